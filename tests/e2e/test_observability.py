"""What a user's Prometheus and Grafana see: a real Prometheus finds the chart's operator and
node agent, and the workers, through the API server, by the pods' prometheus.io annotations,
as it does in a cluster, and evaluates Joule's rules; then every panel of the dashboard, and
its decisions annotation, returns data for a capped job training on the local node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from joule.cluster.prometheus import kubernetes_config
from joule.report.draw import PANELS_KEY
from tests.conftest import CHART, wait_for
from tests.e2e.test_energy import TRAIN
from tests.e2e.test_local_loop import apply, status
from tests.report_checks import DECISIONS, colours, not_blank, pixels_of

RULES = CHART / "files" / "prometheus-rules.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"


@pytest.mark.timeout(420)
def test_prometheus_discovers_joule_and_every_dashboard_panel_has_data(
    kubectl, api, namespace, operator, local_node, cluster, prometheus_server, tmp_path
):
    prom = prometheus_server(config_text=kubernetes_config(cluster.kubeconfig, [RULES]))
    # Found by discovery, not by address: the operator and the node agent, both up.
    for component in ("operator", "node-agent"):
        pod = operator.pod(component)["metadata"]["name"]
        prom.wait_for_series(f'up{{kubernetes_pod="{pod}"}} == 1', timeout=60)

    # A job that gives every panel something to show: a cap it goes over (a lowered,
    # confirmed GPU limit), a budget, samples from Joule's trainer.
    apply(
        kubectl, namespace, "seen", local_node, tmp_path, TRAIN,
        replicas=2, elastic={"minReplicas": 1, "maxReplicas": 2},
        scaling={"policy": "Fixed", "evaluationIntervalSeconds": 5},
        energy={"powerCapWatts": 10, "budget": "1MJ", "windowSeconds": 10,
                "minGpuPowerLimitWatts": 1},
    )  # fmt: skip
    wait_for(lambda: status(api, namespace, "seen").get("energy", {}).get("gpuPowerLimitConfirmed"),
             timeout=240, interval=1.0, what="a lowered power limit in force")  # fmt: skip

    # The workers too, by the annotations Joule puts on them: their own series.
    prom.wait_for_series('up{kubernetes_pod="seen-worker-0"} == 1', timeout=60)
    prom.wait_for_series(f'joule_trainer_samples_total{{kubernetes_namespace="{namespace}"}}',
                         timeout=60)  # fmt: skip
    board = json.loads(DASHBOARD.read_text())

    def bound(expr: str) -> str:
        return expr.replace("$namespace", namespace).replace("$job", "seen")

    # The job picker lists this job.
    picker = next(v for v in board["templating"]["list"] if v["name"] == "job")
    query = bound(picker["query"]["query"])  # label_values(joule_job_phase{...}, joule_job)
    selector = query.removeprefix("label_values(").rsplit(",", 1)[0]
    found = prom.wait_for_series(selector, timeout=60)
    assert {s["metric"]["joule_job"] for s in found} == {"seen"}

    empty = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            try:
                prom.wait_for_series(bound(target["expr"]), timeout=90)
            except AssertionError:
                empty.append(f"{panel['title']}: {target['expr']}")
    assert empty == [], "panels without data:\n" + "\n".join(empty)
    # A decision counted in the last minute, or a reason first counted then (a counter born
    # at 1 shows no change): over 10 minutes here, since the test cannot time its minute.
    annotation = board["annotations"]["list"][0]["expr"]
    decisions = bound(annotation.replace("[1m]", "[10m]").replace("offset 1m", "offset 10m"))
    marks = prom.wait_for_series(decisions, timeout=30)
    assert "PowerLimitLowered" in {m["metric"]["reason"] for m in marks}
    # The rules run: a recorded series has this job, and no operator-down alert fires.
    prom.wait_for_series(f'joule_job:power_watts:rate5m{{namespace="{namespace}"}}', timeout=60)
    assert prom.query('ALERTS{alertname="JouleOperatorDown"}') == []

    # `joule report` draws the same job from the same Prometheus: every panel with its lines,
    # and the lowered limit among its decisions; and, without Prometheus, from the job's
    # status and Events.
    png = report(namespace, "seen", tmp_path / "seen.png", "--prometheus", prom.url)
    boxes = json.loads(Image.open(png).text[PANELS_KEY])
    assert not_blank(png) > 0.02
    for title, names in {
        "Power (W)": ("power", "cap"), "Energy (J)": ("energy", "budget"),
        "Workers": ("desired", "ready"), "Throughput (samples/s)": ("throughput",),
        "GPU power limit (W)": ("limit",),
    }.items():  # fmt: skip
        for colour in colours(*names):
            assert pixels_of(png, colour, tuple(boxes[title])) > 20, (title, colour)
        assert pixels_of(png, DECISIONS, tuple(boxes[title])) > 5, title
    page = report(namespace, "seen", tmp_path / "seen.html", "--prometheus", prom.url)
    assert "<td>PowerLimitLowered</td>" in page.read_text()
    page = report(namespace, "seen", tmp_path / "status.html",
                  "--kubeconfig", str(cluster.kubeconfig))  # fmt: skip
    text = page.read_text()
    assert "status and Events" in text and "<td>PowerLimitLowered</td>" in text


def report(namespace: str, job: str, out: Path, *args: str) -> Path:
    """`joule report` as a user runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "joule", "report", job, "-n", namespace, "--since", "15m",
         "-o", str(out), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "no data for" not in proc.stderr, proc.stderr  # every panel drew something
    return out
