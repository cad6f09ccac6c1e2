"""Probe verdicts from made-up timestamps, and the probe server's answers over HTTP."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from dataclasses import replace
from types import SimpleNamespace

import pytest

from joule.health import (
    InitialSync,
    Limits,
    ProbeServer,
    Verdict,
    Vitals,
    answer,
    liveness,
    readiness,
)
from joule.runner import _Runtime, _stalest

LIMITS = Limits(elector_stale=30, loop_stale=60, reconcile_stale=120)
# A leader in good shape at t=1000.
LEADER = Vitals(
    now=1000.0,
    connected=True,
    leading=True,
    electing=True,
    elector_beat=999.5,
    renewing=True,
    loop_beat=999.8,
    scheduler_alive=True,
    stalest=("ml/llm", 990.0),
    synced=True,
)
STANDBY = Vitals(now=1000.0, connected=True, leading=False, electing=True, elector_beat=999.0)


def test_a_healthy_leader_and_a_healthy_standby_are_live_and_ready():
    for v in (LEADER, STANDBY):
        assert liveness(v, LIMITS) == Verdict(True)
        assert readiness(v) == Verdict(True)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"renewing": False}, "the lease renewal thread has ended"),
        ({"elector_beat": 960.0}, "the leader election loop has not run for 40s"),
        ({"loop_beat": 900.0}, "kopf's event loop has not run for 100s"),
        ({"scheduler_alive": False}, "the resync thread has ended"),
        ({"stalest": ("ml/llm", 800.0)}, "job ml/llm has not been reconciled for 200s"),
    ],
)
def test_a_wedged_leader_fails_liveness_saying_why(change, reason):
    assert liveness(replace(LEADER, **change), LIMITS) == Verdict(False, reason)


def test_what_is_not_started_yet_is_not_judged():
    starting = Vitals(now=5.0, connected=False, leading=True)  # no loop, thread, or job yet
    assert liveness(starting, LIMITS).ok
    # A standby's renewal thread has not started, and no job is known: nothing to be late for.
    assert liveness(replace(STANDBY, renewing=False), LIMITS).ok
    assert liveness(replace(LEADER, stalest=None, scheduler_alive=None), LIMITS).ok
    # Without election, the lease's loop is nobody's business.
    assert liveness(replace(LEADER, electing=False, elector_beat=0.0, renewing=False), LIMITS).ok


def test_a_stuck_standby_poll_fails_liveness():
    assert not liveness(replace(STANDBY, elector_beat=900.0), LIMITS).ok


def test_readiness():
    assert readiness(replace(STANDBY, connected=False)) == Verdict(
        False, "not connected to the API server yet"
    )
    # A standby is ready as soon as it is connected: it is a healthy replica.
    assert readiness(replace(STANDBY, synced=False)).ok
    assert readiness(replace(LEADER, synced=False)) == Verdict(
        False, "the jobs of the first listing are not all reconciled yet"
    )


def test_limits_grow_with_long_periods():
    assert Limits.for_periods(30, 8) == Limits(32, 60, 150)
    assert Limits.for_periods(300, 60).reconcile_stale == 1230
    assert Limits.for_periods(300, 60).elector_stale == 240


def test_initial_sync_waits_for_each_listed_job_or_its_deletion():
    sync = InitialSync([("a", "x"), ("a", "y"), ("b", "z")])
    assert not sync.update({("a", "x"), ("c", "new")})
    assert sync.pending == {("a", "y"), ("b", "z")}
    # ("b", "z") was deleted before kopf listed it: a fresh listing drops it.
    assert not sync.update(set(), existing={("a", "y")})
    assert sync.update({("a", "y")})
    assert InitialSync([]).done


def test_answers():
    ok = lambda: LEADER  # noqa: E731
    assert answer("/healthz", ok, LIMITS) == (200, "ok")
    assert answer("/readyz", ok, LIMITS) == (200, "ok")
    wedged = lambda: replace(LEADER, scheduler_alive=False)  # noqa: E731
    assert answer("/healthz", wedged, LIMITS) == (500, "the resync thread has ended")
    unsynced = lambda: replace(LEADER, synced=False)  # noqa: E731
    assert answer("/readyz", unsynced, LIMITS)[0] == 503
    assert answer("/metrics", ok, LIMITS)[0] == 404

    def broken() -> Vitals:
        raise RuntimeError("boom")

    assert answer("/healthz", broken, LIMITS) == (
        500,
        "could not read the operator's state: RuntimeError: boom",
    )


def test_the_probe_server_answers_over_http():
    state = {"vitals": LEADER}
    server = ProbeServer(0, lambda: state["vitals"], LIMITS, host="127.0.0.1").start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        state["vitals"] = replace(LEADER, synced=False)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/readyz?verbose", timeout=5)
        assert err.value.code == 503
        assert err.value.read() == b"the jobs of the first listing are not all reconciled yet\n"
    finally:
        server.close()


def fake_scheduler(seen: dict, known: set):
    thread = SimpleNamespace(ident=1, is_alive=lambda: True)
    return SimpleNamespace(
        seen=seen, known=known, thread=thread, stop=threading.Event(), lock=threading.Lock()
    )


def test_the_stalest_known_job_is_what_liveness_watches():
    sched = fake_scheduler(
        seen={("a", "x"): 50.0, ("a", "y"): 20.0, ("gone", "z"): 1.0},
        known={("a", "x"), ("a", "y"), ("a", "new")},  # "new": first reconcile in progress
    )
    assert _stalest(sched) == ("a/y", 20.0)
    assert _stalest(fake_scheduler({}, {("a", "new")})) is None
    assert _stalest(None) is None


def test_runtime_vitals_of_a_single_replica_without_election():
    runtime = _Runtime(electing=False, connected=True)
    v = runtime.vitals()
    assert v.leading and not v.synced and v.scheduler_alive is None
    assert not readiness(v).ok and liveness(v, LIMITS).ok
    runtime.scheduler = fake_scheduler({("a", "x"): v.now}, {("a", "x")})
    runtime.kopf_ready = threading.Event()
    runtime.kopf_ready.set()
    runtime.synced = True
    v = runtime.vitals()
    assert v.scheduler_alive is True and v.stalest is not None and v.stalest[0] == "a/x"
    assert readiness(v).ok and liveness(v, LIMITS).ok
