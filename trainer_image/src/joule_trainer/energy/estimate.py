"""An estimate where nothing can be measured: this process's CPU time times a nominal power
per busy core. Exported with ``source="estimated"``; it is a model, never a measurement.

A power limit is simulated the way a GPU enforces one, by running slower: after each step the
trainer idles for ``pause_seconds()``, so that the estimated power over the step stays at the
limit. The limit and what it does are as estimated as the power itself."""

from __future__ import annotations

import os
import time

from joule_trainer.energy.api import Reading

DEFAULT_WATTS_PER_CORE = 15.0
MIN_POWER_WINDOW_S = 0.5
MAX_PAUSE_S = 10.0  # a step is never held longer than this, whatever the limit


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
        self.limit: float | None = None
        self._mark = (time.monotonic(), self._cpu0)

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
        return Reading((cpu - self._cpu0) * self.watts_per_core, self._power, self.limit)

    def set_power_limit(self, watts: float | None) -> float | None:
        if watts is not None and watts <= 0:
            raise ValueError(f"a power limit must be > 0 W, got {watts}")
        self.limit = watts
        self._mark = (time.monotonic(), self._cpu_seconds())
        return watts

    def pause_seconds(self) -> float:
        now, cpu = time.monotonic(), self._cpu_seconds()
        then, cpu_then = self._mark
        if self.limit is None:
            self._mark = (now, cpu)
            return 0.0
        # At the limit, this much CPU work takes this long: idle for the difference.
        pause = min(max((cpu - cpu_then) * self.watts_per_core / self.limit - (now - then), 0.0),
                    MAX_PAUSE_S)  # fmt: skip
        self._mark = (now + pause, cpu)
        return pause

    def close(self) -> None:
        pass
