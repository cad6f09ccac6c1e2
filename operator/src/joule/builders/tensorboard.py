"""A job's TensorBoard: a one-replica Deployment that reads the event files the workers write
under the checkpoint volume, and a Service in front of it. Owned by the job, so collected
with it; labelled apart from the workers, so that it is never counted as one."""

from __future__ import annotations

from typing import Any

from joule.api.types import JobRef, TrainingJobSpec
from joule.builders.labels import child_metadata
from joule.builders.pod import WORKER_POD_SECURITY, WORKER_SECURITY
from joule.constants import LABEL_MANAGED_BY, MANAGED_BY, TENSORBOARD_PORT

LABEL_TENSORBOARD = "joule.dev/tensorboard"
# Small, and no GPU: TensorBoard serves files.
RESOURCES = {"requests": {"cpu": "50m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def tensorboard_name(job: JobRef) -> str:
    return f"{job.name}-tensorboard"


def tensorboard_url(job: JobRef) -> str:
    return f"http://{tensorboard_name(job)}.{job.namespace}.svc:{TENSORBOARD_PORT}"


def _labels(job: JobRef) -> dict[str, str]:
    return {LABEL_TENSORBOARD: job.name, LABEL_MANAGED_BY: MANAGED_BY}


def tensorboard_deployment(job: JobRef, spec: TrainingJobSpec) -> dict[str, Any]:
    """On the nodes the workers may use (their selector, tolerations and affinity: a
    node-local volume is only there), read-only on the checkpoint volume."""
    p = spec.pod
    checkpoint = p["checkpoint"]
    volume = next(v for v in p.get("volumes", []) if v.get("name") == checkpoint["volume"])
    container: dict[str, Any] = {
        "name": "tensorboard",
        "image": spec.tensorboard.image or spec.image,
        "command": [
            "tensorboard", "--logdir", spec.tensorboard.log_dir, "--host", "0.0.0.0",
            "--port", str(TENSORBOARD_PORT), "--reload_interval", "15",
        ],
        "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT}],
        "readinessProbe": {"httpGet": {"path": "/", "port": TENSORBOARD_PORT},
                           "periodSeconds": 5},
        "volumeMounts": [
            {"name": volume["name"], "mountPath": checkpoint["path"], "readOnly": True}
        ],
        "resources": RESOURCES,
        "securityContext": {**WORKER_SECURITY, **p.get("securityContext", {})},
    }  # fmt: skip
    if "imagePullPolicy" in p:
        container["imagePullPolicy"] = p["imagePullPolicy"]
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [volume],
        "enableServiceLinks": False,
        "securityContext": {**WORKER_POD_SECURITY, **p.get("podSecurityContext", {})},
    }
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets",
                "serviceAccountName"):  # fmt: skip
        if key in p:
            pod_spec[key] = p[key]
    labels = _labels(job)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(job, tensorboard_name(job), labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def tensorboard_service(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, tensorboard_name(job), _labels(job)),
        "spec": {
            "selector": _labels(job),
            "ports": [{"name": "http", "port": TENSORBOARD_PORT, "targetPort": TENSORBOARD_PORT}],
        },
    }


def tensorboard_status(
    job: JobRef, spec: TrainingJobSpec, status: dict[str, Any]
) -> dict[str, Any]:
    """``status`` with ``tensorboard`` as the spec has it now: its URL once the job has
    started (workers created), none where it is not enabled. Pure."""
    out = {k: v for k, v in status.items() if k != "tensorboard"}
    if spec.tensorboard.enabled and status.get("startTime"):
        out["tensorboard"] = {"url": tensorboard_url(job), "logDir": spec.tensorboard.log_dir}
    return out
