"""spec.privacy: the figures reach Joule's trainer, and its stop at the budget is the job's
end, said with what it spent (pure parts)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.builders import worker_pod
from joule.observe import PodView, view
from joule.reconcile import plan

JOB = JobRef("j", "ns", "uid")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
STOP = {"stopReason": "PrivacyBudgetReached", "epsilon": 7.98, "delta": 1e-5,
        "targetEpsilon": 8.0, "step": 412}  # fmt: skip


def spec(**privacy):
    return TrainingJobSpec.parse({"image": "t", "replicas": 2, "privacy": privacy})


def done(index, summary=None):
    return PodView(f"j-worker-{index}", f"u{index}", index, "Succeeded", False, True, False,
                   None, summary=summary)  # fmt: skip


def test_the_figures_reach_the_trainer_as_its_environment():
    s = spec(noiseMultiplier=1.1, maxGradNorm=0.5, targetEpsilon=8, delta=1e-5)
    env = {e["name"]: e.get("value") for e in worker_pod(JOB, s, 0)["spec"]["containers"][0]["env"]}
    assert env["JOULE_DP_NOISE_MULTIPLIER"] == "1.1" and env["JOULE_DP_MAX_GRAD_NORM"] == "0.5"
    assert env["JOULE_DP_TARGET_EPSILON"] == "8.0" and env["JOULE_DP_DELTA"] == "1e-05"
    exact = spec(noiseMultiplier=1.23456789)
    env = {
        e["name"]: e.get("value") for e in worker_pod(JOB, exact, 0)["spec"]["containers"][0]["env"]
    }
    assert env["JOULE_DP_NOISE_MULTIPLIER"] == "1.23456789"
    only = spec(targetEpsilon=3)
    names = {e["name"] for e in worker_pod(JOB, only, 1)["spec"]["containers"][0]["env"]}
    assert "JOULE_DP_TARGET_EPSILON" in names and "JOULE_DP_NOISE_MULTIPLIER" not in names
    plain = TrainingJobSpec.parse({"image": "t"})
    assert not any(e["name"].startswith("JOULE_DP_")
                   for e in worker_pod(JOB, plain, 0)["spec"]["containers"][0]["env"])  # fmt: skip


def test_a_stop_at_the_budget_ends_the_job_saying_what_was_spent():
    s = spec(targetEpsilon=8)
    p = plan(JOB, s, {"phase": "Running"}, 1, [done(0, json.dumps(STOP)), done(1)], T0)
    assert (p.status["phase"], p.status["reason"]) == ("Succeeded", "PrivacyBudgetReached")
    assert p.status["privacy"] == {k: STOP[k] for k in ("epsilon", "delta", "targetEpsilon",
                                                        "step")}  # fmt: skip
    assert p.status["message"] == ("training stopped at its privacy budget: epsilon 7.98 of "
                                   "targetEpsilon 8 (delta 1e-05) at step 412")  # fmt: skip
    # Trained to its last step instead: a plain success.
    p = plan(JOB, s, {"phase": "Running"}, 1, [done(0), done(1)], T0)
    assert p.status["reason"] == "Succeeded" and "privacy" not in p.status
    # The same words from a job without spec.privacy mean nothing to Joule.
    plain = TrainingJobSpec.parse({"image": "t", "replicas": 2})
    p = plan(JOB, plain, {"phase": "Running"}, 1, [done(0, json.dumps(STOP)), done(1)], T0)
    assert p.status["reason"] == "Succeeded"


def test_a_workers_termination_message_is_read_once_it_exited_0():
    ended = {"terminated": {"exitCode": 0, "message": json.dumps(STOP)}}
    pod = {"metadata": {"name": "j-worker-0", "labels": {"joule.dev/replica-index": "0"}},
           "status": {"phase": "Succeeded", "containerStatuses": [{"state": ended}]}}  # fmt: skip
    assert json.loads(view(pod).summary)["step"] == 412


@pytest.mark.parametrize(
    ("privacy", "said"),
    [({}, "needs noiseMultiplier or targetEpsilon"),
     ({"noiseMultiplier": 0}, "noiseMultiplier must be a number above 0"),
     ({"targetEpsilon": -1}, "targetEpsilon must be a number above 0"),
     ({"targetEpsilon": 8, "delta": 1}, "delta must be below 1"),
     ({"noiseMultiplier": "1"}, "must be a number above 0")],
)  # fmt: skip
def test_bad_privacy_specs_are_refused(privacy, said):
    with pytest.raises(SpecError, match=said):
        spec(**privacy)


def test_the_epsilon_spent_is_read_into_status_while_the_job_trains(pod_metrics):
    """Through the real scrape, from rank 0's /metrics served here, every evaluation."""
    from joule import autoscaler
    from joule.scaling import next_evaluation
    from joule.trainer_metrics import parse_privacy_metrics

    text = ("joule_trainer_dp_epsilon{job=\"j\",rank=\"0\"} 1.25\n"
            "joule_trainer_dp_delta{job=\"j\",rank=\"0\"} 1e-05\n"
            "joule_trainer_dp_target_epsilon{job=\"j\",rank=\"0\"} 8\n")  # fmt: skip
    assert parse_privacy_metrics(text) == {"epsilon": 1.25, "delta": 1e-05, "targetEpsilon": 8}
    assert parse_privacy_metrics("joule_trainer_steps_total 3\n") is None
    pod_metrics(text)
    s = spec(noiseMultiplier=1.0, targetEpsilon=8)
    running = {"phase": "Running", "restarts": 0}
    assert next_evaluation(s, running, T0) == 0.0  # due at once, then every interval
    body = {"apiVersion": "joule.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "uid", "generation": 1,
                         "resourceVersion": "1"},
            "spec": {"image": "t", "replicas": 2,
                     "privacy": {"noiseMultiplier": 1.0, "targetEpsilon": 8}},
            "status": running}  # fmt: skip
    written = []

    class Api:
        def get_job(self, namespace, name):
            return body

        def clock(self):
            return T0

        def pods(self, job):
            return [PodView(f"j-worker-{i}", f"u{i}", i, "Running", True, True, False, None,
                            ip="127.0.0.1") for i in range(2)]  # fmt: skip

        def write_status(self, old, new):
            written.append(new)
            return old

    after = autoscaler.Autoscaler(Api()).evaluate("ns", "j")
    assert written[-1]["privacy"] == {"epsilon": 1.25, "delta": 1e-05, "targetEpsilon": 8,
                                      "checkedAt": "2026-01-01T00:00:00Z"}  # fmt: skip
    assert after == s.scaling.evaluation_interval_seconds
    # Not while it does not train, nor for a job without spec.privacy.
    assert next_evaluation(s, {"phase": "Pending"}, T0) is None
    assert next_evaluation(TrainingJobSpec.parse({"image": "t"}), running, T0) is None
