"""The spec's scaling, energy and target sections as typed values, and the policy's view of a
job. Plain data, shared by the API (which parses them) and the scaling policy (which reads
them): it lives here, below both, so that neither imports the other."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


class Policy(enum.StrEnum):
    FIXED = "Fixed"
    THROUGHPUT = "Throughput"
    ENERGY_EFFICIENT = "EnergyEfficient"


class OnBudgetExhausted(enum.StrEnum):
    SUSPEND = "Suspend"
    SCALE_TO_MIN = "ScaleToMin"
    WARN = "Warn"


@dataclass(frozen=True)
class Scaling:
    policy: Policy = Policy.FIXED
    evaluation_interval_seconds: float = 30.0
    cooldown_seconds: float = 120.0
    # A resize must promise at least this relative gain (throughput, or joules per sample);
    # undoing one needs twice as little, so that noise cannot flip the decision back.
    min_gain: float = 0.05


@dataclass(frozen=True)
class Energy:
    power_cap_watts: float | None = None  # the job's average power over window_seconds
    window_seconds: float = 300.0
    budget_joules: float | None = None
    on_budget_exhausted: OnBudgetExhausted = OnBudgetExhausted.SUSPEND
    # The per-GPU power limit the job runs at (None: the device's default), and how far the
    # policy may lower it to keep under the cap (None: it may not).
    gpu_power_limit_watts: float | None = None
    min_gpu_power_limit_watts: float | None = None


@dataclass(frozen=True)
class Target:
    samples: float | None = None
    deadline: dt.datetime | None = None


@dataclass(frozen=True)
class JobPolicySpec:
    min_replicas: int
    max_replicas: int
    gpus_per_replica: int = 1
    scaling: Scaling = field(default_factory=Scaling)
    energy: Energy = field(default_factory=Energy)
    target: Target = field(default_factory=Target)
