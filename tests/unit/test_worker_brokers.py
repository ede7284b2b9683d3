"""Which broker a worker talks to when several run (worker/brokers.py): the lists paired by index,
moving on round the list, following a standby's leader hint. No sockets."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from client.cli import main
from worker.brokers import AGAIN, AVOID_GONE_FOR, FOLLOW, LEADERLESS_LIMIT, NEXT, WAIT, BrokerList, BrokerPair

pytestmark = pytest.mark.timeout(30)

A, B, C = "tcp://10.0.0.1:5556", "tcp://10.0.0.2:5556", "tcp://10.0.0.3:5556"
PA, PB, PC = "tcp://10.0.0.1:5557", "tcp://10.0.0.2:5557", "tcp://10.0.0.3:5557"


def three() -> BrokerList:
    return BrokerList.parse(f"{A}, {B},{C}", f"{PA},{PB}, {PC}")


def test_the_lists_are_paired_by_index_and_the_first_pair_comes_first() -> None:
    brokers = three()
    assert brokers.several
    assert brokers.pairs == [BrokerPair(A, PA), BrokerPair(B, PB), BrokerPair(C, PC)]
    assert brokers.current == BrokerPair(A, PA)


def test_one_url_each_is_one_broker_and_moving_on_comes_back_to_it() -> None:
    brokers = BrokerList.parse(A, PA)
    assert not brokers.several
    assert brokers.next() == brokers.current == BrokerPair(A, PA)


@pytest.mark.parametrize(("broker", "replication"), [(f"{A},{B}", PA), (A, f"{PA},{PB}"), (" , ", PA)])
def test_lists_of_different_lengths_or_empty_are_refused(broker: str, replication: str) -> None:
    with pytest.raises(ValueError):
        BrokerList.parse(broker, replication)


def test_the_worker_command_refuses_lists_of_different_lengths_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    r = CliRunner().invoke(main, ["worker", "--id", "w1", "--data", str(tmp_path / "w1"),
                                  "--broker", f"{A},{B}", "--replication", PA])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "Error: --broker lists 2 endpoint(s) and --replication 1: give one replication PUB per broker backend, "
        "in the same order (ZKV_WORKER_BROKER, ZKV_WORKER_REPLICATION)"]
    assert not (tmp_path / "w1").exists()  # refused before the data directory is touched


def test_next_goes_round_the_list() -> None:
    brokers = three()
    assert [brokers.next().backend for _ in range(4)] == [B, C, A, B]


def test_a_standby_naming_a_listed_leader_is_followed() -> None:
    brokers = three()
    assert brokers.on_disconnect({"reason": "standby", "leader": C, "replication": PC}) == FOLLOW
    assert brokers.current == BrokerPair(C, PC)
    assert brokers.next() == BrokerPair(A, PA)  # round the list from the leader's place


def test_the_listed_replication_url_wins_over_the_hint_for_a_listed_leader() -> None:
    brokers = three()
    assert brokers.on_disconnect({"reason": "standby", "leader": B, "replication": None}) == FOLLOW
    assert brokers.current == BrokerPair(B, PB)


def test_a_leader_outside_the_list_is_used_as_a_pair_and_left_for_the_list() -> None:
    brokers = three()
    brokers.next()  # at B, a standby
    elsewhere = BrokerPair("tcp://10.0.0.9:5556", "tcp://10.0.0.9:5557")
    assert brokers.on_disconnect({"reason": "standby", "leader": elsewhere.backend,
                                  "replication": elsewhere.replication}) == FOLLOW
    assert brokers.current == elsewhere and brokers.outside == elsewhere
    assert brokers.next() == BrokerPair(C, PC)  # the one after the standby that named it
    assert brokers.outside is None


def test_a_leader_outside_the_list_without_replication_url_cannot_be_followed() -> None:
    brokers = three()
    assert brokers.on_disconnect({"reason": "standby", "leader": "tcp://10.0.0.9:5556", "replication": None}) == WAIT
    assert brokers.current == BrokerPair(A, PA)


@pytest.mark.parametrize("info", [{"reason": "standby", "leader": None, "replication": None},
                                  {"reason": "standby"}, {"reason": "standby", "leader": A, "replication": PA},
                                  {"reason": "standby", "leader": 7}])
def test_a_standby_without_a_usable_leader_is_asked_again(info: dict) -> None:
    brokers = three()
    assert brokers.on_disconnect(info) == WAIT
    assert brokers.current == BrokerPair(A, PA)


def test_a_standby_that_keeps_knowing_no_leader_is_left_for_the_next_broker() -> None:
    """A broker cut off from etcd stands by and knows no leader, while another one leads."""
    brokers = three()
    leaderless = {"reason": "standby", "leader": None, "replication": None}
    assert [brokers.on_disconnect(leaderless) for _ in range(LEADERLESS_LIMIT - 1)] == [WAIT] * (LEADERLESS_LIMIT - 1)
    assert brokers.on_disconnect(leaderless) == NEXT
    assert brokers.current == BrokerPair(B, PB)
    assert brokers.on_disconnect(leaderless) == WAIT  # counted afresh at each broker
    # With one broker there is nowhere else to go: it is asked again, however often.
    one = BrokerList([A], [PA])
    assert all(one.on_disconnect(leaderless) == WAIT for _ in range(10))


@pytest.mark.parametrize("info", [{}, {"reason": "duplicate"}])
def test_a_disconnect_without_the_standby_reason_means_register_again_here(info: dict) -> None:
    brokers = three()
    assert brokers.on_disconnect(info) == AGAIN
    assert brokers.current == BrokerPair(A, PA)


def test_a_broker_found_gone_is_not_followed_back_on_a_stale_hint() -> None:
    """Until a dead or paused leader's lease lapses, a standby still names it; a worker that just
    left it for silence stays with the standby (and follows the new leader as soon as it is
    named) instead of waiting for silence again."""
    brokers = three()
    assert brokers.leave(100.0) == BrokerPair(B, PB)  # A went silent
    stale = {"reason": "standby", "leader": A, "replication": PA}
    assert brokers.on_disconnect(stale, 100.5) == WAIT
    assert brokers.on_disconnect(stale, 101.0) == WAIT
    assert brokers.current == BrokerPair(B, PB)
    assert brokers.on_disconnect({"reason": "standby", "leader": C, "replication": PC}, 101.5) == FOLLOW
    assert brokers.current == BrokerPair(C, PC)
    # Long enough after, a standby naming it is believed again (it is back and leads).
    assert brokers.on_disconnect(stale, 100.0 + AVOID_GONE_FOR) == FOLLOW
    assert brokers.current == BrokerPair(A, PA)
    # Stale hints are not "no leader": they never send the worker on to the next broker.
    brokers = three()
    brokers.leave(0.0)
    assert all(brokers.on_disconnect(stale, 0.1 * i) == WAIT for i in range(10))
    assert brokers.current == BrokerPair(B, PB)
