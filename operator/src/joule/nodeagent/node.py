"""The local node's Node and Lease objects. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from joule.cluster.nodes import GPU_COUNT_LABEL, GPU_PRODUCT_LABEL, GPU_RESOURCE

LOCAL_NODE_LABEL = "joule.dev/local-node"
LEASE_SECONDS = 40


@dataclass(frozen=True)
class NodeSpec:
    name: str = "local"
    cpu: str = "2"
    memory: str = "8Gi"
    gpus: int = 4  # virtual slots: scheduling capacity, not devices
    gpu_product: str = "virtual"
    pods: int = 110
    address: str = "127.0.0.1"
    taints: tuple[dict[str, str], ...] = ()


def parse_taint(text: str) -> dict[str, str]:
    """``key[=value]:Effect``, as kubelet's --register-with-taints takes it."""
    head, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not head:
        raise ValueError(
            f"taint {text!r}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute"
        )
    key, _, value = head.partition("=")
    taint = {"key": key, "effect": effect}
    if value:
        taint["value"] = value
    return taint


def _ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(now: datetime, ready: bool) -> list[dict[str, Any]]:
    def cond(kind: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return {
            "type": kind,
            "status": "True" if ok else "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": _ts(now),
            "lastTransitionTime": _ts(now),
        }

    return [
        cond(
            "Ready",
            ready,
            "KubeletReady" if ready else "AgentStopped",
            "joule node-agent runs pods as local processes"
            if ready
            else "joule node-agent has stopped",
        ),
        cond("MemoryPressure", False, "KubeletHasSufficientMemory", "no memory pressure"),
        cond("DiskPressure", False, "KubeletHasNoDiskPressure", "no disk pressure"),
        cond("PIDPressure", False, "KubeletHasSufficientPID", "no PID pressure"),
    ]


def node_object(spec: NodeSpec, now: datetime, version: str) -> dict[str, Any]:
    capacity = {
        "cpu": spec.cpu,
        "memory": spec.memory,
        "pods": str(spec.pods),
        "ephemeral-storage": "100Gi",
        GPU_RESOURCE: str(spec.gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": {
                "kubernetes.io/hostname": spec.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                LOCAL_NODE_LABEL: "true",
                GPU_PRODUCT_LABEL: spec.gpu_product,
                GPU_COUNT_LABEL: str(spec.gpus),
            },
        },
        "spec": {"taints": [dict(t) for t in spec.taints]} if spec.taints else {},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "conditions": conditions(now, True),
            "addresses": [
                {"type": "InternalIP", "address": spec.address},
                {"type": "Hostname", "address": spec.name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": version,
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "local://processes",
                "osImage": "",
                "kernelVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        },
    }


def lease_object(name: str, now: datetime) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        },
    }
