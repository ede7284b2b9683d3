"""Rendezvous placement: stable, balanced, and minimal movement when a worker is added."""

from __future__ import annotations

from collections import Counter

from broker.placement import replicas_for_slot, slot_map


def test_placement_is_pinned() -> None:
    # Golden values: a change here moves data on every existing cluster after an upgrade.
    assert replicas_for_slot(0, ["w1", "w2", "w3", "w4"], 3) == ["w4", "w2", "w1"]
    assert replicas_for_slot(1023, ["w1", "w2", "w3", "w4"], 3) == ["w3", "w4", "w2"]


def test_placement_ignores_worker_order() -> None:
    assert slot_map(64, ["a", "b", "c", "d"], 2) == slot_map(64, ["d", "c", "b", "a"], 2)


def test_slots_are_balanced_across_workers() -> None:
    workers = [f"w{i}" for i in range(1, 7)]
    counts = Counter(w for reps in slot_map(1024, workers, 3).values() for w in reps)
    ideal = 1024 * 3 / len(workers)
    assert all(abs(c - ideal) / ideal < 0.15 for c in counts.values()), counts


def test_adding_a_worker_moves_about_one_in_n_plus_one() -> None:
    before = slot_map(1024, ["w1", "w2", "w3", "w4"], 3)
    after = slot_map(1024, ["w1", "w2", "w3", "w4", "w5"], 3)
    moved = sum(len(set(after[s]) - set(before[s])) for s in before)
    ideal = 1024 * 3 / 5  # replicas the new worker should take
    assert abs(moved - ideal) / ideal < 0.15
    # Only the new worker gains replicas: nothing moves between old workers.
    assert all(set(after[s]) - set(before[s]) <= {"w5"} for s in before)
