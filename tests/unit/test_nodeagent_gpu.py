"""The node agent's GPU layer: the NVML wrapper against the simulated NVML, and RAPL on a fake
sysfs. The double is held to pynvml's shapes so that what passes here runs on real NVML."""

import json
import multiprocessing
from pathlib import Path

import pynvml
import pytest

from joule.nodeagent import rapl
from joule.nodeagent.gpu import GpuError, GpuReading, Gpus, LimitRefused, UnknownGpu
from joule.nodeagent.simnvml import SimulatedNvml

A = "GPU-00000000-0000-0000-0000-00000000000a"
B = "GPU-00000000-0000-0000-0000-00000000000b"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def make(state: Path, clock: Clock, *, root: bool = True, **kwargs) -> tuple[Gpus, SimulatedNvml]:
    sim = SimulatedNvml(state, [A, B], clock=clock, is_root=lambda: root, **kwargs)
    sim.nvmlInit()
    return Gpus(sim, "simulated"), sim


@pytest.fixture
def gpus(tmp_path, clock):
    return make(tmp_path / "nvml.json", clock)[0]


# --- the wrapper over the double -------------------------------------------------------------


def test_uuids_in_index_order_and_source_is_honest(gpus):
    assert gpus.uuids() == [A, B]
    assert gpus.source == "simulated"


def test_reading_in_watts_joules_and_ratios(gpus):
    reading = gpus.read(B)
    assert reading == GpuReading(
        uuid=B,
        index=1,
        name="Joule Simulated GPU",
        energy_joules=0.0,
        power_watts=30.0,
        utilization_ratio=0.9,
        memory_used_bytes=float(4 * 2**30),
        memory_total_bytes=float(16 * 2**30),
        power_limit_watts=50.0,
        default_limit_watts=50.0,
        min_limit_watts=1.0,
        max_limit_watts=60.0,
    )


def test_energy_integrates_power_over_time(gpus, clock):
    clock.now += 10
    assert gpus.read(A).energy_joules == pytest.approx(300.0)  # 30 W x 10 s
    clock.now += 0.5
    assert gpus.read(A).energy_joules == pytest.approx(315.0)


def test_lowering_the_limit_clamps_power_and_energy_from_then_on(gpus, clock):
    clock.now += 10
    assert gpus.set_limit(A, 20) == 20.0  # the enforced limit, read back
    clock.now += 10
    reading = gpus.read(A)
    assert reading.power_watts == 20.0
    assert reading.power_limit_watts == 20.0
    assert reading.energy_joules == pytest.approx(300.0 + 200.0)
    assert gpus.read(B).power_watts == 30.0  # the other GPU is untouched


def test_a_limit_at_or_below_idle_reads_as_not_busy(gpus):
    gpus.set_limit(A, 4)
    assert gpus.read(A).utilization_ratio == 0.0


def test_fractional_watts_are_sent_as_integer_milliwatts(gpus):
    assert gpus.set_limit(A, 12.3456) == pytest.approx(12.346)


def test_refused_without_root(tmp_path, clock):
    gpus, _ = make(tmp_path / "nvml.json", clock, root=False)
    with pytest.raises(LimitRefused) as caught:
        gpus.set_limit(A, 20)
    assert caught.value.nvml_error == "Insufficient Permissions"
    assert str(caught.value) == f"NVML refused a 20 W limit on {A}: Insufficient Permissions"
    assert gpus.read(A).power_limit_watts == 50.0


@pytest.mark.parametrize("watts", [0.5, 61, 1000])
def test_out_of_range_is_invalid_argument(gpus, watts):
    with pytest.raises(LimitRefused, match=r"Invalid Argument$") as caught:
        gpus.set_limit(A, watts)
    assert caught.value.nvml_error == "Invalid Argument"
    assert gpus.read(A).power_limit_watts == 50.0


@pytest.mark.parametrize("watts", [0, -5, float("nan"), float("inf")])
def test_nonsense_watts_are_the_callers_bug(gpus, watts):
    with pytest.raises(ValueError, match="positive"):
        gpus.set_limit(A, watts)


def test_none_restores_the_default(gpus):
    gpus.set_limit(A, 20)
    assert gpus.set_limit(A, None) == 50.0
    assert gpus.read(A).power_watts == 30.0


def test_state_survives_a_new_process_on_the_same_file(tmp_path, clock):
    state = tmp_path / "nvml.json"
    first, _ = make(state, clock)
    clock.now += 10
    first.set_limit(A, 20)
    clock.now += 10  # 300 J at 30 W, then 200 J at 20 W
    first.close()
    # The agent restarts: a new double, new arguments that do not change existing devices.
    second, _ = make(state, clock, active_watts=45.0)
    reading = second.read(A)
    assert reading.power_limit_watts == 20.0
    assert reading.energy_joules == pytest.approx(500.0)
    clock.now += 1
    assert second.read(A).energy_joules == pytest.approx(520.0)


def test_new_uuids_are_added_to_an_existing_file(tmp_path, clock):
    state = tmp_path / "nvml.json"
    make(state, clock)
    c = "GPU-00000000-0000-0000-0000-00000000000c"
    sim = SimulatedNvml(state, [c], clock=clock, is_root=lambda: True)
    sim.nvmlInit()
    gpus = Gpus(sim, "simulated")
    assert gpus.uuids() == [A, B, c]
    assert gpus.read(c).index == 2


def test_reset_counters_is_a_driver_reload(tmp_path, clock):
    gpus, sim = make(tmp_path / "nvml.json", clock)
    clock.now += 10
    gpus.set_limit(A, 20)
    sim.reset_counters()
    reading = gpus.read(A)
    assert reading.energy_joules == 0.0
    assert reading.power_limit_watts == 50.0


def test_a_reboot_starts_the_counters_again(tmp_path, clock):
    state = tmp_path / "nvml.json"
    gpus, _ = make(state, clock)
    gpus.set_limit(A, 20)
    clock.now += 10
    data = json.loads(state.read_text())
    data["boot_id"] = "another-boot"
    state.write_text(json.dumps(data))
    again, _ = make(state, clock)
    assert again.read(A).energy_joules == 0.0
    assert again.read(A).power_limit_watts == 50.0


def test_unknown_uuid(gpus):
    with pytest.raises(UnknownGpu, match="Not Found"):
        gpus.read("GPU-nope")
    with pytest.raises(GpuError):  # UnknownGpu is a GpuError
        gpus.set_limit("GPU-nope", 20)


def test_not_supported_fields_are_none(tmp_path, clock):
    pre_volta = {
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetPowerManagementLimitConstraints",
    }
    gpus, _ = make(tmp_path / "nvml.json", clock, unsupported=pre_volta)
    reading = gpus.read(A)
    assert reading.energy_joules is None
    assert reading.min_limit_watts is None
    assert reading.max_limit_watts is None
    assert reading.power_watts == 30.0


def test_other_nvml_errors_name_the_field(tmp_path, clock):
    gpus, sim = make(tmp_path / "nvml.json", clock)

    def lost(handle):
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    sim.nvmlDeviceGetPowerUsage = lost
    with pytest.raises(GpuError, match=r"could not read the power of .*: GPU is lost"):
        gpus.read(A)


def test_uninitialized_until_init_and_after_shutdown(tmp_path, clock):
    sim = SimulatedNvml(tmp_path / "nvml.json", [A], clock=clock)
    gpus = Gpus(sim, "simulated")
    with pytest.raises(GpuError, match="Uninitialized"):
        gpus.uuids()
    sim.nvmlInit()
    assert gpus.uuids() == [A]
    gpus.close()
    with pytest.raises(GpuError, match="did not shut down: Uninitialized"):
        gpus.close()


def test_bytes_uuids_from_old_bindings(tmp_path, clock):
    _, sim = make(tmp_path / "nvml.json", clock)
    sim.nvmlDeviceGetUUID = lambda handle: handle.uuid.encode()
    assert Gpus(sim, "simulated").uuids() == [A, B]


def test_open_nvml_without_the_library_says_what_is_missing():
    with pytest.raises(GpuError) as caught:
        Gpus.open_nvml()
    message = str(caught.value)
    assert "NVML Shared Library Not Found" in message
    assert "no NVIDIA driver" in message


def test_open_nvml_without_the_bindings(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(GpuError, match=r"nvidia-ml-py"):
        Gpus.open_nvml()


# --- the double keeps pynvml's shapes --------------------------------------------------------


def test_the_double_raises_pynvmls_own_exceptions(tmp_path, clock):
    sim = SimulatedNvml(tmp_path / "nvml.json", [A], clock=clock, is_root=lambda: False)
    sim.nvmlInit()
    handle = sim.nvmlDeviceGetHandleByUUID(A)
    with pytest.raises(pynvml.NVMLError_NoPermission) as caught:
        sim.nvmlDeviceSetPowerManagementLimit(handle, 20_000)
    assert caught.value.value == pynvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(pynvml.NVMLError_NotFound):
        sim.nvmlDeviceGetHandleByUUID(B)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        sim.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(TypeError):  # ctypes' c_uint, as pynvml passes the limit
        sim.nvmlDeviceSetPowerManagementLimit(handle, 20.0)


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (pynvml.NVML_ERROR_UNINITIALIZED, "Uninitialized"),
        (pynvml.NVML_ERROR_INVALID_ARGUMENT, "Invalid Argument"),
        (pynvml.NVML_ERROR_NOT_SUPPORTED, "Not Supported"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "Insufficient Permissions"),
        (pynvml.NVML_ERROR_NOT_FOUND, "Not Found"),
    ],
)
def test_every_code_the_double_raises_has_nvmls_text_without_the_library(code, text):
    # pynvml's own table answers these; other codes would need libnvidia-ml's nvmlErrorString.
    assert pynvml.NVMLError._errcode_to_string[code] == text
    assert str(pynvml.NVMLError(code)) == text


def test_the_double_returns_pynvmls_structs(tmp_path, clock):
    sim = SimulatedNvml(tmp_path / "nvml.json", [A], clock=clock)
    sim.nvmlInit()
    handle = sim.nvmlDeviceGetHandleByIndex(0)
    assert isinstance(sim.nvmlDeviceGetUtilizationRates(handle), pynvml.c_nvmlUtilization_t)
    memory = sim.nvmlDeviceGetMemoryInfo(handle)
    assert isinstance(memory, pynvml.c_nvmlMemory_t)
    assert memory.free + memory.used == memory.total
    v2 = sim.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    assert isinstance(v2, pynvml.c_nvmlMemory_v2_t)
    assert sim.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [1000, 60000]
    assert isinstance(sim.nvmlDeviceGetTotalEnergyConsumption(handle), int)
    assert sim.nvmlDeviceGetPowerManagementLimit(handle) == 50000


def _set_limits(state: str, watts: int, rounds: int) -> None:
    sim = SimulatedNvml(Path(state), [A, B], is_root=lambda: True)
    sim.nvmlInit()
    gpus = Gpus(sim, "simulated")
    for _ in range(rounds):
        gpus.set_limit(A, watts)
        gpus.set_limit(B, watts)


def test_processes_share_the_file_without_corrupting_it(tmp_path):
    state = tmp_path / "nvml.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_set_limits, args=(str(state), w, 40)) for w in (10, 20, 30)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    devices = json.loads(state.read_text())["devices"]
    assert set(devices) == {A, B}
    assert {d["limit_mw"] for d in devices.values()} <= {10_000, 20_000, 30_000}
    assert not [p for p in tmp_path.iterdir() if p.name not in ("nvml.json", "nvml.json.lock")]


def test_the_limit_outlives_the_process_that_set_it(tmp_path):
    state = tmp_path / "nvml.json"
    worker = multiprocessing.get_context("fork").Process(
        target=_set_limits, args=(str(state), 25, 1)
    )
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0
    sim = SimulatedNvml(state, [A])
    sim.nvmlInit()
    assert Gpus(sim, "simulated").read(A).power_limit_watts == 25.0


# --- RAPL ------------------------------------------------------------------------------------


def zone(root: Path, directory: str, name: str, energy: int, max_range: int = 1000) -> Path:
    path = root / directory
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path


@pytest.fixture
def powercap(tmp_path):
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "package-0", 100)
    zone(root, "intel-rapl:1", "package-1", 200, max_range=2000)
    zone(root, "intel-rapl:0:0", "core", 50)  # inside package-0
    zone(root, "intel-rapl:2", "psys", 999)  # covers the packages too
    zone(root, "intel-rapl-mmio:0", "package-0", 7)  # a second view of package-0
    (root / "intel-rapl").mkdir()  # the control type, not a zone
    return root


def test_rapl_reads_top_level_packages_only(powercap):
    packages = rapl.read_packages(powercap)
    assert packages == {"package-0": (100, 1000), "package-1": (200, 2000)}
    assert packages.reason is None


def test_rapl_without_powercap(tmp_path):
    packages = rapl.read_packages(tmp_path / "absent")
    assert packages == {}
    assert "no RAPL package zones" in (packages.reason or "")


def test_rapl_permission_denied_is_empty_with_a_reason(powercap, monkeypatch):
    # Tests run as root, whom chmod 000 does not stop: make the read itself refuse.
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    packages = rapl.read_packages(powercap)
    assert packages == {}
    assert "root only" in (packages.reason or "")


def test_rapl_garbage_is_empty_with_a_reason(powercap):
    (powercap / "intel-rapl:1" / "energy_uj").write_text("not a number\n")
    packages = rapl.read_packages(powercap)
    assert packages == {}
    assert "not readable" in (packages.reason or "")


@pytest.mark.parametrize(
    ("previous", "current", "max_range", "increase"),
    [
        (100, 250, 1000, 150),
        (100, 100, 1000, 0),
        (900, 50, 1000, 150),  # wrapped: 100 up to the range, then 50
        (262143328000, 1000, 262143328850, 1850),
    ],
)
def test_counter_increase(previous, current, max_range, increase):
    assert rapl.counter_increase(previous, current, max_range) == increase
