"""What `joule report` draws for one job, as plain values, and the pure steps that make them
from Prometheus' answers or from the job's status and Events. No I/O here."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Panel -> the series drawn in it (name -> Prometheus query). $sel is the job's selector.
# Names follow the dashboard's panels (charts/joule/files/dashboard.json).
PANELS: dict[str, dict[str, str]] = {
    "Power (W)": {
        "power": "joule_job_power_watts{$sel}",
        "cap": "joule_job_power_cap_watts{$sel}",
    },
    "Energy (J)": {
        "energy": "joule_job_energy_joules_total{$sel}",
        "budget": "joule_job_energy_budget_joules{$sel}",
    },
    "Workers": {
        "desired": "joule_job_desired_replicas{$sel}",
        "target": "joule_job_target_replicas{$sel}",
        "ready": "joule_job_ready_replicas{$sel}",
    },
    "Throughput (samples/s)": {
        "throughput": "rate(joule_job_samples_total{$sel}[1m])",
    },
    "GPU power limit (W)": {
        "limit": "joule_job_gpu_power_limit_watts{$sel}",
    },
}
DECISIONS_QUERY = "joule_job_decisions_total{$sel}"
# Lines that are limits to stay under, drawn dashed.
LIMITS = {"cap", "budget"}


@dataclass(frozen=True)
class Line:
    name: str
    times: list[float] = field(default_factory=list)  # unix seconds
    values: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Decision:
    time: float  # unix seconds
    reason: str
    message: str = ""
    count: int = 1  # how many times it was decided at (or up to) this time


@dataclass(frozen=True)
class Report:
    namespace: str
    job: str
    start: float
    end: float
    source: str  # what the data came from, said on the page
    panels: dict[str, list[Line]]
    decisions: list[Decision]
    notes: list[str] = field(default_factory=list)

    def empty_panels(self) -> list[str]:
        return [title for title, lines in self.panels.items() if not any(ln.times for ln in lines)]


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """``90s``, ``30m``, ``1h``, ``2h30m``, ``1d`` -> seconds (above 0)."""
    parts = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if not text.strip() or parts is None:
        raise ValueError(f"--since {text!r}: a duration such as 90s, 30m, 1h or 2h30m")
    seconds = sum(int(v or 0) * _UNITS[u] for v, u in zip(parts.groups(), "dhms", strict=True))
    if seconds <= 0:
        raise ValueError(f"--since {text!r}: must be longer than 0s")
    return float(seconds)


def selector(namespace: str, job: str) -> str:
    return f'namespace="{namespace}",joule_job="{job}"'


def queries(namespace: str, job: str) -> dict[str, dict[str, str]]:
    sel = selector(namespace, job)
    return {
        title: {name: q.replace("$sel", sel) for name, q in lines.items()}
        for title, lines in PANELS.items()
    }


def step_for(seconds: float) -> float:
    """A range query's step: about 300 points over the window, never under 1 s."""
    return max(1.0, round(seconds / 300.0))


def matrix_line(name: str, result: Sequence[Mapping[str, Any]]) -> Line:
    """One line from a range query's matrix: its points, several series summed by time
    (a job's series is one; a job re-created meanwhile gives two, one after the other)."""
    by_time: dict[float, float] = {}
    for series in result:
        for t, v in series.get("values", []):
            value = float(v)
            if value != value:  # NaN: a gap, not a point
                continue
            by_time[float(t)] = by_time.get(float(t), 0.0) + value
    times = sorted(by_time)
    return Line(name, times, [by_time[t] for t in times])


def decisions_from_counters(result: Sequence[Mapping[str, Any]], start: float) -> list[Decision]:
    """Decisions from ``joule_job_decisions_total`` range samples: each rise of a reason's
    counter is a decision at that sample's time. A counter first seen after the window
    starts was born then, at its value (the first decision of that reason); a fall is the
    operator restarting (the counters start again) and its new value counts whole."""
    found: list[Decision] = []
    for series in result:
        reason = str(series.get("metric", {}).get("reason", "?"))
        previous: float | None = None
        for t, v in series.get("values", []):
            t, value = float(t), float(v)
            if previous is None:
                rise = value if t > start + 1e-9 else 0.0
            elif value < previous:
                rise = value
            else:
                rise = value - previous
            if rise >= 1:
                found.append(Decision(t, reason, count=round(rise)))
            previous = value
    return sorted(found, key=lambda d: (d.time, d.reason))


def _timestamp(value: Any) -> float | None:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def decisions_from_events(events: Iterable[Mapping[str, Any]], start: float) -> list[Decision]:
    """The operator's Events about the job (Kubernetes' shape: reason, message, count,
    firstTimestamp, lastTimestamp or eventTime) inside the window. An Event repeated
    ``count`` times is drawn at its last time, with its count."""
    found = []
    for e in events:
        t = _timestamp(e.get("lastTimestamp")) or _timestamp(e.get("eventTime"))
        t = t or _timestamp(e.get("firstTimestamp"))
        if t is None or t < start:
            continue
        found.append(
            Decision(
                t, str(e.get("reason", "?")), str(e.get("message", "")), int(e.get("count") or 1)
            )
        )
    return sorted(found, key=lambda d: (d.time, d.reason))


def _rates(points: Sequence[Sequence[float]], column: int) -> Line:
    """Per-second rates between consecutive window points, drawn at each interval's end."""
    times, values = [], []
    for a, b in itertools.pairwise(points):
        if b[0] > a[0]:
            times.append(float(b[0]))
            values.append((float(b[column]) - float(a[column])) / (float(b[0]) - float(a[0])))
    return Line("", times, values)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def status_panels(
    spec: Mapping[str, Any], status: Mapping[str, Any], now: float
) -> dict[str, list[Line]]:
    """Without Prometheus, what the status holds, with the power window's points (time,
    joules, samples: the last ``spec.energy.windowSeconds``, from the job's bookkeeping
    ConfigMap, as ``energy.window``) for energy, power and throughput, and
    each other figure as one point at ``now``, with the cap and the budget as lines."""
    energy = status.get("energy") or {}
    spec_energy = spec.get("energy") or {}
    window = [p for p in energy.get("window") or [] if isinstance(p, list) and len(p) >= 3]
    first = float(window[0][0]) if window else now

    def level(name: str, value: Any) -> Line:
        """A constant over the window (a limit), or one point now."""
        number = _number(value)
        if number is None:
            return Line(name)
        return Line(
            name, [first, now] if first < now else [now], [number] * (2 if first < now else 1)
        )

    consumed = _number(energy.get("consumedJoules"))
    remaining = _number(energy.get("budgetRemainingJoules"))
    budget = consumed + remaining if consumed is not None and remaining is not None else None
    power, throughput = _rates(window, 1), _rates(window, 2)
    return {
        "Power (W)": [
            Line("power", power.times, power.values),
            level("cap", spec_energy.get("powerCapWatts")),
        ],
        "Energy (J)": [
            Line("energy", [float(p[0]) for p in window], [float(p[1]) for p in window]),
            level("budget", budget),
        ],
        "Workers": [
            level("desired", spec.get("replicas")),
            level("target", status.get("targetReplicas", spec.get("replicas"))),
            level("ready", status.get("readyReplicas", 0)),
        ],
        "Throughput (samples/s)": [Line("throughput", throughput.times, throughput.values)],
        "GPU power limit (W)": [level("limit", energy.get("gpuPowerLimitWatts"))],
    }
