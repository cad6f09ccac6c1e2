"""Worker pods and the service, as the scheduler and torchrun will see them."""

from joule.api import JobRef, TrainingJobSpec
from joule.builders import worker_pod, worker_service
from joule.constants import LABEL_INDEX, LABEL_JOB, POWER_LIMIT_ANNOTATION

JOB = JobRef("llm", "team-a", "uid-123")


def env_of(pod):
    return {
        e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]
    }


def spec(**kw):
    return TrainingJobSpec.parse({"image": "trainer:1", **kw})


def test_pod_carries_gpus_labels_owner_and_a_stable_dns_name():
    pod = worker_pod(JOB, spec(replicas=2, gpusPerReplica=8), 1)
    assert pod["metadata"]["name"] == "llm-worker-1"
    assert pod["metadata"]["labels"][LABEL_JOB] == "llm"
    assert pod["metadata"]["labels"][LABEL_INDEX] == "1"
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("TrainingJob", "uid-123", True)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["spec"]["hostname"] == "llm-worker-1"
    assert pod["spec"]["subdomain"] == "llm"
    assert pod["spec"]["restartPolicy"] == "Never"
    # A worker that dies without a message file leaves its log's tail for the job's status.
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_torchrun_contract_for_a_fixed_size_job():
    env = env_of(worker_pod(JOB, spec(replicas=2, gpusPerReplica=8), 1))
    assert env["PET_NNODES"] == "2:2"
    assert env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_RDZV_BACKEND"] == "c10d"
    assert env["PET_RDZV_ENDPOINT"] == "llm-worker-0.llm:29400"
    assert env["PET_RDZV_ID"] == "uid-123"
    assert env["MASTER_ADDR"] == "llm-worker-0.llm"
    assert env["PET_NODE_RANK"] == "1"
    assert env["WORLD_SIZE"] == "16"
    # Only worker 0 hosts the rendezvous store, wherever the pods run.
    assert env["PET_RDZV_CONF"] == "is_host=false"
    assert env_of(worker_pod(JOB, spec(replicas=2), 0))["PET_RDZV_CONF"] == "is_host=true"


def test_elastic_job_leaves_ranks_to_the_rendezvous():
    env = env_of(worker_pod(JOB, spec(replicas=2, elastic={"minReplicas": 1, "maxReplicas": 4}), 0))
    assert env["PET_NNODES"] == "1:4"
    assert "PET_NODE_RANK" not in env and "WORLD_SIZE" not in env


def test_user_env_is_kept_but_cannot_override_the_rendezvous():
    s = spec(
        env=[{"name": "PET_RDZV_ENDPOINT", "value": "evil:1"}, {"name": "LR", "value": "3e-4"}]
    )
    env = env_of(worker_pod(JOB, s, 0))
    assert env["PET_RDZV_ENDPOINT"] == "llm-worker-0.llm:29400"
    assert env["LR"] == "3e-4"


def test_user_rendezvous_tuning_is_kept_but_worker_0_stays_the_host():
    s = spec(env=[{"name": "PET_RDZV_CONF", "value": "join_timeout=60,is_host=true"}])
    env = env_of(worker_pod(JOB, s, 1))
    assert env["PET_RDZV_CONF"] == "join_timeout=60,is_host=true,is_host=false"


def test_shared_memory_checkpoint_volume_and_quantities():
    s = spec(
        sharedMemory="16Gi",
        resources={"requests": {"cpu": 8, "memory": "64Gi"}},
        volumes=[{"name": "ckpt", "persistentVolumeClaim": {"claimName": "c"}}],
        checkpoint={"path": "/ckpt", "volume": "ckpt"},
        gpusPerReplica=0,
    )
    pod = worker_pod(JOB, s, 0)
    container = pod["spec"]["containers"][0]
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "joule-dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "joule-dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "ckpt", "mountPath": "/ckpt"} in container["volumeMounts"]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"}}
    assert env_of(pod)["JOULE_CHECKPOINT_DIR"] == "/ckpt"
    assert env_of(pod)["PET_NPROC_PER_NODE"] == "1"


def test_placement_and_extra_metadata_pass_through():
    s = spec(
        nodeSelector={"nvidia.com/gpu.product": "H100"},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        priorityClassName="high",
        schedulerName="volcano",
        podLabels={"team": "a", LABEL_JOB: "spoofed"},
        podAnnotations={"note": "x"},
        command=["torchrun"],
        args=["train.py"],
    )
    pod = worker_pod(JOB, s, 0)
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["spec"]["schedulerName"] == "volcano"
    assert pod["spec"]["priorityClassName"] == "high"
    assert pod["metadata"]["labels"]["team"] == "a"
    assert pod["metadata"]["labels"][LABEL_JOB] == "llm"  # ours wins: the selector must hold
    assert pod["metadata"]["annotations"] == {
        "note": "x",
        # Prometheus' pod discovery finds the workers' series as it finds the operator's.
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    assert pod["spec"]["containers"][0]["command"] == ["torchrun"]
    quiet = worker_pod(JOB, spec(podAnnotations={"prometheus.io/scrape": "false"}), 0)
    assert quiet["metadata"]["annotations"]["prometheus.io/scrape"] == "false"  # the user's say


def test_headless_service_publishes_not_ready_workers():
    svc = worker_service(JOB)
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_JOB: "llm"}


def test_the_power_limit_travels_as_an_annotation_and_a_downward_api_file():
    plain = worker_pod(JOB, spec(), 0)
    assert POWER_LIMIT_ANNOTATION not in plain["metadata"].get("annotations", {})
    limited = worker_pod(JOB, spec(energy={"gpuPowerLimitWatts": 400}), 0)
    assert limited["metadata"]["annotations"][POWER_LIMIT_ANNOTATION] == "400"
    lowered = worker_pod(JOB, spec(energy={"gpuPowerLimitWatts": 400}), 0, 287.5)
    assert lowered["metadata"]["annotations"][POWER_LIMIT_ANNOTATION] == "287.5"
    volume = next(v for v in lowered["spec"]["volumes"] if "downwardAPI" in v)
    path = volume["downwardAPI"]["items"][0]
    assert path["fieldRef"]["fieldPath"] == f"metadata.annotations['{POWER_LIMIT_ANNOTATION}']"
    mount = next(
        m for m in lowered["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume["name"]
    )
    assert env_of(lowered)["JOULE_POWER_LIMIT_FILE"] == f"{mount['mountPath']}/{path['path']}"


def test_torchrun_restarts_do_not_follow_the_backoff_limit_and_a_users_setting_wins():
    # backoffLimit counts failed pods; torchrun's in-place restarts are another level.
    assert env_of(worker_pod(JOB, spec(backoffLimit=0), 0))["PET_MAX_RESTARTS"] == "3"
    assert env_of(worker_pod(JOB, spec(backoffLimit=9), 0))["PET_MAX_RESTARTS"] == "3"
    mine = spec(backoffLimit=9, env=[{"name": "PET_MAX_RESTARTS", "value": "0"}])
    names = [e["name"] for e in worker_pod(JOB, mine, 0)["spec"]["containers"][0]["env"]]
    assert names.count("PET_MAX_RESTARTS") == 1
    assert env_of(worker_pod(JOB, mine, 0))["PET_MAX_RESTARTS"] == "0"


def test_with_node_agents_the_trainer_is_not_told_to_apply_limits_itself():
    pod = worker_pod(JOB, spec(energy={"gpuPowerLimitWatts": 400}), 0, None, False)
    assert pod["metadata"]["annotations"][POWER_LIMIT_ANNOTATION] == "400"  # the agent reads it
    assert "JOULE_POWER_LIMIT_FILE" not in env_of(pod)


def test_workers_run_without_privilege_and_the_spec_may_tighten_or_loosen_it():
    pod = worker_pod(JOB, spec(), 0)
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["spec"]["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    restricted = worker_pod(JOB, spec(podSecurityContext={"runAsNonRoot": True},
                                      securityContext={"runAsUser": 1000}), 0)  # fmt: skip
    assert restricted["spec"]["securityContext"]["runAsNonRoot"] is True
    assert restricted["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert restricted["spec"]["containers"][0]["securityContext"]["runAsUser"] == 1000
    loose = worker_pod(JOB, spec(securityContext={"capabilities": {"add": ["SYS_PTRACE"]}}), 0)
    assert loose["spec"]["containers"][0]["securityContext"]["capabilities"] == {
        "add": ["SYS_PTRACE"]
    }  # the user's choice, whole
