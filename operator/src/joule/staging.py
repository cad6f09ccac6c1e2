"""spec.data's staging, as the lifecycle's plan sees it: whether the workers may start, and
what the job's status says meanwhile. Pure.

The staging pod (builders.stage) runs first and alone. Its exit says the rest: 0 with a JSON
summary (status.data, and the workers are created), or one of the staging program's exit
codes, each a reason of its own, with its last line (the job is Failed: a corrupt file or
refused credentials do not get better by retrying, and the file or bucket is named). A
staging pod that cannot start (its Secret or image missing, no node fits) keeps the job
Pending with that reason, as a worker would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from joule.api.events import Event
from joule.api.types import TrainingJobSpec
from joule.observe import PodView
from joule.trainer_metrics import gauges

STAGED = "Staged"
# joule-data stage's exit codes (sysexits.h), and the reason each fails the job with.
EXIT_REASONS = {
    65: "DataCorrupt",  # EX_DATAERR: a file does not match the manifest
    66: "DataNotFound",  # EX_NOINPUT: no manifest, or a file it lists is missing
    69: "DataUnavailable",  # EX_UNAVAILABLE: the source cannot be reached
    74: "DataCacheFull",  # EX_IOERR: the cache volume is full or read-only
    77: "DataAccessDenied",  # EX_NOPERM: the credentials were refused
    78: "DataConfigError",  # EX_CONFIG: its own configuration (no credentials, a bad CA file)
}
SUMMARY_KEYS = ("files", "bytes", "skipped", "seconds", "manifestDigest", "version")
# How often the energy and scaling loop reads a running staging pod's progress into
# status.data (joule-data stage's gauges on its metrics port).
PROGRESS_SECONDS = 5.0
PROGRESS_GAUGES = {
    "joule_data_staged_bytes": "stagedBytes",
    "joule_data_total_bytes": "totalBytes",
    "joule_data_staged_files": "stagedFiles",
    "joule_data_total_files": "totalFiles",
}


def staging(status: dict[str, Any]) -> bool:
    """Whether the job's dataset is being staged (its progress is worth reading)."""
    return (status.get("data") or {}).get("phase") == "Staging"


def parse_progress(text: str) -> dict[str, int]:
    """status.data's progress fields from joule-data stage's /metrics (those it serves)."""
    return {key: int(value) for key, value in gauges(text, PROGRESS_GAUGES).items()}


@dataclass
class Staging:
    """What staging asks of this reconcile."""

    wait: bool  # no worker yet: the dataset is not staged
    create_pod: bool = False
    delete_pod: str | None = None  # its summary is in status: the finished pod goes
    # (phase, reason, message) for the job while it waits, or as it fails.
    phase: str | None = None
    reason: str = ""
    message: str = ""
    failed: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # status.data
    events: list[Event] = field(default_factory=list)


def plan_staging(spec: TrainingJobSpec, status: dict[str, Any], pod: PodView | None) -> Staging:
    data = spec.data
    assert data is not None, "only a job with spec.data stages"
    held = dict(status.get("data") or {})
    if held.get("phase") == STAGED:
        gone = pod.name if pod is not None and not pod.terminating else None
        return Staging(wait=False, delete_pod=gone, data=held)
    base = {"source": data.source, "volume": data.volume}
    if pod is None:
        return Staging(
            wait=True,
            create_pod=True,
            phase="Pending",
            reason="StagingData",
            message=f"staging the dataset from {data.source} into volume {data.volume}",
            data={**base, "phase": "Staging"},
            events=[Event("Normal", "StagingData", f"staging the dataset from {data.source}")],
        )
    if pod.phase == "Succeeded":
        summary = _summary(pod.summary)
        staged = {**base, **summary, "phase": STAGED}
        said = (
            f"staged {summary.get('files', '?')} files ({summary.get('bytes', '?')} bytes) "
            f"from {data.source}, dataset version {summary.get('version', 'unknown')}"
        )
        return Staging(
            wait=False,
            delete_pod=None if pod.terminating else pod.name,
            data=staged,
            events=[Event("Normal", "DataStaged", said)],
        )
    failure = pod.failure
    if pod.phase == "Failed" or (failure is not None and failure.exit_code is not None):
        code = failure.exit_code if failure is not None else None
        reason = EXIT_REASONS.get(code or 0, "DataStagingFailed")
        why = failure.message if failure is not None else "the staging pod failed"
        return Staging(
            wait=True,
            failed=True,
            phase="Failed",
            reason=reason,
            message=f"staging the dataset from {data.source} failed: {why}",
            data={**base, "phase": "Failed"},
        )
    if failure is not None:  # cannot start: its Secret, image or node
        return Staging(
            wait=True,
            phase="Pending",
            reason=failure.reason,
            message=f"the staging pod {pod.name} cannot start: {failure.message}",
            data={**held, **base, "phase": "Staging"},
        )
    return Staging(
        wait=True,
        phase="Pending",
        reason="StagingData",
        message=f"staging the dataset from {data.source} into volume {data.volume}",
        data={**held, **base, "phase": "Staging"},
    )


def _summary(text: str | None) -> dict[str, Any]:
    """The staging program's JSON summary: the figures status.data keeps (none where it
    wrote none, as a program other than joule-data might)."""
    try:
        said = json.loads(text or "")
    except ValueError:
        return {}
    if not isinstance(said, dict):
        return {}
    return {k: said[k] for k in SUMMARY_KEYS if isinstance(said.get(k), int | float | str)}
