"""The scaling policy: from a job's spec, what it measured and the cluster, to a worker count
and a reason. Pure; the operator and the simulator call the same function.

Order of concerns, first match wins:
1. Budget exhausted: act as the spec says (Suspend, ScaleToMin, Warn).
2. Power cap: the job's average power must stay under the cap. Sizes whose predicted power
   exceeds it are never chosen. A measured breach first lowers the per-GPU power limit (where
   the spec allows: minGpuPowerLimitWatts), which costs no restart; at that floor it shrinks
   the job at once (no cooldown). Once the job is well under the cap the limit goes back up.
3. Cooldown: no other resize within cooldownSeconds of the last one, unless the budget is at
   risk (a size that spends it is left at once, as one over the cap is).
4. The policy: Throughput (grow while another worker adds throughput, GPUs are free and the
   job is not input-bound; shrink when the last worker adds little, GPUs are idle or other
   jobs wait) or EnergyEfficient (the size with the fewest joules per sample that meets the
   deadline; then, where minGpuPowerLimitWatts allows, the per-GPU power limit with the
   fewest joules per sample at that size, found by trying lower limits one step at a time,
   as Zeus does). A budget at risk switches Throughput to EnergyEfficient.
A resize is made only when its predicted gain over the remaining work exceeds what a restart
costs (restart_seconds, measured per job). Growing needs a gain of min_gain, shrinking back a
gain of under min_gain / 2: the band between the two keeps noise from flipping decisions.
Throughput growth of a job with a target must also save it MIN_SAVING_SECONDS (90 minutes): a
resize restarts every worker and in a shared cluster is often undone soon after (its GPUs go
back to waiting jobs), so small savings (near a job's end, or of a short job) are not worth
the resizes they cost. Without a target the end is unknown, and only the restart counts.
Growth into GPUs of a busy cluster (one where jobs waited recently) must pay back two
restarts (there and back) within the time the cluster has been quiet so far.
"""

from __future__ import annotations

import math
from dataclasses import replace

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
# Growth of a job with a target must save it at least this much time (besides its restart).
MIN_SAVING_SECONDS = 5400.0
LOW_UTILIZATION = 0.4  # below: input-bound, more workers would only wait
CAP_TARGET = 0.95  # a lowered power limit, and growth, aim at this fraction of the cap
RAISE_BELOW = 0.8  # a lowered limit is raised again once power is under this fraction
BINDING = 0.9  # GPUs drawing less than this fraction of their limit are not held by it
LIMIT_REASONS = ("PowerLimitLowered", "PowerLimitRaised", "PowerLimitTuned")
LIMIT_STEP = 0.1  # a tuning step: this fraction of a GPU's draw at its default limit
BUDGET_MARGIN = 0.1  # growth must leave this much of the remaining budget unspent
LIMIT_KEPT = 1.25  # GPUs drawing up to this much over their limit are taken to keep to it
DEADLINE_MARGIN = 0.1  # a move for energy must still finish this much before the deadline


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
    the nearest measured size (power per worker constant, throughput ~ n^alpha). The power at
    the present size is its measured rate where there is one: the window's average mixes in
    what ran before in the window (another size, the idle GPUs of a restart)."""
    history = dict(obs.history)
    if obs.replicas > 0 and obs.throughput > 0:
        here = history.get(obs.replicas)
        watts = here.watts if here is not None and here.watts > 0 else obs.watts
        history[obs.replicas] = SizeStats(obs.throughput, watts)
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
    d = _decide(spec, obs, cluster)
    if d.reason in LIMIT_REASONS:
        return d
    d = replace(d, gpu_power_limit_watts=obs.gpu_power_limit_watts)
    if _tunes_limit(spec, d.budget_at_risk):
        return d  # the limit is the tuning's to set
    measured = d.reason != "NoMeasurement"
    quiet = measured and not (d.suspend or d.budget_exhausted or d.power_cap_exceeded)
    if quiet and d.replicas == obs.replicas and obs.gpu_power_limit_watts is not None:
        return _raise_limit(spec, obs, d)
    return d


def _gpus(spec: JobPolicySpec, obs: Observations) -> int:
    return max(obs.replicas * max(spec.gpus_per_replica, 1), 1)


def _per_gpu_watts(spec: JobPolicySpec, obs: Observations) -> float:
    return obs.watts / _gpus(spec, obs)


def _lower_limit(spec: JobPolicySpec, obs: Observations, cap: float) -> Decision | None:
    """A per-GPU limit that brings the job under its cap, if the spec allows one lower than
    the present; None at the floor (or where limits may not be set)."""
    floor = spec.energy.min_gpu_power_limit_watts
    current = obs.gpu_power_limit_watts
    if floor is None or (current is not None and current <= floor * 1.01):
        return None
    per_gpu = _per_gpu_watts(spec, obs)
    new = max(floor, per_gpu * CAP_TARGET * cap / obs.watts)
    new = round(new, 1)
    if current is not None and new >= current:
        return None  # not lower than the limit in force: only fewer workers help
    if new >= per_gpu * 0.99:  # GPUs already draw no more than this: only fewer help
        return None
    msg = (
        f"average power {obs.watts:.1f} W over the {cap:.0f} W cap: per-GPU power limit "
        f"{'default' if current is None else f'{current:.3g} W'} -> {new:.3g} W"
    )
    return Decision(
        obs.replicas, "PowerLimitLowered", msg, power_cap_exceeded=True, gpu_power_limit_watts=new
    )


def _over_cap_unmeasured(spec: JobPolicySpec, obs: Observations, cap: float, cur: int) -> Decision:
    """Over the cap while nothing is measured at the size the job is on its way to (a
    resize, a replaced worker). The cap is the window's average and holds all the same:
    growth stops at the workers already running; at the same size the per-GPU limit is
    lowered where allowed; a shrink under way is already lowering the power."""
    running = cur if obs.running is None else obs.running
    msg = f"average power {obs.watts:.1f} W over the {cap:.0f} W cap"
    if running <= 0 or running > cur:
        return Decision(cur, "PowerCapExceeded", f"{msg}; shrinking to {cur} workers",
                        power_cap_exceeded=True)  # fmt: skip
    if running < cur:
        n = max(running, spec.min_replicas)
        return Decision(n, "PowerCapExceeded", f"{msg}: growth to {cur} stopped at {n} workers",
                        power_cap_exceeded=True)  # fmt: skip
    if obs.power_limit_time is not None:
        since = (obs.now - obs.power_limit_time).total_seconds()
        if since < spec.energy.window_seconds:  # the average still holds the old power
            late = f"{msg}; the per-GPU limit set {since:.0f}s ago is not yet in the whole window"
            return Decision(cur, "PowerCapExceeded", late, power_cap_exceeded=True)
    lowered = _lower_limit(spec, obs, cap)
    if lowered is not None:
        return lowered
    return Decision(cur, "PowerCapExceeded", f"{msg}; waiting for a measurement at {cur} workers",
                    power_cap_exceeded=True)  # fmt: skip


def _limit_settling(spec: JobPolicySpec, obs: Observations) -> bool:
    """A limit already as low as the cap asks, which the GPUs keep to within 25 %, set less
    than two windows ago: the average is catching up (a limit enforced in software, like the
    estimated meter's, overshoots at first), and removing a worker for it would cost a
    restart the next window would not have needed. Past two windows, or with GPUs drawing
    well past their limit (one NVML refused to set), the workers go."""
    limit, since = obs.gpu_power_limit_watts, obs.power_limit_time
    if limit is None or since is None:
        return False
    recent = (obs.now - since).total_seconds() < 2 * spec.energy.window_seconds
    return recent and _per_gpu_watts(spec, obs) <= limit * LIMIT_KEPT


def _raise_limit(spec: JobPolicySpec, obs: Observations, d: Decision) -> Decision:
    """Give back a limit lowered for the cap once the job runs well under it."""
    current = obs.gpu_power_limit_watts
    assert current is not None
    cap = spec.energy.power_cap_watts
    ceiling = spec.energy.gpu_power_limit_watts
    # Only a limit lowered for the cap goes back up; with a budget, a lower limit (fewer
    # joules per sample) is kept, or raising it would put the budget at risk again.
    if cap is None or spec.energy.budget_joules is not None or obs.watts >= cap * RAISE_BELOW:
        return d
    new: float | None = None  # the spec's limit, or none
    binding = _per_gpu_watts(spec, obs) >= BINDING * current  # else the limit does nothing
    if obs.watts > 0 and binding:
        new = round(current * CAP_TARGET * cap / obs.watts, 1)
        if ceiling is not None and new >= ceiling:
            new = None
    to = "the spec's limit" if new is None else f"{new:.0f} W"
    if new is not None and new <= current:
        return d
    msg = f"average power {obs.watts:.1f} W: per-GPU power limit {current:.0f} W -> {to}"
    return Decision(d.replicas, "PowerLimitRaised", msg, budget_at_risk=d.budget_at_risk,
                    gpu_power_limit_watts=new)  # fmt: skip


def _decide(spec: JobPolicySpec, obs: Observations, cluster: ClusterView) -> Decision:
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
        if energy.power_cap_watts is not None and obs.watts > energy.power_cap_watts:
            return _over_cap_unmeasured(spec, obs, energy.power_cap_watts, cur)
        return keep("NoMeasurement", "waiting for the workers' first measurements")

    sizes = range(lo, hi + 1)
    stats = {n: predict(obs, n) for n in sizes}
    cap = energy.power_cap_watts
    feasible = [n for n in sizes if cap is None or stats[n].watts <= cap] or [lo]

    # 2. The power cap: a measured breach, or a size predicted over it. Under a lowered
    # per-GPU limit the size's rate measured before it says nothing of its power now: only
    # the window's average counts then.
    predicted_over = cur not in feasible and obs.gpu_power_limit_watts is None
    if cap is not None and (obs.watts > cap or predicted_over):
        if obs.watts > cap and obs.power_limit_time is not None:
            since = (obs.now - obs.power_limit_time).total_seconds()
            if since < energy.window_seconds:  # the average still holds the old power
                return keep(
                    "PowerCapExceeded",
                    f"average power {obs.watts:.1f} W over the {cap:.0f} W cap; the per-GPU "
                    f"limit set {since:.0f}s ago is not yet in the whole window",
                    power_cap_exceeded=True,
                )
        # What the job draws over the cap: the window's average, or where that has not
        # caught up yet, its measured rate at this size. Either way the limit comes first.
        drawn = obs.watts if obs.watts > cap else stats[cur].watts
        lowered = _lower_limit(spec, replace(obs, watts=drawn), cap) if drawn > cap else None
        if lowered is not None:
            return lowered
        if obs.watts > cap and _limit_settling(spec, obs):
            return keep(
                "PowerCapExceeded",
                f"average power {obs.watts:.1f} W over the {cap:.0f} W cap; the per-GPU limit "
                f"of {obs.gpu_power_limit_watts:.1f} W holds the GPUs near it and the average "
                "is still settling",
                power_cap_exceeded=True,
            )
        n = max([f for f in feasible if f < cur], default=lo)
        msg = f"average power {obs.watts:.1f} W over the {cap:.0f} W cap"
        if obs.watts <= cap:  # the window has not caught up with what this size draws
            msg = f"{cur} workers draw {stats[cur].watts:.1f} W, over the {cap:.0f} W cap"
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
    need: dict[int, float] = {}
    if remaining_j is not None and remaining_samples is not None:
        need = {n: remaining_samples * _joules_per_sample(stats[n]) for n in feasible}
        at_risk = need.get(cur, math.inf) > remaining_j
    flags = {"budget_at_risk": at_risk}

    policy = spec.scaling.policy
    if policy == Policy.FIXED and not at_risk:
        return keep("Fixed", "scaling policy is Fixed", **flags)

    # 3. Cooldown. A budget at risk does not wait: a size that spends it is left at once.
    if obs.last_scale_time is not None and not at_risk:
        since = (obs.now - obs.last_scale_time).total_seconds()
        if since < spec.scaling.cooldown_seconds:
            return keep("Cooldown", f"last resize {since:.0f}s ago", **flags)

    per = max(spec.gpus_per_replica, 1)
    # GPUs that waiting jobs need are not ours to take (else: grow, give back, grow...).
    room = max(cluster.free_gpus - cluster.waiting_gpus, 0) // per
    # Never grow into a size the remaining budget could not pay for (with a margin), or the
    # job would grow, fall at risk, shrink, and grow again.
    affordable = [
        n for n in feasible if not need or need[n] <= (remaining_j or 0.0) * (1 - BUDGET_MARGIN)
    ]
    # Growth stops short of the cap by the margin a lowered limit aims at: a size predicted
    # just under it is measured over it as often as not, and shrinks again.
    roomy = [n for n in affordable if cap is None or stats[n].watts <= cap * CAP_TARGET]
    candidates = [n for n in feasible if n <= cur or (n - cur <= room and n in roomy)]
    horizon = (
        remaining_samples / stats[cur].throughput
        if remaining_samples is not None
        else NO_TARGET_HORIZON_SECONDS
    )
    m = spec.scaling.min_gain

    # 4. The policy. Under a lowered power limit the sizes measured before it no longer
    # compare (they ran at another limit): only giving GPUs to waiting jobs goes on, and the
    # limit is raised (or lowered) first.
    ceiling = energy.gpu_power_limit_watts
    limit = obs.gpu_power_limit_watts
    limited = limit is not None and (ceiling is None or limit < ceiling)
    tuning = _tunes_limit(spec, at_risk)
    if limited and not at_risk and not tuning:
        shrink = _fair_share(spec, cluster, candidates, cur, flags)
        return shrink or keep(
            "Steady", f"{cur} workers at a lowered power limit of {limit:.0f} W per GPU", **flags
        )
    if policy == Policy.ENERGY_EFFICIENT or at_risk:
        sizes_now = [cur] if limited and not at_risk else candidates
        # Sizes the remaining budget pays for (with the margin; the present one unless at risk).
        payable = [n for n in sizes_now if n in affordable or (n == cur and not at_risk)]
        d = _energy_efficient(
            spec, obs, stats, sizes_now, payable, cur, horizon, remaining_samples, flags
        )
        if d.replicas == cur and tuning:
            return _tune_limit(spec, obs, _needed_rate(spec, obs, remaining_samples), d)
        return d
    return _throughput(spec, obs, cluster, stats, candidates, cur, horizon, m, flags)


def _tunes_limit(spec: JobPolicySpec, at_risk: bool) -> bool:
    """Whether the policy searches the per-GPU limit for energy (not only for the cap)."""
    energy_first = spec.scaling.policy == Policy.ENERGY_EFFICIENT or at_risk
    return energy_first and spec.energy.min_gpu_power_limit_watts is not None


def _needed_rate(
    spec: JobPolicySpec, obs: Observations, remaining_samples: float | None
) -> float | None:
    """Samples/s that finish the target by the deadline (None: no deadline to meet)."""
    deadline = spec.target.deadline
    if deadline is None or not remaining_samples:
        return None
    left = (deadline - obs.now).total_seconds()
    return remaining_samples / left if left > 0 else math.inf


def _tune_limit(
    spec: JobPolicySpec, obs: Observations, needed: float | None, d: Decision
) -> Decision:
    """One step of a search for the per-GPU limit with the fewest joules per sample at this
    size: go to the best limit measured; from the best, try the next lower one not yet tried
    (down to the floor). Limits too slow for the deadline, or measured over the cap, are out;
    with none left, the fastest allowed (the default where no cap forbids it). Each limit is
    tried once, so the search ends."""
    floor = spec.energy.min_gpu_power_limit_watts
    assert floor is not None
    current = obs.gpu_power_limit_watts
    # The interval rates under each limit; the window average would mix in earlier limits.
    now = obs.limit_history.get(current) or SizeStats(obs.throughput, obs.watts)
    seen = {**obs.limit_history, current: now}

    def fast_enough(limit: float | None) -> bool:
        if needed is None:
            return True
        margin = 1.0 if limit == current else 1 / (1 - DEADLINE_MARGIN)
        return seen[limit].throughput >= needed * margin

    def jps(limit: float | None) -> float:
        return _joules_per_sample(seen[limit])

    def go(limit: float | None, why: str) -> Decision:
        to = "the default" if limit is None else f"{limit:.0f} W"
        return Decision(d.replicas, "PowerLimitTuned", f"per-GPU power limit -> {to}: {why}",
                        budget_at_risk=d.budget_at_risk, gpu_power_limit_watts=limit)  # fmt: skip

    # Limits measured over the cap are out, whatever they save: the cap comes first.
    cap = spec.energy.power_cap_watts
    allowed = [lim for lim in seen if lim == current or cap is None or seen[lim].watts <= cap]
    ok = [limit for limit in allowed if fast_enough(limit)]
    if not ok:
        fastest = max(allowed, key=lambda limit: seen[limit].throughput)
        if fastest == current and (current is None or cap is not None):
            return d  # as fast as the cap allows (or no limit set): nothing to give back
        if fastest == current:
            return go(None, "the deadline needs full speed")
        return go(fastest, "the fastest limit measured; the deadline needs more speed")
    best = min(ok, key=lambda limit: (jps(limit), -(limit or math.inf)))
    if current not in ok or jps(current) > jps(best) * (1 + spec.scaling.min_gain / 2):
        return go(best, f"{jps(best):.3g} J/sample there vs {jps(current):.3g} now")
    if current != best:
        return d
    draw = now.watts / _gpus(spec, obs)
    start = draw if current is None else min(current, draw)
    lower = limit_below(floor, start)
    if lower is not None and lower not in seen:
        return go(lower, f"trying a lower limit; {jps(current):.3g} J/sample now")
    return d


def limit_below(floor: float, watts: float) -> float | None:
    """The next limit to try below ``watts``: a point of a fixed grid, floor x (1 + step)^k.
    A grid anchored at the floor (the spec's, so it never moves) makes a limit tried once
    the same limit when it comes up again: candidates taken from a measured draw differed by
    its noise every time, so the search never ran out of untried limits and changed the
    limit every evaluation. None: at the floor already."""
    if watts <= floor * (1 + LIMIT_STEP / 2):
        return None
    k = math.floor(math.log(watts / floor) / math.log(1 + LIMIT_STEP) - 0.5)
    return round(floor * (1 + LIMIT_STEP) ** max(k, 0), 1)


def _time_saved(stats: dict[int, SizeStats], cur: int, n: int, horizon: float) -> float:
    """Seconds saved by doing the horizon's samples at ``n`` workers instead of ``cur``."""
    return horizon * (1 - stats[cur].throughput / stats[n].throughput)


def _worth_while_quiet(
    stats: dict[int, SizeStats], cur: int, n: int, quiet: float | None, restart: float
) -> bool:
    """In a cluster where jobs waited ``quiet`` seconds ago, free GPUs are expected to stay
    free about as long again: growth must do more work in that time, after a restart there
    and one back, than staying would."""
    if quiet is None:
        return True
    return (quiet - 2 * restart) * stats[n].throughput > quiet * stats[cur].throughput


def _fair_share(
    spec: JobPolicySpec,
    cluster: ClusterView,
    candidates: list[int],
    cur: int,
    flags: dict[str, bool],
) -> Decision | None:
    """One worker back when waiting jobs cannot start on the free GPUs alone and this job
    holds more than an even share of the cluster."""
    per = max(spec.gpus_per_replica, 1)
    share = cluster.total_gpus / cluster.jobs if cluster.jobs else 0.0
    shrinkable = cur > spec.min_replicas and cur - 1 in candidates
    if shrinkable and cluster.waiting_gpus > cluster.free_gpus and cur * per > share:
        wanted = f"{cluster.waiting_gpus} GPUs wanted by waiting jobs"
        return Decision(cur - 1, "FairShare", f"{wanted}: {cur} -> {cur - 1}", **flags)
    return None


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
    shrink = _fair_share(spec, cluster, candidates, cur, flags)
    if shrink is not None:
        return shrink
    if cur > lo and cur - 1 in candidates:
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
        restart = obs.restart_seconds
        if not _worth_while_quiet(stats, cur, nxt, cluster.quiet_seconds, restart):
            quiet = cluster.quiet_seconds or 0.0
            return Decision(
                cur,
                "Steady",
                f"GPUs free, but jobs waited {quiet:.0f}s ago: +{gain:.1%} would not repay "
                f"two {restart:.0f}s restarts in that time",
                **flags,
            )
        saved = _time_saved(stats, cur, nxt, horizon)
        if spec.target.samples is not None and restart < saved < MIN_SAVING_SECONDS:
            return Decision(
                cur,
                "Steady",
                f"GPUs free, but +{gain:.1%} would save {saved / 60:.0f} min of the "
                f"{horizon / 60:.0f} min left, under the {MIN_SAVING_SECONDS / 60:.0f} min "
                "a resize must save",
                **flags,
            )
        if saved > restart:
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
    payable: list[int],
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

        def finishes(n: int, share: float) -> bool:
            restart = obs.restart_seconds if n != cur else 0.0
            return remaining_samples / stats[n].throughput + restart <= left * share

        # Leave a size that meets the deadline only for one that meets it with a margin, so
        # that noise on a borderline size cannot move the job back and forth.
        meeting = [n for n in candidates if finishes(n, 1.0 if n == cur else 1 - DEADLINE_MARGIN)]
        if meeting:
            eligible = meeting
        elif payable:
            # A lost deadline is a wish, a budget a limit: the fastest size it pays for.
            eligible = [max(payable, key=lambda n: stats[n].throughput)]
            paid = "" if payable == candidates else " the budget pays for"
            note = f" (the deadline cannot be met; fastest size{paid})"
        else:
            note = " (the deadline cannot be met, nor the budget kept)"
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
        why = f"{jps_best:.3g} J/sample at {best} workers vs {jps_cur:.3g} at {cur}{note}"
        return Decision(best, "EnergyEfficient", why, **flags)
    return Decision(cur, "Steady", f"a resize to {best} would save too little", **flags)
