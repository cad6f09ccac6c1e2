"""The operator's job-level series: what a dashboard or an alert reads of a TrainingJob."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from joule.api import TrainingJobSpec
from joule.job_metrics import JobSeries, figures


def samples_of(series: JobSeries) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(series)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_managed_jobs_sizes_energy_and_limits_are_series_labelled_by_job_only():
    spec = TrainingJobSpec.parse({
        "image": "x", "replicas": 2, "elastic": {"minReplicas": 1, "maxReplicas": 4},
        "scaling": {"policy": "Throughput"},
        "energy": {"powerCapWatts": 400, "budget": "2kWh", "minGpuPowerLimitWatts": 100},
    })  # fmt: skip
    status = {
        "phase": "Running", "targetReplicas": 3, "readyReplicas": 3, "gpus": 3,
        "energy": {"consumedJoules": 1234.5, "samples": 640.0, "averageWatts": 412.0,
                   "gpuPowerLimitWatts": 250, "source": "node", "meter": "nvml"},
        "conditions": [{"type": "PowerCapExceeded", "status": "True"},
                       {"type": "BudgetAtRisk", "status": "False"}],
    }  # fmt: skip
    series = JobSeries()
    series.set("team-a", "gpt", figures(spec, status))
    series.decided("team-a", "gpt", "ScaleUp")
    series.decided("team-a", "gpt", "ScaleUp")
    got = samples_of(series)
    job = (("joule_job", "gpt"), ("namespace", "team-a"))

    def with_(**more):
        return tuple(sorted({**dict(job), **more}.items()))

    assert got[("joule_job_phase", with_(phase="Running"))] == 1
    assert got[("joule_job_desired_replicas", job)] == 2
    assert got[("joule_job_target_replicas", job)] == 3
    assert got[("joule_job_ready_replicas", job)] == 3
    assert got[("joule_job_energy_joules_total", job)] == 1234.5
    assert got[("joule_job_samples_total", job)] == 640
    assert got[("joule_job_power_watts", job)] == 412
    assert got[("joule_job_power_cap_watts", job)] == 400
    assert got[("joule_job_energy_budget_joules", job)] == 7.2e6
    assert got[("joule_job_gpu_power_limit_watts", job)] == 250
    assert got[("joule_job_condition", with_(condition="PowerCapExceeded"))] == 1
    assert got[("joule_job_condition", with_(condition="BudgetAtRisk"))] == 0
    assert got[("joule_job_energy_source_info", with_(source="node"))] == 1
    assert got[("joule_job_decisions_total", with_(reason="ScaleUp"))] == 2
    labels = {name for (_, pairs) in got for name, _ in pairs}
    assert labels <= {"namespace", "joule_job", "phase", "condition", "source", "reason"}


def test_what_the_status_does_not_hold_is_not_exported_as_zero_and_a_gone_job_goes():
    series = JobSeries()
    series.set("ns", "plain", figures(TrainingJobSpec.parse({"image": "x"}), {}))
    got = samples_of(series)
    names = {name for name, _ in got}
    assert "joule_job_desired_replicas" in names and "joule_job_phase" in names
    for absent in ("joule_job_power_cap_watts", "joule_job_energy_budget_joules",
                   "joule_job_energy_joules_total", "joule_job_power_watts",
                   "joule_job_gpu_power_limit_watts"):  # fmt: skip
        assert absent not in names
    series.set("ns", "plain", None)
    assert not {n for n, _ in samples_of(series) if n.startswith("joule_job_")}


def test_a_refused_limit_is_not_shown_as_in_force():
    spec = TrainingJobSpec.parse({"image": "x", "energy": {"gpuPowerLimitWatts": 150}})
    refused = {"energy": {"gpuPowerLimitRefused": "Insufficient Permissions"}}
    assert figures(spec, refused).gpu_power_limit_watts is None
    assert figures(spec, {}).gpu_power_limit_watts == 150
