"""spec.data's staging pod: `joule-data stage` copies the dataset into the cache volume and
verifies it, before any worker (and any GPU) is asked for. Pure.

It runs with the workers' identity and placement (service account, security contexts,
nodeSelector, tolerations, affinity), so admission judges it as it judges them and a
node-local cache is filled where they will run. It holds no GPU. The source's credentials
reach this pod only, from the Secret the spec names, as environment variables.
"""

from __future__ import annotations

from typing import Any

from joule.api.data import DataSpec
from joule.api.types import JobRef, TrainingJobSpec
from joule.builders.labels import common_labels, owner_reference
from joule.builders.pod import WORKER_POD_SECURITY, WORKER_SECURITY
from joule.builders.template import placement, template_spec, trainer_template
from joule.constants import LABEL_ROLE, METRICS_PORT, ROLE_STAGE, STAGE_CONTAINER

SOURCE_DIR = "/source"  # a persistentVolumeClaim source, read-only
CA_DIR = "/etc/joule-data"  # the source's CA bundle, from a ConfigMap key
CA_FILE = "ca.crt"
SOURCE_VOLUME = "joule-data-source"
CA_VOLUME = "joule-data-ca"
# What copying and hashing needs; no GPU. Enough for the hashing to keep up with a disk.
STAGE_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


def stage_name(job: JobRef) -> str:
    return f"{job.name}-stage"


def stage_command(data: DataSpec, job_name: str) -> list[str]:
    """The staging program's command line (joule_trainer's `joule-data stage`)."""
    cmd = ["joule-data", "stage"]
    if data.s3 is not None:
        cmd += ["--s3", data.s3, "--endpoint", str(data.endpoint)]
        if data.region:
            cmd += ["--region", data.region]
    elif data.https is not None:
        cmd += ["--https", data.https]
    else:
        cmd += ["--dir", f"{SOURCE_DIR}/{data.sub_path}".rstrip("/")]
    if data.ca_bundle is not None:
        cmd += ["--ca-bundle", f"{CA_DIR}/{CA_FILE}"]
    return [
        *cmd,
        "--into", data.staged_dir(job_name),
        "--termination-log", "/dev/termination-log",
        "--metrics-port", str(METRICS_PORT),
    ]  # fmt: skip


def stage_pod(job: JobRef, spec: TrainingJobSpec) -> dict[str, Any]:
    data = spec.data
    assert data is not None, "only a job with spec.data has a staging pod"
    p = spec.pod
    tpl, trainer_tpl = template_spec(p.get("template")), trainer_template(p.get("template"))
    cache = next(
        v for v in [*p.get("volumes", []), *tpl.get("volumes", [])] if v["name"] == data.volume
    )
    volumes: list[dict[str, Any]] = [cache]
    mounts: list[dict[str, Any]] = [{"name": data.volume, "mountPath": data.path}]
    env: list[dict[str, Any]] = []
    if data.access_key is not None and data.secret_key is not None:
        for name, ref in (
            ("AWS_ACCESS_KEY_ID", data.access_key),
            ("AWS_SECRET_ACCESS_KEY", data.secret_key),
        ):
            env.append(
                {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
            )
    if data.claim is not None:
        volumes.append(
            {"name": SOURCE_VOLUME,
             "persistentVolumeClaim": {"claimName": data.claim, "readOnly": True}}
        )  # fmt: skip
        mounts.append({"name": SOURCE_VOLUME, "mountPath": SOURCE_DIR, "readOnly": True})
    if data.ca_bundle is not None:
        volumes.append(
            {"name": CA_VOLUME, "configMap": {
                "name": data.ca_bundle.name,
                "items": [{"key": data.ca_bundle.key, "path": CA_FILE}],
            }}
        )  # fmt: skip
        mounts.append({"name": CA_VOLUME, "mountPath": CA_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": STAGE_CONTAINER,
        "image": data.image or spec.image,
        "command": stage_command(data, job.name),
        "env": env,
        "volumeMounts": mounts,
        "resources": STAGE_RESOURCES,
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        # Its last line is what the job's status quotes where staging fails; on success the
        # program writes a JSON summary there, which becomes status.data.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            **WORKER_SECURITY,
            **trainer_tpl.get("securityContext", {}),
            **p.get("securityContext", {}),
        },
    }
    if "imagePullPolicy" in p:
        container["imagePullPolicy"] = p["imagePullPolicy"]
    selector, tolerations = placement(p)
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "restartPolicy": "Never",  # a failed staging fails the job: the operator says why
        "enableServiceLinks": False,
        "securityContext": {
            **WORKER_POD_SECURITY,
            **tpl.get("securityContext", {}),
            **p.get("podSecurityContext", {}),
        },
    }
    if selector:
        pod_spec["nodeSelector"] = selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
    for key in ("affinity", "priorityClassName", "schedulerName", "serviceAccountName",
                "imagePullSecrets"):  # fmt: skip
        value = p.get(key, tpl.get(key))
        if value is not None:
            pod_spec[key] = value
    labels = {**p.get("podLabels", {}), **common_labels(job), LABEL_ROLE: ROLE_STAGE}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": stage_name(job),
            "namespace": job.namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(METRICS_PORT),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": pod_spec,
    }
