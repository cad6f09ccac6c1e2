"""A double of the pynvml calls `gpu.Gpus` makes, for nodes without an NVIDIA GPU: "simulated".

`Gpus(SimulatedNvml(...), source="simulated")` runs the node agent's GPU layer unchanged: the
same function names, argument and return shapes (ctypes structs from pynvml itself, lists,
ints in mJ and mW), and the same exceptions (`pynvml.NVMLError` subclasses with NVML's codes).

The model, plainly: each simulated GPU is busy all the time. It draws a constant
`active_watts`, clamped by its enforced power limit (power = min(limit, active_watts)), from
the moment its state was created, whether or not anything runs on it: it knows nothing of
the workload. Its energy counter integrates that power over time. Utilisation is a constant
busy figure while power is above `idle_watts`; memory used is a constant.

What is faithful, because the agent's correctness rests on it:
- limits are set in integer milliwatts, only within [min, max] (else Invalid Argument) and
  only by root (else Insufficient Permissions), and they persist until set again: like a
  real GPU's, a limit outlives the process that set it;
- the state (energy counters, limits) lives in a JSON file shared by every process on the
  machine and kept across restarts, so an agent restarted mid-job finds the limit it left.
  Writes are atomic (temp file + os.replace) under an flock on a sibling `.lock` file (the
  state file itself is replaced, so a lock on it would be a lock on a stale inode);
- energy continues from the stored value by CLOCK_MONOTONIC, which is one clock for all
  processes on a machine during one boot. After a reboot (another boot_id) the counters and
  limits start again from zero and the defaults, as a driver load does; `reset_counters()`
  does the same on demand, for tests of a driver reload.

Device properties (name, constraints, draw, memory) are fixed when a device is first added to
the file; a later SimulatedNvml on the same file keeps them whatever its arguments say.

Error strings: every code this double raises (1, 2, 3, 4, 6) is in pynvml's own table
`NVMLError._errcode_to_string`, so `str()` gives NVML's text without the library loaded
(pynvml calls nvmlErrorString only for codes missing from that table). No pynvml global is
touched.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pynvml

SIMULATED_NAME = "Joule Simulated GPU"
BUSY_GPU_PERCENT = 90
BUSY_MEMORY_PERCENT = 40
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class SimulatedHandle:
    """Stands for pynvml's opaque c_nvmlDevice_t."""

    uuid: str


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _raise(code: int) -> NoReturn:
    # pynvml.NVMLError(code) returns the code's own subclass, as pynvml raises it.
    raise pynvml.NVMLError(code)


class SimulatedNvml:
    """A module-like stand-in for `pynvml`, its state in the JSON file `state`."""

    # What callers catch and compare, taken from pynvml so the double cannot drift from it.
    NVMLError = pynvml.NVMLError
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_NO_PERMISSION = pynvml.NVML_ERROR_NO_PERMISSION
    NVML_ERROR_NOT_FOUND = pynvml.NVML_ERROR_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    NVML_ERROR_LIBRARY_NOT_FOUND = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND

    def __init__(
        self,
        state: Path,
        uuids: Sequence[str],
        *,
        active_watts: float = 30.0,
        idle_watts: float = 5.0,
        default_limit_watts: float = 50.0,
        min_limit_watts: float = 1.0,
        max_limit_watts: float = 60.0,
        memory_total_bytes: int = 16 * 2**30,
        memory_used_bytes: int | None = None,
        unsupported: Collection[str] = (),
        clock: Callable[[], float] = time.monotonic,
        is_root: Callable[[], bool] = lambda: os.geteuid() == 0,
    ) -> None:
        """`unsupported`: pynvml function names that raise Not Supported in this process
        (e.g. nvmlDeviceGetTotalEnergyConsumption, as on a pre-Volta GPU)."""
        if not min_limit_watts <= default_limit_watts <= max_limit_watts:
            raise ValueError("the limits must satisfy min <= default <= max")
        used = memory_total_bytes // 4 if memory_used_bytes is None else memory_used_bytes
        if not 0 <= used <= memory_total_bytes:
            raise ValueError("memory used must lie within [0, total]")
        self._state = Path(state)
        self._lock_path = self._state.with_name(self._state.name + ".lock")
        self._clock = clock
        self._is_root = is_root
        self._unsupported = frozenset(unsupported)
        self._inits = 0  # pynvml's refcount: each nvmlInit needs its nvmlShutdown
        new_device = {
            "name": SIMULATED_NAME,
            "energy_mj": 0.0,
            "default_mw": round(default_limit_watts * 1000),
            "min_mw": round(min_limit_watts * 1000),
            "max_mw": round(max_limit_watts * 1000),
            "active_mw": round(active_watts * 1000),
            "idle_mw": round(idle_watts * 1000),
            "memory_total": memory_total_bytes,
            "memory_used": used,
        }
        with self._update() as data:
            devices = data["devices"]
            for uuid in uuids:
                if uuid not in devices:
                    devices[uuid] = {
                        **new_device,
                        "index": len(devices),
                        "since": self._clock(),
                        "limit_mw": new_device["default_mw"],
                    }

    # --- the state file ---------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        # No lock for a read: os.replace makes every version of the file whole.
        try:
            data: dict[str, Any] = json.loads(self._state.read_text())
        except FileNotFoundError:
            return {"boot_id": _boot_id(), "devices": {}}
        return data

    @contextmanager
    def _update(self) -> Iterator[dict[str, Any]]:
        """Read, change and write the state under an exclusive lock across processes."""
        self._state.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._load()
            if data.get("boot_id") != _boot_id():
                # A reboot restarted CLOCK_MONOTONIC and the driver: counters start again.
                data["boot_id"] = _boot_id()
                self._zero(data)
            yield data
            with tempfile.NamedTemporaryFile(
                "w", dir=self._state.parent, prefix=self._state.name, delete=False
            ) as tmp:
                json.dump(data, tmp, indent=1)
            os.replace(tmp.name, self._state)
            # The flock goes with the file's closing.

    def _zero(self, data: dict[str, Any]) -> None:
        now = self._clock()
        for device in data["devices"].values():
            device.update(energy_mj=0.0, since=now, limit_mw=device["default_mw"])

    def reset_counters(self) -> None:
        """A driver reload: energy counters to zero, every limit back to its default."""
        with self._update() as data:
            self._zero(data)

    # --- the model ----------------------------------------------------------------------

    @staticmethod
    def _power_mw(device: dict[str, Any]) -> int:
        return int(min(device["limit_mw"], device["active_mw"]))

    def _energy_mj(self, device: dict[str, Any]) -> float:
        # max(0, ...): a counter never runs backwards, even if a clock is stepped.
        elapsed = max(0.0, self._clock() - device["since"])
        return float(device["energy_mj"]) + self._power_mw(device) * elapsed

    def _device(self, handle: Any, call: str) -> dict[str, Any]:
        if self._inits == 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, SimulatedHandle):
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        device = self._load()["devices"].get(handle.uuid)
        if device is None:
            _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if call in self._unsupported:
            _raise(pynvml.NVML_ERROR_NOT_SUPPORTED)
        result: dict[str, Any] = device
        return result

    # --- the pynvml API -----------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._inits += 1

    def nvmlShutdown(self) -> None:
        if self._inits == 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        self._inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        if self._inits == 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        return len(self._load()["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimulatedHandle:
        if self._inits == 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        index = ctypes.c_uint(index).value  # as pynvml passes it: a float is a TypeError
        for uuid, device in self._load()["devices"].items():
            if device["index"] == index:
                return SimulatedHandle(uuid)
        _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> SimulatedHandle:
        if self._inits == 0:
            _raise(pynvml.NVML_ERROR_UNINITIALIZED)
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        if text not in self._load()["devices"]:
            _raise(pynvml.NVML_ERROR_NOT_FOUND)
        return SimulatedHandle(text)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        self._device(handle, "nvmlDeviceGetUUID")
        uuid: str = handle.uuid
        return uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(self._device(handle, "nvmlDeviceGetName")["name"])

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return int(self._device(handle, "nvmlDeviceGetIndex")["index"])

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        device = self._device(handle, "nvmlDeviceGetTotalEnergyConsumption")
        return int(self._energy_mj(device))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._power_mw(self._device(handle, "nvmlDeviceGetPowerUsage"))

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> pynvml.c_nvmlUtilization_t:
        device = self._device(handle, "nvmlDeviceGetUtilizationRates")
        busy = self._power_mw(device) > device["idle_mw"]
        return pynvml.c_nvmlUtilization_t(
            gpu=BUSY_GPU_PERCENT if busy else 0, memory=BUSY_MEMORY_PERCENT if busy else 0
        )

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        device = self._device(handle, "nvmlDeviceGetMemoryInfo")
        total, used = device["memory_total"], device["memory_used"]
        if version:
            # pynvml's v2 struct; the double reserves nothing.
            return pynvml.c_nvmlMemory_v2_t(
                version=version, total=total, reserved=0, free=total - used, used=used
            )
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return int(self._device(handle, "nvmlDeviceGetEnforcedPowerLimit")["limit_mw"])

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        # The double has one limit, so the management limit is the enforced one.
        return int(self._device(handle, "nvmlDeviceGetPowerManagementLimit")["limit_mw"])

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: Any) -> int:
        return int(self._device(handle, "nvmlDeviceGetPowerManagementDefaultLimit")["default_mw"])

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: Any) -> list[int]:
        device = self._device(handle, "nvmlDeviceGetPowerManagementLimitConstraints")
        return [int(device["min_mw"]), int(device["max_mw"])]  # a list, as pynvml returns

    def nvmlDeviceSetPowerManagementLimit(self, handle: Any, limit: int) -> None:
        self._device(handle, "nvmlDeviceSetPowerManagementLimit")
        # As pynvml's c_uint(limit): a float is a TypeError, a negative wraps (then is out
        # of range).
        milliwatts = ctypes.c_uint(limit).value
        # Permission is checked before the range (a guess: NVML documents both, not the order).
        if not self._is_root():
            _raise(pynvml.NVML_ERROR_NO_PERMISSION)
        with self._update() as data:
            device = data["devices"].get(handle.uuid)
            if device is None:  # the state file was removed under us
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            if not device["min_mw"] <= milliwatts <= device["max_mw"]:
                _raise(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            # Bank the energy drawn under the old limit before the new one takes over.
            device["energy_mj"] = self._energy_mj(device)
            device["since"] = self._clock()
            device["limit_mw"] = milliwatts
