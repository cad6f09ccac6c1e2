"""Scaling by load and energy: ``decide`` (pure) and the data it reads and returns."""

from joule.policy.decide import decide, predict
from joule.policy.types import (
    ClusterView,
    Decision,
    Energy,
    JobPolicySpec,
    Observations,
    OnBudgetExhausted,
    Policy,
    Scaling,
    SizeStats,
    Target,
)

__all__ = [
    "ClusterView", "Decision", "Energy", "JobPolicySpec", "Observations", "OnBudgetExhausted",
    "Policy", "Scaling", "SizeStats", "Target", "decide", "predict",
]  # fmt: skip
