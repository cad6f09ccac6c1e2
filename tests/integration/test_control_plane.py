"""The local control plane is a real Kubernetes: scheduling, garbage collection, admission,
RBAC. Nothing here is mocked; kwok plays the kubelets of the GPU nodes."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.conftest import make_namespace, wait_for

GPU = "nvidia.com/gpu"


def gpu_pod(name: str, gpus: int, privileged: bool = False) -> client.V1Pod:
    container = client.V1Container(
        name="worker",
        image="ghcr.io/joule-dev/trainer:test",
        resources=client.V1ResourceRequirements(limits={GPU: str(gpus)}),
        security_context=client.V1SecurityContext(privileged=True) if privileged else None,
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(containers=[container], restart_policy="Never"),
    )


def test_kubectl_lists_gpu_nodes_ready_with_allocatable_gpus(kubectl):
    # The cluster's own 4 fake GPU nodes (the end-to-end tests add a tainted local node).
    nodes = json.loads(kubectl("get", "nodes", "-l", "type=kwok", "-o", "json").stdout)["items"]
    assert len(nodes) == 4
    for node in nodes:
        assert node["status"]["allocatable"][GPU] == "8"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["metadata"]["name"]
    table = kubectl("get", "nodes").stdout
    assert "gpu-node-0" in table and "Ready" in table


def test_pod_asking_for_8_gpus_is_scheduled_and_runs(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("eight", 8))

    def running():
        pod = core.read_namespaced_pod("eight", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = wait_for(running, what="pod eight to be Running")
    assert pod.spec.node_name.startswith("gpu-node-")


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(core, namespace):
    core.create_namespaced_pod(namespace, gpu_pod("too-big", 9))

    def failed_scheduling():
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=too-big"
        ).items
        return [e for e in events if e.reason == "FailedScheduling"]

    events = wait_for(failed_scheduling, what="a FailedScheduling event")
    assert f"Insufficient {GPU}" in events[0].message
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


def test_deleting_an_owner_deletes_its_dependents(core, namespace):
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    pod = gpu_pod("dependent", 1)
    pod.metadata.owner_references = [
        client.V1OwnerReference(
            api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
        )
    ]
    core.create_namespaced_pod(namespace, pod)
    core.delete_namespaced_config_map(
        "owner", namespace, body=client.V1DeleteOptions(propagation_policy="Background")
    )

    def gone():
        names = [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
        return "dependent" not in names

    wait_for(gone, timeout=60, what="the garbage collector to delete the dependent pod")


def test_restricted_namespace_rejects_a_privileged_pod(core, namespace):
    restricted = make_namespace(core, {"pod-security.kubernetes.io/enforce": "restricted"})
    try:
        with pytest.raises(ApiException) as err:
            core.create_namespaced_pod(restricted, gpu_pod("privileged", 1, privileged=True))
        assert err.value.status == 403
        assert "violates PodSecurity" in err.value.body
        assert "privileged" in err.value.body
        # The same pod is admitted where no policy is enforced: PodSecurity said no, not
        # something else.
        core.create_namespaced_pod(namespace, gpu_pod("privileged", 1, privileged=True))
    finally:
        core.delete_namespace(restricted)


def test_rbac_denies_a_service_account_without_roles(kubectl, namespace):
    who = f"system:serviceaccount:{namespace}:default"
    proc = kubectl("auth", "can-i", "list", "pods", "-n", namespace, f"--as={who}", check=False)
    assert proc.stdout.strip() == "no"
    assert kubectl("auth", "can-i", "list", "pods", "-n", namespace).stdout.strip() == "yes"
