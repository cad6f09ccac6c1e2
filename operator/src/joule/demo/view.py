"""The demo's live view: trainer metrics per job, and the table the terminal shows. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from joule.trainer_metrics import TrainerReading


@dataclass(frozen=True)
class JobRow:
    name: str
    phase: str
    ready: int
    desired: int
    step: float | None
    samples_per_s: float | None
    loss: float | None
    watts: float | None
    joules: float | None
    source: str
    decision: str
    limit: float | None = None  # per-GPU power limit the policy set


def job_row(
    job: Mapping[str, Any], readings: Iterable[TrainerReading], last_event: str | None = None
) -> JobRow:
    """``last_event``: the operator's newest Event on the job ("Reason: message"), which says
    what it last did and why; without one, the job's phase reason."""
    status, spec = job.get("status", {}), job.get("spec", {})
    rs = sorted(readings, key=lambda r: r.rank)
    energy = status.get("energy") or {}
    # Measured from outside the workers (the node agents, Prometheus): the operator's figures;
    # else what the trainers say of themselves.
    measured = energy.get("source") not in (None, "trainer")
    reason, message = status.get("reason", ""), status.get("message", "")
    return JobRow(
        name=job["metadata"]["name"],
        phase=status.get("phase", "Pending"),
        ready=int(status.get("readyReplicas", 0)),
        desired=int(status.get("targetReplicas") or spec.get("replicas", 0)),
        step=rs[0].steps if rs else None,
        samples_per_s=sum(r.throughput for r in rs) if rs else None,
        loss=rs[0].loss if rs else None,
        watts=energy.get("averageWatts")
        if measured
        else (sum(r.watts or 0.0 for r in rs) if rs else None),
        joules=energy.get("consumedJoules")
        if measured
        else (sum(r.joules for r in rs) if rs else None),
        source=f"{energy['source']}: {energy.get('meter', '?')}"
        if measured
        else (rs[0].source if rs else ""),
        decision=last_event or (f"{reason}: {message}" if reason else message),
        limit=energy.get("gpuPowerLimitWatts"),
    )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(rows: Iterable[JobRow], elapsed: float, endpoints: Iterable[str]) -> str:
    header = (
        f"{'JOB':<14} {'PHASE':<10} {'READY':>5} {'STEP':>6} {'SAMPLES/S':>9} {'LOSS':>6} "
        f"{'WATTS':>7} {'LIMIT':>6} {'JOULES':>8}  LAST DECISION"
    )
    lines = [f"joule demo  {elapsed:5.0f}s  (Ctrl-C stops everything)", "", header]
    sources = set()
    for r in rows:
        if r.source:
            sources.add(r.source)
        lines.append(
            f"{r.name:<14.14} {r.phase:<10.10} {f'{r.ready}/{r.desired}':>5} "
            f"{_num(r.step, '.0f'):>6} {_num(r.samples_per_s, '.1f'):>9} "
            f"{_num(r.loss, '.3f'):>6} {_num(r.watts, '.1f'):>7} {_num(r.limit, '.1f'):>6} "
            f"{_num(r.joules, '.0f'):>8}  {r.decision[:90]}"
        )
    if sources:
        note = " (from CPU time: an estimate, not a measurement)" if "estimated" in sources else ""
        if any("simulated" in source for source in sources):
            note = " (the node agent's NVML double: simulated GPUs, not a measurement)"
        lines += ["", f"energy meter: {', '.join(sorted(sources))}{note}"]
    lines += ["LIMIT: the per-GPU power limit Joule set (W); - is the device's default"]
    lines += ["", "metrics:", *(f"  {e}" for e in endpoints)]
    return "\n".join(lines)
