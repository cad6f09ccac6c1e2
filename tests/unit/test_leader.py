"""Leader election's rules with fake clocks and an in-memory Lease that enforces
resourceVersions the way the API server does."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from joule.leader import (
    Action,
    Conflict,
    LeaderElector,
    LeaseLock,
    LeaseRecord,
    Observation,
    decide,
    expired,
    next_record,
    observe,
    released,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def leader_gauge() -> float | None:
    return REGISTRY.get_sample_value("joule_operator_leader")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLease:
    """One Lease: a write must quote the current resourceVersion, as on the API server."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.fail: Exception | None = None
        self.writes: list[LeaseRecord] = []

    def __str__(self) -> str:
        return "ns/lease"

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        self.writes.append(self.record)
        return self.record

    def get(self, timeout: float) -> LeaseRecord | None:
        if self.fail:
            raise self.fail
        return self.record

    def create(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        if self.fail:
            raise self.fail
        if self.record is not None:
            raise Conflict("exists")
        return self._store(record)

    def update(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        if self.fail:
            raise self.fail
        if self.record is None or record.resource_version != self.record.resource_version:
            raise Conflict("changed")
        return self._store(record)


def elector(lease: FakeLease, identity: str, clock: Clock, lost: list[str] | None = None):
    return LeaderElector(
        lease,
        identity,
        lease_duration=8,
        renew_deadline=6.0,
        retry_period=1.0,
        on_lost=(lost.append if lost is not None else lambda _r: None),
        clock=clock,
        wall=lambda: T0 + dt.timedelta(seconds=clock.now),
        jitter=lambda: 1.0,
    )


def record(holder: str, renewed: float = 0.0, transitions: int = 0) -> LeaseRecord:
    at = T0 + dt.timedelta(seconds=renewed)
    return LeaseRecord(holder, 8, at, at, transitions, "7")


# The pure rules.


def test_the_expiry_clock_restarts_only_when_the_record_changes():
    first = observe(None, record("a", renewed=1), now=10.0)
    # Read again unchanged (a new resourceVersion alone is no change): the clock keeps running.
    same = observe(first, replace(record("a", renewed=1), resource_version="8"), now=15.0)
    assert same.since == 10.0 and same.record.resource_version == "8"
    assert not expired(same, 17.9)
    assert expired(same, 18.0)
    # The holder renewed: our clock starts over, whatever its wall-clock renewTime says.
    renewed = observe(same, record("a", renewed=-3600), now=17.0)
    assert renewed.since == 17.0 and not expired(renewed, 24.0)


def test_expiry_ignores_the_holders_wall_clock():
    # A renewTime far in the past (a node whose clock is behind) does not make the lease
    # expired for a replica that just saw it change.
    seen = observe(None, record("a", renewed=-86400), now=50.0)
    assert decide("b", seen, 51.0) is Action.WAIT


@pytest.mark.parametrize(
    ("holder", "elapsed", "action"),
    [
        ("b", 0.0, Action.RENEW),  # ours, even if we were slow
        ("b", 30.0, Action.RENEW),
        ("a", 7.9, Action.WAIT),
        ("a", 8.0, Action.TAKE),  # its holder stopped renewing
        ("", 0.0, Action.TAKE),  # released
    ],
)
def test_decide(holder, elapsed, action):
    seen = Observation(record(holder), since=100.0)
    assert decide("b", seen, 100.0 + elapsed) is action
    assert decide("b", None, 0.0) is Action.CREATE


def test_records_written_for_each_action():
    now = T0 + dt.timedelta(seconds=42)
    created = next_record("b", None, Action.CREATE, now, 8)
    assert (created.holder, created.acquire_time, created.renew_time, created.transitions) == (
        "b",
        now,
        now,
        0,
    )
    mine = record("b", renewed=1, transitions=3)
    renewed = next_record("b", mine, Action.RENEW, now, 8)
    assert renewed.acquire_time == mine.acquire_time and renewed.renew_time == now
    assert renewed.transitions == 3 and renewed.resource_version == "7"
    taken = next_record("b", record("a", transitions=3), Action.TAKE, now, 8)
    assert (taken.holder, taken.acquire_time, taken.transitions) == ("b", now, 4)
    assert taken.resource_version == "7"  # the write is conditional on what we read
    free = released(mine, now)
    assert (free.holder, free.duration_seconds, free.transitions) == ("", 1, 3)
    with pytest.raises(ValueError):
        next_record("b", mine, Action.WAIT, now, 8)


# The elector against the fake Lease.


def test_the_first_candidate_creates_the_lease_and_the_second_waits_until_it_expires():
    lease, clock = FakeLease(), Clock()
    a, b = elector(lease, "a", clock), elector(lease, "b", clock)
    assert a.try_acquire_or_renew() and lease.record.holder == "a"
    assert not b.try_acquire_or_renew()
    clock.advance(1)
    assert a.try_acquire_or_renew()  # renews: b's clock restarts at its next read
    # a dies after that renewal (at 101). b first sees it at 102, so it waits until 110:
    # expiry counts from when this replica saw the change, not from the renewTime.
    for _ in range(8):
        clock.advance(1)
        assert not b.try_acquire_or_renew()
    clock.advance(1)
    assert clock.now == 110.0
    assert b.try_acquire_or_renew()
    assert (lease.record.holder, lease.record.transitions) == ("b", 1)


def test_of_two_candidates_taking_an_expired_lease_at_once_only_one_wins():
    lease, clock = FakeLease(), Clock()
    lease._store(record("dead"))
    x, y = elector(lease, "x", clock), elector(lease, "y", clock)
    assert not x.try_acquire_or_renew() and not y.try_acquire_or_renew()
    clock.advance(9)
    stale = lease.get(1.0)
    lease.get = lambda timeout: stale  # both read before either writes
    assert x.try_acquire_or_renew()
    # y's write quotes the resourceVersion it read, which x's write has just replaced.
    assert not y.try_acquire_or_renew()
    assert (lease.record.holder, lease.record.transitions) == ("x", 1)
    assert [w.holder for w in lease.writes] == ["dead", "x"]


def test_a_racing_create_is_a_conflict_not_an_error():
    lease, clock = FakeLease(), Clock()
    a = elector(lease, "a", clock)
    lease.get = lambda timeout: None  # read before the other created it
    lease._store(record("other"))
    assert not a.try_acquire_or_renew()


def test_a_released_lease_is_taken_without_waiting_for_expiry():
    lease, clock = FakeLease(), Clock()
    a, b = elector(lease, "a", clock), elector(lease, "b", clock)
    assert a.try_acquire_or_renew()
    a.leading = True
    assert not b.try_acquire_or_renew()
    assert a.release()
    assert lease.record.holder == "" and lease.record.duration_seconds == 1
    assert b.try_acquire_or_renew()
    assert (lease.record.holder, lease.record.transitions) == ("b", 1)


def test_release_leaves_a_lease_someone_else_holds_alone():
    lease, clock = FakeLease(), Clock()
    a = elector(lease, "a", clock)
    assert not a.release()  # never held
    assert a.try_acquire_or_renew()
    a.leading = True
    lease.record = replace(lease.record, holder="b")  # taken while we were not looking
    a.observation = observe(a.observation, lease.record, clock.now)
    writes = len(lease.writes)
    assert not a.release()
    assert len(lease.writes) == writes


def test_acquire_waits_as_a_standby_and_logs_the_holder(caplog):
    lease, clock = FakeLease(), Clock()
    lease._store(record("a"))
    b = elector(lease, "b", clock)
    stop = threading.Event()
    sleeps: list[float] = []

    def wait(seconds: float) -> bool:  # stands in for the retry sleep
        sleeps.append(seconds)
        clock.advance(seconds)
        return False

    stop.wait = wait  # type: ignore[method-assign]
    caplog.set_level("INFO", logger="joule.leader")
    assert b.acquire(until=stop)
    assert b.leading and leader_gauge() == 1
    # Polled every retry period; took over once 8 s had passed since it first saw the record.
    assert sleeps == [1.0] * 8
    assert "lease ns/lease is held by a" in caplog.text
    assert "acquired lease ns/lease as b (transitions: 1)" in caplog.text


def test_acquire_keeps_waiting_through_api_errors_and_stops_when_told():
    lease, clock = FakeLease(), Clock()
    lease.fail = ConnectionError("refused")
    a = elector(lease, "a", clock)
    stop = threading.Event()
    calls = []

    def wait(seconds: float) -> bool:
        calls.append(seconds)
        if len(calls) == 3:
            stop.set()
        return stop.is_set()

    stop.wait = wait  # type: ignore[method-assign]
    assert not a.acquire(until=stop)
    assert not a.connected and not a.leading and len(calls) == 3


def run_renewals(a: LeaderElector, clock: Clock, rounds: int, each=None) -> None:
    """Drive renew_loop for ``rounds`` retry periods with a fake sleep."""
    count = [0]

    def wait(seconds: float) -> bool:
        clock.advance(seconds)
        count[0] += 1
        if each:
            each(count[0])
        return count[0] > rounds

    a.stop.wait = wait  # type: ignore[method-assign]
    a.renew_loop()


def test_the_leader_renews_every_retry_period():
    lease, clock = FakeLease(), Clock()
    a = elector(lease, "a", clock, lost := [])
    assert a.acquire(threading.Event())
    run_renewals(a, clock, rounds=5)
    assert not lost
    assert [w.renew_time for w in lease.writes] == [
        T0 + dt.timedelta(seconds=100 + i) for i in range(6)
    ]
    assert {w.acquire_time for w in lease.writes} == {T0 + dt.timedelta(seconds=100)}


def test_the_leader_gives_up_when_it_cannot_renew_within_the_deadline():
    lease, clock = FakeLease(), Clock()
    a = elector(lease, "a", clock, lost := [])
    assert a.acquire(threading.Event())

    def outage(tick: int) -> None:
        if tick == 2:
            lease.fail = TimeoutError("read timed out")

    run_renewals(a, clock, rounds=20, each=outage)
    assert len(lost) == 1 and "could not renew lease ns/lease for 6s" in lost[0]
    assert "TimeoutError" in lost[0]
    # Renewed at 101, then failed from 102: it gives up at 107, before a standby that saw
    # the 101 renewal may take over (at 109 or later).
    assert clock.now == 107.0
    assert not a.leading and leader_gauge() == 0


def test_the_leader_gives_up_at_once_when_another_holds_the_lease():
    lease, clock = FakeLease(), Clock()
    a = elector(lease, "a", clock, lost := [])
    assert a.acquire(threading.Event())

    def stolen(tick: int) -> None:
        if tick == 2:
            lease._store(record("b", transitions=1))

    run_renewals(a, clock, rounds=20, each=stolen)
    assert lost == ["lease ns/lease is now held by b"]
    assert clock.now == 102.0
    assert lease.record.holder == "b"  # never taken back


def test_conflicting_renewals_are_retried_until_the_deadline():
    lease, clock = FakeLease(), Clock()
    a = elector(lease, "a", clock, lost := [])
    assert a.acquire(threading.Event())
    real_update = lease.update
    refusals = [0]

    def flaky(record: LeaseRecord, timeout: float) -> LeaseRecord:
        if refusals[0] < 2:
            refusals[0] += 1
            raise Conflict("changed")
        return real_update(record, timeout)

    lease.update = flaky
    run_renewals(a, clock, rounds=6)
    assert not lost and a.leading and refusals[0] == 2


def test_requests_never_outlast_the_renew_deadline():
    clock = Clock()
    a = elector(FakeLease(), "a", clock)
    assert a._timeout(None) == 6.0
    assert a._timeout(clock.now + 2.5) == 2.5
    assert a._timeout(clock.now - 1) == 0.1


# The API edge.


class FakeCoordination:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def replace_namespaced_lease(self, name, namespace, body, _request_timeout):
        from kubernetes.client.exceptions import ApiException

        self.calls.append(("replace", body))
        raise ApiException(status=409, reason="Conflict")

    def create_namespaced_lease(self, namespace, body, _request_timeout):
        self.calls.append(("create", body))
        from kubernetes import client

        spec = body["spec"]
        return client.V1Lease(
            metadata=client.V1ObjectMeta(name="l", resource_version="1"),
            spec=client.V1LeaseSpec(
                holder_identity=spec["holderIdentity"],
                lease_duration_seconds=spec["leaseDurationSeconds"],
                lease_transitions=spec["leaseTransitions"],
            ),
        )

    def read_namespaced_lease(self, name, namespace, _request_timeout):
        from kubernetes.client.exceptions import ApiException

        raise ApiException(status=404, reason="Not Found")


def test_lease_lock_writes_micro_time_and_maps_conflicts():
    api = FakeCoordination()
    lock = LeaseLock(api, "ns", "l")
    assert lock.get(1.0) is None
    whole_second = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    written = lock.create(LeaseRecord("a", 8, whole_second, whole_second, 0), 1.0)
    assert (written.holder, written.resource_version) == ("a", "1")
    spec = api.calls[0][1]["spec"]
    # isoformat() would drop the zero fraction, which the API server refuses.
    assert spec["renewTime"] == "2026-01-01T12:00:00.000000Z"
    with pytest.raises(Conflict):
        lock.update(replace(written, holder=""), 1.0)
    assert api.calls[1][1]["metadata"]["resourceVersion"] == "1"
    assert api.calls[1][1]["spec"]["holderIdentity"] is None
