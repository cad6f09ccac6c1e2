"""A node lost while a job runs on it: what the pure parts see and decide (no cluster).

Kubernetes evicts a worker from a node that stopped reporting (the taint-eviction controller,
once the worker's toleration of node.kubernetes.io/unreachable runs out), or the pod GC
removes it with its deleted Node; either marks the pod with a DisruptionTarget condition.
The pod then stays Terminating, as no kubelet confirms its end, and holds its fixed name
until the operator force-deletes it. tests/integration/test_node_loss.py does it for real.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.api.events import fmt_time
from joule.builders.pod import NODE_LOST_TAINTS, worker_pod
from joule.constants import LABEL_INDEX, LABEL_JOB
from joule.kube import JobApi
from joule.observe import NODE_LOST, Failure, PodView, view
from joule.podcache import PodCache
from joule.reconcile import STUCK_TERMINATING_SECONDS, plan

JOB = JobRef("j", "ns", "uid-job")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
TAINT_MESSAGE = "Taint manager: deleting due to NoExecute taint"


def spec(**kw: Any) -> TrainingJobSpec:
    return TrainingJobSpec.parse({"image": "x", "replicas": 2, **kw})


def raw_pod(index: int = 1, *, uid: str = "uid-1", deleting: dt.datetime | None = None,
            disruption: str | None = None, phase: str = "Running") -> dict[str, Any]:  # fmt: skip
    """A worker pod as the API server returns it, on node n1."""
    conditions = [{"type": "Ready", "status": "False"}]
    if disruption:
        message = TAINT_MESSAGE if disruption == "DeletionByTaintManager" else "PodGC: gone"
        conditions.append(
            {"type": "DisruptionTarget", "status": "True", "reason": disruption,
             "message": message}
        )  # fmt: skip
    meta: dict[str, Any] = {
        "name": f"j-worker-{index}",
        "namespace": "ns",
        "uid": uid,
        "resourceVersion": "7",
        "labels": {LABEL_JOB: "j", LABEL_INDEX: str(index)},
        "ownerReferences": [{"uid": JOB.uid, "controller": True}],
    }
    if deleting is not None:
        meta["deletionTimestamp"] = fmt_time(deleting)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": "n1"},
        "status": {"phase": phase, "conditions": conditions},
    }


def seen(**kw: Any) -> PodView:
    got = view(raw_pod(**kw))
    assert got is not None
    return got


def healthy(index: int) -> PodView:
    return PodView(f"j-worker-{index}", f"uid-{index}", index, "Running", True, True, False, None)


def run(s: TrainingJobSpec, pods: list[PodView], status: dict[str, Any] | None = None,
        now: dt.datetime = T0):  # fmt: skip
    return plan(JOB, s, status or {"phase": "Running"}, 1, pods, now)


def reasons(p) -> list[str]:
    return [e.reason for e in p.events]


# --- what the operator sees -------------------------------------------------------------------


def test_a_pod_evicted_from_a_lost_node_is_seen_lost_with_its_deadline():
    deadline = T0 + dt.timedelta(seconds=60)
    pod = seen(deleting=deadline, disruption="DeletionByTaintManager")
    assert pod.lost and pod.terminating and pod.node == "n1"
    assert pod.failure == Failure(NODE_LOST, TAINT_MESSAGE)
    assert pod.deletion_deadline == deadline
    # The pod GC's mark (its Node deleted) means the same; the pod is Failed then.
    assert seen(disruption="DeletionByPodGC", phase="Failed").lost


@pytest.mark.parametrize("reason", ["EvictionByEvictionAPI", "PreemptionByScheduler"])
def test_a_disruption_asked_for_is_no_lost_node(reason):
    # A drain or a preemption deletes the pod on purpose, on a node that is still there.
    pod = seen(deleting=T0, disruption=reason)
    assert not pod.lost and pod.failure is None
    assert seen().deletion_deadline is None


# --- what it decides --------------------------------------------------------------------------


def test_a_worker_lost_with_its_node_counts_once_as_a_restart_said_NodeLost():
    s = spec(restartBackoffSeconds=0)
    deadline = T0 + dt.timedelta(seconds=60)
    lost = seen(deleting=deadline, disruption="DeletionByTaintManager")
    first = run(s, [healthy(0), lost])
    assert first.status["restarts"] == 1
    assert first.status["handledFailures"] == ["uid-1"]
    assert first.status["podFailure"]["reason"] == NODE_LOST
    assert reasons(first) == [NODE_LOST, "Resizing"]
    event = first.events[0]
    assert event.type == "Warning"
    assert "j-worker-1 was lost with node n1" in event.message
    assert TAINT_MESSAGE in event.message and "(restart 1 of 3)" in event.message
    # Still Terminating, it holds its index: no replacement yet, and no second delete.
    assert first.create == [] and first.delete == [] and first.force_delete == []
    # Its status says why a worker is missing (not just "Resizing"), and until when.
    forced = fmt_time(deadline + dt.timedelta(seconds=STUCK_TERMINATING_SECONDS))
    assert first.status["reason"] == NODE_LOST
    assert f"force-deleted at {forced}" in first.status["message"]
    # Woken when the pod is due to be forced, if it is still there.
    assert first.requeue_after == pytest.approx(60 + STUCK_TERMINATING_SECONDS)
    # Deciding again (an operator restart, a resync) counts nothing more and says no more.
    again = run(s, [healthy(0), lost], first.status, now=T0 + dt.timedelta(seconds=10))
    assert again.status["restarts"] == 1 and again.events == []
    assert again.status == {**first.status, "conditions": again.status["conditions"]}


def test_a_pod_stuck_terminating_past_its_grace_period_is_force_deleted_then_replaced():
    s = spec(restartBackoffSeconds=0)
    deadline = T0 + dt.timedelta(seconds=60)
    lost = seen(deleting=deadline, disruption="DeletionByTaintManager")
    first = run(s, [healthy(0), lost])
    just_before = deadline + dt.timedelta(seconds=STUCK_TERMINATING_SECONDS - 1)
    waiting = run(s, [healthy(0), lost], first.status, now=just_before)
    assert waiting.force_delete == [] and waiting.requeue_after == pytest.approx(1)
    due = deadline + dt.timedelta(seconds=STUCK_TERMINATING_SECONDS)
    forced = run(s, [healthy(0), lost], first.status, now=due)
    assert forced.force_delete == ["j-worker-1"] and forced.delete == []
    assert reasons(forced) == ["ForceDeleted"]
    message = forced.events[0].message
    assert "j-worker-1 on node n1" in message and "grace period 0" in message
    assert forced.status["restarts"] == 1  # forcing is no second restart
    assert forced.requeue_after == 0  # the replacement is the next reconcile's, at once
    # Gone: the same name comes back (a new pod, a new UID), and the job runs again.
    gone = run(s, [healthy(0)], forced.status, now=due)
    assert gone.create == [1] and "handledFailures" not in gone.status
    back = run(s, [healthy(0), healthy(1)], gone.status, now=due)
    assert back.status["phase"] == "Running" and back.status["restarts"] == 1


def test_any_pod_stuck_terminating_is_forced_but_only_a_lost_one_is_a_restart():
    # A scale-down's pod on a node that died meanwhile: it holds index 1 against a scale
    # back up, so it goes too, but nothing failed.
    s = spec(replicas=1)
    deadline = T0 + dt.timedelta(seconds=60)
    leaving = seen(deleting=deadline)
    p = run(s, [healthy(0), leaving], now=deadline + dt.timedelta(seconds=45))
    assert p.force_delete == ["j-worker-1"] and p.status["restarts"] == 0
    assert "45s past its grace period" in p.events[0].message
    # A pod that is not being deleted is never forced, however old.
    calm = run(s, [healthy(0)], now=T0 + dt.timedelta(days=3))
    assert calm.force_delete == [] and calm.requeue_after is None


def test_a_worker_removed_with_its_deleted_node_is_counted_NodeLost_and_replaced():
    # The pod GC marks it Failed (DisruptionTarget DeletionByPodGC) just before deleting it.
    s = spec(restartBackoffSeconds=0)
    gone = seen(disruption="DeletionByPodGC", phase="Failed")
    p = run(s, [healthy(0), gone])
    assert p.status["restarts"] == 1 and reasons(p)[0] == NODE_LOST
    assert "node n1 (PodGC: gone)" in p.events[0].message
    assert p.delete == ["j-worker-1"]  # a Failed pod not yet deleted: ours to delete


def test_lost_workers_use_up_the_backoff_limit_as_failures_do():
    s = spec(backoffLimit=0)
    lost = seen(deleting=T0 + dt.timedelta(seconds=60), disruption="DeletionByTaintManager")
    p = run(s, [healthy(0), lost])
    assert p.status["phase"] == "Failed" and p.status["reason"] == "BackoffLimitExceeded"
    assert "(NodeLost)" in p.status["message"]
    assert p.delete == ["j-worker-0"]  # the lost one is on its way out already


def test_a_lost_worker_waits_out_the_restart_backoff_as_a_failed_one_does():
    s = spec(restartBackoffSeconds=10)
    lost = seen(deleting=T0 + dt.timedelta(seconds=60), disruption="DeletionByTaintManager")
    first = run(s, [healthy(0), lost])
    assert first.status["lastFailureTime"] == fmt_time(T0)
    # Forced and gone within the backoff: the replacement still waits for it.
    early = run(s, [healthy(0)], first.status, now=T0 + dt.timedelta(seconds=5))
    assert early.create == [] and early.status["reason"] == "BackingOff"


# --- the workers' tolerations -----------------------------------------------------------------


def tolerations(s: TrainingJobSpec) -> list[dict[str, Any]]:
    return worker_pod(JOB, s, 0)["spec"].get("tolerations", [])


def test_workers_leave_a_lost_node_after_nodeLostTimeoutSeconds_not_300():
    assert TrainingJobSpec.parse({"image": "x"}).node_lost_timeout_seconds == 60
    assert tolerations(spec()) == [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 60}
        for key in NODE_LOST_TAINTS
    ]
    assert {t["tolerationSeconds"] for t in tolerations(spec(nodeLostTimeoutSeconds=0))} == {0}


def test_the_users_own_tolerations_of_those_taints_are_left_alone():
    mine = {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
            "effect": "NoExecute", "tolerationSeconds": 900}  # fmt: skip
    got = tolerations(spec(tolerations=[mine, {"key": "gpu", "operator": "Exists"}]))
    assert got[:2] == [mine, {"key": "gpu", "operator": "Exists"}]
    assert [t["key"] for t in got[2:]] == ["node.kubernetes.io/not-ready"]
    # Tolerating everything, for ever, is the user's choice too.
    everything = [{"operator": "Exists"}]
    assert tolerations(spec(tolerations=everything)) == everything
    # A NoSchedule toleration of the key does not keep a worker on a lost node: ours is added.
    no_schedule = {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                   "effect": "NoSchedule"}  # fmt: skip
    assert len(tolerations(spec(tolerations=[no_schedule]))) == 3


@pytest.mark.parametrize("value", [-1, 3601, "60", True])
def test_nodeLostTimeoutSeconds_out_of_range_is_refused(value):
    with pytest.raises(SpecError, match=r"spec\.nodeLostTimeoutSeconds"):
        spec(nodeLostTimeoutSeconds=value)


# --- the force-delete call --------------------------------------------------------------------


class Answer:
    def __init__(self, pod: dict[str, Any]) -> None:
        self.data = json.dumps(pod).encode()


class Core:
    """CoreV1Api's delete, recording what was asked."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.calls: list[tuple[str, Any]] = []

    def delete_namespaced_pod(self, name: str, namespace: str, body=None, **_: Any) -> Answer:
        self.calls.append((name, body))
        return Answer(self.answer)


def api_with(cache: PodCache, core: Core) -> JobApi:
    api = JobApi.__new__(JobApi)  # no client: only the pod calls are exercised
    api.core, api.pod_cache = core, cache
    return api


def test_a_forced_delete_has_grace_period_0_for_that_uid_and_leaves_the_cache():
    stuck = raw_pod(deleting=T0, disruption="DeletionByTaintManager")
    cache = PodCache(core=None)
    cache._replace("", [stuck])
    cache._synced.add("")
    core = Core(stuck)
    api_with(cache, core).delete_pod("ns", "j-worker-1", force=True, uid="uid-1")
    (name, body), = core.calls  # fmt: skip
    assert name == "j-worker-1"
    assert body == {"gracePeriodSeconds": 0, "preconditions": {"uid": "uid-1"}}
    # The answer is its last state: gone from the cache at once, so no later reconcile
    # forces it again (and the watch's DELETED, which follows, changes nothing).
    assert cache.pods(JOB) == []


def test_a_plain_delete_sends_no_options_and_keeps_the_pod_terminating():
    pod = raw_pod()
    cache = PodCache(core=None)
    cache._synced.add("")
    core = Core({**pod, "metadata": {**pod["metadata"], "deletionTimestamp": fmt_time(T0)}})
    api_with(cache, core).delete_pod("ns", "j-worker-1")
    assert core.calls == [("j-worker-1", None)]
    assert [p.terminating for p in cache.pods(JOB)] == [True]
