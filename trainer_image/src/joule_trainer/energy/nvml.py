"""NVIDIA GPUs through NVML (`pynvml`, from the nvidia-ml-py distribution).

Volta and newer expose a total-energy counter (millijoules since driver load); where it is
missing, power (milliwatts) is sampled on a thread and integrated. NVML errors become
``MeterError`` so that callers need not know pynvml's exception types. Utilisation and memory
in use ride along with each reading, refreshed at most once a second (NVML's own utilisation
window is 1/6 s to 1 s, so reading it every step would cost without telling more).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from joule_trainer.energy.api import MeterError, Reading, counter_delta

U64 = 2**64
ACTIVITY_EVERY_S = 1.0


class NvmlMeter:
    measured = True

    def __init__(self, gpu_index: int, nvml: Any = None, sample_interval_s: float = 0.1) -> None:
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        self._lock = threading.Lock()
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(gpu_index)
        except nvml.NVMLError as exc:
            raise MeterError(f"NVML unavailable for GPU {gpu_index}: {exc}") from exc
        self._energy_j = 0.0
        self._last_power_w: float | None = None
        try:
            self._last_counter: int | None = int(
                nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            )
            self.source = "nvml"
        except nvml.NVMLError:
            self._last_counter = None
            self.source = "nvml-sampled"
        self._activity_at = -ACTIVITY_EVERY_S  # monotonic time of the last refresh
        self._utilization: float | None = None
        self._memory_used: float | None = None
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        if self._last_counter is None:
            self._last_sample = (time.monotonic(), self._power_w())
            self._interval = sample_interval_s
            self._sampler = threading.Thread(target=self._sample_loop, daemon=True)
            self._sampler.start()

    def _power_w(self) -> float:
        try:
            power = float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0
        except self._nvml.NVMLError as exc:
            raise MeterError(f"NVML power read failed: {exc}") from exc
        self._last_power_w = power
        return power

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sample()
            except MeterError:
                continue  # a missed sample widens the next trapezoid; nothing is lost

    def sample(self) -> None:
        """Integrate power since the last sample (trapezoid rule)."""
        now, power = time.monotonic(), self._power_w()
        with self._lock:
            then, before = self._last_sample
            self._energy_j += (now - then) * (power + before) / 2.0
            self._last_sample = (now, power)

    def read(self) -> Reading:
        nvml = self._nvml
        if self._last_counter is not None:
            try:
                counter = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            except nvml.NVMLError as exc:
                raise MeterError(f"NVML energy read failed: {exc}") from exc
            with self._lock:
                self._energy_j += counter_delta(self._last_counter, counter, U64) / 1000.0
                self._last_counter = counter
            power: float | None = self._power_w()
        else:
            power = self._last_power_w
        try:
            limit = float(nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle)) / 1000.0
        except nvml.NVMLError:
            limit = None
        self._refresh_activity()
        with self._lock:
            return Reading(self._energy_j, power, limit, self._utilization, self._memory_used)

    def _refresh_activity(self) -> None:
        """Utilisation and memory in use, at most once per ``ACTIVITY_EVERY_S``. A GPU that
        cannot report them (a MIG slice has no utilisation) leaves them None: unknown, which
        is not a meter failure and must not read as an idle GPU."""
        now = time.monotonic()
        if now - self._activity_at < ACTIVITY_EVERY_S:
            return
        self._activity_at = now
        nvml = self._nvml
        try:
            self._utilization = nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0
        except nvml.NVMLError:
            self._utilization = None
        try:
            self._memory_used = float(nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except nvml.NVMLError:
            self._memory_used = None

    def set_power_limit(self, watts: float | None) -> float | None:
        """Set the GPU's power management limit, clamped to what it accepts. Needs the right
        to (root or CAP_SYS_ADMIN in the container); NVML's refusal becomes MeterError."""
        nvml, h = self._nvml, self._handle
        try:
            low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(h)
            want = (
                nvml.nvmlDeviceGetPowerManagementDefaultLimit(h) if watts is None else watts * 1000
            )
            milliwatts = int(min(max(want, low), high))
            nvml.nvmlDeviceSetPowerManagementLimit(h, milliwatts)
            return float(nvml.nvmlDeviceGetEnforcedPowerLimit(h)) / 1000.0
        except nvml.NVMLError as exc:
            raise MeterError(f"NVML did not set the power limit to {watts} W: {exc}") from exc

    def pause_seconds(self) -> float:
        return 0.0  # the GPU enforces its own limit

    def close(self) -> None:
        self._stop.set()
        if self._sampler:
            self._sampler.join(timeout=1)
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
