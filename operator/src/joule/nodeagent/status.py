"""The pod status a kubelet would report, from what the agent knows of its processes. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ContainerState:
    name: str
    image: str
    kind: str = "waiting"  # waiting | running | terminated
    reason: str = "ContainerCreating"
    message: str = ""
    started: datetime | None = None
    finished: datetime | None = None
    exit_code: int | None = None
    pid: int | None = None
    restarts: int = 0


def _ts(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_reason(code: int) -> str:
    return "Completed" if code == 0 else "Error"  # no cgroup here, so never OOMKilled


def phase(containers: list[ContainerState]) -> str:
    if containers and all(c.kind == "terminated" for c in containers):
        return "Succeeded" if all(c.exit_code == 0 for c in containers) else "Failed"
    if any(c.kind in ("running", "terminated") for c in containers):
        return "Running"
    return "Pending"


def container_status(c: ContainerState) -> dict[str, Any]:
    if c.kind == "running":
        state: dict[str, Any] = {"running": {"startedAt": _ts(c.started)}}
    elif c.kind == "terminated":
        state = {
            "terminated": {
                "exitCode": c.exit_code,
                "reason": exit_reason(c.exit_code or 0),
                "message": c.message or None,
                "startedAt": _ts(c.started),
                "finishedAt": _ts(c.finished),
                "containerID": f"local://{c.pid}" if c.pid else None,
            }
        }
    else:
        state = {"waiting": {"reason": c.reason, "message": c.message or None}}
    out: dict[str, Any] = {
        "name": c.name,
        "image": c.image,
        "imageID": "",
        "ready": c.kind == "running",
        "started": c.kind == "running",
        "restartCount": c.restarts,
        "state": state,
    }
    if c.pid and c.kind != "waiting":
        out["containerID"] = f"local://{c.pid}"
    return out


def pod_status(
    containers: list[ContainerState], address: str, node_address: str, start: datetime
) -> dict[str, Any]:
    """The ``status`` of a pod bound to the local node, for the pods/status subresource."""
    ph = phase(containers)
    ready = ph == "Running" and all(c.kind == "running" for c in containers)
    now = _ts(start)

    def cond(kind: str, ok: bool, reason: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"type": kind, "status": "True" if ok else "False"}
        c["lastTransitionTime"] = now
        if reason and not ok:
            c["reason"] = reason
        return c

    return {
        "phase": ph,
        "hostIP": node_address,
        "hostIPs": [{"ip": node_address}],
        "podIP": address,
        "podIPs": [{"ip": address}],
        "startTime": now,
        "conditions": [
            cond("PodReadyToStartContainers", True),
            cond("Initialized", True),
            cond("Ready", ready, "PodCompleted" if ph in ("Succeeded", "Failed") else None),
            cond("ContainersReady", ready),
            cond("PodScheduled", True),
        ],
        "containerStatuses": [container_status(c) for c in containers],
    }
