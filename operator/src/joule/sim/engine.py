"""A discrete-time cluster simulator and the strategies it compares. Pure (seeded RNG).

Every strategy sees the same jobs in the same order on the same cluster. Jobs queue FIFO and
start when their first allocation fits. Each evaluation interval a strategy may resize a
running job (the job then makes no progress for its restart time, GPUs held) or change its
power limit. Joule's strategy is ``joule.policy.decide`` unchanged, fed noisy measurements.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from joule.policy import (
    ClusterView,
    Energy,
    JobPolicySpec,
    Observations,
    OnBudgetExhausted,
    Policy,
    Scaling,
    SizeStats,
    Target,
    decide,
)
from joule.sim.model import (
    IDLE_FRACTION,
    JobSpec,
    limit_fraction,
    noisy,
    power_factor,
    speed,
)

STEP_SECONDS = 10.0
EVAL_SECONDS = 60.0
WINDOW_SECONDS = 300.0
# How far Joule may lower a GPU's power limit (fraction of its maximum), in every simulated
# job: the spec's minGpuPowerLimitWatts.
MIN_LIMIT_FRACTION = 0.7
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class Job:
    spec: JobSpec
    n: int = 0
    f: float = 1.0
    done: float = 0.0
    energy: float = 0.0
    start: float | None = None
    end: float | None = None
    restart_until: float = 0.0
    rescales: int = 0
    gpu_seconds: float = 0.0
    window_energy: float = 0.0
    window_start: float = 0.0
    windows: int = 0
    windows_over: int = 0
    last_scale: float | None = None
    limit: float | None = None  # per-GPU power limit (W) Joule's policy set; None: default
    limit_time: float | None = None
    limit_history: dict[float | None, SizeStats] = field(default_factory=dict)  # at this size
    history: dict[int, SizeStats] = field(default_factory=dict)
    util_log: list[tuple[float, int]] = field(default_factory=list)  # HPA's desired sizes

    @property
    def gpus(self) -> int:
        return self.n * self.spec.kind.gpus_per_worker


# A strategy: (job, now, the cluster's free/waiting GPUs, rng) -> (workers, power-limit
# fraction f, see model.py).
Strategy = Callable[[Job, float, ClusterView, random.Random], tuple[int, float]]


@dataclass(frozen=True)
class Result:
    name: str
    energy: float
    samples: float
    jct: list[float]
    windows: int
    windows_over: int
    overruns: int
    misses: int
    rescales: int
    gpu_hours: float
    unfinished: int

    @property
    def joules_per_sample(self) -> float:
        return self.energy / self.samples if self.samples else math.inf


def first_size(job: Job, free: int, want: int) -> int:
    kind = job.spec.kind
    fits = free // kind.gpus_per_worker
    return min(want, fits) if min(want, fits) >= kind.min_workers else 0


def simulate(
    name: str,
    jobs: list[JobSpec],
    gpus: int,
    strategy: Strategy,
    initial: Callable[[JobSpec], tuple[int, float, bool]],
    seed: int,
    horizon: float = 14 * 86400.0,
) -> Result:
    """Run ``jobs`` to completion (or ``horizon``). ``initial`` gives a job's first size,
    power limit, and whether it may start smaller when fewer GPUs are free."""
    rng = random.Random(seed)
    pending = [Job(s) for s in sorted(jobs, key=lambda s: s.arrival)]
    queue: list[Job] = []
    running: list[Job] = []
    finished: list[Job] = []
    now, next_eval = 0.0, 0.0
    last_wait: float | None = None  # when a job last waited for GPUs
    while (pending or queue or running) and now < horizon:
        while pending and pending[0].spec.arrival <= now:
            queue.append(pending.pop(0))
        free = gpus - sum(j.gpus for j in running)
        while queue:  # FIFO gang start: the head blocks the rest, as a batch queue does
            job = queue[0]
            want, f, elastic = initial(job.spec)
            n = (
                first_size(job, free, want)
                if elastic
                else (want if free >= want * job.spec.kind.gpus_per_worker else 0)
            )
            if n == 0:
                break
            queue.pop(0)
            job.n, job.f, job.start = n, f, now
            job.window_start = now
            job.restart_until = now + job.spec.kind.restart_seconds  # the first start, too
            running.append(job)
            free -= job.gpus
        if now >= next_eval:
            waiting = sum(j.spec.kind.min_workers * j.spec.kind.gpus_per_worker for j in queue)
            if waiting:
                last_wait = now
            quiet = None if last_wait is None else now - last_wait
            for job in running:
                if now < job.restart_until:
                    continue
                free = gpus - sum(j.gpus for j in running)
                view = ClusterView(free, waiting, quiet, gpus, len(running) + len(queue))
                n, f = strategy(job, now, view, rng)
                if n != job.n:
                    job.rescales += 1
                    job.last_scale = now
                    job.restart_until = now + job.spec.kind.restart_seconds
                job.n, job.f = n, f
            next_eval = now + EVAL_SECONDS
        for job in list(running):
            kind = job.spec.kind
            watts = kind.watts(job.n, job.f)
            if now < job.restart_until:
                watts *= IDLE_FRACTION  # held, loading, not training
            else:
                job.done += kind.throughput(job.n, job.f) * STEP_SECONDS
            job.energy += watts * STEP_SECONDS
            job.window_energy += watts * STEP_SECONDS
            job.gpu_seconds += job.gpus * STEP_SECONDS
            if now + STEP_SECONDS - job.window_start >= WINDOW_SECONDS:
                job.windows += 1
                cap = job.spec.power_cap
                if cap is not None and job.window_energy / WINDOW_SECONDS > cap * 1.001:
                    job.windows_over += 1
                job.window_energy, job.window_start = 0.0, now + STEP_SECONDS
            if job.done >= kind.samples:
                job.end = now + STEP_SECONDS
                running.remove(job)
                finished.append(job)
        now += STEP_SECONDS
    everyone = finished + running + queue + pending
    return Result(
        name=name,
        energy=sum(j.energy for j in everyone),
        samples=sum(min(j.done, j.spec.kind.samples) for j in everyone),
        jct=[j.end - j.spec.arrival for j in finished if j.end is not None],
        windows=sum(j.windows for j in everyone if j.spec.power_cap is not None),
        windows_over=sum(j.windows_over for j in everyone),
        overruns=sum(1 for j in everyone if j.spec.budget and j.energy > j.spec.budget),
        misses=sum(
            1
            for j in everyone
            if j.spec.deadline and (j.end is None or j.end - j.spec.arrival > j.spec.deadline)
        ),
        rescales=sum(j.rescales for j in everyone),
        gpu_hours=sum(j.gpu_seconds for j in everyone) / 3600,
        unfinished=len(everyone) - len(finished),
    )


# -- strategies ----------------------------------------------------------------------------


def static_max(job: Job, now: float, cluster: ClusterView, rng: random.Random) -> tuple[int, float]:
    return job.n, job.f


def best_power_limit(min_speed: float = 0.0) -> float:
    """The power-limit fraction with the fewest joules per sample whose speed is at least
    ``min_speed`` (energy per sample is U-shaped in the limit)."""
    grid = [round(0.4 + 0.05 * i, 2) for i in range(13)]
    ok = [f for f in grid if speed(f) >= min_speed] or [1.0]
    return min(ok, key=lambda f: power_factor(f) / speed(f))


def hpa(job: Job, now: float, cluster: ClusterView, rng: random.Random) -> tuple[int, float]:
    """Kubernetes' HPA on a utilisation metric: target 80 %, 10 % tolerance, 300 s
    stabilisation for scale-down. Utilisation is modelled as the per-worker efficiency."""
    kind = job.spec.kind
    util = noisy(kind.throughput(job.n) / (job.n * kind.throughput(1)), rng)
    ratio = util / 0.8
    desired = job.n if abs(ratio - 1.0) <= 0.1 else math.ceil(job.n * ratio)
    desired = min(max(desired, kind.min_workers), kind.max_workers)
    job.util_log = [(t, d) for t, d in job.util_log if t > now - 300.0] + [(now, desired)]
    if desired < job.n:
        desired = max(d for _, d in job.util_log)  # scale down only to the window's maximum
    fits = job.n + cluster.free_gpus // kind.gpus_per_worker
    return min(desired, fits), job.f


def pollux(job: Job, now: float, cluster: ClusterView, rng: random.Random) -> tuple[int, float]:
    """Goodput-greedy (Pollux-like, energy-blind): take a free worker when it adds >= 5 %
    throughput, give one back when waiting jobs cannot start and it adds < 20 %."""
    kind, free, waiting = job.spec.kind, cluster.free_gpus, cluster.waiting_gpus
    gain_up = kind.throughput(job.n + 1) / kind.throughput(job.n) - 1
    gain_last = kind.throughput(job.n) / kind.throughput(job.n - 1) - 1 if job.n > 1 else 1.0
    if waiting > free and job.n > kind.min_workers and gain_last < 0.2:
        return job.n - 1, job.f
    if job.n < kind.max_workers and free - waiting >= kind.gpus_per_worker and gain_up >= 0.05:
        return job.n + 1, job.f
    return job.n, job.f


def joule(job: Job, now: float, cluster: ClusterView, rng: random.Random) -> tuple[int, float]:
    """joule.policy.decide, unchanged, on noisy measurements. EnergyEfficient where the job
    has a deadline to trade against, Throughput otherwise; caps and budgets always apply."""
    s, kind = job.spec, job.spec.kind
    thr = noisy(kind.throughput(job.n, job.f), rng)
    watts = noisy(kind.watts(job.n, job.f), rng, 0.03)
    job.history[job.n] = smooth(job.history.get(job.n), thr, watts)
    job.limit_history[job.limit] = smooth(job.limit_history.get(job.limit), thr, watts)
    spec = JobPolicySpec(
        kind.min_workers,
        kind.max_workers,
        kind.gpus_per_worker,
        Scaling(
            policy=Policy.ENERGY_EFFICIENT if s.deadline else Policy.THROUGHPUT,
            evaluation_interval_seconds=EVAL_SECONDS,
            cooldown_seconds=600.0,
        ),
        Energy(
            power_cap_watts=s.power_cap,
            budget_joules=s.budget,
            on_budget_exhausted=OnBudgetExhausted.WARN,
            min_gpu_power_limit_watts=MIN_LIMIT_FRACTION * kind.gpu_watts,
        ),
        Target(
            samples=kind.samples,
            deadline=EPOCH + dt.timedelta(seconds=s.arrival + s.deadline) if s.deadline else None,
        ),
    )
    obs = Observations(
        replicas=job.n,
        throughput=job.history[job.n].throughput,
        watts=job.history[job.n].watts,
        consumed_joules=job.energy,
        samples_done=job.done,
        now=EPOCH + dt.timedelta(seconds=now),
        history=dict(job.history),
        restart_seconds=kind.restart_seconds,
        last_scale_time=at(job.last_scale),
        gpu_power_limit_watts=job.limit,
        power_limit_time=at(job.limit_time),
        limit_history=dict(job.limit_history),
    )
    d = decide(spec, obs, cluster)
    if d.replicas != job.n:
        job.limit_history = {}  # what a limit gives depends on the size
    if d.gpu_power_limit_watts != job.limit:
        job.limit, job.limit_time = d.gpu_power_limit_watts, now
    return d.replicas, limit_fraction(kind, job.limit)


def smooth(old: SizeStats | None, throughput: float, watts: float) -> SizeStats:
    if old is None:
        return SizeStats(throughput, watts)
    return SizeStats(0.5 * throughput + 0.5 * old.throughput, 0.5 * watts + 0.5 * old.watts)


def at(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else EPOCH + dt.timedelta(seconds=seconds)


def oracle_plan(s: JobSpec) -> tuple[int, float]:
    """Knows the curves: the (workers, power limit) with the fewest joules that meets the
    deadline (or, without one, finishes within 5 % of the full size's time) and the cap."""
    kind = s.kind
    full_time = kind.samples / kind.throughput(kind.max_workers)
    limit = s.deadline if s.deadline else full_time * 1.05
    best: tuple[float, int, float] | None = None
    for n in range(kind.min_workers, kind.max_workers + 1):
        for f in [round(0.4 + 0.05 * i, 2) for i in range(13)]:
            if s.power_cap is not None and kind.watts(n, f) > s.power_cap:
                continue
            t = kind.samples / kind.throughput(n, f) + kind.restart_seconds
            if t > limit:
                continue
            e = kind.watts(n, f) * t
            if best is None or e < best[0]:
                best = (e, n, f)
    if best is None:  # nothing meets it: the fastest size under the cap, full power
        sizes = range(kind.min_workers, kind.max_workers + 1)
        ok = [n for n in sizes if s.power_cap is None or kind.watts(n) <= s.power_cap]
        return max(ok or [kind.min_workers]), 1.0
    return best[1], best[2]


def strategies() -> dict[str, tuple[Strategy, Callable[[JobSpec], tuple[int, float, bool]]]]:
    tuned = best_power_limit(min_speed=1 / 1.05)
    return {
        "static-max": (static_max, lambda s: (s.kind.max_workers, 1.0, False)),
        "hpa": (hpa, lambda s: ((s.kind.min_workers + s.kind.max_workers) // 2, 1.0, True)),
        "pollux": (pollux, lambda s: (s.kind.max_workers, 1.0, True)),
        "static+powerlimit": (static_max, lambda s: (s.kind.max_workers, tuned, False)),
        "joule": (joule, lambda s: (s.kind.max_workers, 1.0, True)),
        "oracle": (static_max, lambda s: (*oracle_plan(s), True)),
    }


def compare(seed: int, jobs: list[JobSpec], gpus: int) -> list[Result]:
    return [
        simulate(name, jobs, gpus, strategy, initial, seed)
        for name, (strategy, initial) in strategies().items()
    ]


def p95(values: list[float]) -> float:
    if not values:
        return math.nan
    return sorted(values)[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


def mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else math.nan
