"""Which GPU power limits to set. Pure.

The agent owns its node's GPU power limits: a GPU runs at the limit its pod asks for (the
``joule.dev/gpu-power-limit-watts`` annotation the operator sets), and at its default
otherwise: when the pod ends, when it stops asking, and on a GPU no pod holds. So a lowered
limit never outlives its pod and reaches the next tenant, even after the agent itself was
down when the pod ended. A refused limit is not retried for ``RETRY_SECONDS`` unless the
request changes: NVML's answer would be the same, and the log would fill with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RETRY_SECONDS = 60.0
# NVML takes milliwatts and some boards round them: within this, a limit is the one asked.
TOLERANCE_WATTS = 0.5


@dataclass(frozen=True)
class Request:
    """What a pod asks for one of its GPUs."""

    watts: float | None  # None: the default
    error: str | None = None  # why the annotation could not be used


@dataclass(frozen=True)
class Limits:
    """A GPU's limits as NVML reports them."""

    enforced: float | None
    default: float | None


@dataclass(frozen=True)
class Refusal:
    watts: float | None
    error: str
    at: float  # unix seconds


@dataclass(frozen=True)
class Action:
    gpu: str
    watts: float | None  # None: back to the default


def parse_annotation(value: str | None) -> Request:
    """The annotation's value as a request: absent or empty asks for the default."""
    if value is None or not value.strip():
        return Request(None)
    try:
        watts = float(value)
    except ValueError:
        return Request(None, f"the annotation's value {value!r} is not a number of watts")
    if not watts > 0 or watts == float("inf"):
        return Request(None, f"the annotation's value {value!r} is not a positive power")
    return Request(watts)


def wanted(requests: list[Request]) -> float | None:
    """A GPU's limit from its holders' requests: the lowest asked (pods sharing a GPU by
    time-slicing share its limit too); None: the default."""
    asked = [r.watts for r in requests if r.watts is not None]
    return min(asked) if asked else None


def plan(
    requests: Mapping[str, list[Request]],
    limits: Mapping[str, Limits],
    refused: Mapping[str, Refusal],
    now: float,
) -> list[Action]:
    """The limits to set now. ``requests``: a held GPU's holders' requests (a GPU absent is
    held by none); ``limits``: every GPU the agent can see."""
    out = []
    for gpu, lim in sorted(limits.items()):
        want = wanted(requests.get(gpu, []))
        target = want if want is not None else lim.default
        if target is None or lim.enforced is None:
            continue  # the GPU reports no limit: nothing to compare or restore
        if abs(lim.enforced - target) <= TOLERANCE_WATTS:
            continue
        last = refused.get(gpu)
        if last is not None and last.watts == want and now - last.at < RETRY_SECONDS:
            continue
        out.append(Action(gpu, want))
    return out
