"""The real Prometheus and promtool, built from their Go module: the server reports the release
it was built from, scrapes an endpoint the test serves and answers PromQL over its HTTP API,
and promtool accepts the configuration we generate. No Kubernetes cluster is involved."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from joule.cluster.prometheus import (
    PROMETHEUS_VERSION,
    duration,
    release_version,
    scrape_config,
)
from tests.conftest import free_port

# The first run builds Prometheus (minutes, cold) inside the first test's setup.
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture
def app():
    """A tiny exporter on a free port with its own registry: (address, my_counter)."""
    registry = CollectorRegistry()
    counter = Counter("my_counter", "Incremented by the test.", registry=registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{port}", counter
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_the_binaries_report_the_release_they_were_built_from(prometheus_tools):
    release = release_version(PROMETHEUS_VERSION)
    for binary in prometheus_tools:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=True
        )
        assert f"version {release}" in out.stdout + out.stderr, (binary, out)


def test_it_scrapes_a_counter_and_answers_promql(prometheus_server, app):
    address, counter = app
    counter.inc(5)
    prom = prometheus_server({"app": [address]}, interval_s=1.0)

    [series] = prom.wait_for_series("my_counter_total", timeout=30)
    assert series["metric"]["job"] == "app"
    assert series["metric"]["instance"] == address
    assert float(series["value"][1]) == 5.0
    assert [float(s["value"][1]) for s in prom.query('up{job="app"}')] == [1.0]

    # rate() needs two samples in its window: keep counting across a few scrapes.
    deadline = time.monotonic() + 30
    rate: list[dict] = []
    while not rate and time.monotonic() < deadline:
        counter.inc(10)
        time.sleep(0.5)
        rate = prom.query("rate(my_counter_total[10s]) > 0")
    assert rate, prom.tail()
    assert float(rate[0]["value"][1]) > 0
    assert float(prom.query("my_counter_total")[0]["value"][1]) > 5.0


def test_promtool_accepts_the_generated_config(prometheus_tools, tmp_path: Path):
    promtool = prometheus_tools[1]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        scrape_config({"operator": ["127.0.0.1:9100"], "agent": ["10.0.0.1:9400"]}, 0.5)
    )
    out = subprocess.run(
        [str(promtool), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr

    # And the real checker agrees when something is wrong: a timeout longer than the interval.
    config.write_text(config.read_text().replace("scrape_timeout: 500ms", "scrape_timeout: 5s"))
    bad = subprocess.run(
        [str(promtool), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode != 0 and "scrape timeout greater than scrape interval" in bad.stdout + (
        bad.stderr
    )


def test_scrape_config_refuses_what_prometheus_would_misread():
    assert duration(2.0) == "2s" and duration(0.25) == "250ms"
    with pytest.raises(ValueError, match="not host:port"):
        scrape_config({"app": ["http://127.0.0.1:9100/metrics"]})
    with pytest.raises(ValueError, match="job name"):
        scrape_config({"an app": ["127.0.0.1:9100"]})
    with pytest.raises(TypeError):
        scrape_config({"app": "127.0.0.1:9100"})
    with pytest.raises(ValueError):
        duration(0)
