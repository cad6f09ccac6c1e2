"""The headless Service that gives each worker a stable DNS name for the rendezvous."""

from __future__ import annotations

from typing import Any

from joule.api.types import JobRef
from joule.builders.labels import child_metadata, selector
from joule.constants import METRICS_PORT, RDZV_PORT


def service_name(job: JobRef) -> str:
    return job.name


def worker_service(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(job, service_name(job)),
        "spec": {
            "clusterIP": "None",
            "selector": selector(job),
            # Workers must find each other before they are ready: the rendezvous is what
            # makes them ready.
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT},
            ],
        },
    }
