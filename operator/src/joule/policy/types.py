"""What the scaling policy reads and what it returns. Plain data, no I/O."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
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


@dataclass(frozen=True)
class SizeStats:
    """What the job did at one worker count, as measured (smoothed)."""

    throughput: float  # samples/s
    watts: float


@dataclass(frozen=True)
class Observations:
    replicas: int  # workers training now
    throughput: float  # samples/s over the last window
    watts: float  # average power over the last window
    consumed_joules: float
    samples_done: float
    now: dt.datetime
    gpu_utilization: float | None = None  # 0..1; None where unknown (CPU)
    history: Mapping[int, SizeStats] = field(default_factory=dict)
    restart_seconds: float = 30.0  # measured cost of the last resize, per job
    last_scale_time: dt.datetime | None = None
    gpu_power_limit_watts: float | None = None  # the per-GPU limit the policy last set
    power_limit_time: dt.datetime | None = None  # when it set it
    # At the current size: what each per-GPU limit tried gave (None: the default limit).
    limit_history: Mapping[float | None, SizeStats] = field(default_factory=dict)
    # Workers training now, where it differs from ``replicas`` (mid-resize: ``replicas`` is
    # the size the job is on its way to); None: the same.
    running: int | None = None


@dataclass(frozen=True)
class ClusterView:
    free_gpus: int
    waiting_gpus: int = 0  # GPUs other jobs are waiting for
    # How long no job has waited for GPUs (None: none has, as far as is known). Free GPUs in a
    # busy cluster are likely wanted again soon; growth into them must pay back sooner.
    quiet_seconds: float | None = None
    # GPUs on schedulable nodes and jobs running or waiting (0: unknown). A job gives GPUs to
    # waiting jobs only while it holds more than an even share, total_gpus / jobs.
    total_gpus: int = 0
    jobs: int = 0


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    message: str
    suspend: bool = False
    budget_at_risk: bool = False
    budget_exhausted: bool = False
    power_cap_exceeded: bool = False
    # The per-GPU power limit to run at; None: the spec's limit (or the device default).
    gpu_power_limit_watts: float | None = None
