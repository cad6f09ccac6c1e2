"""Energy meters: NVML against a test double of the pynvml calls, and the labelled estimate."""

import time
from types import SimpleNamespace

import pytest
from joule_trainer.energy import MeterError
from joule_trainer.energy.api import counter_delta
from joule_trainer.energy.estimate import EstimatedMeter
from joule_trainer.energy.nvml import NvmlMeter
from joule_trainer.energy.probe import probe


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The pynvml functions NvmlMeter calls, with values the test controls."""

    NVMLError = FakeNVMLError

    def __init__(self, energy_mj=None, power_mw=300_000, limit_mw=700_000, init_fails=False):
        self.energy_mj = energy_mj  # None: the GPU has no energy counter
        self.power_mw = power_mw
        self.limit_mw = limit_mw
        self.init_fails = init_fails
        self.fail_reads = False
        self.shutdown_called = False
        self.utilization_pct: int | None = 37  # None: not supported (a MIG slice)
        self.memory_used = 5 * 2**30
        self.activity_reads = 0

    def nvmlInit(self):
        if self.init_fails:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy_mj is None:
            raise FakeNVMLError("Not Supported")
        if self.fail_reads:
            raise FakeNVMLError("GPU is lost")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, h):
        if self.fail_reads:
            raise FakeNVMLError("GPU is lost")
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self.limit_mw

    def nvmlShutdown(self):
        self.shutdown_called = True

    def nvmlDeviceGetUtilizationRates(self, h):
        self.activity_reads += 1
        if self.utilization_pct is None:
            raise FakeNVMLError("Not Supported")
        return SimpleNamespace(gpu=self.utilization_pct, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=80 * 2**30, free=80 * 2**30 - self.memory_used,
                               used=self.memory_used)  # fmt: skip

    # Power limits, as an H100-class GPU reports them (milliwatts).
    constraints = (200_000, 700_000)
    default_mw = 700_000
    may_set = True

    def nvmlDeviceGetPowerManagementLimitConstraints(self, h):
        return self.constraints

    def nvmlDeviceGetPowerManagementDefaultLimit(self, h):
        return self.default_mw

    def nvmlDeviceSetPowerManagementLimit(self, h, milliwatts):
        if not self.may_set:
            raise FakeNVMLError("Insufficient Permissions")
        self.limit_mw = milliwatts


def test_energy_counter_is_used_where_the_gpu_has_one():
    nvml = FakeNvml(energy_mj=1_000_000)
    meter = NvmlMeter(0, nvml=nvml)
    assert meter.source == "nvml" and meter.measured
    nvml.energy_mj += 250_000  # 250 J
    reading = meter.read()
    assert reading.energy_joules == pytest.approx(250.0)
    assert reading.power_watts == pytest.approx(300.0)
    assert reading.power_limit_watts == pytest.approx(700.0)
    meter.close()
    assert nvml.shutdown_called


def test_counter_wrap_around_is_not_a_negative_energy():
    nvml = FakeNvml(energy_mj=2**64 - 1000)
    meter = NvmlMeter(0, nvml=nvml)
    nvml.energy_mj = 4000  # wrapped: 1000 + 4000 mJ later
    assert meter.read().energy_joules == pytest.approx(5.0)
    assert counter_delta(10, 4, 16) == 10


def test_without_a_counter_power_is_sampled_and_integrated():
    nvml = FakeNvml(energy_mj=None, power_mw=200_000)
    meter = NvmlMeter(0, nvml=nvml, sample_interval_s=0.01)
    assert meter.source == "nvml-sampled"
    time.sleep(0.3)
    reading = meter.read()
    meter.close()
    # 200 W for ~0.3 s: about 60 J (the sampler thread's timing is not exact).
    assert 30 < reading.energy_joules < 90
    assert reading.power_watts == pytest.approx(200.0)


def test_nvml_errors_become_meter_errors():
    with pytest.raises(MeterError, match="Driver Not Loaded"):
        NvmlMeter(0, nvml=FakeNvml(init_fails=True))
    nvml = FakeNvml(energy_mj=0)
    meter = NvmlMeter(0, nvml=nvml)
    nvml.fail_reads = True
    with pytest.raises(MeterError, match="GPU is lost"):
        meter.read()


def test_the_estimate_says_it_is_an_estimate_and_grows_with_cpu_time():
    meter = EstimatedMeter(watts_per_core=10)
    assert meter.source == "estimated" and not meter.measured
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    time.sleep(0.5)
    reading = meter.read()
    assert reading.energy_joules >= 2.0  # >= 0.3 s of CPU x 10 W, minus tick rounding
    assert reading.power_watts is not None and reading.power_watts > 0
    with pytest.raises(ValueError):
        EstimatedMeter(0)


def test_probe_falls_back_to_the_estimate_without_gpu_or_rapl(tmp_path, monkeypatch):
    monkeypatch.delenv("JOULE_ENERGY_SOURCE", raising=False)
    monkeypatch.setattr("joule_trainer.energy.rapl.POWERCAP", tmp_path)
    monkeypatch.setattr("joule_trainer.energy.rapl.RaplMeter.__init__.__defaults__", (tmp_path,))
    assert probe(None).source == "estimated"


def test_rapl_reads_package_counters_and_handles_their_wrap(tmp_path):
    from joule_trainer.energy.rapl import RaplMeter

    zone = tmp_path / "intel-rapl:0"
    (zone / "intel-rapl:0:0").mkdir(parents=True)  # a sub-zone: counted inside the package
    (zone / "max_energy_range_uj").write_text("1000000\n")
    (zone / "energy_uj").write_text("999000\n")
    meter = RaplMeter(tmp_path)
    (zone / "energy_uj").write_text("2000\n")  # wrapped: 1000 + 2000 uJ
    assert meter.read().energy_joules == pytest.approx(0.003)
    with pytest.raises(MeterError):
        RaplMeter(tmp_path / "none")


def test_nvml_sets_the_power_limit_within_what_the_gpu_accepts():
    nvml = FakeNvml(energy_mj=0)
    meter = NvmlMeter(0, nvml=nvml)
    assert meter.set_power_limit(450.0) == pytest.approx(450.0)
    assert meter.read().power_limit_watts == pytest.approx(450.0)
    assert meter.set_power_limit(50.0) == pytest.approx(200.0)  # clamped to the GPU's floor
    assert meter.set_power_limit(None) == pytest.approx(700.0)  # back to the default
    assert meter.pause_seconds() == 0.0


def test_a_refused_power_limit_is_an_error_that_says_so():
    nvml = FakeNvml(energy_mj=0)
    nvml.may_set = False
    with pytest.raises(MeterError, match="Insufficient Permissions"):
        NvmlMeter(0, nvml=nvml).set_power_limit(300.0)


def test_the_estimate_keeps_its_power_at_the_limit_by_idling():
    meter = EstimatedMeter(watts_per_core=20.0)
    assert meter.pause_seconds() == 0.0  # no limit: never idles
    meter.set_power_limit(5.0)
    wall0, cpu0 = time.monotonic(), time.process_time()
    while time.process_time() < cpu0 + 0.2:  # one core flat out: ~20 W estimated
        pass
    pause = meter.pause_seconds()
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    # 0.2 s of CPU at 20 W/core is 4 J; at 5 W that takes 0.8 s: idle for what is left of
    # it (~0.6 s on an idle machine; less where other load stretched the busy loop's wall time).
    assert pause == pytest.approx(max(cpu * 20.0 / 5.0 - wall, 0.0), abs=0.1)
    assert meter.read().power_limit_watts == 5.0
    with pytest.raises(ValueError):
        meter.set_power_limit(0.0)


def test_the_limit_file_follows_the_annotation(tmp_path):
    from joule_trainer.energy.limit import LimitFile, parse_limit

    path = tmp_path / "gpu-power-limit-watts"
    limit = LimitFile(str(path), every_s=0.0)
    assert not limit.changed() and limit.current is None  # absent: the default
    path.write_text("237.5")
    assert limit.changed() and limit.current == 237.5
    assert not limit.changed()  # unchanged: nothing to apply
    path.write_text("")  # annotation removed
    assert limit.changed() and limit.current is None
    assert parse_limit(" 80 ") == 80.0
    with pytest.raises(ValueError):
        parse_limit("-3")
    assert not LimitFile(None).changed()  # not run by the operator: no file, no limit


def test_nvml_readings_carry_utilisation_and_memory_refreshed_once_a_second(monkeypatch):
    nvml = FakeNvml(energy_mj=0)
    meter = NvmlMeter(0, nvml=nvml)
    reading = meter.read()
    assert reading.gpu_utilization_ratio == pytest.approx(0.37)
    assert reading.gpu_memory_used_bytes == 5 * 2**30
    nvml.utilization_pct = 90
    for _ in range(50):  # every step reads the meter; NVML's utilisation is asked once
        assert meter.read().gpu_utilization_ratio == pytest.approx(0.37)
    assert nvml.activity_reads == 1
    now = time.monotonic()
    monkeypatch.setattr("joule_trainer.energy.nvml.time.monotonic", lambda: now + 1.5)
    assert meter.read().gpu_utilization_ratio == pytest.approx(0.9)
    assert nvml.activity_reads == 2


def test_a_gpu_without_utilisation_reports_it_unknown_not_an_error():
    nvml = FakeNvml(energy_mj=0)
    nvml.utilization_pct = None
    reading = NvmlMeter(0, nvml=nvml).read()
    assert reading.gpu_utilization_ratio is None
    assert reading.energy_joules == 0.0 and reading.gpu_memory_used_bytes == 5 * 2**30


def exposition(metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def test_gpu_series_are_absent_where_no_gpu_is_measured_not_zero():
    """The operator reads a 0 utilisation as an idle GPU and shrinks the job: a trainer that
    cannot measure a GPU must not export the series at all."""
    from joule_trainer.metrics import TrainerMetrics

    meter = EstimatedMeter(watts_per_core=10)
    metrics = TrainerMetrics.create("job", "0", 0, "none", meter.source)
    metrics.record(meter.read())
    text = exposition(metrics)
    assert "joule_trainer_power_watts{" in text  # the meter's own figures are there
    assert "joule_trainer_gpu_utilization_ratio" not in text
    assert "joule_trainer_gpu_memory_used_bytes" not in text


def test_gpu_series_carry_what_nvml_measured(monkeypatch):
    from joule_trainer.metrics import TrainerMetrics

    nvml = FakeNvml(energy_mj=1_000_000)
    nvml.utilization_pct = None  # not known at first: still absent, not 0
    meter = NvmlMeter(0, nvml=nvml)
    metrics = TrainerMetrics.create("job", "0", 0, "0", meter.source)
    metrics.record(meter.read())
    assert "joule_trainer_gpu_utilization_ratio" not in exposition(metrics)
    nvml.utilization_pct = 62
    later = time.monotonic() + 1.5
    monkeypatch.setattr("joule_trainer.energy.nvml.time.monotonic", lambda: later)
    metrics.record(meter.read())
    lines = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in exposition(metrics).splitlines()
        if line.startswith("joule_trainer_gpu_")
    }
    assert lines == {
        "joule_trainer_gpu_utilization_ratio": pytest.approx(0.62),
        "joule_trainer_gpu_memory_used_bytes": 5 * 2**30,
    }


def test_the_exposition_carries_the_process_start_time_the_operator_keys_counters_by():
    """A process restarted in place counts its energy from zero; the operator tells it from
    the process before by process_start_time_seconds, not only by a counter going down."""
    from joule_trainer.metrics import TrainerMetrics

    from joule.trainer_metrics import parse_trainer_metrics

    meter = EstimatedMeter(watts_per_core=10)
    metrics = TrainerMetrics.create("job", "0", 0, "none", meter.source)
    metrics.steps.inc()
    metrics.record(meter.read())
    reading = parse_trainer_metrics(exposition(metrics))
    boot = time.time() - time.monotonic()  # roughly: the process started after boot
    assert reading is not None and reading.started is not None
    assert boot - 5 < reading.started <= time.time()
