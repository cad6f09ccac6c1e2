"""What the scaling policy reads and what it returns. Plain data, no I/O."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

# The spec's values live in the API, below the policy; re-exported for the policy's users.
from joule.api.scaling import (
    Energy,
    JobPolicySpec,
    OnBudgetExhausted,
    Policy,
    Scaling,
    Target,
)

__all__ = [
    "ClusterView", "Decision", "Energy", "JobPolicySpec", "Observations", "OnBudgetExhausted",
    "Policy", "Scaling", "SizeStats", "Target",
]  # fmt: skip


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
