"""Pick the best meter this process can use: NVML for its GPU, else RAPL, else an estimate."""

from __future__ import annotations

import os

from joule_trainer.energy.api import EnergyMeter, MeterError
from joule_trainer.energy.estimate import EstimatedMeter
from joule_trainer.energy.rapl import RaplMeter


def probe(gpu_index: int | None, prefer: str | None = None) -> EnergyMeter:
    """``prefer`` (or JOULE_ENERGY_SOURCE): nvml, rapl or estimated, to force a choice."""
    prefer = prefer or os.environ.get("JOULE_ENERGY_SOURCE")
    watts = float(os.environ.get("JOULE_ESTIMATED_WATTS_PER_CORE", "15"))
    if prefer == "estimated":
        return EstimatedMeter(watts)
    if gpu_index is not None and prefer in (None, "nvml"):
        try:
            from joule_trainer.energy.nvml import NvmlMeter

            return NvmlMeter(gpu_index)
        except (MeterError, ImportError):
            if prefer == "nvml":
                raise
    if prefer in (None, "rapl"):
        try:
            return RaplMeter()
        except MeterError:
            if prefer == "rapl":
                raise
    return EstimatedMeter(watts)
