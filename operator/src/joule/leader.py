"""Leader election on a ``coordination.k8s.io/v1`` Lease, with client-go's semantics.

The chart runs more than one replica of the operator so that a lost node does not stop every
job's lifecycle for minutes; only the replica holding the Lease reconciles, the others wait as
standbys. The rules are client-go's ``leaderelection`` (the ones kube-controller-manager and
controller-runtime follow), so a reader who knows those knows these:

- The Lease records ``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``,
  ``renewTime`` and ``leaseTransitions``. Every write quotes the ``resourceVersion`` it read,
  so of two candidates writing at once the API server accepts one and refuses the other (409).
- A standby judges expiry by its own monotonic clock: the lease has expired once the record
  has not changed for ``leaseDurationSeconds`` since this replica *saw* it change. Wall clocks
  of different nodes are never compared.
- The leader renews every retry period; if it could not renew for the renew deadline (shorter
  than the lease duration) it stops leading at once, before a standby may take over.
- On a clean shutdown the leader releases the lease (no holder, duration 1 s), so a rolling
  update hands over within a retry period instead of a lease duration.

The ``kubernetes`` package ships a ``leaderelection`` module with a Lease lock, but it times
expiry with ``time.time()`` (which jumps when NTP steps the clock), never counts
``leaseTransitions``, cannot release, gives its HTTP calls no timeout (so a hung renewal can
outlive the deadline), builds its client from the global configuration and blocks the calling
thread in its renew loop. The loop is small, so it lives here: the decisions (``observe``,
``decide``, ``next_record``, ``released``) are pure functions tested with fake clocks,
``LeaseLock`` does the API calls, and ``LeaderElector`` runs the two loops (wait as a
standby, renew as the leader).
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from joule.metrics import LEADER

log = logging.getLogger("joule.leader")


@dataclass(frozen=True)
class LeaseRecord:
    """A Lease's election fields. ``holder`` is empty when nobody holds it (released)."""

    holder: str
    duration_seconds: int
    acquire_time: dt.datetime | None
    renew_time: dt.datetime | None
    transitions: int
    # What an update must quote; not part of the record's identity (see ``observe``).
    resource_version: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Observation:
    """The record last read, and when (monotonic seconds) it was first seen as it is."""

    record: LeaseRecord
    since: float


class Action(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # we hold it
    TAKE = "take"  # free, or its holder stopped renewing
    WAIT = "wait"  # someone else holds it and is renewing


def observe(previous: Observation | None, record: LeaseRecord, now: float) -> Observation:
    """client-go's observedTime: the clock restarts only when the record itself changes.

    A renewal changes ``renewTime``, so a live leader keeps restarting every standby's clock;
    a dead one leaves the record as it was, and the clock runs out. The resourceVersion is
    carried along (the next write must quote the newest) but does not restart the clock.
    """
    if previous is not None and previous.record == record:
        return Observation(record, previous.since)
    return Observation(record, now)


def expired(observation: Observation, now: float) -> bool:
    """Whether the holder has had its full lease duration, by our clock, to renew and did not."""
    return now >= observation.since + observation.record.duration_seconds


def decide(identity: str, observation: Observation | None, now: float) -> Action:
    if observation is None:
        return Action.CREATE
    holder = observation.record.holder
    if holder == identity:
        return Action.RENEW
    if not holder or expired(observation, now):
        return Action.TAKE
    return Action.WAIT


def next_record(
    identity: str,
    current: LeaseRecord | None,
    action: Action,
    wall: dt.datetime,
    duration_seconds: int,
) -> LeaseRecord:
    """The record to write for ``action`` (not WAIT), quoting ``current``'s resourceVersion."""
    if action is Action.WAIT:
        raise ValueError("nothing to write while waiting")
    if current is None or action is Action.CREATE:
        return LeaseRecord(identity, duration_seconds, wall, wall, 0)
    if action is Action.RENEW:
        return replace(
            current,
            duration_seconds=duration_seconds,
            acquire_time=current.acquire_time or wall,
            renew_time=wall,
        )
    # A change of holder counts as a transition, also after a release (as in client-go).
    return LeaseRecord(
        identity, duration_seconds, wall, wall, current.transitions + 1, current.resource_version
    )


def released(current: LeaseRecord, wall: dt.datetime) -> LeaseRecord:
    """What the leader writes on a clean shutdown: no holder, and a 1 s duration for any
    candidate that waits for expiry rather than for an empty holder."""
    return LeaseRecord("", 1, wall, wall, current.transitions, current.resource_version)


class Conflict(Exception):
    """The Lease changed (or appeared) since it was read: another candidate wrote first."""


class LeaseStore(Protocol):
    """One Lease, read and written with optimistic concurrency; ``timeout`` bounds each call."""

    def get(self, timeout: float) -> LeaseRecord | None: ...

    def create(self, record: LeaseRecord, timeout: float) -> LeaseRecord: ...

    def update(self, record: LeaseRecord, timeout: float) -> LeaseRecord: ...


class LeaseLock:
    """``LeaseStore`` on the API server (``CoordinationV1Api``)."""

    def __init__(self, api: Any, namespace: str, name: str) -> None:
        self.api = api  # kubernetes.client.CoordinationV1Api; not imported at module level
        self.namespace = namespace
        self.name = name

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def get(self, timeout: float) -> LeaseRecord | None:
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self.api.read_namespaced_lease(
                self.name, self.namespace, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _record(lease)

    def create(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        from kubernetes.client.exceptions import ApiException

        body = {"metadata": {"name": self.name}, "spec": _spec(record)}
        try:
            lease = self.api.create_namespaced_lease(self.namespace, body, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 409:  # AlreadyExists: another candidate created it first
                raise Conflict(str(self)) from None
            raise
        return _record(lease)

    def update(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        from kubernetes.client.exceptions import ApiException

        body = {
            "metadata": {"name": self.name, "resourceVersion": record.resource_version},
            "spec": _spec(record),
        }
        try:
            lease = self.api.replace_namespaced_lease(
                self.name, self.namespace, body, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status in (404, 409):  # changed, or deleted, since we read it
                raise Conflict(str(self)) from None
            raise
        return _record(lease)


def _micro_time(value: dt.datetime | None) -> str | None:
    # MicroTime's wire format; isoformat() drops the fraction when it is zero, which the API
    # server's RFC3339Micro parser refuses.
    if value is None:
        return None
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _spec(record: LeaseRecord) -> dict[str, Any]:
    return {
        "holderIdentity": record.holder or None,
        "leaseDurationSeconds": record.duration_seconds,
        "acquireTime": _micro_time(record.acquire_time),
        "renewTime": _micro_time(record.renew_time),
        "leaseTransitions": record.transitions,
    }


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    version = lease.metadata.resource_version
    if spec is None:
        return LeaseRecord("", 0, None, None, 0, version)
    return LeaseRecord(
        holder=spec.holder_identity or "",
        duration_seconds=spec.lease_duration_seconds or 0,
        acquire_time=spec.acquire_time,
        renew_time=spec.renew_time,
        transitions=spec.lease_transitions or 0,
        resource_version=version,
    )


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """Waits for the Lease (``acquire``), then renews it on a thread (``start_renewing``)
    until ``release`` or until renewing fails for the renew deadline, when ``on_lost`` is
    called: it must stop all reconciling at once (the operator exits the process)."""

    def __init__(
        self,
        store: LeaseStore,
        identity: str,
        *,
        lease_duration: int = 8,
        renew_deadline: float = 6.0,
        retry_period: float = 1.0,
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _utcnow,
        jitter: Callable[[], float] = lambda: random.uniform(1.0, 1.2),
    ) -> None:
        self.store = store
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.on_lost = on_lost
        self.clock = clock
        self.wall = wall
        # Standbys retry a little apart (client-go's JitterUntil, factor 1.2), so that two
        # of them started together do not keep colliding.
        self.jitter = jitter
        self.observation: Observation | None = None
        self.leading = False
        self.connected = False  # the Lease has been read (or found absent) once
        self.renewed_at: float | None = None  # when the last successful renewal began
        self.beat: float | None = None  # when a loop last ran (the liveness probe reads it)
        self.stop = threading.Event()  # ends the renew loop (release sets it)
        self.thread: threading.Thread | None = None
        LEADER.set(0)

    # One step, as client-go's tryAcquireOrRenew.

    def try_acquire_or_renew(self, deadline: float | None = None) -> bool:
        """Read the Lease and write it if we hold it or may take it; True when we hold it."""
        started = self.clock()
        current = self.store.get(self._timeout(deadline))
        self.connected = True
        if current is None:
            action = Action.CREATE
        else:
            before = self.observation.record.holder if self.observation else None
            self.observation = observe(self.observation, current, started)
            if current.holder != before and current.holder != self.identity:
                log.info(
                    "lease %s is held by %s", self.store, current.holder or "nobody (released)"
                )
            action = decide(self.identity, self.observation, started)
            if action is Action.WAIT:
                return False
            if self.leading and action is Action.TAKE:
                return False  # someone else holds it now: lost, never silently taken back
        record = next_record(self.identity, current, action, self.wall(), self.lease_duration)
        try:
            if action is Action.CREATE:
                written = self.store.create(record, self._timeout(deadline))
            else:
                written = self.store.update(record, self._timeout(deadline))
        except Conflict:
            return False  # another candidate wrote first; read again next period
        # Timed from before the read: the others' clocks started no earlier than our write.
        self.observation = Observation(written, started)
        self.renewed_at = started
        return True

    def _timeout(self, deadline: float | None) -> float:
        # Every call ends before the renew deadline, so a hung request cannot keep a leader
        # that no longer holds the lease reconciling.
        if deadline is None:
            return max(self.renew_deadline, 1.0)
        return min(max(deadline - self.clock(), 0.1), self.renew_deadline)

    # The standby's loop.

    def acquire(self, until: threading.Event) -> bool:
        """Poll every retry period until we hold the Lease (True) or ``until`` is set."""
        log.info("waiting for lease %s as %s", self.store, self.identity)
        while not until.is_set():
            self.beat = self.clock()
            try:
                if self.try_acquire_or_renew():
                    self._became_leader()
                    return True
            except Exception as exc:  # the API server is away: keep waiting
                log.warning("lease %s: %s; retrying", self.store, _brief(exc))
            until.wait(self.retry_period * self.jitter())
        return False

    def _became_leader(self) -> None:
        self.leading = True
        LEADER.set(1)
        record = self.observation.record if self.observation else None
        log.info(
            "acquired lease %s as %s (transitions: %s)",
            self.store,
            self.identity,
            record.transitions if record else 0,
        )

    # The leader's loop.

    def start_renewing(self) -> None:
        self.thread = threading.Thread(target=self.renew_loop, name="joule-lease", daemon=True)
        self.thread.start()

    def renew_loop(self) -> None:
        """Renew every retry period; give up (``on_lost``) when the renew deadline passes
        without a successful renewal, or at once when another replica holds the lease."""
        while not self.stop.wait(self.retry_period):
            now = self.clock()
            self.beat = now
            assert self.renewed_at is not None  # set by the acquiring write
            deadline = self.renewed_at + self.renew_deadline
            error = ""
            try:
                if self.try_acquire_or_renew(deadline):
                    continue
            except Exception as exc:
                error = _brief(exc)
            if self.stop.is_set():
                return  # released meanwhile: not a loss
            holder = self.observation.record.holder if self.observation else self.identity
            if holder != self.identity:  # taken over, or cleared by hand: never re-taken
                self._lost(f"lease {self.store} is now held by {holder or 'nobody'}")
                return
            if self.clock() >= deadline:
                self._lost(
                    f"could not renew lease {self.store} for {self.renew_deadline:g}s"
                    + (f" ({error})" if error else "")
                )
                return
            if error:
                log.warning("renewing lease %s failed, retrying: %s", self.store, error)

    def _lost(self, reason: str) -> None:
        self.leading = False
        LEADER.set(0)
        self.on_lost(reason)

    def renewing(self) -> bool:
        """False once the renewal thread has ended (for any reason but ``release``)."""
        return self.thread is None or self.thread.is_alive() or self.stop.is_set()

    # Clean shutdown.

    def release(self) -> bool:
        """Stop renewing and hand the lease back, so that a standby takes it within one retry
        period. Only after the caller stopped reconciling. True when it was released."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(self.renew_deadline + self.retry_period)
        if not self.leading or self.observation is None:
            return False
        if self.observation.record.holder != self.identity:
            return False
        self.leading = False
        LEADER.set(0)
        try:
            self.store.update(released(self.observation.record, self.wall()), self.renew_deadline)
        except Conflict:
            log.warning("lease %s changed meanwhile: not released", self.store)
            return False
        except Exception as exc:  # the standby takes over when the lease expires instead
            log.warning("releasing lease %s failed: %s", self.store, _brief(exc))
            return False
        log.info("released lease %s as %s", self.store, self.identity)
        return True


def _brief(exc: Exception) -> str:
    """One line for an API error (ApiException's str() is the whole response)."""
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"{status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
