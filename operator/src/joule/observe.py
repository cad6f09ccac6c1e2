"""What the operator sees of a worker pod, reduced to what its decisions need. Pure.

The interesting part is ``failure``: the reason a pod is failing or cannot start, in the words
`kubectl describe` would use (ImagePullBackOff, OOMKilled, Unschedulable, ...), so that the
job's status can say it without the user having to look at every pod.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from joule.api.events import parse_time
from joule.constants import LABEL_INDEX, LABEL_ROLE, POWER_LIMIT_ANNOTATION, ROLE_STAGE

# Waiting reasons after which a container will not start on its own.
BLOCKING_WAITING = {
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
}

# A pod's DisruptionTarget reasons that mean its node went away rather than that it failed
# or was deleted on purpose: the taint-eviction controller deleting it from a node tainted
# NoExecute (node.kubernetes.io/unreachable or not-ready, once its toleration ran out), and
# the pod garbage collector removing it from a Node object that was deleted. Kubernetes sets
# them itself (pod disruption conditions, GA in 1.31); nothing here reads the Node.
NODE_LOST_REASONS = frozenset({"DeletionByTaintManager", "DeletionByPodGC"})
NODE_LOST = "NodeLost"  # the Failure reason (and Event reason) of a worker lost with its node


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    exit_code: int | None = None


# A worker's exit code for a configuration error that a restart cannot fix (sysexits.h's
# EX_CONFIG): Joule's trainer exits so where none of the job's checkpoints verifies with its
# key, or its key file is no key. Every restart would meet the same refusal.
EXIT_CONFIG = 78
CONFIG_ERROR = "ConfigError"  # the status and Event reason of a job failed for it


def restart_cannot_fix(failure: Failure | None) -> bool:
    """Whether a worker's failure ends its job at once rather than count as a restart: its
    container exited EXIT_CONFIG. A worker lost with its node never does (no exit code)."""
    return failure is not None and failure.exit_code == EXIT_CONFIG


@dataclass(frozen=True)
class PodView:
    name: str
    uid: str
    index: int
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    scheduled: bool
    terminating: bool
    failure: Failure | None
    ip: str | None = None
    power_limit: str | None = None  # the per-GPU power limit annotation, as set
    owner: str | None = None  # UID of the controller that owns the pod (its TrainingJob)
    node: str | None = None  # the node it is bound to
    # metadata.deletionTimestamp: when the pod should be gone (the API server sets it to the
    # delete request's time plus the grace period); None while it is not being deleted.
    deletion_deadline: dt.datetime | None = None
    # ROLE_STAGE for spec.data's staging pod (index -1), else a worker.
    role: str = "worker"
    # The termination message of a pod that exited 0: the staging pod's JSON summary, or a
    # worker's word on why it stopped (Joule's trainer at its privacy budget).
    summary: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) resources and is not on its way out."""
        return not self.finished and not self.terminating

    @property
    def lost(self) -> bool:
        """Taken down with its node (see NODE_LOST_REASONS), whatever its phase says: a
        kubelet that is gone never reports one."""
        return self.failure is not None and self.failure.reason == NODE_LOST


def view(pod: dict[str, Any]) -> PodView | None:
    """A PodView, or None for a pod without a valid replica index (not one of ours)."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    stage = labels.get(LABEL_ROLE) == ROLE_STAGE
    try:
        index = -1 if stage else int(labels.get(LABEL_INDEX, ""))
    except ValueError:
        return None
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = phase == "Running" and conditions.get("Ready", {}).get("status") == "True"
    node = (pod.get("spec") or {}).get("nodeName") or None
    return PodView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        index=index,
        phase=phase,
        ready=ready,
        scheduled=node is not None,
        terminating=meta.get("deletionTimestamp") is not None,
        deletion_deadline=parse_time(meta.get("deletionTimestamp")),
        failure=failure(status, conditions),
        ip=status.get("podIP"),
        power_limit=(meta.get("annotations") or {}).get(POWER_LIMIT_ANNOTATION),
        owner=next(
            (o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")),
            None,
        ),
        node=node,
        role=ROLE_STAGE if stage else "worker",
        summary=_summary(status) if phase == "Succeeded" else None,
    )


def _summary(status: dict[str, Any]) -> str | None:
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        if term.get("exitCode") == 0:
            return str(term.get("message") or "")[:MAX_SUMMARY] or None
    return None


# Longest termination message kept, in characters: a status line, not a log.
MAX_MESSAGE = 256
# Longest staging summary read (a JSON object of a few figures; the kubelet keeps 4 KiB).
MAX_SUMMARY = 4096


def failure(status: dict[str, Any], conditions: dict[str, dict[str, Any]]) -> Failure | None:
    # A lost node comes first: what its containers last said is stale (no kubelet reports
    # from there any more), and the pod GC marks such a pod Failed with no reason of its own.
    disrupted = conditions.get("DisruptionTarget") or {}
    if disrupted.get("status") == "True" and disrupted.get("reason") in NODE_LOST_REASONS:
        return Failure(NODE_LOST, disrupted.get("message") or disrupted["reason"])
    # Then the container's own terminated reason (OOMKilled, Error): the pod's reason, where
    # it has one, is a generic one.
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        term = state.get("terminated")
        if term and term.get("exitCode", 0) != 0:
            reason = term.get("reason") or "Error"
            code = term.get("exitCode")
            said = last_line(term.get("message") or "")
            return Failure(reason, said or f"exited with code {code}", code)
        waiting = state.get("waiting")
        if waiting and waiting.get("reason") in BLOCKING_WAITING:
            return Failure(waiting["reason"], waiting.get("message") or waiting["reason"])
    sched = conditions.get("PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        return Failure("Unschedulable", sched.get("message") or "no node fits the pod")
    if status.get("phase") == "Failed":
        return Failure(status.get("reason") or "Failed", status.get("message") or "pod failed")
    return None


def last_line(text: str) -> str:
    """The last non-blank line of a termination message, shortened to MAX_MESSAGE. Workers
    use FallbackToLogsOnError, so the message is their log's tail (up to 80 lines) where they
    wrote no message file: its last line is the one that says why (a traceback's error)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 3] + "..."
