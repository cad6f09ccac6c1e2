"""The Reconciler's order of writes: status first, then pods, then Events.

An in-memory API stands in for the API server here only to stop the operator at an exact
point between two calls (a crash there cannot be timed against a real server); what is
checked is what a restarted operator reads back.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools

import pytest
from kubernetes.client.rest import ApiException

from joule.api.types import JobRef
from joule.builders.bookkeeping import read_bookkeeping
from joule.kube import JobApi
from joule.lifecycle import Reconciler

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Crash(BaseException):
    """The operator process dies here (BaseException: nothing in it catches this)."""


class FakeApi:
    def __init__(self):
        self.job: dict | None = None
        self.pods: dict[str, dict] = {}
        self.events: list[str] = []
        self.calls: list[str] = []
        self.crash_on: str | None = None
        self.conflicts = 0
        self.configmap: dict | None = None
        self.rv = itertools.count(1)

    def _call(self, what):
        self.calls.append(what)
        if self.crash_on == what:
            self.crash_on = None
            raise Crash(what)

    # CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, ns, plural, name, **_):
        self._call("get")
        if self.job is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.job)

    def replace_namespaced_custom_object_status(self, group, version, ns, plural, name, body, **_):
        self._call("status")
        if self.conflicts:
            self.conflicts -= 1
            self.job["metadata"]["resourceVersion"] = str(next(self.rv))
            raise ApiException(status=409)
        if body["metadata"]["resourceVersion"] != self.job["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        self.job["status"] = copy.deepcopy(body["status"])
        self.job["metadata"]["resourceVersion"] = str(next(self.rv))
        return copy.deepcopy(self.job)

    # CoreV1 (joule.corev1: answers are plain JSON)
    def list_namespaced_pod(self, ns, label_selector, **_):
        self._call("list")
        return {"items": [copy.deepcopy(p) for p in self.pods.values()]}

    def create_namespaced_pod(self, ns, pod, **_):
        self._call("create")
        name = pod["metadata"]["name"]
        if name in self.pods:
            raise ApiException(status=409)
        pod = copy.deepcopy(pod)
        pod["metadata"]["uid"] = f"uid-{name}-{len(self.calls)}"
        pod["status"] = {"phase": "Pending"}
        self.pods[name] = pod

    def delete_namespaced_pod(self, name, ns, **_):
        self._call("delete")
        if self.pods.pop(name, None) is None:
            raise ApiException(status=404)

    def create_namespaced_service(self, ns, svc, **_):
        self._call("service")
        if svc["metadata"]["name"].endswith("-tensorboard"):
            self._call("tensorboard service")

    # AppsV1Api (spec.tensorboard)
    refuse_deployments = False

    def create_namespaced_deployment(self, ns, body, **_):
        self._call("tensorboard deployment")
        if self.refuse_deployments:
            raise ApiException(status=403, reason="Forbidden")

    def delete_namespaced_deployment(self, name, ns, **_):
        self._call(f"delete deployment {name}")

    def delete_namespaced_service(self, name, ns, **_):
        self._call(f"delete service {name}")

    def create_namespaced_event(self, ns, event, **_):
        self._call("event")
        self.events.append(event["reason"])

    def patch_namespaced_pod(self, name, ns, body, **_):
        self._call("patch")

    def read_namespaced_config_map(self, name, ns, **_):
        self._call("read-cm")
        if self.configmap is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.configmap)

    def create_namespaced_config_map(self, ns, body, **_):
        self._call("cm")
        if self.configmap is not None:
            raise ApiException(status=409)
        self.configmap = {**copy.deepcopy(body), "metadata": {**body["metadata"],
                          "resourceVersion": str(next(self.rv))}}  # fmt: skip

    def replace_namespaced_config_map(self, name, ns, body, **_):
        self._call("cm")
        if body["metadata"]["resourceVersion"] != self.configmap["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        self.configmap = {**copy.deepcopy(body), "metadata": {**body["metadata"],
                          "resourceVersion": str(next(self.rv))}}  # fmt: skip


def job_api(api: FakeApi) -> JobApi:
    from kubernetes import client

    edge = JobApi(client.ApiClient(), clock=lambda: T0)
    edge.core = edge.custom = edge.apps = api
    return edge


def reconciler(api: FakeApi) -> Reconciler:
    return Reconciler(job_api(api))


def new_job(api: FakeApi, **spec) -> None:
    api.job = {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "job-uid", "generation": 1,
                     "resourceVersion": "0"},
        "spec": {"image": "x", "replicas": 2, **spec},
    }  # fmt: skip


def test_status_is_written_before_any_pod_is_created():
    api = FakeApi()
    new_job(api)
    reconciler(api).reconcile("ns", "j")
    first_create = api.calls.index("create")
    assert "status" in api.calls[:first_create]
    assert api.calls.index("event") > first_create


def test_a_crash_between_status_and_pods_loses_no_start_time_and_counts_no_restart_twice():
    api = FakeApi()
    new_job(api, backoffLimit=3)
    api.crash_on = "create"
    with pytest.raises(Crash):
        reconciler(api).reconcile("ns", "j")
    # It died creating a worker (the other of the batch, created in parallel, may exist)...
    assert len(api.pods) <= 1
    started = api.job["status"]["startTime"]  # ...but the status it acted on is stored
    assert api.job["status"]["attemptStartTime"] == started
    reconciler(api).reconcile("ns", "j")  # a new operator
    assert sorted(api.pods) == ["j-worker-0", "j-worker-1"]
    assert api.job["status"]["startTime"] == started

    # A worker fails; the operator dies before deleting it: the restart is already counted.
    pod = api.pods["j-worker-1"]
    pod["spec"]["nodeName"] = "n"
    pod["status"] = {"phase": "Failed", "containerStatuses": [
        {"state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}  # fmt: skip
    api.crash_on = "delete"
    with pytest.raises(Crash):
        reconciler(api).reconcile("ns", "j")
    assert api.job["status"]["restarts"] == 1
    assert "WorkerFailed" not in api.events  # posted only once the pods are dealt with
    reconciler(api).reconcile("ns", "j")
    assert api.job["status"]["restarts"] == 1  # the same failure is not counted again
    assert "j-worker-1" not in api.pods or api.pods["j-worker-1"]["status"]["phase"] != "Failed"


def test_a_status_conflict_redoes_the_plan_without_posting_its_events_twice():
    api = FakeApi()
    new_job(api)
    api.conflicts = 1
    reconciler(api).reconcile("ns", "j")
    assert api.events.count("CreatedWorkers") == 1
    assert sorted(api.pods) == ["j-worker-0", "j-worker-1"]


def running_managed_job(api: FakeApi) -> None:
    new_job(api, replicas=2, elastic={"minReplicas": 1, "maxReplicas": 2},
            scaling={"policy": "Throughput", "evaluationIntervalSeconds": 30},
            energy={"powerCapWatts": 10})  # fmt: skip
    reconciler(api).reconcile("ns", "j")
    for pod in api.pods.values():  # both workers run and are ready
        pod["spec"]["nodeName"] = "n"
        pod["status"] = {"phase": "Running", "podIP": "127.0.0.9",
                         "conditions": [{"type": "Ready", "status": "True"}]}  # fmt: skip
    reconciler(api).reconcile("ns", "j")
    assert api.job["status"]["phase"] == "Running"


def add_cluster_reads(api: FakeApi) -> None:
    empty = type("L", (), {"items": []})
    api.list_node = lambda **_: empty
    api.list_pod_for_all_namespaces = lambda **_: empty


def test_the_scaling_loop_writes_a_target_and_touches_no_pod(monkeypatch):
    from joule.autoscaler import Autoscaler
    from joule.scrape import Result
    from joule.trainer_metrics import TrainerReading

    api = FakeApi()
    running_managed_job(api)
    add_cluster_reads(api)
    over = TrainerReading(0, 10, 100, 10.0, 1.0, 30.0, 3000.0, "estimated", started=1.0)

    def read(targets, deadline, parse=None):
        return {t.key: Result(over) for t in targets}

    monkeypatch.setattr("joule.autoscaler.scrape_all", read)
    api.calls.clear()
    scaler = Autoscaler(job_api(api))
    after = scaler.evaluate("ns", "j")
    assert after == 30  # due again in one evaluationIntervalSeconds
    assert not {"create", "delete", "patch"} & set(api.calls)  # pods are the lifecycle's
    energy = api.job["status"]["energy"]
    assert energy["consumedJoules"] == 6000 and "lastDecision" in api.job["status"]
    # Per-worker counters are bookkeeping: in the job's ConfigMap, with the total, not status.
    assert "counters" not in energy and "window" not in energy
    kept = read_bookkeeping(api.configmap)
    assert len(kept["counters"]) == 2 and kept["consumedJoules"] == 6000
    assert api.configmap["metadata"]["ownerReferences"][0]["uid"] == "job-uid"
    assert scaler.evaluate("ns", "j") == 30  # not due yet: nothing read, nothing written
    assert api.calls.count("status") == 1


def test_a_crash_between_the_bookkeeping_and_the_status_neither_loses_nor_doubles_a_joule(
    monkeypatch,
):
    from joule.autoscaler import Autoscaler
    from joule.scrape import Result
    from joule.trainer_metrics import TrainerReading

    api = FakeApi()
    running_managed_job(api)
    add_cluster_reads(api)
    joules = {"now": 1000.0}

    def read(targets, deadline, parse=None):
        r = TrainerReading(0, 10, 100, 10.0, 1.0, 30.0, joules["now"], "estimated", started=1.0)
        return {t.key: Result(r) for t in targets}

    monkeypatch.setattr("joule.autoscaler.scrape_all", read)
    Autoscaler(job_api(api)).evaluate("ns", "j")  # 2 x 1000 J
    joules["now"] = 1500.0
    later = job_api(api)
    later.clock = lambda: T0 + dt.timedelta(seconds=60)
    api.crash_on = "status"  # dies right after writing the bookkeeping
    with pytest.raises(Crash):
        Autoscaler(later).evaluate("ns", "j")
    assert api.job["status"]["energy"]["consumedJoules"] == 2000  # status: one round behind
    joules["now"] = 1600.0
    again = job_api(api)
    again.clock = lambda: T0 + dt.timedelta(seconds=120)
    Autoscaler(again).evaluate("ns", "j")
    assert api.job["status"]["energy"]["consumedJoules"] == 3200  # 2 x 1600: exact


def test_a_hung_worker_does_not_hold_the_jobs_lifecycle(monkeypatch):
    import threading
    import time

    from joule.autoscaler import Autoscaler

    api = FakeApi()
    running_managed_job(api)
    add_cluster_reads(api)
    release = threading.Event()

    def hung(targets, deadline, parse=None):
        release.wait(10)
        return {}

    monkeypatch.setattr("joule.autoscaler.scrape_all", hung)
    scaler = Autoscaler(job_api(api))
    evaluation = threading.Thread(target=scaler.evaluate, args=("ns", "j"))
    evaluation.start()
    try:
        time.sleep(0.2)  # the evaluation now waits on the workers
        api.pods.pop("j-worker-1")  # a worker is gone: the lifecycle must replace it now
        began = time.monotonic()
        reconciler(api).reconcile("ns", "j")
        assert time.monotonic() - began < 1.0
        assert "j-worker-1" in api.pods
    finally:
        release.set()
        evaluation.join(10)


def test_a_namesake_jobs_energy_is_not_inherited(monkeypatch):
    """Deleted and re-created under the same name before the garbage collector ran: the old
    job's ConfigMap is still there, with its joules; none of them are the new job's."""
    from joule.autoscaler import Autoscaler
    from joule.builders.bookkeeping import bookkeeping_configmap
    from joule.scrape import Result
    from joule.trainer_metrics import TrainerReading

    api = FakeApi()
    running_managed_job(api)
    add_cluster_reads(api)
    old = bookkeeping_configmap(JobRef("j", "ns", "old-uid"), {"consumedJoules": 9e6})
    api.configmap = {**old, "metadata": {**old["metadata"], "resourceVersion": "7"}}
    r = TrainerReading(0, 10, 100, 10.0, 1.0, 30.0, 50.0, "estimated", started=1.0)
    monkeypatch.setattr(
        "joule.autoscaler.scrape_all",
        lambda targets, d, parse=None: {t.key: Result(r) for t in targets},
    )
    Autoscaler(job_api(api)).evaluate("ns", "j")
    assert api.job["status"]["energy"]["consumedJoules"] == 100  # 2 x 50 J, nothing inherited
    assert api.configmap["metadata"]["ownerReferences"][0]["uid"] == "job-uid"


def test_a_deleted_workers_last_joules_from_its_node_agent_count_once(monkeypatch):
    """The agent keeps a pod's final record a while after it lets go of its GPU; the job's
    carried counter takes its last increase, once, and then lets it go."""
    from joule.agent_metrics import AgentReading, PodGpu
    from joule.autoscaler import Autoscaler, NodeAgents
    from joule.scrape import Result

    api = FakeApi()
    running_managed_job(api)
    add_cluster_reads(api)
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in api.pods.values()}
    w0, w1 = uids["j-worker-0"], uids["j-worker-1"]
    joules = {w0: 100.0, w1: 100.0}

    def read(targets, deadline, parse=None):
        if parse is None or parse.__name__ != "parse_agent_metrics":
            return {t.key: Result(None, "connection refused") for t in targets}  # no /metrics
        rows = {uid: (PodGpu("GPU-" + uid, j, since=5.0),) for uid, j in joules.items()}
        return {t.key: Result(AgentReading("simulated", rows)) for t in targets}

    monkeypatch.setattr("joule.autoscaler.scrape_all", read)
    agents = NodeAgents("joule-system", "app=agent", 9410)

    def evaluate_at(seconds):
        edge = job_api(api)
        edge.clock = lambda: T0 + dt.timedelta(seconds=seconds)
        edge.node_agents = lambda ns, selector: {"n": "127.0.0.8"}
        Autoscaler(edge, agents).evaluate("ns", "j")
        return api.job["status"]["energy"]

    assert evaluate_at(0)["consumedJoules"] == 200
    del api.pods["j-worker-1"]  # scaled away; its agent still has its final 150 J
    joules.update({w0: 200.0, w1: 150.0})
    assert evaluate_at(60)["consumedJoules"] == 350  # +100 and w1's last +50
    del joules[w1]  # the agent's retention is over
    joules[w0] = 250.0
    energy = evaluate_at(120)
    assert energy["consumedJoules"] == 400 and energy["source"] == "node"
    assert list(read_bookkeeping(api.configmap)["counters"]) == [f"{w0}/GPU-{w0}@5.00"]


TENSORBOARD = {
    "checkpoint": {"path": "/c", "volume": "c"},
    "volumes": [{"name": "c", "emptyDir": {}}],
    "tensorboard": {"enabled": True},
}


def test_a_tensorboard_comes_with_the_first_workers_and_goes_when_turned_off():
    api = FakeApi()
    new_job(api, **TENSORBOARD)
    reconciler(api).reconcile("ns", "j")
    assert api.calls.count("create") == 2
    assert "tensorboard deployment" in api.calls and "tensorboard service" in api.calls
    assert api.job["status"]["tensorboard"]["url"] == "http://j-tensorboard.ns.svc:6006"

    api.calls.clear()
    reconciler(api).reconcile("ns", "j")  # nothing new: no second create
    assert "tensorboard deployment" not in api.calls

    api.job["spec"]["tensorboard"] = {"enabled": False}
    api.job["metadata"]["generation"] = 2
    reconciler(api).reconcile("ns", "j")
    assert "delete deployment j-tensorboard" in api.calls
    assert "delete service j-tensorboard" in api.calls
    assert "tensorboard" not in api.job["status"]


def test_a_refused_tensorboard_is_said_and_does_not_hold_up_the_workers():
    api = FakeApi()
    api.refuse_deployments = True
    new_job(api, **TENSORBOARD)
    reconciler(api).reconcile("ns", "j")
    assert api.calls.count("create") == 2  # both workers
    assert "TensorboardRejected" in api.events


def test_a_watch_triggered_reconcile_starts_from_the_watched_body_without_reading_it():
    api = FakeApi()
    new_job(api)
    edge = job_api(api)
    edge.remember_job(copy.deepcopy(api.job))  # kopf's ADDED event
    Reconciler(edge).reconcile("ns", "j", cached=True)
    assert "get" not in api.calls
    assert sorted(api.pods) == ["j-worker-0", "j-worker-1"]
    # Its own status write is what the next watch-triggered reconcile starts from.
    assert edge.job("ns", "j", cached=True)["status"] == api.job["status"]


def test_a_stale_watched_body_is_refused_at_the_status_write_and_the_redo_reads_afresh():
    api = FakeApi()
    new_job(api, replicas=2)
    edge = job_api(api)
    edge.remember_job(copy.deepcopy(api.job))  # replicas 2, resourceVersion 0
    # The user scaled to 1 (and the job's resourceVersion moved) before the watch said so.
    api.job["spec"]["replicas"] = 1
    api.job["metadata"]["resourceVersion"] = str(next(api.rv))
    Reconciler(edge).reconcile("ns", "j", cached=True)
    assert api.calls[:4] == ["list", "status", "get", "list"]  # refused (409), then read
    assert sorted(api.pods) == ["j-worker-0"]  # decided on the fresh spec only
    assert api.events.count("CreatedWorkers") == 1


def test_an_older_watch_event_does_not_replace_a_newer_body():
    api = FakeApi()
    new_job(api)
    edge = job_api(api)
    old = copy.deepcopy(api.job)
    Reconciler(edge).reconcile("ns", "j")  # writes status: a newer resourceVersion
    edge.remember_job(old)  # the watch's event for the job as created, arriving late
    assert edge.job("ns", "j", cached=True)["status"] == api.job["status"]


def test_workers_are_created_in_doubling_batches_and_a_refusal_stops_the_next_batch():
    api = FakeApi()
    new_job(api, replicas=16)
    refused_from = 8  # a quota for 8 workers

    real_create = api.create_namespaced_pod

    def create(ns, pod, **kw):
        if int(pod["metadata"]["name"].rsplit("-", 1)[1]) >= refused_from:
            api._call("create")
            raise ApiException(status=403, reason="Forbidden: exceeded quota")
        return real_create(ns, pod, **kw)

    api.create_namespaced_pod = create
    reconciler(api).reconcile("ns", "j")
    # Batches of 2, 4, 8: the third (workers 6-13) meets the quota and no fourth is tried.
    assert api.calls.count("create") == 2 + 4 + 8
    assert sorted(api.pods, key=lambda n: int(n.rsplit("-", 1)[1])) == [
        f"j-worker-{i}" for i in range(8)
    ]
    assert api.job["status"]["reason"] == "PodRejected"
