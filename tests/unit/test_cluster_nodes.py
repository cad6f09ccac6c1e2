"""Fake GPU nodes as kwok and kube-scheduler see them."""

import pytest

from joule.cluster.components import KWOK_NODE_ANNOTATION
from joule.cluster.nodes import GPU_RESOURCE, gpu_node, gpu_nodes
from joule.cluster.settings import ClusterSettings, NodeShape


def test_nodes_advertise_gpus_as_capacity_and_allocatable():
    node = gpu_node(2, NodeShape(gpus=8))
    assert node["metadata"]["name"] == "gpu-node-2"
    assert node["status"]["capacity"][GPU_RESOURCE] == "8"
    assert node["status"]["allocatable"][GPU_RESOURCE] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"


def test_nodes_carry_the_annotation_kwok_manages():
    key, value = KWOK_NODE_ANNOTATION
    assert gpu_node(0, NodeShape())["metadata"]["annotations"][key] == value


def test_node_count_and_names_are_distinct():
    nodes = gpu_nodes(4, NodeShape())
    assert [n["metadata"]["name"] for n in nodes] == [f"gpu-node-{i}" for i in range(4)]


def test_shape_and_settings_reject_nonsense():
    with pytest.raises(ValueError, match="GPUs per node"):
        NodeShape(gpus=-1)
    with pytest.raises(ValueError, match="node count"):
        ClusterSettings(nodes=-2)
    with pytest.raises(ValueError, match="cluster name"):
        ClusterSettings(name="Bad_Name")


def test_a_node_counts_as_schedulable_only_when_ready_and_untainted():
    from joule.cluster.lifecycle import schedulable_nodes

    ready = {"type": "Ready", "status": "True"}
    not_ready = {"type": "Ready", "status": "False"}
    taint = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
    nodes = [
        {"status": {"conditions": [ready]}, "spec": {}},
        {"status": {"conditions": [ready]}, "spec": {"taints": [taint]}},
        {"status": {"conditions": [not_ready]}, "spec": {}},
        {"status": {}, "spec": {}},
    ]
    assert schedulable_nodes(nodes) == 1
