"""The node agent's GPUs: the one module that calls NVML.

Everything above this module speaks watts, joules and ratios, and sees two exceptions of
ours (GpuError, LimitRefused) instead of pynvml's. The NVML it calls is passed in: the real
`pynvml` module (`Gpus.open_nvml()`), or `simnvml.SimulatedNvml` on a machine without a GPU.
`Gpus.source` says which ("nvml" or "simulated"); the agent exports it as a label so that a
simulated figure can never pass for a measured one.

Units at the NVML edge: energy in millijoules, power and limits in milliwatts (integers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment. A field is None where this GPU does not support it."""

    uuid: str
    index: int
    name: str
    # The device's total-energy counter since the driver loaded (Volta and later).
    energy_joules: float | None
    power_watts: float | None
    utilization_ratio: float | None
    memory_used_bytes: float | None
    memory_total_bytes: float | None
    power_limit_watts: float | None  # the limit in force (enforced), whoever set it
    default_limit_watts: float | None
    min_limit_watts: float | None
    max_limit_watts: float | None


class GpuError(RuntimeError):
    """NVML is unusable, or a read failed for a reason other than "not supported"."""


class UnknownGpu(GpuError):
    """No GPU with this UUID on the node (it was never here, or it fell off the bus)."""


class LimitRefused(RuntimeError):
    """NVML refused to set a power limit (permissions, out of range, not supported)."""

    def __init__(self, uuid: str, watts: float | None, nvml_error: str) -> None:
        self.uuid = uuid
        self.watts = watts  # None: the default limit was asked for
        self.nvml_error = nvml_error  # NVML's own text, e.g. "Insufficient Permissions"
        what = "the default limit" if watts is None else f"a {watts:g} W limit"
        super().__init__(f"NVML refused {what} on {uuid}: {nvml_error}")


def _text(value: str | bytes) -> str:
    # pynvml returns str since 11.x; older bindings returned bytes.
    return value.decode() if isinstance(value, bytes) else value


class Gpus:
    """The GPUs of this node, through an NVML module (pynvml or its double)."""

    def __init__(self, nvml: Any, source: str) -> None:
        self._nvml = nvml
        self.source = source

    @classmethod
    def open_nvml(cls) -> Gpus:
        """The real NVML; GpuError that says what is missing when it cannot start."""
        try:
            # Imported here: optional, only `joule[agent]` installs nvidia-ml-py.
            import pynvml
        except ImportError as exc:
            raise GpuError(
                "the NVML Python bindings are not installed (pip install 'joule[agent]', "
                "which brings nvidia-ml-py)"
            ) from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            if exc.value in (
                pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
            ):
                hint = (
                    "this node has no NVIDIA driver, or the container cannot see it: run "
                    "the pod with the NVIDIA container runtime, or mount libnvidia-ml.so.1 "
                    "and /dev/nvidia*"
                )
            else:
                hint = "nvidia-smi shows the driver's state"
            raise GpuError(f"NVML did not start ({exc}): {hint}") from exc
        return cls(pynvml, "nvml")

    def uuids(self) -> list[str]:
        """The GPUs' UUIDs in NVML index order."""
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
            return [
                _text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i)))
                for i in range(count)
            ]
        except nvml.NVMLError as exc:
            raise GpuError(f"NVML could not list the GPUs: {exc}") from exc

    def read(self, uuid: str) -> GpuReading:
        """Every field read on its own, so one unsupported counter costs only that field."""
        nvml = self._nvml
        handle = self._handle(uuid)

        def field(name: str, call: Callable[[Any], T]) -> T | None:
            try:
                return call(handle)
            except nvml.NVMLError as exc:
                if exc.value == nvml.NVML_ERROR_NOT_SUPPORTED:
                    return None
                raise GpuError(f"NVML could not read {name} of {uuid}: {exc}") from exc

        index = field("the index", nvml.nvmlDeviceGetIndex)
        name = field("the name", nvml.nvmlDeviceGetName)
        energy_mj = field("the energy counter", nvml.nvmlDeviceGetTotalEnergyConsumption)
        power_mw = field("the power", nvml.nvmlDeviceGetPowerUsage)
        utilization = field("the utilization", nvml.nvmlDeviceGetUtilizationRates)
        memory = field("the memory", nvml.nvmlDeviceGetMemoryInfo)
        limit_mw = field("the enforced power limit", nvml.nvmlDeviceGetEnforcedPowerLimit)
        default_mw = field("the default power limit", nvml.nvmlDeviceGetPowerManagementDefaultLimit)
        constraints = field(
            "the power limit constraints", nvml.nvmlDeviceGetPowerManagementLimitConstraints
        )
        min_mw, max_mw = constraints if constraints is not None else (None, None)
        return GpuReading(
            uuid=uuid,
            index=-1 if index is None else int(index),  # -1, "": never seen, but not a crash
            name="" if name is None else _text(name),
            energy_joules=_milli(energy_mj),
            power_watts=_milli(power_mw),
            utilization_ratio=None if utilization is None else utilization.gpu / 100,
            memory_used_bytes=None if memory is None else float(memory.used),
            memory_total_bytes=None if memory is None else float(memory.total),
            power_limit_watts=_milli(limit_mw),
            default_limit_watts=_milli(default_mw),
            min_limit_watts=_milli(min_mw),
            max_limit_watts=_milli(max_mw),
        )

    def set_limit(self, uuid: str, watts: float | None) -> float:
        """Set a power limit (None: the GPU's default); return the limit NVML then enforces.

        The enforced limit is read back rather than assumed: NVML may round, and another
        limit (a lower one set out of band) can win."""
        if watts is not None and not (math.isfinite(watts) and watts > 0):
            # A caller's bug, not NVML's refusal: a negative would wrap in NVML's unsigned int.
            raise ValueError(f"a power limit must be a positive number of watts, not {watts}")
        nvml = self._nvml
        handle = self._handle(uuid)
        try:
            if watts is None:
                milliwatts = int(nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle))
            else:
                milliwatts = round(watts * 1000)  # NVML takes an unsigned int of mW
            nvml.nvmlDeviceSetPowerManagementLimit(handle, milliwatts)
        except nvml.NVMLError as exc:
            raise LimitRefused(uuid, watts, str(exc)) from exc
        try:
            return float(nvml.nvmlDeviceGetEnforcedPowerLimit(handle)) / 1000
        except nvml.NVMLError as exc:
            raise GpuError(f"NVML set a limit on {uuid} but cannot read it back: {exc}") from exc

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError as exc:
            raise GpuError(f"NVML did not shut down: {exc}") from exc

    def _handle(self, uuid: str) -> Any:
        nvml = self._nvml
        try:
            return nvml.nvmlDeviceGetHandleByUUID(uuid)
        except nvml.NVMLError as exc:
            if exc.value in (nvml.NVML_ERROR_NOT_FOUND, nvml.NVML_ERROR_INVALID_ARGUMENT):
                raise UnknownGpu(f"no GPU {uuid} on this node (NVML: {exc})") from exc
            raise GpuError(f"NVML could not find {uuid}: {exc}") from exc


def _milli(value: float | None) -> float | None:
    # mJ -> J, mW -> W; a division keeps 12346 mW at 12.346 W (a product would not).
    return None if value is None else float(value) / 1000
