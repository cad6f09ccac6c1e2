"""The operator against the real control plane: kubectl in, pods, status and events out.

kwok marks scheduled pods Running; where a test needs a worker to exit, it writes the pod's
status the way a kubelet would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import ROOT, wait_for

GROUP, VERSION, PLURAL = "joule.dev", "v1alpha1", "trainingjobs"


def manifest(name: str, **spec) -> str:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"image": "trainer:test", **spec},
    }
    return yaml.safe_dump(body)


@pytest.fixture
def jobs(api, operator):
    return client.CustomObjectsApi(api)


def apply_job(kubectl, namespace: str, name: str, **spec):
    return kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest(name, **spec))


def job(jobs, namespace, name) -> dict:
    return jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_phase(jobs, namespace, name, phase, timeout=30.0) -> dict:
    def check():
        body = job(jobs, namespace, name)
        return body if body.get("status", {}).get("phase") == phase else None

    try:
        return wait_for(check, timeout=timeout, what=f"{name} to be {phase}")
    except AssertionError:
        status = job(jobs, namespace, name).get("status")
        raise AssertionError(f"{name} never reached {phase}; status: {status}") from None


def pods_of(core, namespace, name) -> list[client.V1Pod]:
    items = core.list_namespaced_pod(namespace, label_selector=f"joule.dev/job-name={name}").items
    return sorted(items, key=lambda p: p.metadata.name)


def events_of(core, namespace, name) -> list[str]:
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [e.reason for e in events.items]


def finish_pod(core, namespace, pod_name, exit_code: int, reason: str = "Completed") -> None:
    """Write a terminated container status, as a kubelet does when the process exits."""
    pod = core.read_namespaced_pod(pod_name, namespace)
    phase = "Succeeded" if exit_code == 0 else "Failed"
    status = {
        "phase": phase,
        "containerStatuses": [
            {
                "name": "trainer",
                "image": pod.spec.containers[0].image,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": reason}},
            }
        ],
    }
    core.patch_namespaced_pod_status(pod_name, namespace, {"status": status})


def test_examples_apply_and_kubectl_shows_them(kubectl, jobs, namespace):
    kubectl("apply", "-n", namespace, "-f", str(ROOT / "examples"))
    for name in ("llm-fixed", "elastic"):
        wait_phase(jobs, namespace, name, "Running")
    table = kubectl("get", "tj", "-n", namespace).stdout
    assert "PHASE" in table and "GPUS" in table
    row = next(line for line in table.splitlines() if line.startswith("llm-fixed"))
    assert row.split()[1:5] == ["Running", "2", "2", "16"]
    # The other example folders pass the API server's validation too (not run: they would
    # need the local node, or GPUs beyond this cluster's).
    for folder in ("demo", "scaling", "template"):
        kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(ROOT / "examples" / folder))
    explain = kubectl("explain", "trainingjob.spec.elastic").stdout
    assert "Bounds within which the job may be resized" in explain
    assert "minReplicas" in explain


def test_two_workers_of_eight_gpus_land_on_two_nodes_with_the_torchrun_env(
    kubectl, jobs, core, namespace
):
    apply_job(kubectl, namespace, "ddp", replicas=2, gpusPerReplica=8)
    body = wait_phase(jobs, namespace, "ddp", "Running")
    assert body["status"]["readyReplicas"] == 2 and body["status"]["gpus"] == 16
    pods = pods_of(core, namespace, "ddp")
    assert [p.status.phase for p in pods] == ["Running", "Running"]
    assert len({p.spec.node_name for p in pods}) == 2
    env = {e.name: e.value for e in pods[1].spec.containers[0].env}
    assert env["PET_NNODES"] == "2:2"
    assert env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_RDZV_ENDPOINT"] == "ddp-worker-0.ddp:29400"
    assert env["PET_NODE_RANK"] == "1"
    svc = core.read_namespaced_service("ddp", namespace)
    assert svc.spec.cluster_ip == "None"
    assert {"CreatedWorkers", "Running"} <= set(events_of(core, namespace, "ddp"))


def test_a_gang_larger_than_the_cluster_never_holds_gpus_past_its_timeout(
    kubectl, jobs, core, namespace
):
    # 5 x 8 GPUs on a cluster of 4 x 8: four pods could run, the fifth never fits.
    apply_job(
        kubectl,
        namespace,
        "huge",
        replicas=5,
        gpusPerReplica=8,
        startupTimeoutSeconds=3,
        backoffLimit=1,
    )
    body = wait_phase(jobs, namespace, "huge", "Failed", timeout=60)
    assert body["status"]["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in json.dumps(body["status"]["podFailure"])
    assert body["status"]["restarts"] == 2
    wait_for(
        lambda: (
            not [
                p for p in pods_of(core, namespace, "huge") if p.metadata.deletion_timestamp is None
            ]
        ),
        what="the partial gang to be released",
    )
    assert "StartupTimeout" in events_of(core, namespace, "huge")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"replicas": 5, "elastic": {"minReplicas": 1, "maxReplicas": 4}},
            "replicas must lie within",
        ),
        (
            {"replicas": 2, "elastic": {"minReplicas": 3, "maxReplicas": 2}},
            "elastic.minReplicas must be less than or equal to elastic.maxReplicas",
        ),
        ({"gpusPerReplica": -1}, "spec.gpusPerReplica"),
        ({"replicaz": 2}, 'unknown field "spec.replicaz"'),
        ({"cleanPodPolicy": "Sometimes"}, "spec.cleanPodPolicy"),
        ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "set GPUs with spec.gpusPerReplica"),
        ({"scaling": {"policy": "Throughput"}}, "needs spec.elastic bounds to scale within"),
        ({"scaling": {"policy": "Fastest"}}, "spec.scaling.policy"),
        ({"energy": {"budget": "lots"}}, "budget must be a positive number of joules"),
        ({"energy": {"budget": "250 kWh"}}, "budget must be a positive number of joules"),
        ({"energy": {"powerCapWatts": 0}}, "spec.energy.powerCapWatts"),
        ({"energy": {"gpuPowerLimitWatts": 0}}, "spec.energy.gpuPowerLimitWatts"),
        ({"energy": {"minGpuPowerLimitWatts": -5}}, "spec.energy.minGpuPowerLimitWatts"),
        ({"energy": {"onBudgetExhausted": "Panic"}}, "spec.energy.onBudgetExhausted"),
        ({"target": {"deadline": "tomorrow"}}, "spec.target.deadline"),
        (
            {"energy": {"minGpuPowerLimitWatts": 150}},
            "energy.minGpuPowerLimitWatts needs powerCapWatts, budget or scaling.policy",
        ),
        (
            {
                "energy": {
                    "powerCapWatts": 900,
                    "gpuPowerLimitWatts": 200,
                    "minGpuPowerLimitWatts": 300,
                }
            },
            "minGpuPowerLimitWatts must not be above gpuPowerLimitWatts",
        ),
    ],
)
def test_invalid_manifests_are_rejected_with_the_schema_message(
    kubectl, crd, namespace, spec, message
):
    proc = kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest("bad", **spec), check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_a_failed_worker_is_replaced_until_the_backoff_limit(kubectl, jobs, core, namespace):
    apply_job(kubectl, namespace, "flaky", replicas=2, backoffLimit=1)
    wait_phase(jobs, namespace, "flaky", "Running")
    first = core.read_namespaced_pod("flaky-worker-1", namespace).metadata.uid
    finish_pod(core, namespace, "flaky-worker-1", 137, "OOMKilled")

    def replaced():
        pods = {p.metadata.name: p for p in pods_of(core, namespace, "flaky")}
        new = pods.get("flaky-worker-1")
        return new is not None and new.metadata.uid != first and new.status.phase == "Running"

    wait_for(replaced, what="a replacement for flaky-worker-1")
    body = wait_phase(jobs, namespace, "flaky", "Running")
    assert body["status"]["restarts"] == 1
    assert "podFailure" not in body["status"]  # recovered: nothing is failing now

    finish_pod(core, namespace, "flaky-worker-0", 1, "Error")
    body = wait_phase(jobs, namespace, "flaky", "Failed")
    assert body["status"]["reason"] == "BackoffLimitExceeded"
    assert "flaky-worker-0 failed (Error, exit code 1)" in body["status"]["message"]
    assert body["status"]["completionTime"]
    assert "WorkerFailed" in events_of(core, namespace, "flaky")


def test_workers_exiting_zero_make_the_job_succeed(kubectl, jobs, core, namespace):
    apply_job(kubectl, namespace, "done", replicas=2)
    wait_phase(jobs, namespace, "done", "Running")
    for i in range(2):
        finish_pod(core, namespace, f"done-worker-{i}", 0)
    body = wait_phase(jobs, namespace, "done", "Succeeded")
    assert body["status"]["completionTime"]
    succeeded = next(c for c in body["status"]["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True"
    # cleanPodPolicy Running (the default) keeps finished pods, for their logs.
    assert len(pods_of(core, namespace, "done")) == 2


def test_the_ttl_deletes_a_finished_job_and_the_deadline_fails_a_long_one(
    kubectl, jobs, core, namespace
):
    apply_job(
        kubectl, namespace, "short", replicas=1, ttlSecondsAfterFinished=1, cleanPodPolicy="All"
    )
    apply_job(kubectl, namespace, "slow", replicas=1, activeDeadlineSeconds=3)
    wait_phase(jobs, namespace, "short", "Running")
    finish_pod(core, namespace, "short-worker-0", 0)

    def deleted():
        names = [
            j["metadata"]["name"]
            for j in jobs.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        ]
        return "short" not in names

    wait_for(deleted, timeout=30, what="ttlSecondsAfterFinished to delete the job")
    body = wait_phase(jobs, namespace, "slow", "Failed", timeout=30)
    assert body["status"]["reason"] == "DeadlineExceeded"
    wait_for(
        lambda: all(
            p.metadata.deletion_timestamp or p.status.phase != "Running"
            for p in pods_of(core, namespace, "slow")
        ),
        what="the deadline to stop the running worker",
    )


def test_deleting_a_job_removes_its_pods_and_service(kubectl, jobs, core, namespace):
    apply_job(kubectl, namespace, "gone", replicas=2)
    wait_phase(jobs, namespace, "gone", "Running")
    kubectl("delete", "tj", "gone", "-n", namespace, "--wait=true", "--timeout=30s")
    wait_for(lambda: not pods_of(core, namespace, "gone"), what="pods to be collected")
    wait_for(
        lambda: (
            not core.list_namespaced_service(namespace, field_selector="metadata.name=gone").items
        ),
        what="service to be collected",
    )


def test_scale_down_up_suspend_and_resume(kubectl, jobs, core, namespace):
    apply_job(kubectl, namespace, "el", replicas=2, elastic={"minReplicas": 1, "maxReplicas": 4})
    wait_phase(jobs, namespace, "el", "Running")
    worker0 = core.read_namespaced_pod("el-worker-0", namespace).metadata.uid

    kubectl("scale", "tj/el", "-n", namespace, "--replicas=4")
    wait_for(
        lambda: job(jobs, namespace, "el")["status"].get("readyReplicas") == 4,
        what="4 ready workers",
    )
    kubectl("scale", "tj/el", "-n", namespace, "--replicas=1")

    def only_worker_0():
        live = [
            p.metadata.name
            for p in pods_of(core, namespace, "el")
            if p.metadata.deletion_timestamp is None
        ]
        return live == ["el-worker-0"]

    wait_for(only_worker_0, what="scale down to worker 0")
    assert core.read_namespaced_pod("el-worker-0", namespace).metadata.uid == worker0
    wait_phase(jobs, namespace, "el", "Running")
    over = kubectl("scale", "tj/el", "-n", namespace, "--replicas=5", check=False)
    assert over.returncode != 0 and "replicas must lie within" in over.stderr

    kubectl("patch", "tj", "el", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    body = wait_phase(jobs, namespace, "el", "Suspended")
    wait_for(lambda: not pods_of(core, namespace, "el"), what="suspended pods to go")
    assert body["status"]["replicas"] == 0
    kubectl(
        "patch", "tj", "el", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    wait_phase(jobs, namespace, "el", "Running")
    assert {"Suspended", "Resumed", "RemovedWorkers"} <= set(events_of(core, namespace, "el"))


def test_killing_the_operator_mid_creation_leaves_exactly_the_desired_pods(
    kubectl, jobs, core, namespace, operator
):
    for attempt in range(3):
        name = f"restart-{attempt}"
        apply_job(kubectl, namespace, name, replicas=4)
        # Kill as soon as the first pod exists: the others are being created right now.
        wait_for(lambda n=name: pods_of(core, namespace, n), interval=0.01, what="a first pod")
        operator.kill()
        operator.start()
        body = wait_phase(jobs, namespace, name, "Running")
        names = [p.metadata.name for p in pods_of(core, namespace, name)]
        assert names == [f"{name}-worker-{i}" for i in range(4)]
        assert body["status"]["replicas"] == 4


def test_status_and_spec_stay_apart_for_gitops(kubectl, jobs, namespace):
    apply_job(kubectl, namespace, "git", replicas=1)
    body = wait_phase(jobs, namespace, "git", "Running")
    # No finalizer (the job stays deletable without the operator) and no annotations of ours.
    assert not body["metadata"].get("finalizers")
    annotations = body["metadata"].get("annotations") or {}
    assert not [k for k in annotations if "joule" in k or "kopf" in k]
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    # Re-applying the same manifest is a no-op: nothing drifts.
    out = apply_job(kubectl, namespace, "git", replicas=1).stdout
    assert "unchanged" in out


def test_examples_folder_is_valid_yaml():
    """Every example job holds one TrainingJob, with the objects it needs (a checkpoint claim).
    examples/gitops/ holds Argo CD and Flux objects too; its jobs/ folder is jobs."""
    gitops = ROOT / "examples" / "gitops"
    for path in Path(ROOT / "examples").rglob("*.yaml"):
        if path.is_relative_to(gitops) and not path.is_relative_to(gitops / "jobs"):
            continue
        kinds = [d["kind"] for d in yaml.safe_load_all(path.read_text()) if d]
        assert kinds.count("TrainingJob") == 1, (path, kinds)
        assert set(kinds) <= {"TrainingJob", "PersistentVolumeClaim"}, (path, kinds)


def test_a_worker_deleted_by_a_scale_down_is_not_counted_as_a_failure(
    kubectl, jobs, core, namespace
):
    """A real kubelet reports a deleted pod as Failed (exit 143 after SIGTERM) before it is
    gone; kwok removes it at once. A finalizer holds the pod in Terminating here, so that the
    operator sees what it sees on a real node."""
    apply_job(kubectl, namespace, "sd", replicas=2, backoffLimit=0,
              elastic={"minReplicas": 1, "maxReplicas": 2})  # fmt: skip
    wait_phase(jobs, namespace, "sd", "Running")
    hold = {"metadata": {"finalizers": ["joule.dev/test-hold"]}}
    core.patch_namespaced_pod("sd-worker-1", namespace, hold)
    kubectl("scale", "tj/sd", "-n", namespace, "--replicas=1")
    wait_for(
        lambda: core.read_namespaced_pod("sd-worker-1", namespace).metadata.deletion_timestamp,
        what="worker 1 to be terminating",
    )
    finish_pod(core, namespace, "sd-worker-1", 143, reason="Error")  # SIGTERM, as kubelets do
    time.sleep(3)  # the operator reconciles on that pod event
    body = job(jobs, namespace, "sd")
    assert body["status"]["phase"] == "Running"  # at its new size, not Failed
    assert body["status"]["restarts"] == 0 and "podFailure" not in body["status"]
    core.patch_namespaced_pod("sd-worker-1", namespace, {"metadata": {"finalizers": None}})
    body = wait_phase(jobs, namespace, "sd", "Running")
    assert body["status"]["restarts"] == 0
    assert "WorkerFailed" not in events_of(core, namespace, "sd")


def test_a_worker_the_api_server_refuses_shows_stalled_with_its_message(
    kubectl, jobs, core, namespace
):
    quota = client.V1ResourceQuota(
        metadata=client.V1ObjectMeta(name="no-pods"),
        spec=client.V1ResourceQuotaSpec(hard={"pods": "0"}),
    )
    core.create_namespaced_resource_quota(namespace, quota)
    wait_for(
        lambda: core.read_namespaced_resource_quota("no-pods", namespace).status.hard or {},
        what="the quota to be counted",
    )
    apply_job(kubectl, namespace, "refused", replicas=1)

    def stalled():
        st = job(jobs, namespace, "refused").get("status") or {}
        cond = {c["type"]: c for c in st.get("conditions", [])}
        return st if cond.get("Stalled", {}).get("status") == "True" else None

    st = wait_for(stalled, what="a Stalled condition")
    assert st["reason"] == "PodRejected"
    assert "exceeded quota" in st["podFailure"]["message"]
    assert "PodRejected" in events_of(core, namespace, "refused")
    # Room at last: the refusal clears and the worker runs.
    core.delete_namespaced_resource_quota("no-pods", namespace)
    wait_phase(jobs, namespace, "refused", "Running", timeout=60)


def stalled_with(jobs, namespace: str, name: str) -> dict:
    def stalled():
        st = job(jobs, namespace, name).get("status") or {}
        cond = {c["type"]: c for c in st.get("conditions", [])}
        return st if cond.get("Stalled", {}).get("status") == "True" else None

    return wait_for(stalled, what=f"{name} to be Stalled")


def test_a_job_gives_its_author_no_more_than_creating_pods_would(kubectl, jobs, core, namespace):
    """The operator creates the workers with its own rights, but admission judges them in
    the job's namespace as it would the author's own pods: a hostPath where the baseline
    Pod Security Standard is enforced, or a ServiceAccount the namespace does not have, is
    refused, and the job says so."""
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=baseline")
    apply_job(kubectl, namespace, "host", replicas=1,
              volumes=[{"name": "root", "hostPath": {"path": "/"}}],
              volumeMounts=[{"name": "root", "mountPath": "/host"}])  # fmt: skip
    st = stalled_with(jobs, namespace, "host")
    assert st["reason"] == "PodRejected"
    assert "violates PodSecurity" in st["message"] and "hostPath" in st["message"], st
    # The operator's own account lives in another namespace; this one has no such account.
    apply_job(kubectl, namespace, "borrowed", replicas=1, serviceAccountName="joule-operator")
    st = stalled_with(jobs, namespace, "borrowed")
    assert st["reason"] == "PodRejected"
    assert 'serviceaccount "joule-operator" not found' in st["message"].lower(), st
    assert pods_of(core, namespace, "host") == [] and pods_of(core, namespace, "borrowed") == []


def test_a_misspelt_field_inside_the_template_is_refused_and_named(kubectl, jobs, core, namespace):
    """The CRD keeps some of a template's fields as written (resources, probes, volumes:
    restating all of a PodSpec in its schema would pass the CRD size limit), so a typo
    there reaches the operator: the worker is refused, and the job is Stalled with the
    field's path, instead of failing its reconcile over and over without a word."""
    apply_job(kubectl, namespace, "typo", replicas=1,
              template={"spec": {"containers": [
                  {"name": "trainer", "resources": {"limitz": {"cpu": "1"}}},
              ]}})  # fmt: skip
    st = stalled_with(jobs, namespace, "typo")
    assert st["reason"] == "PodRejected", st
    assert 'unknown field "spec.containers[0].resources.limitz"' in st["message"], st
    assert pods_of(core, namespace, "typo") == []


def test_a_template_adds_init_containers_sidecars_and_spreading_to_every_worker(
    kubectl, jobs, core, namespace
):
    """spec.template's init container, native sidecar, extra container, topology spread and
    runtime class reach each worker as the API server stored it (so the merged pod is valid to
    it), with Joule's trainer first and what Joule owns unmoved."""
    runtime = f"joule-{namespace}"  # cluster-scoped: one per test namespace
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": runtime}, "handler": "runc",
    }))  # fmt: skip
    spread = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
              "whenUnsatisfiable": "DoNotSchedule",
              "labelSelector": {"matchLabels": {"joule.dev/job-name": "tpl"}}}  # fmt: skip
    template = {
        "metadata": {"labels": {"team": "vision"}},
        "spec": {
            "initContainers": [
                {"name": "fetch", "image": "busybox", "command": ["true"]},
                {"name": "proxy", "image": "envoy", "restartPolicy": "Always"},
            ],
            "containers": [
                {"name": "logs", "image": "fluent-bit"},
                {"name": "trainer", "env": [{"name": "DATA_DIR", "value": "/data"}],
                 "readinessProbe": {"tcpSocket": {"port": 29400}}},
            ],
            "topologySpreadConstraints": [spread],
            "runtimeClassName": runtime,
            "terminationGracePeriodSeconds": 120,
        },
    }  # fmt: skip
    try:
        apply_job(kubectl, namespace, "tpl", replicas=2, gpusPerReplica=1, template=template)
        wait_phase(jobs, namespace, "tpl", "Running")
        pods = pods_of(core, namespace, "tpl")
        assert len(pods) == 2
        assert len({p.spec.node_name for p in pods}) == 2  # spread, one per node
        for pod in pods:
            s = pod.spec
            assert [c.name for c in s.init_containers] == ["fetch", "proxy"]
            assert s.init_containers[1].restart_policy == "Always"
            assert [c.name for c in s.containers] == ["trainer", "logs"]
            trainer = s.containers[0]
            assert trainer.image == "trainer:test"
            assert trainer.resources.limits["nvidia.com/gpu"] == "1"
            env = {e.name: e.value for e in trainer.env}
            assert env["DATA_DIR"] == "/data"
            assert env["PET_RDZV_ENDPOINT"] == "tpl-worker-0.tpl:29400"  # Joule's
            assert trainer.readiness_probe.tcp_socket.port == 29400
            assert s.topology_spread_constraints[0].topology_key == "kubernetes.io/hostname"
            assert s.runtime_class_name == runtime
            assert s.termination_grace_period_seconds == 120
            owned = (s.restart_policy, s.hostname, s.subdomain)
            assert owned == ("Never", pod.metadata.name, "tpl")
            labels = pod.metadata.labels
            assert labels["team"] == "vision" and labels["joule.dev/job-name"] == "tpl"
            annotations = pod.metadata.annotations
            assert annotations["kubectl.kubernetes.io/default-container"] == "trainer"
    finally:
        kubectl("delete", "runtimeclass", runtime, "--ignore-not-found")


def test_the_operators_metrics_follow_each_job_and_drop_it_when_it_goes(
    kubectl, jobs, core, operator, namespace
):
    from prometheus_client.parser import text_string_to_metric_families

    def series() -> dict[tuple[str, str], float]:
        import urllib.request

        with urllib.request.urlopen(operator.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (s.name, s.labels.get("phase") or s.labels.get("reason") or ""): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.labels.get("namespace") == namespace and s.labels.get("joule_job") == "seen"
        }

    apply_job(kubectl, namespace, "seen", replicas=2, backoffLimit=2)
    wait_phase(jobs, namespace, "seen", "Running")
    got = wait_for(lambda: (s := series()).get(("joule_job_ready_replicas", "")) == 2 and s,
                   what="the job's series at 2 ready workers")  # fmt: skip
    assert got[("joule_job_phase", "Running")] == 1
    assert got[("joule_job_desired_replicas", "")] == 2
    assert got[("joule_job_gpus", "")] > 0
    finish_pod(core, namespace, "seen-worker-1", 137, "OOMKilled")
    wait_for(lambda: series().get(("joule_job_decisions_total", "WorkerFailed")) == 1,
             what="the failure counted among the job's decisions")  # fmt: skip
    kubectl("delete", "tj", "seen", "-n", namespace, "--wait=true")
    wait_for(lambda: not series(), what="the job's series to go with it")
