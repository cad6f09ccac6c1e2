"""The scaling policy: from a job's spec, what it measured and the cluster, to a worker count
and a reason. Pure; the operator and the simulator call the same function.

Order of concerns, first match wins:
1. Budget exhausted: act as the spec says (Suspend, ScaleToMin, Warn).
2. Power cap: the job's average power must stay under the cap. Sizes whose predicted power
   exceeds it are never chosen; a measured breach shrinks the job at once (no cooldown).
3. Cooldown: no other resize within cooldownSeconds of the last one.
4. The policy: Throughput (grow while another worker adds throughput, GPUs are free and the
   job is not input-bound; shrink when the last worker adds little, GPUs are idle or other
   jobs wait) or EnergyEfficient (the size with the fewest joules per sample that meets the
   deadline). A budget at risk switches Throughput to EnergyEfficient.
A resize is made only when its predicted gain over the remaining work exceeds what a restart
costs (restart_seconds, measured per job). Growing needs a gain of min_gain, shrinking back a
gain of under min_gain / 2: the band between the two keeps noise from flipping decisions.
"""

from __future__ import annotations

import math

from joule.policy.types import (
    ClusterView,
    Decision,
    JobPolicySpec,
    Observations,
    OnBudgetExhausted,
    Policy,
    SizeStats,
)

DEFAULT_SCALING_EXPONENT = 0.8  # throughput ~ workers^0.8 until two sizes are measured
NO_TARGET_HORIZON_SECONDS = 3600.0  # how far ahead gains count when no target is given
LOW_UTILIZATION = 0.4  # below: input-bound, more workers would only wait


def exponent(history: dict[int, SizeStats]) -> float:
    """How throughput grows with workers, from the two measured sizes farthest apart."""
    sizes = sorted(n for n, s in history.items() if s.throughput > 0)
    if len(sizes) < 2:
        return DEFAULT_SCALING_EXPONENT
    a, b = sizes[0], sizes[-1]
    alpha = math.log(history[b].throughput / history[a].throughput) / math.log(b / a)
    return min(max(alpha, 0.0), 1.0)


def predict(obs: Observations, n: int) -> SizeStats:
    """Throughput and power at ``n`` workers: measured where we have been, else scaled from
    the nearest measured size (power per worker constant, throughput ~ n^alpha)."""
    history = dict(obs.history)
    if obs.replicas > 0 and obs.throughput > 0:
        history[obs.replicas] = SizeStats(obs.throughput, obs.watts)
    if n in history:
        return history[n]
    if not history:
        return SizeStats(0.0, 0.0)
    m = min(history, key=lambda k: (abs(k - n), -k))
    alpha = exponent(history)
    return SizeStats(history[m].throughput * (n / m) ** alpha, history[m].watts * n / m)


def _joules_per_sample(s: SizeStats) -> float:
    return s.watts / s.throughput if s.throughput > 0 else math.inf


def decide(spec: JobPolicySpec, obs: Observations, cluster: ClusterView) -> Decision:
    lo, hi = spec.min_replicas, spec.max_replicas
    cur = min(max(obs.replicas, lo), hi)
    energy, target = spec.energy, spec.target

    def keep(reason: str, message: str, **flags: bool) -> Decision:
        return Decision(cur, reason, message, **flags)

    # 1. The energy budget.
    remaining_j = None
    if energy.budget_joules is not None:
        remaining_j = energy.budget_joules - obs.consumed_joules
        if remaining_j <= 0:
            used = f"{obs.consumed_joules:.0f} J of {energy.budget_joules:.0f} J used"
            action = energy.on_budget_exhausted
            if action == OnBudgetExhausted.SUSPEND:
                return Decision(cur, "BudgetExhausted", f"{used}: suspending", True, False, True)
            if action == OnBudgetExhausted.SCALE_TO_MIN:
                return Decision(
                    lo, "BudgetExhausted", f"{used}: scaling to {lo}", False, False, True
                )
            return keep(
                "BudgetExhausted", f"{used}: onBudgetExhausted is Warn", budget_exhausted=True
            )

    if obs.replicas == 0 or obs.throughput <= 0:
        return keep("NoMeasurement", "waiting for the workers' first measurements")

    sizes = range(lo, hi + 1)
    stats = {n: predict(obs, n) for n in sizes}
    cap = energy.power_cap_watts
    feasible = [n for n in sizes if cap is None or stats[n].watts <= cap] or [lo]

    # 2. The power cap: a measured breach, or a size predicted over it.
    if cap is not None and (obs.watts > cap or cur not in feasible):
        n = max([f for f in feasible if f < cur], default=lo)
        msg = f"average power {obs.watts:.1f} W over the {cap:.0f} W cap"
        if n < cur:
            return Decision(
                n, "PowerCapExceeded", f"{msg}: {cur} -> {n} workers", power_cap_exceeded=True
            )
        if obs.watts > cap:
            return keep(
                "PowerCapExceeded",
                f"{msg}; already at the minimum of {lo}",
                power_cap_exceeded=True,
            )

    # What is left to do, and whether the budget will last.
    remaining_samples = None
    if target.samples is not None:
        remaining_samples = max(target.samples - obs.samples_done, 0.0)
    at_risk = False
    if remaining_j is not None and remaining_samples is not None:
        need = {n: remaining_samples * _joules_per_sample(stats[n]) for n in feasible}
        at_risk = need.get(cur, math.inf) > remaining_j
    flags = {"budget_at_risk": at_risk}

    policy = spec.scaling.policy
    if policy == Policy.FIXED and not at_risk:
        return keep("Fixed", "scaling policy is Fixed", **flags)

    # 3. Cooldown.
    if obs.last_scale_time is not None:
        since = (obs.now - obs.last_scale_time).total_seconds()
        if since < spec.scaling.cooldown_seconds:
            return keep("Cooldown", f"last resize {since:.0f}s ago", **flags)

    per = max(spec.gpus_per_replica, 1)
    # GPUs that waiting jobs need are not ours to take (else: grow, give back, grow...).
    room = max(cluster.free_gpus - cluster.waiting_gpus, 0) // per
    candidates = [n for n in feasible if n <= cur or n - cur <= room]
    horizon = (
        remaining_samples / stats[cur].throughput
        if remaining_samples is not None
        else NO_TARGET_HORIZON_SECONDS
    )
    m = spec.scaling.min_gain

    # 4. The policy.
    if policy == Policy.ENERGY_EFFICIENT or at_risk:
        return _energy_efficient(
            spec, obs, stats, candidates, cur, horizon, remaining_samples, flags
        )
    return _throughput(spec, obs, cluster, stats, candidates, cur, horizon, m, flags)


def _worth_restart_time(
    stats: dict[int, SizeStats], cur: int, n: int, horizon: float, restart: float
) -> bool:
    """Does finishing the horizon's samples at ``n`` save more time than a restart costs?"""
    work = horizon * stats[cur].throughput
    return work / stats[cur].throughput - work / stats[n].throughput > restart


def _throughput(
    spec: JobPolicySpec,
    obs: Observations,
    cluster: ClusterView,
    stats: dict[int, SizeStats],
    candidates: list[int],
    cur: int,
    horizon: float,
    m: float,
    flags: dict[str, bool],
) -> Decision:
    lo = spec.min_replicas
    util = obs.gpu_utilization
    if cur > lo and cur - 1 in candidates:
        if cluster.waiting_gpus > cluster.free_gpus:  # they cannot start on free GPUs alone
            wanted = f"{cluster.waiting_gpus} GPUs wanted by waiting jobs"
            return Decision(cur - 1, "FairShare", f"{wanted}: {cur} -> {cur - 1}", **flags)
        if util is not None and util < LOW_UTILIZATION:
            return Decision(
                cur - 1,
                "LowUtilization",
                f"GPU utilisation {util:.0%}: {cur} -> {cur - 1}",
                **flags,
            )
        last_gain = stats[cur].throughput / stats[cur - 1].throughput - 1
        if last_gain < m / 2:
            return Decision(
                cur - 1,
                "LowMarginalGain",
                f"worker {cur} adds {last_gain:.1%} throughput: {cur} -> {cur - 1}",
                **flags,
            )
    # Grow straight to the largest size every step to which still gains min_gain: one
    # restart instead of one per worker.
    nxt = cur
    while nxt + 1 in candidates and stats[nxt + 1].throughput / stats[nxt].throughput - 1 >= m:
        nxt += 1
    if nxt > cur and (util is None or util >= LOW_UTILIZATION):
        gain = stats[nxt].throughput / stats[cur].throughput - 1
        if _worth_restart_time(stats, cur, nxt, horizon, obs.restart_seconds):
            return Decision(
                nxt,
                "ScaleUp",
                f"GPUs free; predicted +{gain:.1%} throughput: {cur} -> {nxt}",
                **flags,
            )
    return Decision(cur, "Steady", f"{cur} workers: no resize gains enough", **flags)


def _energy_efficient(
    spec: JobPolicySpec,
    obs: Observations,
    stats: dict[int, SizeStats],
    candidates: list[int],
    cur: int,
    horizon: float,
    remaining_samples: float | None,
    flags: dict[str, bool],
) -> Decision:
    eligible = candidates
    deadline = spec.target.deadline
    note = ""
    if deadline is not None and remaining_samples:
        left = (deadline - obs.now).total_seconds()
        needed = remaining_samples / left if left > 0 else math.inf
        meeting = [n for n in candidates if stats[n].throughput >= needed]
        if meeting:
            eligible = meeting
        else:
            eligible = [max(candidates, key=lambda n: stats[n].throughput)]
            note = " (the deadline cannot be met; fastest size)"
    best = min(eligible, key=lambda n: (_joules_per_sample(stats[n]), n))
    if best == cur:
        return Decision(
            cur, "Steady", f"{cur} workers use the fewest joules per sample{note}", **flags
        )
    jps_cur, jps_best = _joules_per_sample(stats[cur]), _joules_per_sample(stats[best])
    gain = jps_cur / jps_best - 1 if jps_best > 0 else 0.0
    samples = horizon * stats[cur].throughput
    saved = samples * (jps_cur - jps_best)
    restart_cost = obs.restart_seconds * stats[cur].watts
    must = cur not in eligible  # the deadline forces it
    if must or (gain >= spec.scaling.min_gain and saved > restart_cost):
        why = f"{jps_best:.2f} J/sample at {best} workers vs {jps_cur:.2f} at {cur}{note}"
        return Decision(best, "EnergyEfficient", why, **flags)
    return Decision(cur, "Steady", f"a resize to {best} would save too little", **flags)
