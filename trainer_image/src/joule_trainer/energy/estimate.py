"""An estimate where nothing can be measured: this process's CPU time times a nominal power
per busy core. Exported with ``source="estimated"``; it is a model, never a measurement."""

from __future__ import annotations

import os
import time

from joule_trainer.energy.api import Reading

DEFAULT_WATTS_PER_CORE = 15.0
MIN_POWER_WINDOW_S = 0.5


class EstimatedMeter:
    source = "estimated"
    measured = False

    def __init__(self, watts_per_core: float = DEFAULT_WATTS_PER_CORE) -> None:
        if watts_per_core <= 0:
            raise ValueError(f"nominal watts per core must be > 0, got {watts_per_core}")
        self.watts_per_core = watts_per_core
        self._cpu0 = self._cpu_seconds()
        self._last = (time.monotonic(), self._cpu0)
        self._power: float | None = None

    @staticmethod
    def _cpu_seconds() -> float:
        t = os.times()
        return t.user + t.system

    def read(self) -> Reading:
        now, cpu = time.monotonic(), self._cpu_seconds()
        then, cpu_then = self._last
        # Power over at least half a second: CPU time is counted in clock ticks, so shorter
        # windows would swing between 0 and several times the true figure.
        if now - then >= MIN_POWER_WINDOW_S:
            self._power = (cpu - cpu_then) / (now - then) * self.watts_per_core
            self._last = (now, cpu)
        return Reading((cpu - self._cpu0) * self.watts_per_core, self._power)

    def close(self) -> None:
        pass
