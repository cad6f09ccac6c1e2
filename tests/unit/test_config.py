"""Operator settings from JOULE_* variables: defaults, and a clear error for bad values."""

from pathlib import Path

import pytest

from joule.config import OperatorConfig

NOWHERE = Path("/nonexistent/serviceaccount/namespace")


def test_defaults_and_overrides():
    assert OperatorConfig.from_env({}, namespace_file=NOWHERE) == OperatorConfig()
    cfg = OperatorConfig.from_env(
        {
            "JOULE_WATCH_NAMESPACES": "ml, research,ml",
            "JOULE_RESYNC_SECONDS": "5",
            "JOULE_METRICS_PORT": "0",
            "JOULE_LOG_FORMAT": "plain",
        }
    )
    assert (cfg.namespaces, cfg.resync_seconds, cfg.metrics_port, cfg.log_format) == (
        ("ml", "research"),
        5.0,
        0,
        "plain",
    )


def test_leader_election_defaults_off_and_reads_the_charts_variables():
    cfg = OperatorConfig.from_env({}, namespace_file=NOWHERE)
    assert not cfg.leader_elect
    assert (cfg.lease_name, cfg.lease_namespace, cfg.identity) == ("joule-operator", "default", "")
    assert (cfg.lease_duration_seconds, cfg.renew_deadline_seconds) == (8, 6.0)
    assert (cfg.retry_period_seconds, cfg.health_port) == (1.0, 8081)
    cfg = OperatorConfig.from_env(
        {
            "JOULE_LEADER_ELECT": "true",
            "JOULE_LEASE_NAME": "joule",
            "JOULE_LEASE_NAMESPACE": "joule-system",
            "JOULE_POD_NAME": "joule-operator-7d9f-abcde",
            "JOULE_HEALTH_PORT": "0",
            "JOULE_LEASE_DURATION_SECONDS": "15",
            "JOULE_LEASE_RENEW_DEADLINE_SECONDS": "10",
            "JOULE_LEASE_RETRY_PERIOD_SECONDS": "2",
        },
        namespace_file=NOWHERE,
    )
    assert cfg.leader_elect and cfg.health_port == 0
    assert (cfg.lease_name, cfg.lease_namespace, cfg.identity) == (
        "joule",
        "joule-system",
        "joule-operator-7d9f-abcde",
    )
    assert (cfg.lease_duration_seconds, cfg.renew_deadline_seconds, cfg.retry_period_seconds) == (
        15,
        10.0,
        2.0,
    )
    assert not OperatorConfig.from_env({"JOULE_LEADER_ELECT": "false"}).leader_elect


def test_the_lease_lives_in_the_pods_own_namespace_by_default(tmp_path):
    own = tmp_path / "namespace"
    own.write_text("joule-system\n")
    assert OperatorConfig.from_env({}, namespace_file=own).lease_namespace == "joule-system"
    overridden = OperatorConfig.from_env({"JOULE_LEASE_NAMESPACE": "ops"}, namespace_file=own)
    assert overridden.lease_namespace == "ops"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOULE_RESYNC_SECONDS": "soon"}, "JOULE_RESYNC_SECONDS must be a number"),
        ({"JOULE_WORKERS": "0"}, "JOULE_WORKERS must be >= 1"),
        ({"JOULE_LOG_FORMAT": "xml"}, "JOULE_LOG_FORMAT must be json or plain"),
        ({"JOULE_LEADER_ELECT": "yes"}, "JOULE_LEADER_ELECT must be true or false, got 'yes'"),
        ({"JOULE_LEADER_ELECT": "True"}, "JOULE_LEADER_ELECT must be true or false"),
        ({"JOULE_HEALTH_PORT": "http"}, "JOULE_HEALTH_PORT must be a number"),
        ({"JOULE_HEALTH_PORT": "70000"}, "JOULE_HEALTH_PORT must be a port number"),
        ({"JOULE_METRICS_PORT": "80.5"}, "JOULE_METRICS_PORT must be a port number"),
        ({"JOULE_LEASE_DURATION_SECONDS": "7.5"}, "JOULE_LEASE_DURATION_SECONDS must be whole"),
        ({"JOULE_LEASE_DURATION_SECONDS": "0"}, "JOULE_LEASE_DURATION_SECONDS must be >= 1"),
        (
            {"JOULE_LEASE_DURATION_SECONDS": "6"},
            r"JOULE_LEASE_DURATION_SECONDS \(6\) must be greater than "
            r"JOULE_LEASE_RENEW_DEADLINE_SECONDS \(6\)",
        ),
        (
            {"JOULE_LEASE_RETRY_PERIOD_SECONDS": "5"},
            r"JOULE_LEASE_RENEW_DEADLINE_SECONDS \(6\) must be greater than 1.2 x "
            r"JOULE_LEASE_RETRY_PERIOD_SECONDS \(5\)",
        ),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        OperatorConfig.from_env(env)


def test_a_watched_namespace_that_is_no_name_is_refused():
    with pytest.raises(ValueError, match=r"JOULE_WATCH_NAMESPACES .* 'Team_A'"):
        OperatorConfig.from_env({"JOULE_WATCH_NAMESPACES": "ml,Team_A"}, namespace_file=NOWHERE)


def test_the_api_clients_pool_holds_a_connection_for_every_worker():
    from kubernetes import client

    from joule.runner import POOL_SPARE, api_configuration

    saved = client.Configuration.get_default_copy()
    client.Configuration.set_default(client.Configuration())  # the library's default: 5/CPU
    try:
        assert api_configuration(16).connection_pool_maxsize >= 16 + POOL_SPARE
        assert api_configuration(64).connection_pool_maxsize == 64 + POOL_SPARE
    finally:
        client.Configuration.set_default(saved)
