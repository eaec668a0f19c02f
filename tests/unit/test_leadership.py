"""The controller's leader election against an in-memory Lease with the API server's resourceVersion rules."""

from __future__ import annotations

import copy
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
from kubernetes.client import ApiException, V1Lease

from checkpointer.adapters.kube import Kube
from checkpointer.controller.leadership import LEASE_NAME, Leadership, may_acquire

T0 = datetime.datetime(2025, 1, 1, 12, 0, 0, 1, tzinfo=datetime.UTC)
NAMESPACE = "checkpointer-system"


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("holder", "renewed", "now", "expected"),
    [
        (None, None, 0, True),  # nobody holds it
        ("", at(0), 1, True),  # given up
        ("me", at(0), 1, True),  # ours already (a restart of this pod)
        ("other", at(0), 1, False),
        ("other", at(0), 10, False),  # expiry is strictly after renewTime + duration
        ("other", at(0), 10.001, True),
        ("other", None, 0, True),  # a holder that never renewed holds nothing
    ],
)
def test_may_acquire(holder: str | None, renewed: datetime.datetime | None, now: float, expected: bool) -> None:
    assert may_acquire(holder, renewed, 10, at(now), "me") is expected


class FakeLeases:
    """One Lease, written as the API server writes it: a stale resourceVersion is a 409 Conflict."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        # Called once just before the next write: another candidate's turn in between.
        self.before_write: Callable[[], None] | None = None
        self.fail_writes = 0
        self.lose_answers = 0

    def read_lease(self, namespace: str, name: str) -> V1Lease | None:
        return V1Lease.from_dict(copy.deepcopy(self.lease)) if self.lease else None

    def _hook(self) -> None:
        hook, self.before_write = self.before_write, None
        if hook:
            hook()
        if self.fail_writes:
            self.fail_writes -= 1
            raise ApiException(status=503, reason="Service Unavailable")

    def _store(self, body: dict[str, Any]) -> V1Lease:
        self.version += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.version)
        if self.lose_answers:
            self.lose_answers -= 1
            raise TimeoutError("the answer was lost")
        written = self.read_lease(NAMESPACE, LEASE_NAME)
        assert written is not None
        return written

    def create_lease(self, namespace: str, body: dict[str, Any], timeout: float | None = None) -> V1Lease:
        self._hook()
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        return self._store(body)

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any], timeout: float | None = None) -> V1Lease:
        self._hook()
        if self.lease is None:
            raise ApiException(status=404, reason="NotFound")
        if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        return self._store(body)

    @property
    def holder(self) -> str | None:
        return self.lease["spec"].get("holderIdentity") if self.lease else None


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime.datetime:
        return self.now


class Fences:
    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fenced = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.fenced.set()


def candidate(
    leases: FakeLeases, me: str, clock: Clock | None = None, fences: Fences | None = None, **kwargs: float
) -> Leadership:
    options: dict[str, float] = {"duration": 10.0, "renew_every": 3600.0} | kwargs
    leadership = Leadership(
        cast(Kube, leases),
        NAMESPACE,
        me,
        options["duration"],
        options["renew_every"],
        fence=fences or Fences(),
        clock=clock or Clock(),
    )
    return leadership


@pytest.fixture
def leases() -> FakeLeases:
    return FakeLeases()


def test_the_first_candidate_creates_the_lease_and_the_second_stands_by(leases: FakeLeases) -> None:
    clock = Clock()
    a, b = candidate(leases, "a", clock), candidate(leases, "b", clock)
    assert a.try_acquire()
    assert leases.holder == "a"
    assert leases.lease is not None and leases.lease["spec"]["leaseDurationSeconds"] == 10
    clock.now = at(5)
    assert not b.try_acquire()
    assert b.holder == "a"
    a.release()


def test_two_candidates_racing_for_an_absent_lease_cannot_both_win(leases: FakeLeases) -> None:
    a, b = candidate(leases, "a"), candidate(leases, "b")
    outcome: list[bool] = []
    leases.before_write = lambda: outcome.append(a.try_acquire())
    assert not b.try_acquire()
    assert outcome == [True]
    assert (leases.holder, b.holder) == ("a", "a")
    a.release()


def test_two_candidates_racing_for_an_expired_lease_cannot_both_win(leases: FakeLeases) -> None:
    clock = Clock()
    old = candidate(leases, "old", clock)
    assert old.try_acquire()
    old._stopped.set()  # it died without giving the Lease up
    clock.now = at(11)
    a, b = candidate(leases, "a", clock), candidate(leases, "b", clock)
    outcome: list[bool] = []
    leases.before_write = lambda: outcome.append(a.try_acquire())
    assert not b.try_acquire()
    assert outcome == [True]
    assert leases.holder == "a"
    assert leases.lease is not None and leases.lease["spec"]["leaseTransitions"] == 1
    a.release()


def test_a_renewed_lease_is_not_taken_and_an_expired_one_is(leases: FakeLeases) -> None:
    clock = Clock()
    leader, standby = candidate(leases, "leader", clock), candidate(leases, "standby", clock)
    assert leader.try_acquire()
    for second in (8, 16, 24):
        clock.now = at(second)
        leader.renew()
        clock.now = at(second + 9)
        assert not standby.try_acquire()
    leader._stopped.set()
    clock.now = at(24 + 10.5)
    assert standby.try_acquire()
    assert leases.holder == "standby"
    standby.release()


def test_release_lets_a_standby_take_over_at_once(leases: FakeLeases) -> None:
    clock = Clock()
    leader, standby = candidate(leases, "leader", clock), candidate(leases, "standby", clock)
    assert leader.try_acquire()
    leader.release()
    assert leases.holder is None
    assert standby.try_acquire()
    standby.release()


def test_a_leader_that_cannot_renew_in_time_stops_before_its_lease_expires(leases: FakeLeases) -> None:
    fences = Fences()
    leader = candidate(leases, "leader", fences=fences, duration=1.5, renew_every=0.1)
    started = time.monotonic()
    assert leader.try_acquire()
    leases.fail_writes = 1000
    assert fences.fenced.wait(5)
    elapsed = time.monotonic() - started
    # It fences before the duration (less the margin for exiting) has passed since its last renewal.
    assert 0.9 <= elapsed < 1.5, elapsed
    assert "could not be renewed" in fences.messages[0]
    assert not leader.leading


def test_renewals_that_succeed_keep_the_leader_going(leases: FakeLeases) -> None:
    fences = Fences()
    leader = candidate(leases, "leader", fences=fences, duration=1.0, renew_every=0.1)
    assert leader.try_acquire()
    assert not fences.fenced.wait(1.5)
    assert leases.version > 5
    leader.release()
    assert fences.messages == []


def test_a_leader_whose_lease_was_taken_stops_at_once(leases: FakeLeases) -> None:
    fences = Fences()
    clock = Clock()
    leader = candidate(leases, "leader", clock, fences)
    assert leader.try_acquire()
    assert leases.lease is not None
    leases.lease["spec"]["holderIdentity"] = "usurper"
    leases.lease["metadata"]["resourceVersion"] = "999"
    leader.renew()
    assert fences.fenced.is_set()
    assert "taken over by usurper" in fences.messages[0]


def test_a_renewal_whose_answer_was_lost_is_still_ours(leases: FakeLeases) -> None:
    fences = Fences()
    clock = Clock()
    leader = candidate(leases, "leader", clock, fences)
    assert leader.try_acquire()
    clock.now = at(2)
    leases.lose_answers = 1
    with pytest.raises(TimeoutError):
        leader.renew()
    clock.now = at(4)
    leader.renew()  # a 409: the resourceVersion moved on with our own write
    assert fences.messages == []
    clock.now = at(6)
    leader.renew()
    assert leases.lease is not None and leases.lease["spec"]["renewTime"] == at(6)
    leader.release()


def test_standing_by_ends_when_stopped(leases: FakeLeases) -> None:
    clock = Clock()
    leader, standby = candidate(leases, "leader", clock), candidate(leases, "standby", clock, renew_every=0.05)
    assert leader.try_acquire()
    stopping = threading.Event()
    threading.Timer(0.3, stopping.set).start()
    assert standby.wait_until_leader(stopping) is False
    leader.release()
    assert standby.wait_until_leader(threading.Event()) is True
    standby.release()
