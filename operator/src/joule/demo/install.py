"""Joule in the demo's cluster as a user installs it: `helm install` of charts/joule, with the
operator image built here, so that the operator and the node agent run as pods on the real
node and Prometheus finds them as it does in a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from joule.cluster.nodeconfig import NodeLayout

RELEASE = "joule"
NAMESPACE = "joule-system"
OPERATOR_IMAGE = "ghcr.io/joule-dev/operator"  # containerd mirrors ghcr.io to the node's registry
OPERATOR_NAME = "joule-dev/operator"
TAG = "0.1.0"


def values(layout: NodeLayout) -> dict[str, Any]:
    """The chart's values for the demo's node: the operator from the local registry, energy
    from the node agent, whose GPUs are its NVML double (the node has GPU slots, no GPUs), and
    whose kubelet and state folders are this node's."""
    return {
        "image": {"repository": OPERATOR_IMAGE, "tag": TAG},
        "operator": {"logFormat": "plain", "resyncSeconds": 10},
        "energy": {"source": "node"},
        "nodeAgent": {
            "gpus": "simulated",
            "intervalSeconds": 2,
            "kubeletRootDir": str(layout.kubelet_dir),
            "stateDir": str(layout.state / "joule-node-agent"),
        },
    }


def install_argv(helm: Path, kubeconfig: Path, chart: Path, values_file: Path) -> list[str]:
    return [
        str(helm), "install", RELEASE, str(chart), "--kubeconfig", str(kubeconfig),
        "-n", NAMESPACE, "--create-namespace", "-f", str(values_file),
        "--wait", "--timeout", "300s",
    ]  # fmt: skip
