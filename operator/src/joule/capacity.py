"""Room for a job's workers, node by node. Pure.

A worker's GPUs must all be on one node, and on a node its nodeSelector and tolerations
allow. Free GPUs summed over the cluster overstate the room: 2 free GPUs on each of four
nodes hold no 4-GPU worker, and GPUs on nodes a job may not use are none of its room. A
resize planned on the sum waited for a worker that could never be scheduled. The node and
pod lists are read once and shared by every job's evaluation (``Capacity``); each job then
asks how many of its workers fit (``Capacity.view_for``).

Required node affinity is not evaluated (only nodeSelector and tolerations): a job that
uses it may be told of room its workers cannot take, which the resize timeout then undoes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joule.constants import LABEL_JOB
from joule.policy import ClusterView

GPU = "nvidia.com/gpu"
BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")  # PreferNoSchedule only discourages


@dataclass(frozen=True)
class NodeRoom:
    name: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, str], ...]
    free_gpus: int


@dataclass(frozen=True)
class Capacity:
    """The schedulable nodes' free GPUs, and the cluster-wide figures the policy reads."""

    nodes: tuple[NodeRoom, ...]
    waiting_gpus: int
    total_gpus: int
    jobs: int
    quiet_seconds: float | None = None  # how long no pod has waited for GPUs, if known

    def view_for(
        self,
        gpus_per_replica: int,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Sequence[Mapping[str, Any]] = (),
    ) -> ClusterView:
        """The cluster as one job sees it: free GPUs counted in whole workers, on the nodes
        its placement allows."""
        per = max(gpus_per_replica, 1)
        selector = node_selector or {}
        workers = sum(
            node.free_gpus // per
            for node in self.nodes
            if all(node.labels.get(k) == v for k, v in selector.items())
            and all(
                tolerated(t, tolerations)
                for t in node.taints
                if t.get("effect") in BLOCKING_EFFECTS
            )
        )
        return ClusterView(
            free_gpus=workers * per,
            waiting_gpus=self.waiting_gpus,
            quiet_seconds=self.quiet_seconds,
            total_gpus=self.total_gpus,
            jobs=self.jobs,
        )


def tolerated(taint: Mapping[str, Any], tolerations: Sequence[Mapping[str, Any]]) -> bool:
    """Whether one of the tolerations tolerates the taint, as the scheduler decides it."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t.get("key") == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (
            taint.get("value") or ""
        ):
            return True
    return False


def pod_gpus(pod: Mapping[str, Any]) -> int:
    total = 0
    for c in pod.get("spec", {}).get("containers", []):
        limits = c.get("resources", {}).get("limits", {}) or {}
        total += int(limits.get(GPU, 0))
    return total


def capacity(nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]) -> Capacity:
    """Free GPUs per Ready, schedulable node (allocatable minus what pods bound to it hold),
    GPUs that unscheduled pods wait for, and how many jobs hold or want GPUs."""
    held: dict[str, int] = {}
    waiting = 0
    jobs = set()
    for pod in pods:
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") or not pod_gpus(pod):
            continue
        meta = pod.get("metadata", {})
        # A TrainingJob's workers are one job; any other GPU pod counts on its own.
        jobs.add((meta.get("namespace"), meta.get("labels", {}).get(LABEL_JOB) or meta.get("name")))
        node_name = pod.get("spec", {}).get("nodeName")
        if node_name:
            held[node_name] = held.get(node_name, 0) + pod_gpus(pod)
        else:
            waiting += pod_gpus(pod)
    rooms, total = [], 0
    for node in nodes:
        if not _schedulable(node):
            continue
        meta = node.get("metadata", {})
        allocatable = int(node.get("status", {}).get("allocatable", {}).get(GPU, 0))
        total += allocatable
        rooms.append(
            NodeRoom(
                name=meta.get("name", ""),
                labels=dict(meta.get("labels") or {}),
                taints=tuple(node.get("spec", {}).get("taints") or ()),
                free_gpus=max(allocatable - held.get(meta.get("name", ""), 0), 0),
            )
        )
    return Capacity(tuple(rooms), waiting_gpus=waiting, total_gpus=total, jobs=len(jobs))


def _schedulable(node: Mapping[str, Any]) -> bool:
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in node.get("status", {}).get("conditions", [])
    )
    return ready and not node.get("spec", {}).get("unschedulable")
