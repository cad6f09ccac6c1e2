"""The prometheus energy source's pure parts: the query as sent, the answer as read, and the
settings that choose them. The query against a real Prometheus is in
tests/integration/test_prometheus_source.py."""

from __future__ import annotations

import pytest

from joule.config import OperatorConfig
from joule.prometheus_energy import (
    PRESETS,
    QueryError,
    Series,
    configured,
    parse_vector,
    render,
)


def answer(*series, kind="vector"):
    return {"status": "success", "data": {"resultType": kind, "result": list(series)}}


def test_the_query_names_the_namespace_and_every_running_worker():
    promql = render(PRESETS["joule"], "team-a", ["j-worker-1", "j-worker-0"])
    assert 'namespace="team-a"' in promql and 'pod=~"j-worker-0|j-worker-1"' in promql


def test_each_series_is_a_counter_of_its_pod_keyed_by_its_other_labels():
    body = answer(
        {"metric": {"pod": "w0", "gpu": "GPU-a"}, "value": [1.0, "120.5"]},
        {"metric": {"pod": "w0", "gpu": "GPU-b"}, "value": [1.0, "80"]},
        {"metric": {"pod": "w1", "gpu": "GPU-c", "pod_uid": "u1"}, "value": [1.0, "7"]},
    )
    assert parse_vector(body, "pod") == {
        "w0": [Series("gpu=GPU-a", 120.5), Series("gpu=GPU-b", 80.0)],
        "w1": [Series("gpu=GPU-c,pod_uid=u1", 7.0, "u1")],
    }


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"status": "error", "errorType": "bad_data", "error": "parse error"}, "bad_data: parse"),
        (answer(kind="matrix"), "must return an instant vector, not matrix"),
        (answer({"metric": {"node": "x"}, "value": [1, "3"]}), "has no 'pod' label"),
        (answer({"metric": {"pod": "w0"}, "value": [1, "NaN"]}), "not a finite"),
        (answer({"metric": {"pod": "w0"}, "value": [1, "-4"]}), "not a finite"),
    ],
)
def test_an_answer_that_is_not_joules_per_pod_is_refused_with_the_reason(body, says):
    with pytest.raises(QueryError, match=says):
        parse_vector(body, "pod")


def test_a_preset_gives_its_query_and_counter_and_settings_override_it():
    dcgm = configured("http://p:9090", "dcgm", "", "", "")
    assert dcgm.counter == "device" and "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in dcgm.query
    assert dcgm.meter == "prometheus/dcgm"
    mine = configured("http://p:9090", "custom", 'sum by (pod_name) (x{pod_name=~"$pods"})',
                      "pod_name", "pod")  # fmt: skip
    assert (mine.pod_label, mine.counter, mine.meter) == ("pod_name", "pod", "prometheus")


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"JOULE_JOB_ENERGY_SOURCE": "prometheus"}, "needs JOULE_PROMETHEUS_URL"),
        ({"JOULE_JOB_ENERGY_SOURCE": "prometheus", "JOULE_PROMETHEUS_URL": "p:9090"}, "http"),
        ({"JOULE_JOB_ENERGY_SOURCE": "prometheus", "JOULE_PROMETHEUS_URL": "http://p",
          "JOULE_PROMETHEUS_PRESET": "custom"}, "needs JOULE_PROMETHEUS_QUERY"),
        ({"JOULE_PROMETHEUS_PRESET": "kepler"}, "must be one of joule, dcgm, custom"),
        ({"JOULE_PROMETHEUS_COUNTER": "gpu"}, "must be pod or device"),
        ({"JOULE_JOB_ENERGY_SOURCE": "node", "JOULE_NODE_AGENTS": "false"}, "the node agents"),
        ({"JOULE_JOB_ENERGY_SOURCE": "dcgm"}, "must be one of node, trainer, prometheus"),
    ],
)  # fmt: skip
def test_bad_energy_settings_stop_the_operator_with_the_setting_named(env, says, tmp_path):
    with pytest.raises(ValueError, match=says):
        OperatorConfig.from_env(env, namespace_file=tmp_path / "none")


def test_the_node_source_is_the_default(tmp_path):
    config = OperatorConfig.from_env({}, namespace_file=tmp_path / "none")
    assert config.energy_source == "node" and config.node_agents
