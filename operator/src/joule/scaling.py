"""From the workers' /metrics to status.energy, a policy decision and its Events. Pure.

Energy is accounted from each worker's ``joule_trainer_energy_joules_total`` counter, keyed
by pod UID in status: a counter seen before adds its increase, a new or reset counter adds
its whole value (the process started since). status.energy.consumedJoules therefore only
grows, and an operator restart (status is re-read) loses or doubles nothing. Average power
is the increase of consumed joules over the last ``windowSeconds``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from joule.api.types import TrainingJobSpec
from joule.constants import LABEL_JOB
from joule.policy import ClusterView, Decision, Observations, SizeStats, decide
from joule.reconcile import Event, fmt_time, parse_time
from joule.trainer_metrics import TrainerReading

GPU = "nvidia.com/gpu"
MAX_WINDOW_POINTS = 64
HISTORY_SMOOTHING = 0.5  # weight of the newest interval in the per-size averages
DEFAULT_LIMIT = "default"  # status.energy.limitHistory's key for "no limit set"


@dataclass(frozen=True)
class Evaluation:
    status: dict[str, Any]  # the job's status with energy, targetReplicas, decision updated
    decision: Decision
    events: list[Event]


def _count(prev: Mapping[str, float], now: Mapping[str, float]) -> float:
    added = 0.0
    for uid, value in now.items():
        last = prev.get(uid)
        added += value - last if last is not None and value >= last else value
    return added


def account(
    energy: Mapping[str, Any],
    readings: Sequence[tuple[str, TrainerReading]],
    now: dt.datetime,
    window_seconds: float,
    replicas: int,
    steady: bool,
) -> dict[str, Any]:
    """The new status.energy after reading the workers (uid, reading) at ``now``."""
    joules = {uid: r.joules for uid, r in readings}
    samples = {uid: r.samples for uid, r in readings}
    consumed = float(energy.get("consumedJoules", 0.0)) + _count(energy.get("counters", {}), joules)
    done = float(energy.get("samples", 0.0)) + _count(energy.get("sampleCounters", {}), samples)
    t = now.timestamp()
    window = [p for p in energy.get("window", []) if p[0] >= t - window_seconds]
    older = [p for p in energy.get("window", []) if p[0] < t - window_seconds]
    if older:  # keep one point at or before the window's start, so rates span all of it
        window.insert(0, older[-1])
    previous = window[-1] if window else None
    window = [*window, [t, consumed, done]][-MAX_WINDOW_POINTS:]
    out: dict[str, Any] = {
        **energy,
        "consumedJoules": round(consumed, 3),
        "samples": done,
        "counters": joules,
        "sampleCounters": samples,
        "window": window,
    }
    if readings:
        out["source"] = readings[0][1].source
    first = window[0]
    if t - first[0] > 0:
        out["averageWatts"] = round((consumed - first[1]) / (t - first[0]), 3)
    history = dict(energy.get("history", {}))
    if steady and previous is not None and t - previous[0] > 0:
        interval = t - previous[0]
        thr = (done - previous[2]) / interval
        watts = (consumed - previous[1]) / interval
        if thr > 0:
            history[str(replicas)] = _smoothed(history.get(str(replicas)), thr, watts)
        # The same interval, for the power limit in force all through it.
        set_at = parse_time(energy.get("gpuPowerLimitTime"))
        if thr > 0 and (set_at is None or previous[0] >= set_at.timestamp()):
            tried = dict(energy.get("limitHistory", {}))
            key = limit_key(energy.get("gpuPowerLimitWatts"))
            tried[key] = _smoothed(tried.get(key), thr, watts)
            out["limitHistory"] = tried
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
    readings: Sequence[tuple[str, TrainerReading]],
    cluster: ClusterView,
    now: dt.datetime,
    running: int,
    steady: bool,
) -> Evaluation:
    """Account energy, ask the policy, and say what changed (status, Events)."""
    st = dict(status)
    energy = account(
        st.get("energy", {}), readings, now, spec.energy.window_seconds, running, steady
    )
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
    util = [r.utilization for _, r in readings if r.utilization is not None]
    current = int(st.get("targetReplicas") or spec.replicas)
    # Mid-resize (or before the first steady reading) nothing is measured at any size: the
    # policy then only watches the budget, and keeps the size it is on the way to.
    obs = Observations(
        replicas=running if steady else current,
        throughput=rates["throughput"] if rates and steady else 0.0,
        watts=energy.get("averageWatts", 0.0),
        consumed_joules=energy["consumedJoules"],
        samples_done=energy["samples"],
        now=now,
        gpu_utilization=sum(util) / len(util) if util else None,
        history={int(n): _stats(h) for n, h in energy.get("history", {}).items()},
        restart_seconds=float(energy.get("restartSeconds", 30.0)),
        last_scale_time=last_scale,
        gpu_power_limit_watts=energy.get("gpuPowerLimitWatts"),
        power_limit_time=parse_time(energy.get("gpuPowerLimitTime")),
        limit_history={
            None if k == DEFAULT_LIMIT else float(k): _stats(h)
            for k, h in energy.get("limitHistory", {}).items()
        },
    )
    decision = decide(spec.policy_spec(), obs, cluster)
    st["energy"] = energy
    events: list[Event] = []
    if decision.gpu_power_limit_watts != obs.gpu_power_limit_watts:
        if decision.gpu_power_limit_watts is None:
            energy.pop("gpuPowerLimitWatts", None)
        else:
            energy["gpuPowerLimitWatts"] = decision.gpu_power_limit_watts
        energy["gpuPowerLimitTime"] = fmt_time(now)
        events.append(Event("Normal", decision.reason, decision.message))
    if decision.replicas != current and not decision.suspend:
        energy.pop("limitHistory", None)  # what a limit gives depends on the size
        st["targetReplicas"] = decision.replicas
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


def cluster_view(
    nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> ClusterView:
    """Free GPUs (allocatable on Ready, schedulable nodes minus what scheduled pods hold),
    GPUs that unscheduled pods wait for, and how many jobs hold or want GPUs."""

    def gpus(pod: Mapping[str, Any]) -> int:
        total = 0
        for c in pod.get("spec", {}).get("containers", []):
            limits = c.get("resources", {}).get("limits", {}) or {}
            total += int(limits.get(GPU, 0))
        return total

    capacity = 0
    for node in nodes:
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        if ready and not node.get("spec", {}).get("unschedulable"):
            capacity += int(node.get("status", {}).get("allocatable", {}).get(GPU, 0))
    held = waiting = 0
    jobs = set()
    for pod in pods:
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") or not gpus(pod):
            continue
        meta = pod.get("metadata", {})
        # A TrainingJob's workers are one job; any other GPU pod counts on its own.
        jobs.add((meta.get("namespace"), meta.get("labels", {}).get(LABEL_JOB) or meta.get("name")))
        if pod.get("spec", {}).get("nodeName"):
            held += gpus(pod)
        else:
            waiting += gpus(pod)
    return ClusterView(
        free_gpus=max(capacity - held, 0), waiting_gpus=waiting, total_gpus=capacity, jobs=len(jobs)
    )
