"""The demo's live view: trainer metrics per job, and the table the terminal shows. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class TrainerReading:
    """One worker's /metrics, reduced to what the view shows."""

    rank: int
    steps: float
    samples: float
    throughput: float
    loss: float | None
    watts: float | None
    joules: float
    source: str


def parse_trainer_metrics(text: str) -> TrainerReading | None:
    """Rank 0..n of a joule trainer's exposition; None when it has not trained a step yet."""
    values: dict[str, float] = {}
    labels: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("joule_trainer_"):
                values[sample.name] = sample.value
                if sample.name == "joule_trainer_energy_joules_total":
                    labels = dict(sample.labels)
                labels.setdefault("rank", sample.labels.get("rank", "0"))
    if "joule_trainer_steps_total" not in values:
        return None
    return TrainerReading(
        rank=int(labels.get("rank", "0")),
        steps=values["joule_trainer_steps_total"],
        samples=values.get("joule_trainer_samples_total", 0.0),
        throughput=values.get("joule_trainer_throughput_samples_per_second", 0.0),
        loss=values.get("joule_trainer_loss"),
        watts=values.get("joule_trainer_power_watts"),
        joules=values.get("joule_trainer_energy_joules_total", 0.0),
        source=labels.get("source", "?"),
    )


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


def job_row(job: Mapping[str, Any], readings: Iterable[TrainerReading]) -> JobRow:
    status, spec = job.get("status", {}), job.get("spec", {})
    rs = sorted(readings, key=lambda r: r.rank)
    reason, message = status.get("reason", ""), status.get("message", "")
    return JobRow(
        name=job["metadata"]["name"],
        phase=status.get("phase", "Pending"),
        ready=int(status.get("readyReplicas", 0)),
        desired=int(spec.get("replicas", 0)),
        step=rs[0].steps if rs else None,
        samples_per_s=sum(r.throughput for r in rs) if rs else None,
        loss=rs[0].loss if rs else None,
        watts=sum(r.watts or 0.0 for r in rs) if rs else None,
        joules=sum(r.joules for r in rs) if rs else None,
        source=rs[0].source if rs else "",
        decision=f"{reason}: {message}" if reason else message,
    )


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(rows: Iterable[JobRow], elapsed: float, endpoints: Iterable[str]) -> str:
    header = (
        f"{'JOB':<14} {'PHASE':<10} {'READY':>5} {'STEP':>6} {'SAMPLES/S':>9} {'LOSS':>6} "
        f"{'WATTS':>7} {'JOULES':>8}  LAST DECISION"
    )
    lines = [f"joule demo  {elapsed:5.0f}s  (Ctrl-C stops everything)", "", header]
    sources = set()
    for r in rows:
        if r.source:
            sources.add(r.source)
        lines.append(
            f"{r.name:<14.14} {r.phase:<10.10} {f'{r.ready}/{r.desired}':>5} "
            f"{_num(r.step, '.0f'):>6} {_num(r.samples_per_s, '.1f'):>9} "
            f"{_num(r.loss, '.3f'):>6} {_num(r.watts, '.1f'):>7} {_num(r.joules, '.0f'):>8}  "
            f"{r.decision[:60]}"
        )
    if sources:
        note = " (from CPU time: an estimate, not a measurement)" if "estimated" in sources else ""
        lines += ["", f"energy meter: {', '.join(sorted(sources))}{note}"]
    lines += ["", "metrics:", *(f"  {e}" for e in endpoints)]
    return "\n".join(lines)
