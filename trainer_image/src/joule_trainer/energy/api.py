"""The meter abstraction. Units are in the names: joules, watts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class MeterError(RuntimeError):
    """A meter could not be read; vendor errors are mapped to this."""


@dataclass(frozen=True)
class Reading:
    energy_joules: float  # since the meter was opened, monotonic
    power_watts: float | None  # latest instantaneous (or short-window) power, if known
    power_limit_watts: float | None = None
    # GPU activity, where a GPU is measured (NVML); None means unknown, never idle.
    gpu_utilization_ratio: float | None = None  # busy fraction, 0-1
    gpu_memory_used_bytes: float | None = None


class EnergyMeter(Protocol):
    # "nvml", "nvml-sampled", "rapl", or "estimated": exported as the `source` label.
    source: str
    # Whether the figure is measured by hardware; an estimate must never claim to be.
    measured: bool

    def read(self) -> Reading: ...

    def set_power_limit(self, watts: float | None) -> float | None:
        """Run the device at ``watts`` (None: its default); returns the limit now enforced.
        MeterError where the device or this process cannot set one."""
        ...

    def pause_seconds(self) -> float:
        """How long to idle after a step to keep under the limit, where nothing else can
        enforce it (0 where the device does)."""
        ...

    def close(self) -> None: ...


def counter_delta(previous: int, current: int, wrap_at: int) -> int:
    """Increase of a hardware counter that wraps to zero at ``wrap_at``."""
    if current >= previous:
        return current - previous
    return wrap_at - previous + current
