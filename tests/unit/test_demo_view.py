"""The demo's live view reads the trainer's real /metrics exposition."""

from joule_trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest

from joule.demo.view import job_row, render
from joule.trainer_metrics import parse_trainer_metrics


def exposition(rank: int, throughput: float, joules: float) -> str:
    m = TrainerMetrics.create("gpt", str(rank), rank, "none", "estimated")
    m.steps.inc(12)
    m.samples.inc(12 * 16)
    m.loss.set(2.5 + rank)
    m.throughput.set(throughput)
    m.power.set(15.0)
    m.energy.inc(joules)
    return generate_latest(m.registry).decode()


def test_a_job_row_sums_workers_and_takes_rank_0s_loss():
    readings = [parse_trainer_metrics(exposition(r, 100.0, 50.0)) for r in (1, 0)]
    assert all(readings)
    assert readings[0].rank == 1 and readings[0].source == "estimated"
    job = {
        "metadata": {"name": "gpt"},
        "spec": {"replicas": 2},
        "status": {
            "phase": "Running",
            "readyReplicas": 2,
            "reason": "AllWorkersRunning",
            "message": "2 workers running",
        },
    }
    row = job_row(job, readings)
    assert (row.step, row.samples_per_s, row.loss, row.watts, row.joules) == (
        12, 200.0, 2.5, 30.0, 100.0
    )  # fmt: skip
    text = render([row], 12.0, ["operator  http://127.0.0.1:8080/metrics"])
    assert "gpt" in text and "2/2" in text and "AllWorkersRunning: 2 workers running" in text
    assert "an estimate, not a measurement" in text


def test_a_worker_that_has_not_stepped_yet_shows_dashes():
    assert parse_trainer_metrics("# nothing yet\n") is None
    row = job_row({"metadata": {"name": "x"}, "spec": {"replicas": 1}}, [])
    assert row.phase == "Pending" and row.samples_per_s is None
    assert " - " in render([row], 1.0, [])


def test_the_row_shows_the_policys_size_limit_and_newest_event():
    job = {
        "metadata": {"name": "gpt"},
        "spec": {"replicas": 2},
        "status": {"phase": "Running", "readyReplicas": 2, "targetReplicas": 1,
                   "energy": {"gpuPowerLimitWatts": 5.5}},
    }  # fmt: skip
    said = "PowerLimitLowered: average power 21.0 W over the 12 W cap: ... -> 5 W"
    row = job_row(job, [], said)
    assert (row.desired, row.limit, row.decision) == (1, 5.5, said)
    text = render([row], 3.0, [])
    assert "2/1" in text and " 5.5 " in text and "PowerLimitLowered: average power" in text


def test_a_job_measured_by_the_node_agents_shows_the_operators_figures_and_says_simulated():
    readings = [parse_trainer_metrics(exposition(0, 100.0, 50.0))]
    job = {
        "metadata": {"name": "gpt"},
        "spec": {"replicas": 1},
        "status": {"phase": "Running", "readyReplicas": 1,
                   "energy": {"source": "node", "meter": "simulated", "averageWatts": 30.0,
                              "consumedJoules": 900.0}},
    }  # fmt: skip
    row = job_row(job, readings)
    assert (row.watts, row.joules, row.samples_per_s) == (30.0, 900.0, 100.0)
    text = render([row], 5.0, [])
    assert "energy meter: node: simulated" in text and "simulated GPUs, not a measurement" in text
