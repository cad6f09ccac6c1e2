"""Energy meters behind one interface (``api.EnergyMeter``): NVML, RAPL, or a labelled
estimate. ``probe()`` picks the best one available; a figure always carries its source."""

from joule_trainer.energy.api import EnergyMeter, MeterError, Reading
from joule_trainer.energy.probe import probe

__all__ = ["EnergyMeter", "MeterError", "Reading", "probe"]
