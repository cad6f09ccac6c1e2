"""From what was measured to status.energy, a policy decision and its Events. Pure.

Energy is accounted from counters: each pod's GPUs as its node's agent reports them (keyed
by pod UID, GPU and when the agent's record began), or, from the trainer itself, each worker
process's ``joule_trainer_energy_joules_total`` (keyed by pod UID, local rank and the
process's start time, ``process_start_time_seconds``); samples from the workers' counters.
A counter seen before adds its increase; a new one (a new key, or a counter that went down)
adds its whole value. The last value of every pod
that still exists is carried from round to round, so a pod missing from one scrape (a
timeout, a round that read nothing) adds only its increase when it is read again. These
records and the totals they add up to are one record, kept in the job's ConfigMap (see
``BOOKKEEPING``; status shows the totals): the consumed joules only grow, and an operator
restart (the record is re-read) loses or doubles nothing. Average power is the increase of
consumed joules over the last ``windowSeconds``; the points kept for it are thinned, never
cut, so the average spans the whole window (but not a gap in the evaluations).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from joule.agent_metrics import LimitReport
from joule.api.events import Event, fmt_time, parse_time
from joule.api.growth import mark_growth
from joule.api.types import TrainingJobSpec
from joule.hang import watched
from joule.policy import ClusterView, Decision, Observations, SizeStats, decide
from joule.staging import PROGRESS_SECONDS, staging
from joule.trainer_metrics import TrainerReading

MAX_WINDOW_POINTS = 64
# A limit no node agent has confirmed this long after it was asked for counts as refused.
LIMIT_CONFIRM_SECONDS = 60.0
HISTORY_SMOOTHING = 0.5  # weight of the newest interval in the per-size averages
DEFAULT_LIMIT = "default"  # limitHistory's key for "no limit set"


# status.energy keys that are the controller's bookkeeping: kept in the job's ConfigMap
# (builders.bookkeeping), with the totals they add up to, and not in status.
BOOKKEEPING = (
    "counters", "sampleCounters", "window", "history", "limitHistory", "limitHistoryAt",
    "gpuPowerLimitPendingSince", "gpuPowerLimitRefusedFor",
)  # fmt: skip
TOTALS = ("consumedJoules", "samples")


def merge_energy(shown: Mapping[str, Any], kept: Mapping[str, Any]) -> dict[str, Any]:
    """status.energy and the bookkeeping as one record for ``evaluate``. The bookkeeping's
    totals win: a counter and what it added are written together there."""
    return {**shown, **kept}


def split_energy(energy: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An evaluated record as (status.energy, the bookkeeping to keep)."""
    kept = {k: v for k, v in energy.items() if k in BOOKKEEPING or k in TOTALS}
    shown = {k: v for k, v in energy.items() if k not in BOOKKEEPING}
    return shown, kept


@dataclass(frozen=True)
class Measured:
    """One evaluation's readings: counters by where they are kept, and what measured them."""

    joules: Mapping[str, float]
    samples: Mapping[str, float]
    source: str  # node | trainer: who measured the energy
    meter: str | None = None  # with what: nvml, simulated, estimated, rapl, ...
    utilization: float | None = None  # the job's GPUs' mean busy fraction; None: unknown
    # Where samples come from, when energy does not come from the workers themselves.
    progress: str | None = None
    # A new energy counter's first value is a baseline, not energy used (a device's
    # counter since its driver loaded, read through Prometheus).
    baseline_new: bool = False

    @classmethod
    def from_trainers(cls, readings: Sequence[tuple[str, TrainerReading]]) -> Measured:
        """The trainers' self-reported counters (key: ``counter_key``)."""
        util = [r.utilization for _, r in readings if r.utilization is not None]
        return cls(
            joules={key: r.joules for key, r in readings},
            samples={key: r.samples for key, r in readings},
            source="trainer",
            meter=readings[0][1].source if readings else None,
            utilization=sum(util) / len(util) if util else None,
        )


@dataclass(frozen=True)
class Evaluation:
    status: dict[str, Any]  # the job's status with energy, targetReplicas, decision updated
    decision: Decision
    events: list[Event]


def counter_key(pod_uid: str, local_rank: int, reading: TrainerReading) -> str:
    """Where a process's counters are kept: a restarted process (same pod and rank, a new
    start time) gets a new key, so its counter counts from zero even if it has already
    passed the old process's last value."""
    key = f"{pod_uid}/{local_rank}"
    return key if reading.started is None else f"{key}@{reading.started:.2f}"


def _stream(key: str) -> str:
    return key.split("@", 1)[0]


def _count(
    prev: Mapping[str, float],
    now: Mapping[str, float],
    alive: Collection[str],
    baseline_new: bool = False,
) -> tuple[float, dict[str, float]]:
    """The increase of the counters read now over their last values, and the values to carry
    to the next round: every counter of a pod that still exists, the newest per process.
    ``baseline_new``: a counter not seen before adds nothing (its value is a baseline)."""
    # Keys by stream (pod/rank), so that each reading looks up its process's records in
    # constant time: a job of 8192 processes was quadratic with a search per reading.
    prev_by_stream: dict[str, list[str]] = {}
    for k in prev:
        prev_by_stream.setdefault(_stream(k), []).append(k)
    carried_by_stream: dict[str, dict[str, float]] = {}
    for k, v in prev.items():
        if k.split("/", 1)[0] in alive:
            carried_by_stream.setdefault(_stream(k), {})[k] = v
    added = 0.0
    for key, value in now.items():
        stream = _stream(key)
        last = prev.get(key)
        if last is None:
            # A key without the start time is an earlier operator's record of the same
            # process; a reading without it (an exporter that stopped sending it) continues
            # the newest record of its stream.
            same = sorted(k for k in prev_by_stream.get(stream, ()) if k != key)
            last = prev[same[-1]] if key == stream and same else prev.get(stream)
        if last is None and baseline_new:
            pass
        else:
            added += value - last if last is not None and value >= last else value
        # The process that wrote the stream's other records is gone: this one replaced it.
        carried_by_stream[stream] = {key: value}
    carried = {k: v for records in carried_by_stream.values() for k, v in records.items()}
    return added, carried


def _thin(window: list[list[float]], limit: int) -> list[list[float]]:
    """At most ``limit`` points, keeping the first (at or before the window's start) and the
    last: the interior point whose neighbours are closest goes first, so the points stay
    spread over the whole window instead of the oldest being cut off."""
    points = list(window)
    while len(points) > limit >= 2:
        i = min(range(1, len(points) - 1), key=lambda j: points[j + 1][0] - points[j - 1][0])
        del points[i]
    return points


def account(
    energy: Mapping[str, Any],
    readings: Sequence[tuple[str, TrainerReading]] | Measured,
    now: dt.datetime,
    window_seconds: float,
    replicas: int,
    steady: bool,
    alive: Collection[str] | None = None,
    interval: float = 0.0,
) -> dict[str, Any]:
    """The new status.energy after reading the workers (counter_key, reading) at ``now``.
    ``alive``: UIDs of the job's pods that exist now (default: those read). ``interval``:
    the evaluation interval: an interval much shorter (a retry) teaches no rate, and a gap
    much longer (a suspension, an operator down) is no part of the power window."""
    m = readings if isinstance(readings, Measured) else Measured.from_trainers(readings)
    if alive is None:
        alive = {key.split("/", 1)[0] for key in (*m.joules, *m.samples)}
    added_j, joule_counters = _count(energy.get("counters", {}), m.joules, alive, m.baseline_new)
    added_s, sample_counters = _count(energy.get("sampleCounters", {}), m.samples, alive)
    consumed = float(energy.get("consumedJoules", 0.0)) + added_j
    done = float(energy.get("samples", 0.0)) + added_s
    t = now.timestamp()
    window = [p for p in energy.get("window", []) if p[0] >= t - window_seconds]
    older = [p for p in energy.get("window", []) if p[0] < t - window_seconds]
    after_older = window[0][0] if window else t
    if older and not (interval and after_older - older[-1][0] > 2 * interval):
        # One point at or before the window's start, so rates span all of it; not one from
        # before a gap in the evaluations, whose average would dilute the window's.
        window.insert(0, older[-1])
    previous = window[-1] if window else None
    # The 4th value: the size the job ran steadily at when the point was taken (0: not
    # steady). An interval teaches a size's rate only if it was steady at that size from
    # its start: one that began while workers were still starting (their counters not yet
    # readable) made a size look several times slower than it is.
    window = _thin([*window, [t, consumed, done, replicas if steady else 0]], MAX_WINDOW_POINTS)
    out: dict[str, Any] = {
        **energy,
        "evaluatedAt": fmt_time(now),
        "consumedJoules": round(consumed, 3),
        "samples": done,
        "counters": joule_counters,
        "sampleCounters": sample_counters,
        "window": window,
    }
    if m.joules or m.source != "trainer":
        out["source"] = m.source
        if m.meter:
            out["meter"] = m.meter
    if m.progress:
        out["progress"] = m.progress
    first = window[0]
    if t - first[0] > 0:
        out["averageWatts"] = round((consumed - first[1]) / (t - first[0]), 3)
    else:
        out.pop("averageWatts", None)  # one point: no average yet, rather than a stale one
    history = dict(energy.get("history", {}))
    from_steady = previous is not None and len(previous) > 3 and previous[3] == replicas
    long_enough = previous is not None and t - previous[0] >= max(interval / 2, 1e-9)
    if steady and from_steady and previous is not None and long_enough:
        interval = t - previous[0]
        thr = (done - previous[2]) / interval
        watts = (consumed - previous[1]) / interval
        if thr > 0:
            history[str(replicas)] = _smoothed(history.get(str(replicas)), thr, watts)
        # The same interval, for the power limit in force all through it.
        set_at = parse_time(energy.get("gpuPowerLimitTime"))
        if thr > 0 and (set_at is None or previous[0] >= set_at.timestamp()):
            # What a limit gives depends on the size: rates learned at another size go.
            same_size = energy.get("limitHistoryAt", replicas) == replicas
            tried = dict(energy.get("limitHistory", {})) if same_size else {}
            key = limit_key(energy.get("gpuPowerLimitWatts"))
            tried[key] = _smoothed(tried.get(key), thr, watts)
            out["limitHistory"] = tried
            out["limitHistoryAt"] = replicas
    out["history"] = history
    return out


def _smoothed(old: Mapping[str, float] | None, thr: float, watts: float) -> dict[str, float]:
    """The newest interval's rates, averaged into what was measured before."""
    if old:
        a = HISTORY_SMOOTHING
        thr = a * thr + (1 - a) * old["throughput"]
        watts = a * watts + (1 - a) * old["watts"]
    return {"throughput": round(thr, 3), "watts": round(watts, 3)}


def _stats(rates: Mapping[str, float]) -> SizeStats:
    return SizeStats(rates["throughput"], rates["watts"])


def limit_key(watts: float | None) -> str:
    return DEFAULT_LIMIT if watts is None else f"{watts:g}"


def evaluate(
    spec: TrainingJobSpec,
    status: Mapping[str, Any],
    readings: Sequence[tuple[str, TrainerReading]] | Measured,
    cluster: ClusterView,
    now: dt.datetime,
    running: int,
    steady: bool,
    alive: Collection[str] | None = None,
    limits: LimitReport | None = None,
) -> Evaluation:
    """Account energy, ask the policy, and say what changed (status, Events). ``limits``:
    what the node agents report of the job's power limit (None: nobody confirms limits, as
    with the trainer's self-report, which applies them itself)."""
    st = dict(status)
    m = readings if isinstance(readings, Measured) else Measured.from_trainers(readings)
    energy = account(
        st.get("energy", {}), m, now, spec.energy.window_seconds, running, steady, alive,
        interval=spec.scaling.evaluation_interval_seconds,
    )  # fmt: skip
    if spec.energy.budget_joules is not None:
        energy["budgetRemainingJoules"] = round(
            max(spec.energy.budget_joules - energy["consumedJoules"], 0.0), 3
        )
    last_scale = parse_time(st.get("lastScaleTime"))
    rates = energy.get("history", {}).get(str(running))
    if last_scale and steady and rates and energy.get("measuredScale") != st["lastScaleTime"]:
        # The first steady reading at the new size: what the last resize cost, kept per job.
        energy["restartSeconds"] = round((now - last_scale).total_seconds(), 1)
        energy["measuredScale"] = st["lastScaleTime"]
    events: list[Event] = []
    policy_spec = spec.policy_spec()
    if limits is not None:
        refusal = _confirm_limit(spec, energy, limits, now, events)
        if refusal:
            # Limits do not work for this job: the policy goes on with workers alone.
            policy_spec = replace(
                policy_spec, energy=replace(spec.energy, min_gpu_power_limit_watts=None)
            )
    current = int(st.get("targetReplicas") or spec.replicas)
    # Mid-resize (or before the first steady reading) nothing is measured at any size: the
    # policy then only watches the budget, and keeps the size it is on the way to.
    obs = Observations(
        replicas=running if steady else current,
        # Workers running, where a raised target has not been reached yet; a worker being
        # replaced is no growth (the target did not move), and reads as the same size.
        running=running if running > current or st.get("growingSince") else None,
        throughput=rates["throughput"] if rates and steady else 0.0,
        watts=energy.get("averageWatts", 0.0),
        consumed_joules=energy["consumedJoules"],
        samples_done=energy["samples"],
        now=now,
        gpu_utilization=m.utilization,
        history={int(n): _stats(h) for n, h in energy.get("history", {}).items()},
        restart_seconds=float(energy.get("restartSeconds", 30.0)),
        last_scale_time=last_scale,
        gpu_power_limit_watts=energy.get("gpuPowerLimitWatts"),
        # A limit not yet confirmed in force reads as one just set: the policy waits for it.
        power_limit_time=(
            now
            if energy.get("gpuPowerLimitConfirmed") is False
            else parse_time(energy.get("gpuPowerLimitTime"))
        ),
        limit_history={
            None if k == DEFAULT_LIMIT else float(k): _stats(h)
            for k, h in energy.get("limitHistory", {}).items()
            if energy.get("limitHistoryAt", running) == running  # measured at this size
        },
    )
    decision = decide(policy_spec, obs, cluster)
    st["energy"] = energy
    if decision.gpu_power_limit_watts != obs.gpu_power_limit_watts:
        if decision.gpu_power_limit_watts is None:
            energy.pop("gpuPowerLimitWatts", None)
        else:
            energy["gpuPowerLimitWatts"] = decision.gpu_power_limit_watts
        energy["gpuPowerLimitTime"] = fmt_time(now)
        if limits is not None:
            energy["gpuPowerLimitConfirmed"] = False  # until the node agents say so
            energy["gpuPowerLimitPendingSince"] = fmt_time(now)
        events.append(Event("Normal", decision.reason, decision.message))
    if decision.replicas != current and not decision.suspend:
        st["targetReplicas"] = decision.replicas
        mark_growth(st, running, decision.replicas, now)
        st["lastScaleTime"] = fmt_time(now)
        events.append(
            Event(
                "Normal", decision.reason, f"{current} -> {decision.replicas}: {decision.message}"
            )
        )
    elif "targetReplicas" not in st:
        st["targetReplicas"] = current
    last = st.get("lastDecision", {})
    limit = decision.gpu_power_limit_watts
    if (last.get("reason"), last.get("replicas"), last.get("suspend", False),
        last.get("gpuPowerLimitWatts")) != (
        decision.reason, decision.replicas, decision.suspend, limit
    ):  # fmt: skip
        st["lastDecision"] = {
            "replicas": decision.replicas,
            "reason": decision.reason,
            "message": decision.message,
            "at": fmt_time(now),
            "suspend": decision.suspend,
            "atRisk": decision.budget_at_risk,
            "overCap": decision.power_cap_exceeded,
        }
        if limit is not None:
            st["lastDecision"]["gpuPowerLimitWatts"] = limit
        alarming = decision.suspend or decision.budget_exhausted or decision.power_cap_exceeded
        if alarming and not events:
            events.append(Event("Warning", decision.reason, decision.message))
        cap = spec.energy.power_cap_watts
        if last.get("overCap") and not decision.power_cap_exceeded and cap is not None:
            watts = energy.get("averageWatts", 0.0)
            events.append(
                Event("Normal", "UnderPowerCap", f"average power {watts:.1f} W, under the "
                      f"{cap:.0f} W cap, at {decision.replicas} workers")
            )  # fmt: skip
    return Evaluation(st, decision, events)


def _confirm_limit(
    spec: TrainingJobSpec,
    energy: dict[str, Any],
    report: LimitReport,
    now: dt.datetime,
    events: list[Event],
) -> str | None:
    """Keep energy's record of the chosen per-GPU limit in step with what the node agents
    report; returns why limits do not work for this job (None: they do). The policy's
    clock for a limit (gpuPowerLimitTime) starts when the limit is confirmed in force, not
    when it was asked for: until then the GPUs still ran at the old one.

    A refusal holds until the spec's limits change (the user's fix); a limit the agents
    answered for but have not put in force within LIMIT_CONFIRM_SECONDS counts as refused.
    A round in which they did not answer for every worker counts for nothing."""
    asked_for = _limit_spec(spec)
    if energy.get("gpuPowerLimitRefused"):
        if energy.get("gpuPowerLimitRefusedFor") == asked_for:
            return str(energy["gpuPowerLimitRefused"])
        for key in ("gpuPowerLimitRefused", "gpuPowerLimitRefusedFor"):
            energy.pop(key, None)  # the spec's limits changed: try them
    chosen = energy.get("gpuPowerLimitWatts")
    if chosen is None and spec.energy.gpu_power_limit_watts is None:
        energy.pop("gpuPowerLimitConfirmed", None)
        energy.pop("gpuPowerLimitPendingSince", None)
        return None
    if report.unknown and report.refused is None:
        return None
    if report.refused is None and report.confirmed:
        if energy.get("gpuPowerLimitConfirmed") is False:
            energy["gpuPowerLimitTime"] = fmt_time(now)
        energy["gpuPowerLimitConfirmed"] = True
        energy.pop("gpuPowerLimitPendingSince", None)
        return None
    since = parse_time(energy.setdefault("gpuPowerLimitPendingSince", fmt_time(now))) or now
    why = report.refused
    if why is None and (now - since).total_seconds() < LIMIT_CONFIRM_SECONDS:
        if energy.get("gpuPowerLimitConfirmed") is not True:
            energy["gpuPowerLimitConfirmed"] = False
        return None
    if why is None:
        why = f"no node agent put the limit in force within {LIMIT_CONFIRM_SECONDS:.0f}s"
    energy["gpuPowerLimitRefused"] = why
    energy["gpuPowerLimitRefusedFor"] = asked_for
    for key in ("gpuPowerLimitWatts", "gpuPowerLimitConfirmed", "gpuPowerLimitPendingSince"):
        energy.pop(key, None)
    energy["gpuPowerLimitTime"] = fmt_time(now)
    watts = f"{chosen:g} W" if chosen is not None else "the spec's"
    events.append(
        Event("Warning", "PowerLimitRefused",
              f"the per-GPU power limit ({watts}) was refused: {why}; the policy goes on "
              "without power limits (fewer workers instead) until spec.energy's limits change")
    )  # fmt: skip
    return why


def _limit_spec(spec: TrainingJobSpec) -> str:
    """The spec's power-limit settings, as a refusal remembers them."""
    e = spec.energy
    return f"{e.gpu_power_limit_watts}/{e.min_gpu_power_limit_watts}"


def next_evaluation(
    spec: TrainingJobSpec, status: dict[str, Any], now: dt.datetime
) -> float | None:
    """Seconds until the energy and scaling loop is due for this job: every
    evaluationIntervalSeconds while it runs, if it has a policy or an energy limit, or, for
    its progress only, while its hang timeout is watched (see ``joule.hang``), or for the
    epsilon it has spent (spec.privacy); every few seconds while its dataset is staged."""
    interval = float(spec.scaling.evaluation_interval_seconds)
    if spec.managed and status.get("phase") in ("Running", "Resizing"):
        last = parse_time((status.get("energy") or {}).get("evaluatedAt"))
    elif watched(spec, status):
        last = parse_time((status.get("progress") or {}).get("checkedAt"))
    elif spec.privacy is not None and status.get("phase") in ("Running", "Resizing"):
        last = parse_time((status.get("privacy") or {}).get("checkedAt"))  # epsilon so far
    elif staging(status):  # spec.data: the staging pod's progress, into status.data
        last = parse_time((status.get("data") or {}).get("checkedAt"))
        interval = PROGRESS_SECONDS
    else:
        return None
    if last is None:
        return 0.0
    due = last + dt.timedelta(seconds=interval)
    return max((due - now).total_seconds(), 0.0)
