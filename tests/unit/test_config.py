"""Operator settings from JOULE_* variables: defaults, and a clear error for bad values."""

import pytest

from joule.config import OperatorConfig


def test_defaults_and_overrides():
    assert OperatorConfig.from_env({}) == OperatorConfig()
    cfg = OperatorConfig.from_env(
        {
            "JOULE_NAMESPACE": "ml",
            "JOULE_RESYNC_SECONDS": "5",
            "JOULE_METRICS_PORT": "0",
            "JOULE_LOG_FORMAT": "plain",
        }
    )
    assert (cfg.namespace, cfg.resync_seconds, cfg.metrics_port, cfg.log_format) == (
        "ml",
        5.0,
        0,
        "plain",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"JOULE_RESYNC_SECONDS": "soon"}, "JOULE_RESYNC_SECONDS must be a number"),
        ({"JOULE_WORKERS": "0"}, "JOULE_WORKERS must be >= 1"),
        ({"JOULE_LOG_FORMAT": "xml"}, "JOULE_LOG_FORMAT must be json or plain"),
    ],
)
def test_bad_values_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        OperatorConfig.from_env(env)
