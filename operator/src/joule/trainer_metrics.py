"""What a Joule trainer's /metrics says, reduced to what the operator and the demo use. Pure."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
    utilization: float | None = None  # GPU busy fraction; None without NVML
    started: float | None = None  # the process's start (unix seconds): a new one resets


def parse_trainer_metrics(text: str) -> TrainerReading | None:
    """Rank 0..n of a joule trainer's exposition; None when it has not trained a step yet."""
    values: dict[str, float] = {}
    labels: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_start_time_seconds":
                values[sample.name] = sample.value
            elif sample.name.startswith("joule_trainer_"):
                values[sample.name] = sample.value
                if sample.name == "joule_trainer_energy_joules_total":
                    labels = dict(sample.labels)
                labels.setdefault("rank", sample.labels.get("rank", "0"))
    if "joule_trainer_steps_total" not in values:
        return None
    for name in ("joule_trainer_samples_total", "joule_trainer_energy_joules_total"):
        value = values.get(name, 0.0)
        # Counters the operator adds up: one NaN, infinite or negative value would spoil
        # the job's total for good.
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} is not a finite, non-negative counter")
    return TrainerReading(
        rank=int(labels.get("rank", "0")),
        steps=values["joule_trainer_steps_total"],
        samples=values.get("joule_trainer_samples_total", 0.0),
        throughput=values.get("joule_trainer_throughput_samples_per_second", 0.0),
        loss=values.get("joule_trainer_loss"),
        watts=values.get("joule_trainer_power_watts"),
        joules=values.get("joule_trainer_energy_joules_total", 0.0),
        source=labels.get("source", "?"),
        utilization=values.get("joule_trainer_gpu_utilization_ratio"),
        started=values.get("process_start_time_seconds"),
    )


def samples_parser(metric: str) -> Callable[[str], TrainerReading | None]:
    """A parser for a script's own counter of samples (spec.progress.samplesMetric), summed
    over its series; None until the counter exists. Only samples (and the process's start
    time, where served) are read: the energy comes from the node."""
    names = {metric, f"{metric}_total"}

    def parse(text: str) -> TrainerReading | None:
        total, found, started = 0.0, False, None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in names:
                    if not math.isfinite(sample.value) or sample.value < 0:
                        raise ValueError(f"{metric} is not a finite, non-negative counter")
                    total += sample.value
                    found = True
                elif sample.name == "process_start_time_seconds":
                    started = sample.value
        if not found:
            return None
        return TrainerReading(0, 0.0, total, 0.0, None, None, 0.0, "?", started=started)

    return parse


PRIVACY_GAUGES = {
    "joule_trainer_dp_epsilon": "epsilon",
    "joule_trainer_dp_delta": "delta",
    "joule_trainer_dp_target_epsilon": "targetEpsilon",
}


def gauges(text: str, names: Mapping[str, str]) -> dict[str, float]:
    """The named gauges of an exposition, under the keys ``names`` maps them to (the largest
    sample of each, where labels split it; non-finite values left out)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = names.get(sample.name)
            if key is not None and math.isfinite(sample.value):
                out[key] = max(out.get(key, sample.value), sample.value)
    return out


def parse_privacy_metrics(text: str) -> dict[str, float] | None:
    """The epsilon a DP-SGD trainer has spent (and at which delta, of which target), as
    status.privacy keeps it; None where it serves none (DP off, or no step yet)."""
    out = gauges(text, PRIVACY_GAUGES)
    return out if "epsilon" in out else None
