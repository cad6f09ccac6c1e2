"""A discrete-time cluster simulator and the strategies it compares. Pure (seeded RNG).

Every strategy sees the same jobs in the same order on the same cluster. Jobs queue FIFO and
start when their first allocation fits. Each evaluation interval a strategy may resize a
running job (the job then makes no progress for its restart time, GPUs held) or change its
power limit. Jobs run 5 % faster or slower and draw 3 % more or less power than the model
says, afresh every interval and the same for every strategy, as real jobs do.

Joule's strategy is the operator's own evaluation, not a copy of it: each interval the
simulated workers expose cumulative energy and sample counters (per process, with its start
time, reset by a restart) and ``joule.scaling.evaluate`` accounts them into the job's status,
learns its rates and asks ``joule.policy.decide``; the size and power limit the workers then
run at are read back from that status with the reconciler's own ``desired_replicas`` and
``power_limit``.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from joule.api.events import fmt_time
from joule.api.types import TrainingJobSpec
from joule.policy import ClusterView
from joule.reconcile import desired_replicas, power_limit
from joule.scaling import counter_key, evaluate
from joule.sim.model import (
    IDLE_FRACTION,
    JobSpec,
    limit_fraction,
    noisy,
    power_factor,
    speed,
)
from joule.trainer_metrics import TrainerReading

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
    util_log: list[tuple[float, int]] = field(default_factory=list)  # HPA's desired sizes
    # This interval's deviation from the model: (speed, power) factors.
    noise: tuple[float, float] = (1.0, 1.0)
    # What the workers' processes count since they last (re)started, all workers together.
    proc_start: float = 0.0
    proc_joules: float = 0.0
    proc_samples: float = 0.0
    # Joule only: the TrainingJob as the operator parses it, and the status it keeps.
    manifest: TrainingJobSpec | None = None
    status: dict[str, Any] = field(default_factory=dict)

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
            job.window_start = job.proc_start = now
            job.restart_until = now + job.spec.kind.restart_seconds  # the first start, too
            running.append(job)
            free -= job.gpus
        if now >= next_eval:
            waiting = sum(j.spec.kind.min_workers * j.spec.kind.gpus_per_worker for j in queue)
            if waiting:
                last_wait = now
            quiet = None if last_wait is None else now - last_wait
            for job in running:
                free = gpus - sum(j.gpus for j in running)
                view = ClusterView(free, waiting, quiet, gpus, len(running) + len(queue))
                n, f = strategy(job, now, view, rng)
                if n != job.n:
                    job.rescales += 1
                    job.last_scale = now
                    job.restart_until = now + job.spec.kind.restart_seconds
                    job.proc_start, job.proc_joules, job.proc_samples = now, 0.0, 0.0
                job.n, job.f = n, f
                job.noise = _noise(seed, job.spec.id, now)
            next_eval = now + EVAL_SECONDS
        for job in list(running):
            kind = job.spec.kind
            speed_noise, power_noise = job.noise
            watts = kind.watts(job.n, job.f) * power_noise
            if now < job.restart_until:
                watts *= IDLE_FRACTION  # held, loading, not training
            else:
                progress = kind.throughput(job.n, job.f) * speed_noise * STEP_SECONDS
                job.done += progress
                job.proc_samples += progress
            job.energy += watts * STEP_SECONDS
            job.proc_joules += watts * STEP_SECONDS
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


def _noise(seed: int, job: int, now: float) -> tuple[float, float]:
    """The same deviations for every strategy: drawn from the seed, the job and the time."""
    r = random.Random(seed * 1_000_003 + job * 7_919 + int(now))
    return noisy(1.0, r), noisy(1.0, r, 0.03)


# -- strategies ----------------------------------------------------------------------------


def between_restarts(strategy: Strategy) -> Strategy:
    """A strategy that only looks at jobs that train: it leaves one restarting alone."""

    def wrapped(
        job: Job, now: float, cluster: ClusterView, rng: random.Random
    ) -> tuple[int, float]:
        if now < job.restart_until:
            return job.n, job.f
        return strategy(job, now, cluster, rng)

    return wrapped


def static_max(job: Job, now: float, cluster: ClusterView, rng: random.Random) -> tuple[int, float]:
    return job.n, job.f


def best_power_limit(min_speed: float = 0.0) -> float:
    """The power-limit fraction with the fewest joules per sample whose speed is at least
    ``min_speed`` (energy per sample is U-shaped in the limit)."""
    grid = [round(0.4 + 0.05 * i, 2) for i in range(13)]
    ok = [f for f in grid if speed(f) >= min_speed] or [1.0]
    return min(ok, key=lambda f: power_factor(f) / speed(f))


@between_restarts
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


@between_restarts
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
    """The operator's evaluation, on the simulated workers' counters: EnergyEfficient where
    the job has a deadline to trade against, Throughput otherwise; caps and budgets always
    apply. It runs mid-restart too, as the operator's does (accounting, cap and budget)."""
    kind = job.spec.kind
    if job.manifest is None:
        job.manifest = TrainingJobSpec.parse(manifest(job.spec))
    started = EPOCH.timestamp() + job.proc_start
    readings = []
    for i in range(job.n):  # one process per worker; pod w<i>, local rank 0
        reading = TrainerReading(
            rank=i, steps=1.0, samples=job.proc_samples / job.n, throughput=0.0, loss=None,
            watts=None, joules=job.proc_joules / job.n, source="simulated", started=started,
        )  # fmt: skip
        readings.append((counter_key(f"w{i}", 0, reading), reading))
    steady = now >= job.restart_until  # every worker ready and training at this size
    result = evaluate(
        job.manifest,
        job.status,
        readings,
        cluster,
        EPOCH + dt.timedelta(seconds=now),
        job.n,
        steady,
        alive={f"w{i}" for i in range(job.n)},
    )
    job.status = result.status
    n = desired_replicas(job.manifest, job.status)
    return n, limit_fraction(kind, power_limit(job.manifest, job.status))


def manifest(s: JobSpec) -> dict[str, Any]:
    """The TrainingJob spec a user would write for a simulated job."""
    kind = s.kind
    energy: dict[str, Any] = {"onBudgetExhausted": "Warn", "windowSeconds": int(WINDOW_SECONDS)}
    if s.power_cap is not None or s.budget is not None or s.deadline:  # a reason to lower it
        energy["minGpuPowerLimitWatts"] = math.ceil(MIN_LIMIT_FRACTION * kind.gpu_watts)
    if s.power_cap is not None:
        energy["powerCapWatts"] = int(s.power_cap)
    if s.budget is not None:
        energy["budget"] = s.budget
    target: dict[str, Any] = {"samples": int(kind.samples)}
    if s.deadline:
        target["deadline"] = fmt_time(EPOCH + dt.timedelta(seconds=s.arrival + s.deadline))
    return {
        "image": "simulated",
        # Start small and let the policy grow the job into free GPUs: a job that asks for
        # its maximum waits for all of it (gang start), and one that got it in a busy
        # cluster gives most of it back to the jobs that wait.
        "replicas": kind.min_workers,
        "gpusPerReplica": kind.gpus_per_worker,
        "elastic": {"minReplicas": kind.min_workers, "maxReplicas": kind.max_workers},
        "scaling": {
            "policy": "EnergyEfficient" if s.deadline else "Throughput",
            "evaluationIntervalSeconds": int(EVAL_SECONDS),
            "cooldownSeconds": 600,
        },
        "energy": energy,
        "target": target,
    }


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
        # The operator starts a job at spec.replicas, all workers or none (gang start).
        "joule": (joule, lambda s: (manifest(s)["replicas"], 1.0, False)),
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
