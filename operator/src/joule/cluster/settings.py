"""What a local cluster is made of: pinned versions, where things live, the node shape.

Versions are pinned so that every machine builds and tests against the same control plane;
the cache is keyed by version, so changing one here triggers exactly one new build.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


def cache_dir() -> Path:
    """Built binaries and throwaway Go modules; shared by every cluster on this machine."""
    env = os.environ.get("JOULE_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "joule"


def state_root() -> Path:
    """Runtime state (pids, ports, certificates, etcd data) of the running clusters."""
    env = os.environ.get("JOULE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "joule" / "clusters"


@dataclass(frozen=True)
class NodeShape:
    """The capacity of each fake GPU node that kwok keeps Ready."""

    gpus: int = 8
    cpu: str = "96"
    memory: str = "1024Gi"
    pods: int = 110
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"GPUs per node must be >= 0, got {self.gpus}")
        if self.pods < 1:
            raise ValueError(f"pods per node must be >= 1, got {self.pods}")


@dataclass(frozen=True)
class ClusterSettings:
    """Everything `joule cluster up` needs to know; defaults give 4 nodes x 8 GPUs."""

    name: str = "joule"
    nodes: int = 4
    shape: NodeShape = field(default_factory=NodeShape)
    kubernetes_version: str = KUBERNETES_VERSION
    etcd_version: str = ETCD_VERSION
    kwok_version: str = KWOK_VERSION
    # A real node (kubelet + containerd) as well as the kwok nodes: None starts one where
    # this machine can (root on Linux); True insists; False never.
    real_node: bool | None = None
    # nvidia.com/gpu slots the real node's device plugin advertises (slots, not GPUs).
    node_gpus: int = 4
    # Taints registered on the real node (key=value:Effect), e.g. to keep other pods off it.
    node_taints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"cluster name {self.name!r} must be 1-40 lowercase letters, digits or '-'"
            )
        if self.nodes < 0:
            raise ValueError(f"node count must be >= 0, got {self.nodes}")

    @property
    def state_dir(self) -> Path:
        return state_root() / self.name

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"
