"""Fake GPU nodes: Node objects that kwok keeps Ready, with `nvidia.com/gpu` capacity. Pure."""

from __future__ import annotations

from typing import Any

from joule.cluster.components import KWOK_NODE_ANNOTATION
from joule.cluster.settings import NodeShape

GPU_RESOURCE = "nvidia.com/gpu"
# The label NVIDIA's GPU feature discovery puts on real nodes; jobs may select on it.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
# Also GPU feature discovery's; the chart's node agent selects GPU nodes by it.
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
NODE_NAME_PREFIX = "gpu-node-"


def node_name(index: int) -> str:
    return f"{NODE_NAME_PREFIX}{index}"


def gpu_node(index: int, shape: NodeShape) -> dict[str, Any]:
    """The Node manifest of fake GPU node ``index``."""
    name = node_name(index)
    capacity = {
        "cpu": shape.cpu,
        "memory": shape.memory,
        "pods": str(shape.pods),
        "ephemeral-storage": "1Ti",
        GPU_RESOURCE: str(shape.gpus),
    }
    key, value = KWOK_NODE_ANNOTATION
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                GPU_PRODUCT_LABEL: shape.gpu_product,
                GPU_COUNT_LABEL: str(shape.gpus),
            },
        },
        "spec": {},
        "status": {
            "allocatable": dict(capacity),
            "capacity": capacity,
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "fake",
                "kubeProxyVersion": "fake",
            },
        },
    }


def gpu_nodes(count: int, shape: NodeShape) -> list[dict[str, Any]]:
    return [gpu_node(i, shape) for i in range(count)]
