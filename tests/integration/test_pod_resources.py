"""The kubelet's pod-resources API reports the GPU slots a pod holds, as on a GPU node.

A pod asking for ``nvidia.com/gpu: 2`` runs on the real node; the device plugin binary's
``pod-resources`` mode, run inside the node's mount namespace (where the kubelet runs), asks
the kubelet's PodResourcesLister and must list that pod with two distinct slots, and the node's
four slots as allocatable. The node agent's Python client (``joule.nodeagent.podresources``),
run there too, must give the same answer as the Go binary."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from kubernetes import client

from joule.cluster import ClusterInfo, ClusterSettings
from joule.cluster.deviceplugin import (
    DEFAULT_RESOURCE,
    ensure_device_plugin,
    pod_resources_argv,
    pod_resources_socket,
)
from joule.cluster.realnode import NodeRecord, in_namespace
from tests.conftest import RealNode, wait_for

pytestmark = pytest.mark.cluster

PAUSE = "registry.k8s.io/pause:3.10.2"  # imported on the node by `up`: no pull
SLOTS = ClusterSettings().node_gpus  # the slots the test cluster's node advertises (4)


def node_namespace_holder(cluster: ClusterInfo):
    holders = [p for p in cluster.processes if p.name == "node-namespace"]
    assert len(holders) == 1, f"cluster.json has no single node-namespace process: {holders}"
    return holders[0]


def pod_resources(cluster: ClusterInfo) -> dict[str, Any]:
    """The lister's JSON, asked from inside the node's mount namespace."""
    assert cluster.node is not None, "the test cluster has no real node (tests run as root)"
    socket = pod_resources_socket(NodeRecord.from_json(cluster.node).layout().kubelet_dir)
    argv = in_namespace(
        node_namespace_holder(cluster), pod_resources_argv(ensure_device_plugin(), socket)
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


# Prints what the Python client reads, in the Go binary's JSON shape. The node's mount
# namespace is a slave copy of the host's (unshare --mount --propagation slave) with only the
# kubelet's fixed folders mounted over, so this interpreter and the repository are there too.
PYTHON_LISTER = """
import json, sys
from pathlib import Path
from joule.nodeagent.podresources import PodResourcesClient

def devices(by_resource):
    return {resource: list(ids) for resource, ids in by_resource.items()}

with PodResourcesClient(Path(sys.argv[1]), timeout_s=10) as lister:
    pods, allocatable = lister.list(), lister.allocatable()
json.dump({
    "pods": [
        {"namespace": p.namespace, "name": p.name,
         "containers": [{"name": c.name, "devices": devices(c.devices)} for c in p.containers]}
        for p in pods
    ],
    "allocatable": devices(allocatable),
}, sys.stdout)
"""


def python_pod_resources(cluster: ClusterInfo) -> dict[str, Any]:
    """The Python client's answer, asked from inside the node's mount namespace."""
    assert cluster.node is not None, "the test cluster has no real node (tests run as root)"
    socket = pod_resources_socket(NodeRecord.from_json(cluster.node).layout().kubelet_dir)
    argv = in_namespace(
        node_namespace_holder(cluster), [sys.executable, "-c", PYTHON_LISTER, str(socket)]
    )
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"the Python client failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


def gpu_pod(name: str, count: int) -> client.V1Pod:
    placement = RealNode.placement()
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            node_selector=placement["nodeSelector"],
            tolerations=[client.V1Toleration(**t) for t in placement["tolerations"]],
            termination_grace_period_seconds=0,
            containers=[
                client.V1Container(
                    name="holder",
                    image=PAUSE,
                    image_pull_policy="Never",
                    resources=client.V1ResourceRequirements(limits={DEFAULT_RESOURCE: str(count)}),
                )
            ],
        ),
    )


def holders(core: client.CoreV1Api) -> dict[str, int]:
    """Pods on the real node that hold GPU slots as the scheduler counts them (every pod not
    Succeeded or Failed, a deleting one too), with their phase: what a new pod waits behind."""
    pods = core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={RealNode.name}")
    held = {}
    for p in pods.items:
        if p.status.phase in ("Succeeded", "Failed"):
            continue
        slots = sum(
            int((c.resources.limits or {}).get(DEFAULT_RESOURCE, 0))
            for c in p.spec.containers
            if c.resources
        )
        if slots:
            gone = " (deleting)" if p.metadata.deletion_timestamp else ""
            held[f"{p.metadata.namespace}/{p.metadata.name} {p.status.phase}{gone}"] = slots
    return held


def slot_holders(core: client.CoreV1Api) -> list[str]:
    return [f"{pod}: {slots}" for pod, slots in holders(core).items()]


def wait_free_slots(core: client.CoreV1Api, wanted: int) -> None:
    """Earlier tests' pods on the node may still be stopping (their namespaces are deleted
    without waiting): wait for them rather than fail behind them."""
    try:
        wait_for(lambda: SLOTS - sum(holders(core).values()) >= wanted, timeout=180,
                 interval=1.0, what=f"{wanted} free GPU slots on the node")  # fmt: skip
    except AssertionError as e:
        raise AssertionError(f"{e}; held by {slot_holders(core)}") from e


def why_not_running(core: client.CoreV1Api, namespace: str, name: str) -> str:
    pod = core.read_namespaced_pod(name, namespace)
    conditions = [
        f"{c.type}={c.status} {c.reason or ''} {c.message or ''}".strip()
        for c in pod.status.conditions or []
    ]
    waiting = [
        f"{s.name}: {s.state.waiting.reason} {s.state.waiting.message or ''}"
        for s in pod.status.container_statuses or []
        if s.state and s.state.waiting
    ]
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return (
        f"phase {pod.status.phase}; conditions {conditions}; waiting {waiting}; "
        f"events {[f'{e.reason}: {e.message}' for e in events.items]}; "
        f"slot holders on the node {slot_holders(core)}"
    )


def wait_running(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod:
    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase == "Running" else None

    try:
        return wait_for(running, timeout=120, interval=0.5, what=f"{name} to run")
    except AssertionError as e:
        raise AssertionError(f"{e}: {why_not_running(core, namespace, name)}") from e


def test_the_kubelet_lists_the_slots_a_pod_holds(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    node = core.read_node(RealNode.name)
    assert node.status.allocatable.get(DEFAULT_RESOURCE) == str(SLOTS) == "4"
    all_slots = {f"slot-{i}" for i in range(SLOTS)}

    wait_free_slots(core, 2)
    core.create_namespaced_pod(namespace, gpu_pod("two-slots", 2))
    try:
        pod = wait_running(core, namespace, "two-slots")
        assert pod.spec.node_name == RealNode.name

        report = pod_resources(cluster)
        assert report["socket"].endswith("/kubelet/pod-resources/kubelet.sock")
        allocatable = report["allocatable"]
        assert list(allocatable) == [DEFAULT_RESOURCE], allocatable
        assert sorted(allocatable[DEFAULT_RESOURCE]) == sorted(all_slots), allocatable

        ours = [
            p for p in report["pods"] if (p["namespace"], p["name"]) == (namespace, "two-slots")
        ]
        assert len(ours) == 1, f"the kubelet does not list {namespace}/two-slots: {report['pods']}"
        containers = ours[0]["containers"]
        assert [c["name"] for c in containers] == ["holder"]
        ids = containers[0]["devices"].get(DEFAULT_RESOURCE, [])
        assert len(ids) == 2 and len(set(ids)) == 2, ids
        assert set(ids) <= all_slots, ids

        # No other pod on the node holds any of them (the kubelet accounts each slot once).
        held_elsewhere = {
            i
            for p in report["pods"]
            if p is not ours[0]
            for c in p["containers"]
            for i in c["devices"].get(DEFAULT_RESOURCE, [])
        }
        assert not held_elsewhere & set(ids), held_elsewhere
    finally:
        core.delete_namespaced_pod("two-slots", namespace, grace_period_seconds=0)

    def gone_from_kubelet() -> bool:
        return not any(p["namespace"] == namespace for p in pod_resources(cluster)["pods"])

    wait_for(gone_from_kubelet, timeout=60, interval=1.0, what="the kubelet to drop the pod")


def test_the_python_client_reads_what_the_go_binary_reads(
    cluster: ClusterInfo, core: client.CoreV1Api, namespace: str
) -> None:
    wait_free_slots(core, 2)
    core.create_namespaced_pod(namespace, gpu_pod("two-slots", 2))
    try:
        wait_running(core, namespace, "two-slots")
        go, python = pod_resources(cluster), python_pod_resources(cluster)
    finally:
        core.delete_namespaced_pod("two-slots", namespace, grace_period_seconds=0)

    # The kubelet keeps device IDs in sets: their order can differ from one answer to the next.
    def in_order(devices: dict[str, list[str]]) -> dict[str, list[str]]:
        return {resource: sorted(ids) for resource, ids in devices.items()}

    assert in_order(python["allocatable"]) == in_order(go["allocatable"])
    assert sorted(python["allocatable"][DEFAULT_RESOURCE]) == [f"slot-{i}" for i in range(SLOTS)]

    def ours(report: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {**p, "containers": [{**c, "devices": in_order(c["devices"])} for c in p["containers"]]}
            for p in report["pods"]
            if (p["namespace"], p["name"]) == (namespace, "two-slots")
        ]

    assert len(ours(go)) == 1, go["pods"]
    assert ours(python) == ours(go)
    ids = ours(python)[0]["containers"][0]["devices"][DEFAULT_RESOURCE]
    assert len(set(ids)) == 2, ids
