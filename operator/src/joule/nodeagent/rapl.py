"""CPU package energy from the Linux powercap interface (RAPL), where the node has it.

Only the top-level package zones are read: `intel-rapl:N` whose name is `package-N` (AMD's
driver uses the same names). Sub-zones (`intel-rapl:N:M`: core, uncore, dram) lie inside
their package, `psys` covers the packages as well, and `intel-rapl-mmio:N` is a second view
of the same package: summing any of them with the packages would count energy twice.

The trainer has its own meter (joule_trainer.energy.rapl); the operator package does not
depend on the trainer's, so this is a small copy of the reading, not an import.
"""

from __future__ import annotations

from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


class Packages(dict[str, tuple[int, int]]):
    """Zone name ("package-0") -> (energy_uj, max_energy_range_uj): the counter and the point
    where it wraps, for `counter_increase`. Empty, with `reason` set, where none is readable."""

    def __init__(
        self, zones: dict[str, tuple[int, int]] | None = None, *, reason: str | None = None
    ) -> None:
        super().__init__(zones or {})
        self.reason = reason


def read_packages(root: Path = POWERCAP) -> Packages:
    """The package counters now, all or none: a partial sum would pass for a whole one."""
    zones = sorted(
        p
        for p in root.glob("intel-rapl:*")
        if p.name.count(":") == 1 and _name(p).startswith("package-")
    )
    if not zones:
        return Packages(reason=f"no RAPL package zones under {root}")
    found: dict[str, tuple[int, int]] = {}
    try:
        for zone in zones:
            energy = int((zone / "energy_uj").read_text())
            found[_name(zone)] = (energy, int((zone / "max_energy_range_uj").read_text()))
    except PermissionError:
        # Since the PLATYPUS fix (CVE-2020-8694, kernel 5.10) energy_uj is root-only.
        return Packages(reason=f"{root}: energy_uj is readable by root only (run privileged)")
    except (OSError, ValueError) as exc:
        return Packages(reason=f"RAPL not readable: {exc}")
    return Packages(found)


def counter_increase(previous: int, current: int, max_range: int) -> int:
    """The increase of an energy_uj counter that wraps to zero past `max_range`.

    Right across at most one wrap, so read more often than the counter wraps: the usual
    range, 262143328850 uJ, lasts about 44 minutes at 100 W."""
    if current >= previous:
        return current - previous
    return max_range - previous + current


def _name(zone: Path) -> str:
    try:
        return (zone / "name").read_text().strip()
    except OSError:
        return ""
