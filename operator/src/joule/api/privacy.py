"""spec.privacy: differential privacy in Joule's trainer (DP-SGD with Opacus).

The operator passes the figures to the workers (JOULE_DP_*), and reads back what the trainer
says when it stops at the target: a worker that exits 0 with a JSON termination message
``{"stopReason": "PrivacyBudgetReached", "epsilon", "delta", "targetEpsilon", "step"}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from joule.api.types import SpecError

STOP_REASON = "PrivacyBudgetReached"
ENV = {
    "noise_multiplier": "JOULE_DP_NOISE_MULTIPLIER",
    "max_grad_norm": "JOULE_DP_MAX_GRAD_NORM",
    "target_epsilon": "JOULE_DP_TARGET_EPSILON",
    "delta": "JOULE_DP_DELTA",
}
STOP_KEYS = ("epsilon", "delta", "targetEpsilon", "step")


@dataclass(frozen=True)
class Privacy:
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None

    def env(self) -> list[dict[str, str]]:
        return [
            {"name": name, "value": repr(getattr(self, key))}  # exact: a float's repr
            for key, name in ENV.items()
            if getattr(self, key) is not None
        ]


def parse_privacy(d: Any) -> Privacy | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise SpecError(f"spec.privacy must be an object, not {d!r}")
    values: dict[str, float | None] = {}
    for key, field in (("noise_multiplier", "noiseMultiplier"), ("max_grad_norm", "maxGradNorm"),
                       ("target_epsilon", "targetEpsilon"), ("delta", "delta")):  # fmt: skip
        v = d.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v <= 0):
            raise SpecError(f"spec.privacy.{field} must be a number above 0, not {v!r}")
        values[key] = float(v) if v is not None else None
    if values["delta"] is not None and values["delta"] >= 1:
        raise SpecError(f"spec.privacy.delta must be below 1, not {d['delta']!r}")
    if values["noise_multiplier"] is None and values["target_epsilon"] is None:
        raise SpecError("spec.privacy needs noiseMultiplier or targetEpsilon (or both)")
    return Privacy(**values)


def stopped_at_budget(message: str | None) -> dict[str, Any] | None:
    """status.privacy from a worker's termination message, where it says it stopped at the
    target epsilon; None otherwise."""
    try:
        said = json.loads(message or "")
    except ValueError:
        return None
    if not isinstance(said, dict) or said.get("stopReason") != STOP_REASON:
        return None
    return {k: said[k] for k in STOP_KEYS if isinstance(said.get(k), int | float)}
