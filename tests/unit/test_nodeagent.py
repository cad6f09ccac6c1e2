"""The local node agent's decisions: addresses, names, the process plan, the status."""

from datetime import UTC, datetime
from pathlib import Path

import pytest

from joule.builders.pod import worker_pod
from joule.nodeagent import network, podproc
from joule.nodeagent.node import node_object, parse_taint
from joule.nodeagent.status import ContainerState, phase, pod_status
from tests.unit.test_builders import JOB, spec


def test_every_pod_gets_its_own_loopback_address_and_keeps_it():
    pool = network.AddressPool()
    a, b = pool.address("uid-a"), pool.address("uid-b")
    assert a != b and a.startswith("127.") and a != "127.0.0.1"
    assert pool.address("uid-a") == a
    pool.release("uid-a")
    assert pool.address("uid-c") not in (a, b)  # a freed address is not handed out at once


def test_pod_names_resolve_as_cluster_dns_would():
    pod = {
        "metadata": {"namespace": "ml"},
        "spec": {"hostname": "j-worker-0", "subdomain": "j"},
    }
    names = network.dns_names(pod)
    assert "j-worker-0.j" in names and "j-worker-0.j.ml.svc.cluster.local" in names
    assert network.dns_names({"metadata": {}, "spec": {}}) == []


def test_names_and_ports_in_values_are_rewritten_whole():
    ports = network.PortMap(lambda used: 40000 + len(list(used)))
    names = {"j-worker-0.j": "127.0.1.5", "j-worker-0.j.ml.svc": "127.0.1.5"}
    assert network.rewrite("j-worker-0.j:29400", names, ports) == "127.0.1.5:40000"
    assert network.rewrite("j-worker-0.j.ml.svc:29400", names, ports) == "127.0.1.5:40000"
    assert network.rewrite("j-worker-0.j", names, ports) == "127.0.1.5"
    assert network.rewrite("x-j-worker-0.j.example.com", names, ports) == (
        "x-j-worker-0.j.example.com"
    )
    assert network.rewrite("j-worker-0.j:9090", names, ports) == "127.0.1.5:40001"
    ports.release("127.0.1.5")
    assert network.rewrite("j-worker-0.j:29400", names, ports) == "127.0.1.5:40000"


def ctx(tmp: Path) -> podproc.PodContext:
    return podproc.PodContext(
        address="127.0.1.7",
        node_name="local",
        node_address="127.0.0.1",
        pod_dir=tmp / "pod",
        claims_dir=tmp / "claims",
        bin_dir=tmp / "bin",
        names={"llm-worker-0.llm": "127.0.1.6"},
        host_port=lambda address, port: port + 10000,
    )


def operator_pod(**extra) -> dict:
    pod = worker_pod(JOB, spec(image=podproc.TRAINER_IMAGE + ":0.1.0", **extra), 1)
    pod["metadata"]["uid"] = "pod-uid"
    return pod


def test_the_trainer_image_runs_joule_launch_with_the_operators_contract(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "joule-launch").touch()
    pod = operator_pod(
        args=["--steps", "5", "--checkpoint-dir", "/ckpt/run"],
        checkpoint={"path": "/ckpt", "volume": "c"},
        volumes=[{"name": "c", "hostPath": {"path": str(tmp_path / "shared")}}],
    )
    plan = podproc.plan(
        pod, pod["spec"]["containers"][0], ctx(tmp_path), podproc.LocalImages(), {"PATH": "/x"}
    )
    assert isinstance(plan, podproc.ProcessPlan)
    assert plan.argv[0] == str(tmp_path / "bin" / "joule-launch")
    assert plan.argv[1:] == ["--steps", "5", "--checkpoint-dir", f"{tmp_path / 'shared'}/run"]
    env = plan.env
    assert env["PET_RDZV_ENDPOINT"] == "127.0.1.6:39400"  # worker 0's address, a unique port
    assert env["POD_IP"] == "127.0.1.7" and env["POD_NAME"] == "llm-worker-1"
    assert env["JOULE_METRICS_ADDR"] == "127.0.1.7"  # its own address, as in a netns
    assert env["JOULE_CHECKPOINT_DIR"] == str(tmp_path / "shared")
    assert env["PATH"].startswith(str(tmp_path / "bin"))
    assert plan.volumes["/ckpt"] == tmp_path / "shared"
    assert "/dev/shm" not in plan.volumes  # the machine's own


def test_an_image_without_a_local_equivalent_is_refused_with_a_reason(tmp_path):
    pod = operator_pod()
    container = {**pod["spec"]["containers"][0], "image": "nvcr.io/nvidia/pytorch:24.01"}
    refusal = podproc.plan(pod, container, ctx(tmp_path), podproc.LocalImages(), {})
    assert isinstance(refusal, podproc.Refusal)
    assert refusal.reason == "ImageNotRunnableLocally"
    assert "nvcr.io/nvidia/pytorch:24.01" in refusal.message and "--local-image" in refusal.message
    allowed = podproc.LocalImages({"nvcr.io/nvidia/pytorch": []})
    container["command"] = ["python", "-c", "print($(POD_NAME))"]
    plan = podproc.plan(pod, container, ctx(tmp_path), allowed, {})
    assert isinstance(plan, podproc.ProcessPlan)
    assert plan.argv == [str(tmp_path / "bin" / "python"), "-c", "print(llm-worker-1)"]


def test_unsupported_env_sources_are_refused_not_ignored(tmp_path):
    pod = operator_pod()
    container = pod["spec"]["containers"][0]
    container["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    )
    refusal = podproc.plan(pod, container, ctx(tmp_path), podproc.LocalImages(), {})
    assert isinstance(refusal, podproc.Refusal) and "TOKEN" in refusal.message


def test_pod_status_follows_the_processes_as_a_kubelet_reports_them():
    t = datetime(2026, 1, 1, tzinfo=UTC)
    waiting = ContainerState("trainer", "img")
    running = ContainerState("trainer", "img", kind="running", started=t, pid=42)
    ok = ContainerState("trainer", "img", kind="terminated", exit_code=0, started=t, finished=t)
    bad = ContainerState("trainer", "img", kind="terminated", exit_code=143)
    assert [phase([c]) for c in (waiting, running, ok, bad)] == [
        "Pending", "Running", "Succeeded", "Failed"
    ]  # fmt: skip
    status = pod_status([running], "127.0.1.9", "127.0.0.1", t)
    assert status["podIP"] == "127.0.1.9" and status["hostIP"] == "127.0.0.1"
    (c,) = status["containerStatuses"]
    assert c["ready"] and c["state"]["running"]["startedAt"] == "2026-01-01T00:00:00Z"
    assert c["containerID"] == "local://42"
    ready = {x["type"]: x["status"] for x in status["conditions"]}["Ready"]
    assert ready == "True"
    term = pod_status([bad], "127.0.1.9", "127.0.0.1", t)["containerStatuses"][0]["state"]
    assert term["terminated"]["exitCode"] == 143 and term["terminated"]["reason"] == "Error"


def test_the_node_advertises_virtual_gpus_and_taints():
    from joule.nodeagent.node import NodeSpec

    taint = parse_taint("joule.dev/local-node=true:NoSchedule")
    assert taint == {"key": "joule.dev/local-node", "value": "true", "effect": "NoSchedule"}
    node = node_object(NodeSpec(gpus=3, taints=(taint,)), datetime.now(UTC), "v")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "3"
    assert node["spec"]["taints"] == [taint]
    assert node["metadata"]["labels"]["joule.dev/local-node"] == "true"
    with pytest.raises(ValueError, match="NoSchedule"):
        parse_taint("key=value")


def test_the_power_limit_annotation_reaches_the_trainer_through_a_downward_api_file(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "joule-launch").touch()
    pod = operator_pod(energy={"gpuPowerLimitWatts": 300})
    plan = podproc.plan(pod, pod["spec"]["containers"][0], ctx(tmp_path), podproc.LocalImages(), {})
    assert isinstance(plan, podproc.ProcessPlan)
    volume_dir = tmp_path / "pod" / "volumes" / "joule-power"
    assert plan.env["JOULE_POWER_LIMIT_FILE"] == str(volume_dir / "gpu-power-limit-watts")
    assert podproc.downward_files(pod, ctx(tmp_path)) == {
        volume_dir / "gpu-power-limit-watts": "300"
    }
    del pod["metadata"]["annotations"]  # the operator removed the limit: an empty file
    assert set(podproc.downward_files(pod, ctx(tmp_path)).values()) == {""}
    pod["spec"]["volumes"].append(
        {"name": "cpu", "downwardAPI": {"items": [{"path": "c", "resourceFieldRef": {}}]}}
    )
    refusal = podproc.plan(
        pod, pod["spec"]["containers"][0], ctx(tmp_path), podproc.LocalImages(), {}
    )
    assert isinstance(refusal, podproc.Refusal) and "only fieldRef items" in refusal.message
