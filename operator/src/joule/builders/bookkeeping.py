"""The ConfigMap that holds a job's energy bookkeeping (``<job>-joule-energy``).

Each worker process's last energy and sample counters, the power window's points, and the
rates measured per size and per power limit are the controller's records, not something a
user reads: kept in the TrainingJob's status they made every watch of it carry them, and a
job with a thousand workers would carry thousands of entries. They live in a ConfigMap the
job owns (deleted with it), together with the totals they add up to, so that a counter and
the joules it added are always written in one object: a crash between two writes can
neither lose nor double a joule. Status shows the totals, copied from here.
"""

from __future__ import annotations

import json
from typing import Any

from joule.api.types import JobRef
from joule.builders.labels import common_labels, owner_reference

STATE_KEY = "energy.json"


def bookkeeping_name(job: JobRef) -> str:
    return f"{job.name}-joule-energy"


def bookkeeping_configmap(
    job: JobRef, state: dict[str, Any], resource_version: str | None = None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": bookkeeping_name(job),
        "namespace": job.namespace,
        "labels": common_labels(job),
        "ownerReferences": [owner_reference(job)],
    }
    if resource_version is not None:  # a replace that fails if someone wrote in between
        metadata["resourceVersion"] = resource_version
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {STATE_KEY: json.dumps(state, separators=(",", ":"), sort_keys=True)},
    }


def read_bookkeeping(configmap: dict[str, Any]) -> dict[str, Any]:
    """The state a ConfigMap holds; empty when it holds none that parses."""
    try:
        state = json.loads((configmap.get("data") or {}).get(STATE_KEY) or "{}")
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}
