"""Joule's recording rules and alerts, checked and tested by promtool (built from Prometheus's
own module): every alert against input series that must and must not fire it, and the
recorded series' values. The chart's PrometheusRule renders the same file."""

from __future__ import annotations

import subprocess

import yaml

from tests.conftest import CHART, ROOT, Helm

RULES = CHART / "files" / "prometheus-rules.yaml"
TESTS = ROOT / "tests" / "rules" / "prometheus-rules.test.yaml"


def promtool(tools, *args: str) -> subprocess.CompletedProcess[str]:
    _, binary = tools
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=120,
                          cwd=TESTS.parent)  # fmt: skip


def test_the_rules_are_valid_and_every_alert_is_tested(prometheus_tools):
    checked = promtool(prometheus_tools, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    alerts = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    tested = {
        case["alertname"]
        for test in yaml.safe_load(TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a test that fires them: {alerts - tested}"


def test_the_alerts_fire_when_and_only_when_they_should(prometheus_tools):
    result = promtool(prometheus_tools, "test", "rules", TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_wrong_expectation_fails_the_rule_tests(prometheus_tools, tmp_path):
    # The check above can fail: the same tests, expecting an alert that must not fire.
    tests = yaml.safe_load(TESTS.read_text())
    tests["rule_files"] = [str(RULES)]
    failed = next(t for t in tests["tests"] if t["name"] == "a failed job")
    failed["alert_rule_test"][0]["exp_alerts"] = [{"exp_labels": {"severity": "warning"}}]
    path = tmp_path / "wrong.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    result = promtool(prometheus_tools, "test", "rules", str(path))
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def test_the_charts_prometheusrule_carries_the_same_rules(helm: Helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"prometheusRule": {"enabled": True}}))
    rendered = helm("template", "joule", str(CHART), "-f", str(values),
                    "--show-only", "templates/prometheusrule.yaml").stdout  # fmt: skip
    rule = yaml.safe_load(rendered)
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
