"""Hung workers (joule.hang): what the progress loop records, and what plan() does with it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from joule.api import JobRef, TrainingJobSpec
from joule.api.events import fmt_time
from joule.api.types import SpecError
from joule.autoscaler import progress_samples
from joule.hang import observe
from joule.observe import PodView
from joule.reconcile import plan
from joule.scaling import next_evaluation
from joule.scrape import Result
from joule.trainer_metrics import TrainerReading

JOB = JobRef("j", "ns", "uid")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TIMEOUT = 600


def spec(**kw: Any) -> TrainingJobSpec:
    body = {"image": "x", "replicas": 2, "progress": {"hangTimeoutSeconds": TIMEOUT}, **kw}
    return TrainingJobSpec.parse(body)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def pod(index: int, phase: str = "Running", uid: str | None = None, **kw: Any) -> PodView:
    return PodView(f"j-worker-{index}", uid or f"uid-{index}", index, phase,
                   phase == "Running", True, False, None, **kw)  # fmt: skip


PODS = [pod(0), pod(1)]


def running(s: TrainingJobSpec, now: dt.datetime = T0) -> dict[str, Any]:
    """The status of a job whose workers have just all come up."""
    return plan(JOB, s, {"phase": "Starting"}, 1, PODS, now).status


def check(s: TrainingJobSpec, st: dict[str, Any], samples: float | None, now: dt.datetime):
    """One look of the progress loop, then the reconcile its status write wakes."""
    record = observe(s, st, samples, now)
    assert record is not None
    return plan(JOB, s, {**st, "progress": record}, 1, PODS, now)


def condition(st: dict[str, Any], ctype: str) -> tuple[str, str]:
    c = next(c for c in st["conditions"] if c["type"] == ctype)
    return c["status"], c["reason"]


def test_workers_that_keep_stepping_are_never_hung():
    s = spec()
    st = running(s)
    for i, t in enumerate(range(0, 3 * TIMEOUT, 30)):
        out = check(s, st, 100.0 * i, at(t))
        assert out.delete == [] and out.events == [] and out.status["phase"] == "Running"
        st = out.status
    assert st["progress"]["lastProgressTime"] == st["progress"]["checkedAt"]
    assert st["progress"]["samples"] == 100.0 * i


def test_no_new_sample_for_the_timeout_restarts_every_worker_and_counts_it():
    s = spec(backoffLimit=3)
    st = check(s, running(s), 1200.0, T0).status
    st = check(s, st, 1200.0, at(TIMEOUT - 1)).status  # not yet
    assert st["phase"] == "Running" and st["restarts"] == 0
    out = check(s, st, 1200.0, at(TIMEOUT + 5))
    assert sorted(out.delete) == ["j-worker-0", "j-worker-1"] and out.create == []
    st = out.status
    assert st["restarts"] == 1
    assert (st["phase"], st["reason"]) == ("Pending", "Hung")
    [event] = out.events
    assert (event.type, event.reason) == ("Warning", "WorkerHung")
    # It names the timeout and when a sample was last seen to be new.
    assert f"hangTimeoutSeconds={TIMEOUT}" in event.message
    assert fmt_time(T0) in event.message and "joule_trainer_samples_total" in event.message
    assert "restart 1 of 3" in event.message and st["message"] == event.message
    # A restart under way: Reconciling (as BackingOff), not Stalled.
    assert condition(st, "Reconciling") == ("True", "Hung")
    assert condition(st, "Stalled")[0] == "False" and condition(st, "Ready")[0] == "False"
    assert "lastProgressTime" not in st["progress"]  # the clock starts again with the group


def test_the_new_group_says_hung_until_every_worker_runs_again_then_times_afresh():
    s = spec()
    st = check(s, check(s, running(s), 5.0, T0).status, 5.0, at(TIMEOUT)).status
    going = [PodView(p.name, p.uid, p.index, "Running", True, True, True, None) for p in PODS]
    out = plan(JOB, s, st, 1, going, at(TIMEOUT + 1))  # the old pods still terminating
    assert out.create == [] and out.events == []  # nothing counted or posted twice
    assert (out.status["reason"], out.status["restarts"]) == ("Hung", 1)
    out = plan(JOB, s, out.status, 1, [], at(TIMEOUT + 20))  # gone: the new group
    assert out.create == [0, 1] and out.status["reason"] == "Hung"
    new = [pod(0, "Pending", "uid-new-0"), pod(1, "Pending", "uid-new-1")]
    out = plan(JOB, s, out.status, 1, new, at(TIMEOUT + 25))
    assert (out.status["phase"], out.status["reason"]) == ("Starting", "Hung")
    back = [pod(0, uid="uid-new-0"), pod(1, uid="uid-new-1")]
    st = plan(JOB, s, out.status, 1, back, at(TIMEOUT + 40)).status
    assert (st["phase"], st["reason"], st["restarts"]) == ("Running", "AllWorkersRunning", 1)
    assert "progress" not in st  # the restart is over; the next look starts the clock
    record = observe(s, st, 5.0, at(TIMEOUT + 45))
    assert record == {"lastProgressTime": fmt_time(at(TIMEOUT + 45)),
                      "samples": 5.0, "checkedAt": fmt_time(at(TIMEOUT + 45))}  # fmt: skip


def test_a_job_that_hangs_past_its_backoff_limit_fails_saying_hung():
    s = spec(backoffLimit=1)
    st = {**check(s, running(s), 5.0, T0).status, "restarts": 1}
    out = check(s, st, 5.0, at(TIMEOUT))
    st = out.status
    assert (st["phase"], st["reason"], st["restarts"]) == ("Failed", "Hung", 2)
    assert "2 restarts > backoffLimit=1" in st["message"] and st["completionTime"]
    assert sorted(out.delete) == ["j-worker-0", "j-worker-1"]
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "WorkerHung")]
    assert condition(st, "Stalled") == ("True", "Hung")
    assert "progress" not in st


@pytest.mark.parametrize(
    "pods, spec_change",
    [
        ([pod(0)], {}),  # a worker is gone (a resize, a failure being replaced)
        ([pod(0), pod(1, "Pending")], {}),  # one not ready
        (PODS, {"suspend": True}),
        ([pod(0), pod(1, "Failed")], {}),  # a failed worker restarts the group already
    ],
    ids=["resize", "not-ready", "suspend", "failed"],
)
def test_a_resize_restart_or_suspension_starts_the_clock_again(pods, spec_change):
    s = spec()
    st = check(s, running(s), 5.0, T0).status
    st = check(s, st, 5.0, at(TIMEOUT - 10)).status
    assert st["progress"]["lastProgressTime"] == fmt_time(T0)
    out = plan(JOB, spec(**spec_change), st, 1, pods, at(TIMEOUT - 5))
    assert "WorkerHung" not in [e.reason for e in out.events]
    assert "progress" not in out.status and out.status["phase"] != "Running"
    assert out.status["restarts"] == (1 if spec_change == {} and len(pods) == 2
                                      and pods[1].phase == "Failed" else 0)  # fmt: skip


def test_the_clock_starts_when_the_job_is_running_not_before():
    s = spec()
    starting = plan(JOB, s, {"phase": "Pending"}, 1, [pod(0), pod(1, "Pending")], T0).status
    assert observe(s, starting, 0.0, T0) is None  # still starting: nothing is timed
    assert next_evaluation(s, starting, T0) is None
    st = running(s, at(900))
    assert next_evaluation(s, st, at(900)) == 0.0  # due at once: the first look
    first = observe(s, st, None, at(900))  # not every worker could be read yet
    assert first == {"lastProgressTime": fmt_time(at(900)), "checkedAt": fmt_time(at(900))}
    assert next_evaluation(s, {**st, "progress": first}, at(910)) == 20  # every 30 s


def test_off_when_not_set_and_a_record_left_behind_goes():
    s = TrainingJobSpec.parse({"image": "x", "replicas": 2})
    st = running(s)
    assert observe(s, st, 5.0, T0) is None and next_evaluation(s, st, T0) is None
    stale = {"samples": 5.0, "lastProgressTime": fmt_time(T0), "checkedAt": fmt_time(at(7200))}
    out = plan(JOB, s, {**st, "progress": stale}, 1, PODS, at(7200))
    assert out.delete == [] and "progress" not in out.status


def test_only_a_look_decides_not_a_clock_that_ran_while_nobody_looked():
    """An operator down for longer than the timeout: the record's last look was in time, so
    the reconcile after its restart restarts nothing; the next look sees the sum moved."""
    s = spec()
    st = check(s, check(s, running(s), 5.0, T0).status, 9.0, at(30)).status
    out = plan(JOB, s, st, 1, PODS, at(3 * TIMEOUT))
    assert out.delete == [] and out.status["phase"] == "Running"
    out = check(s, out.status, 900.0, at(3 * TIMEOUT + 5))
    assert out.delete == [] and out.status["progress"]["samples"] == 900.0


def test_a_change_is_progress_but_an_unread_worker_is_not():
    s = spec()
    st = check(s, running(s), 500.0, T0).status
    # A process restarted in place counts from zero again: the sum went down, but moved.
    st = check(s, st, 40.0, at(300)).status
    assert st["progress"]["lastProgressTime"] == fmt_time(at(300))
    # A round that could not read every worker shows no progress...
    st = check(s, st, None, at(600)).status
    assert st["progress"]["lastProgressTime"] == fmt_time(at(300))
    assert st["progress"]["samples"] == 40.0
    # ...and unread workers long enough are hung ones.
    out = check(s, st, None, at(300 + TIMEOUT))
    assert out.status["reason"] == "Hung" and len(out.delete) == 2


def test_a_scripts_own_counter_is_named_in_the_event():
    s = spec(progress={"samplesMetric": "imgs_seen_total", "hangTimeoutSeconds": 60})
    st = check(s, check(s, running(s), 5.0, T0).status, 5.0, at(60)).status
    assert "no new sample (imgs_seen_total) for 60s" in st["message"]


def reading(samples: float) -> Result:
    return Result(TrainerReading(0, 1, samples, 0.0, None, None, 0.0, "?"))


def test_the_samples_sum_needs_every_worker_that_must_answer():
    both = {"a/0": reading(10), "b/0": reading(5), "gone/0": reading(100)}
    assert progress_samples(both, {"a/0", "b/0"}) == 15  # one on its way out is not summed
    assert progress_samples({"a/0": reading(10), "b/0": Result(None)}, {"a/0", "b/0"}) == 10
    unread = {"a/0": reading(10), "b/0": Result(None, "timed out")}
    assert progress_samples(unread, {"a/0", "b/0"}) is None
    assert progress_samples({"a/0": reading(10)}, {"a/0", "b/0"}) is None
    assert progress_samples({}, set()) is None


def test_the_spec_field():
    assert spec().progress.hang_timeout_seconds == TIMEOUT
    assert spec().progress.samples_metric is None  # joule_trainer's own counter
    assert TrainingJobSpec.parse({"image": "x"}).progress.hang_timeout_seconds is None
    with pytest.raises(SpecError, match=r"spec\.progress\.hangTimeoutSeconds must be >= 60"):
        spec(progress={"hangTimeoutSeconds": 30})
    with pytest.raises(SpecError, match=r"hangTimeoutSeconds must be an integer"):
        spec(progress={"hangTimeoutSeconds": "10m"})


def test_the_progress_loop_reads_a_job_with_only_a_hang_timeout_and_the_reconcile_acts(
    monkeypatch,
):
    """Through the operator's own code (Autoscaler, Reconciler) on an in-memory API."""
    from joule.autoscaler import Autoscaler
    from joule.lifecycle import Reconciler
    from tests.unit.test_kube_order import FakeApi, job_api, new_job

    api = FakeApi()

    def edge(seconds: float):
        out = job_api(api)
        out.clock = lambda: at(seconds)
        return out

    new_job(api, progress={"hangTimeoutSeconds": 60}, scaling={"evaluationIntervalSeconds": 10})
    Reconciler(edge(0)).reconcile("ns", "j")
    for p in api.pods.values():
        p["spec"]["nodeName"] = "n"
        p["status"] = {"phase": "Running", "podIP": "127.0.0.9",
                       "conditions": [{"type": "Ready", "status": "True"}]}  # fmt: skip
    assert Reconciler(edge(0)).reconcile("ns", "j").evaluate_after == 0.0
    samples = {"now": 0.0}
    monkeypatch.setattr(
        "joule.autoscaler.scrape_all",
        lambda targets, deadline, parse=None: {t.key: reading(samples["now"]) for t in targets},
    )

    def tick(seconds: float) -> float | None:
        """One look, then the reconcile its status write (a watch event) starts."""
        after = Autoscaler(edge(seconds)).evaluate("ns", "j")
        Reconciler(edge(seconds)).reconcile("ns", "j")
        return after

    for t in (0, 10, 20):
        samples["now"] += 32
        assert tick(t) == 10  # due again in one evaluationIntervalSeconds
    assert api.job["status"]["progress"]["lastProgressTime"] == fmt_time(at(20))
    assert api.configmap is None  # no energy bookkeeping for a job without policy or limit
    for t in (30, 40, 50, 60, 70):  # stuck at 96 samples
        tick(t)
        assert api.job["status"]["phase"] == "Running"
    tick(80)
    st = api.job["status"]
    assert (st["phase"], st["reason"], st["restarts"]) == ("Pending", "Hung", 1)
    assert api.pods == {} and api.events.count("WorkerHung") == 1
    Reconciler(edge(81)).reconcile("ns", "j")  # the old pods are gone: the new group
    assert sorted(api.pods) == ["j-worker-0", "j-worker-1"]
    assert api.job["status"]["reason"] == "Hung" and api.events.count("WorkerHung") == 1
