"""``/healthz`` (liveness) and ``/readyz`` (readiness) for the kubelet's probes.

The verdicts are pure functions of a ``Vitals`` snapshot (monotonic timestamps and flags that
the runner reads off the elector, kopf's event loop and the resync scheduler), so every rule is
unit-tested with made-up times; the HTTP server only asks for a snapshot and answers.

Liveness fails only when a restart would help: a loop that should tick has not for far longer
than it ever should (the runner's ``Limits`` are generous multiples), or a thread that must
run has died. A slow API server is not a reason: the leader exits on its own when it cannot
renew its lease, and a restart would not make the API server faster.

Readiness says the replica does what it is for. A leader is ready once it is connected and has
reconciled every job of its first listing (kopf's ``ready_flag`` rises earlier, before the
first listing, so the runner also tracks the listed jobs with ``InitialSync``). A standby that
is connected and waiting for the lease is a healthy replica and is ready too: otherwise a
rolling update of a two-replica Deployment would wait forever for a standby to become ready,
and a PodDisruptionBudget would count healthy standbys as broken.

kopf's own ``liveness_endpoint`` is not used: it serves only while kopf runs, which a standby
does not, and it cannot see the resync thread or the lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("joule.health")
Key = tuple[str, str]


@dataclass(frozen=True)
class Vitals:
    """What the probes judge, read at one instant. Times are ``time.monotonic()`` seconds;
    None means "not started yet" (nothing to judge)."""

    now: float
    # A call to the API server has succeeded (the lease was read, or the jobs listed).
    connected: bool
    # This replica reconciles: it holds the lease, or runs without election.
    leading: bool
    # Whether this replica takes part in an election at all.
    electing: bool = False
    # The election's loop last ran (standby: polling; leader: renewing).
    elector_beat: float | None = None
    # False when the leader's renewal thread has ended.
    renewing: bool = True
    # kopf's event loop last ran our heartbeat coroutine.
    loop_beat: float | None = None
    # The resync thread runs (None: not started).
    scheduler_alive: bool | None = None
    # The known job reconciled least recently, and when.
    stalest: tuple[str, float] | None = None
    # Every job of the first listing has been reconciled once (and kopf's startup is done).
    synced: bool = False


@dataclass(frozen=True)
class Limits:
    """How long each loop may go without ticking before the process counts as wedged."""

    # The election loop ticks every retry period; a dead-slow API call is bounded by the
    # renew deadline, so several lease durations without a tick is not slowness.
    elector_stale: float = 30.0
    # kopf's loop runs our heartbeat every second; handlers run on threads, not on the loop.
    loop_stale: float = 60.0
    # Every known job is resynced every resync period at the latest, and each reconcile's
    # API calls time out after 30 s; past this a worker or the resync thread is stuck.
    reconcile_stale: float = 120.0

    @classmethod
    def for_periods(cls, resync_seconds: float, lease_duration: float) -> Limits:
        return cls(
            elector_stale=max(30.0, 4 * lease_duration),
            loop_stale=60.0,
            reconcile_stale=max(120.0, 4 * resync_seconds + 30.0),
        )


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = "ok"


def liveness(v: Vitals, limits: Limits) -> Verdict:
    if v.electing:
        if v.leading and not v.renewing:
            return Verdict(False, "the lease renewal thread has ended")
        if v.elector_beat is not None and v.now - v.elector_beat > limits.elector_stale:
            return Verdict(
                False, f"the leader election loop has not run for {v.now - v.elector_beat:.0f}s"
            )
    if v.loop_beat is not None and v.now - v.loop_beat > limits.loop_stale:
        return Verdict(False, f"kopf's event loop has not run for {v.now - v.loop_beat:.0f}s")
    if v.scheduler_alive is False:
        return Verdict(False, "the resync thread has ended")
    # No known job, nothing to be late for: a wedged resync with no jobs harms nobody.
    if v.stalest is not None:
        job, at = v.stalest
        if v.now - at > limits.reconcile_stale:
            return Verdict(False, f"job {job} has not been reconciled for {v.now - at:.0f}s")
    return Verdict(True)


def readiness(v: Vitals) -> Verdict:
    if not v.connected:
        return Verdict(False, "not connected to the API server yet")
    if not v.leading:
        return Verdict(True)  # a standby waiting for the lease is healthy (module docstring)
    if not v.synced:
        return Verdict(False, "the jobs of the first listing are not all reconciled yet")
    return Verdict(True)


class InitialSync:
    """The jobs that existed when this replica began to reconcile, until each has been
    reconciled once, or is gone (deleted before kopf listed it, so it never will be)."""

    def __init__(self, listed: Iterable[Key]) -> None:
        self.pending: frozenset[Key] = frozenset(listed)

    def update(self, reconciled: Collection[Key], existing: Collection[Key] | None = None) -> bool:
        """Drop what was reconciled (and, given a fresh listing, what no longer exists);
        True when nothing is pending."""
        pending = self.pending.difference(reconciled)
        if existing is not None:
            pending = pending.intersection(existing)
        self.pending = pending
        return self.done

    @property
    def done(self) -> bool:
        return not self.pending


def answer(path: str, vitals: Callable[[], Vitals], limits: Limits) -> tuple[int, str]:
    """The status code and one-line body for a probe request."""
    if path not in ("/healthz", "/readyz"):
        return 404, "not found: try /healthz or /readyz"
    try:
        snapshot = vitals()
    except Exception as exc:  # a probe must answer; a broken snapshot is itself a failure
        return 500, f"could not read the operator's state: {type(exc).__name__}: {exc}"
    if path == "/healthz":
        verdict = liveness(snapshot, limits)
        return (200, "ok") if verdict.ok else (500, verdict.reason)
    verdict = readiness(snapshot)
    return (200, "ok") if verdict.ok else (503, verdict.reason)


class ProbeServer:
    """The probes on a standard-library HTTP server in a daemon thread (no event loop: the
    standby has none, and a wedged kopf loop must not silence its own liveness probe)."""

    def __init__(
        self, port: int, vitals: Callable[[], Vitals], limits: Limits, host: str = "0.0.0.0"
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = answer(self.path.split("?", 1)[0], vitals, limits)
                data = (body.splitlines()[0] if body else "").encode() + b"\n"
                self.send_response(code)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # the kubelet asks every few seconds; a line each would drown the log

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="joule-probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> ProbeServer:
        self.thread.start()
        log.info("probes on :%d/healthz and /readyz", self.port)
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
