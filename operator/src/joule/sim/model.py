"""The simulated world: job archetypes, how fast and how hungry they are. Pure.

Throughput follows a Pollux-style step-time model: a step on n workers takes
compute/n + sync(n), so samples/s = n * base / (1 + beta * (n - 1)) grows sub-linearly.
Power per worker depends on the GPU power limit as a fraction f of its maximum: power falls
linearly with f towards idle, speed falls slowly near f = 1 and fast below ~0.6, so energy per
sample is U-shaped in f with its minimum near 0.7 (the shape Zeus measured on real GPUs).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

IDLE_FRACTION = 0.3  # a busy GPU's power floor, as a fraction of its limit at f = 1


def speed(f: float) -> float:
    """Relative step speed at power-limit fraction f (1.0 at f = 1)."""
    return max(1.0 - 1.2 * (1.0 - f) ** 2, 0.05)


def power_factor(f: float) -> float:
    """A GPU's power as a fraction of its maximum at setting f: f spans the limits a GPU
    accepts, from IDLE_FRACTION (f = 0) to its maximum (f = 1); a training GPU draws its limit."""
    return IDLE_FRACTION + (1.0 - IDLE_FRACTION) * f


@dataclass(frozen=True)
class Archetype:
    name: str
    gpus_per_worker: int
    base: float  # samples/s of one worker at f = 1
    beta: float  # synchronisation cost per extra worker
    watts_per_worker: float  # at f = 1, all GPUs of a worker busy
    samples: float  # work to do
    min_workers: int
    max_workers: int
    restart_seconds: float

    @property
    def gpu_watts(self) -> float:
        """One GPU's maximum power limit."""
        return self.watts_per_worker / self.gpus_per_worker

    def throughput(self, n: int, f: float = 1.0) -> float:
        if n <= 0:
            return 0.0
        return n * self.base / (1.0 + self.beta * (n - 1)) * speed(f)

    def watts(self, n: int, f: float = 1.0) -> float:
        return n * self.watts_per_worker * power_factor(f)

    def joules_per_sample(self, n: int, f: float = 1.0) -> float:
        return self.watts(n, f) / self.throughput(n, f)


ARCHETYPES = (
    # A large language model: scales well, 8 GPUs per worker.
    Archetype("llm", 8, 40.0, 0.04, 5600.0, 2.0e6, 1, 4, 120.0),
    # A vision model: scales less well, 2 GPUs per worker.
    Archetype("vision", 2, 900.0, 0.15, 1200.0, 6.0e6, 1, 8, 45.0),
    # A recommender: communication-heavy, poor scaling.
    Archetype("recsys", 4, 2500.0, 0.35, 2400.0, 1.2e7, 1, 6, 60.0),
)


def limit_fraction(kind: Archetype, limit_watts: float | None) -> float:
    """The setting f of a per-GPU power limit in watts (None: the maximum, f = 1)."""
    if limit_watts is None:
        return 1.0
    share = min(max(limit_watts / kind.gpu_watts, IDLE_FRACTION), 1.0)
    return (share - IDLE_FRACTION) / (1.0 - IDLE_FRACTION)


@dataclass(frozen=True)
class JobSpec:
    id: int
    kind: Archetype
    arrival: float  # seconds
    power_cap: float | None  # watts, the job's average over the window
    budget: float | None  # joules
    deadline: float | None  # seconds after arrival


def workload(seed: int, jobs: int, mean_gap: float = 600.0) -> list[JobSpec]:
    """A stream of jobs: Poisson arrivals, archetypes at random, some with a power cap (at
    60-90 % of the job's full-size power), a budget (1.3-2x the energy at its best size) and
    a deadline (2-6x the time at full size)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(jobs):
        t += rng.expovariate(1.0 / mean_gap)
        kind = rng.choice(ARCHETYPES)
        full = kind.max_workers
        cap = kind.watts(full) * rng.uniform(0.6, 0.9) if rng.random() < 0.4 else None
        best = min(kind.joules_per_sample(n) for n in range(kind.min_workers, full + 1))
        budget = kind.samples * best * rng.uniform(1.3, 2.0) if rng.random() < 0.3 else None
        fastest = kind.samples / kind.throughput(full)
        deadline = fastest * rng.uniform(2.0, 6.0) if rng.random() < 0.3 else None
        out.append(JobSpec(i, kind, t, cap, budget, deadline))
    return out


def noisy(value: float, rng: random.Random, sigma: float = 0.05) -> float:
    return value * math.exp(rng.gauss(0.0, sigma))
