"""broker/history.py: when a replica's read or scan answer is void."""

from __future__ import annotations

from broker.history import applied_of, void_answer
from broker.state import Pos, Slot


def slot() -> Slot:
    # Epoch 3 wrote seqs 71..238; recovery adopted 238 and epoch 4 writes from 239 on (now at 241).
    return Slot(0, ["w1", "w2", "w3"], last=Pos(241, 4), committed=241, epochs=[(1, 1), (3, 71), (4, 239)])


def test_an_answer_from_the_history_is_good() -> None:
    s = slot()
    assert void_answer(s, 241, [241, 4]) is None
    assert void_answer(s, 200, [238, 3]) is None  # behind, but not below what was committed when asked


def test_an_answer_below_the_floor_is_from_a_replica_that_lost_the_slot() -> None:
    assert void_answer(slot(), 241, [0, 0]) == "lost"
    assert void_answer(slot(), 241, [240]) == "lost"  # (an older worker sends no epoch)


def test_an_old_leaders_uncommitted_writes_are_off_the_history_at_any_seq() -> None:
    s = slot()
    assert void_answer(s, 238, [241, 3]) == "off_history"  # the same seq as the last, another history
    assert void_answer(s, 238, [245, 3]) == "off_history"  # past anything this leader sequenced
    assert void_answer(s, 238, [241]) is None  # without the epoch the broker cannot tell


def test_applied_of_reads_both_forms() -> None:
    assert applied_of([[2, 10, 3], [5, 7]]) == {2: [10, 3], 5: [7]}
    assert void_answer(slot(), 0, None) is None
