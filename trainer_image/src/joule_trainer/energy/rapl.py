"""Intel/AMD package energy through the Linux powercap interface (RAPL), where readable."""

from __future__ import annotations

from pathlib import Path

from joule_trainer.energy.api import MeterError, Reading, counter_delta

POWERCAP = Path("/sys/class/powercap")


class RaplMeter:
    source = "rapl"
    measured = True

    def __init__(self, root: Path = POWERCAP) -> None:
        # Top-level packages only (intel-rapl:0, intel-rapl:1): sub-zones are inside them.
        self._zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self._zones:
            raise MeterError(f"no RAPL zones under {root}")
        try:
            self._wrap = [int((z / "max_energy_range_uj").read_text()) for z in self._zones]
            self._last = [self._counter(z) for z in self._zones]
        except (OSError, ValueError) as exc:
            raise MeterError(f"RAPL not readable: {exc}") from exc
        self._energy_j = 0.0

    @staticmethod
    def _counter(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read(self) -> Reading:
        try:
            now = [self._counter(z) for z in self._zones]
        except (OSError, ValueError) as exc:
            raise MeterError(f"RAPL read failed: {exc}") from exc
        for i, value in enumerate(now):
            self._energy_j += counter_delta(self._last[i], value, self._wrap[i]) / 1e6
        self._last = now
        return Reading(self._energy_j, None)

    def set_power_limit(self, watts: float | None) -> float | None:
        if watts is None:
            return None
        raise MeterError("the RAPL meter reads CPU packages; it sets no GPU power limit")

    def pause_seconds(self) -> float:
        return 0.0

    def close(self) -> None:
        pass
