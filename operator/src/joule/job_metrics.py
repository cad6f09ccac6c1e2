"""Job-level series from the operator, so that dashboards and alerts need not scrape workers:
what each TrainingJob is (phase, sizes, limits) and has done (energy, samples), from the
status the operator last wrote.

Names follow Prometheus' conventions: base units, ``_total`` for what only grows (power is
``rate(joule_job_energy_joules_total[5m])``; the window average the policy uses is exported
too). Labels are the job's ``namespace`` and ``joule_job`` (``job`` is the scrape job's);
never a pod or its UID, so a job's series stay as many whatever it does. A value the status
does not hold (no cap, no budget, nothing measured yet) is not exported: an unset gauge
would read 0, and a 0 W cap or a 0 J budget means something else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from joule.api.types import Phase, TrainingJobSpec

LABELS = ["namespace", "joule_job"]


@dataclass(frozen=True)
class JobFigures:
    phase: str
    desired: int  # spec.replicas
    target: int  # what the policy or the user set (spec.replicas without a policy)
    ready: int
    gpus: int
    samples: float | None
    energy_joules: float | None
    average_watts: float | None
    power_cap_watts: float | None
    budget_joules: float | None
    gpu_power_limit_watts: float | None
    energy_source: str | None
    conditions: Mapping[str, bool]  # BudgetAtRisk, BudgetExhausted, PowerCapExceeded, ...


def figures(spec: TrainingJobSpec, status: Mapping[str, Any]) -> JobFigures:
    """What the job's series say, from its spec and the status the operator wrote. Pure."""
    energy = status.get("energy") or {}
    limit = energy.get("gpuPowerLimitWatts", spec.energy.gpu_power_limit_watts)
    if energy.get("gpuPowerLimitRefused"):
        limit = None  # none is asked of the GPUs
    return JobFigures(
        phase=str(status.get("phase") or Phase.PENDING.value),
        desired=spec.replicas,
        target=int(status.get("targetReplicas") or spec.replicas),
        ready=int(status.get("readyReplicas") or 0),
        gpus=int(status.get("gpus") or 0),
        samples=_number(energy.get("samples")),
        energy_joules=_number(energy.get("consumedJoules")),
        average_watts=_number(energy.get("averageWatts")),
        power_cap_watts=spec.energy.power_cap_watts,
        budget_joules=spec.energy.budget_joules,
        gpu_power_limit_watts=_number(limit),
        energy_source=energy.get("source"),
        conditions={
            c["type"]: c.get("status") == "True"
            for c in status.get("conditions") or []
            if isinstance(c, dict) and "type" in c
        },
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class JobSeries(Collector):
    """The latest figures of every known job, rendered at scrape time."""

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], JobFigures] = {}
        self._decisions: dict[tuple[str, str], dict[str, int]] = {}
        self._lock = threading.Lock()

    def set(self, namespace: str, name: str, job: JobFigures | None) -> None:
        with self._lock:
            if job is None:
                self._jobs.pop((namespace, name), None)
                self._decisions.pop((namespace, name), None)
            else:
                self._jobs[(namespace, name)] = job

    def decided(self, namespace: str, name: str, reason: str) -> None:
        """One more Event of ``reason`` for the job (a resize, a limit, a budget...)."""
        with self._lock:
            tally = self._decisions.setdefault((namespace, name), {})
            tally[reason] = tally.get(reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs = sorted(self._jobs.items())
            decisions = {key: dict(tally) for key, tally in self._decisions.items()}

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=LABELS)

        phase = GaugeMetricFamily(
            "joule_job_phase", "1 for the job's phase", labels=[*LABELS, "phase"]
        )
        desired = gauge("joule_job_desired_replicas", "spec.replicas")
        target = gauge("joule_job_target_replicas", "The size the policy (or the user) chose")
        ready = gauge("joule_job_ready_replicas", "Workers running and ready")
        gpus = gauge("joule_job_gpus", "GPUs the job's scheduled workers hold")
        samples = CounterMetricFamily(
            "joule_job_samples", "Training samples the workers reported", labels=LABELS
        )
        energy = CounterMetricFamily(
            "joule_job_energy", "Energy the job has consumed (joules)", labels=LABELS,
            unit="joules",
        )  # fmt: skip
        watts = gauge(
            "joule_job_power_watts", "Average power over spec.energy.windowSeconds (the policy's)"
        )
        cap = gauge("joule_job_power_cap_watts", "spec.energy.powerCapWatts")
        budget = gauge("joule_job_energy_budget_joules", "spec.energy.budget")
        limit = gauge("joule_job_gpu_power_limit_watts", "The per-GPU power limit asked")
        condition = GaugeMetricFamily(
            "joule_job_condition",
            "1 while the job's condition is True (BudgetAtRisk, BudgetExhausted, "
            "PowerCapExceeded, Stalled, MetricsUnavailable, PowerLimitRefused, ...)",
            labels=[*LABELS, "condition"],
        )
        info = GaugeMetricFamily(
            "joule_job_energy_source_info", "Who measured the job's energy",
            labels=[*LABELS, "source"],
        )  # fmt: skip
        decided = CounterMetricFamily(
            "joule_job_decisions",
            "The operator's Events for the job, by reason (ScaleUp, PowerLimitLowered, "
            "BudgetExhausted, WorkerFailed, ...), since this operator started",
            labels=[*LABELS, "reason"],
        )
        for (namespace, name), job in jobs:
            labels = [namespace, name]
            phase.add_metric([*labels, job.phase], 1.0)
            desired.add_metric(labels, job.desired)
            target.add_metric(labels, job.target)
            ready.add_metric(labels, job.ready)
            gpus.add_metric(labels, job.gpus)
            for family, value in (
                (samples, job.samples),
                (energy, job.energy_joules),
                (watts, job.average_watts),
                (cap, job.power_cap_watts),
                (budget, job.budget_joules),
                (limit, job.gpu_power_limit_watts),
            ):
                if value is not None:
                    family.add_metric(labels, value)
            for kind, on in sorted(job.conditions.items()):
                condition.add_metric([*labels, kind], 1.0 if on else 0.0)
            if job.energy_source:
                info.add_metric([*labels, job.energy_source], 1.0)
            for reason, count in sorted(decisions.get((namespace, name), {}).items()):
                decided.add_metric([*labels, reason], float(count))
        yield from (phase, desired, target, ready, gpus, samples, energy, watts, cap, budget,
                    limit, condition, info, decided)  # fmt: skip


JOB_SERIES = JobSeries()
