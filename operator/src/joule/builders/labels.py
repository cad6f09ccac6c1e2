"""Labels and the owner reference every child of a job carries."""

from __future__ import annotations

from typing import Any

from joule.api.types import JobRef
from joule.constants import API_VERSION, KIND, LABEL_JOB, LABEL_MANAGED_BY, MANAGED_BY


def selector(job: JobRef) -> dict[str, str]:
    """Selects the job's worker pods: the Service's selector and the scale subresource's."""
    return {LABEL_JOB: job.name}


def selector_string(job: JobRef) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(job).items())


def common_labels(job: JobRef) -> dict[str, str]:
    return {**selector(job), LABEL_MANAGED_BY: MANAGED_BY}


def owner_reference(job: JobRef) -> dict[str, Any]:
    # controller=true and blockOwnerDeletion: deleting the job (foreground or background)
    # deletes its pods and service through the garbage collector.
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(job: JobRef, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The metadata of an object the job owns: in its namespace, labelled (the job's common
    labels unless others are given), collected with it."""
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": common_labels(job) if labels is None else labels,
        "ownerReferences": [owner_reference(job)],
    }
