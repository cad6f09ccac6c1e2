"""Reading the workers' /metrics: in parallel, under one deadline, bounded, without a proxy."""

import http.server
import threading
import time
from typing import ClassVar

import pytest

from joule.scrape import MAX_BYTES, Target, scrape_all

EXPOSITION = (
    "# TYPE joule_trainer_steps_total counter\n"
    'joule_trainer_steps_total{rank="0"} 7\n'
    "# TYPE joule_trainer_energy_joules_total counter\n"
    'joule_trainer_energy_joules_total{rank="0",source="estimated"} 42\n'
    "# TYPE process_start_time_seconds gauge\n"
    "process_start_time_seconds 1700000000.25\n"
)


@pytest.fixture
def server():
    """One HTTP server; the path a test asks for says how it answers."""

    class Handler(http.server.BaseHTTPRequestHandler):
        behaviour: ClassVar[dict[str, str]] = {"mode": "ok"}

        def do_GET(self):
            mode = self.behaviour["mode"]
            if mode == "redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            if mode == "garbage":
                self.wfile.write(b"SECRET-TOKEN not http at all\r\n\r\n")
                return
            if mode == "drip":
                self.send_response(200)
                self.end_headers()
                for _ in range(40):  # a byte every 0.1 s: 4 s for a 1 s deadline
                    self.wfile.write(b"#")
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            if mode == "nan":
                body = EXPOSITION.replace("} 42", "} NaN").encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)
                return
            if mode == "hang":
                time.sleep(3)
            body = EXPOSITION.encode() if mode != "huge" else b"#" * (MAX_BYTES + 10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, Handler.behaviour
    srv.shutdown()


def test_a_worker_is_read_with_its_process_start_time_and_no_proxy_is_used(server, monkeypatch):
    srv, _ = server
    # A proxy for the operator's outbound traffic must not be used to reach pod IPs.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    out = scrape_all([Target("a/0", "127.0.0.1", srv.server_address[1])], 5)
    assert out["a/0"].error is None
    assert out["a/0"].reading.joules == 42 and out["a/0"].reading.started == 1700000000.25


def test_hung_workers_cost_one_deadline_together_not_one_timeout_each(server):
    srv, behaviour = server
    behaviour["mode"] = "hang"
    port = srv.server_address[1]
    targets = [Target(f"p{i}/0", "127.0.0.1", port) for i in range(4)]
    began = time.monotonic()
    out = scrape_all(targets, 1.0)
    took = time.monotonic() - began
    # In turn they would take 4 s at least; together, about one deadline.
    assert took < 2.5, f"4 hung workers took {took:.1f}s with a 1 s deadline"
    assert all(r.reading is None and r.error for r in out.values())


def test_an_oversized_response_is_refused(server):
    srv, behaviour = server
    behaviour["mode"] = "huge"
    out = scrape_all([Target("a/0", "127.0.0.1", srv.server_address[1])], 5)
    assert out["a/0"].reading is None and "larger than" in out["a/0"].error


def test_a_closed_port_is_an_error_that_says_why():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = scrape_all([Target("a/0", "127.0.0.1", port)], 2)
    assert out["a/0"].reading is None and "refused" in out["a/0"].error.lower()


@pytest.mark.parametrize("mode", ["redirect", "garbage", "nan"])
def test_a_worker_cannot_redirect_the_operator_break_the_round_or_leak_into_status(server, mode):
    srv, behaviour = server
    behaviour["mode"] = mode
    out = scrape_all([Target("a/0", "127.0.0.1", srv.server_address[1])], 5)
    result = out["a/0"]
    assert result.reading is None and result.error
    assert "169.254" not in result.error and "SECRET" not in result.error


def test_a_worker_sending_a_byte_at_a_time_keeps_to_the_deadline(server):
    srv, behaviour = server
    behaviour["mode"] = "drip"
    from joule.scrape import scrape

    began = time.monotonic()
    result = scrape("127.0.0.1", srv.server_address[1], time.monotonic() + 1.0)
    assert result.reading is None and "deadline" in result.error
    assert time.monotonic() - began < 1.8


def test_a_scripts_own_samples_counter_is_read_where_the_spec_says():
    """spec.progress: a counter the user's script serves (any name, one port per pod) stands
    in for joule_trainer's series when the energy comes from the node."""
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    from joule.api import TrainingJobSpec
    from joule.autoscaler import Autoscaler, NodeAgents
    from joule.observe import PodView
    from tests.conftest import free_port

    registry = CollectorRegistry()
    counter = Counter("imgs_seen", "images trained", ["split"], registry=registry)
    counter.labels("a").inc(300)
    counter.labels("b").inc(20)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        spec = TrainingJobSpec.parse({
            "image": "x", "gpusPerReplica": 2,
            "progress": {"samplesMetric": "imgs_seen_total", "port": port},
        })  # fmt: skip
        pod = PodView("w0", "uid0", 0, "Running", True, True, False, None, "127.0.0.1")
        scaler = Autoscaler(None, NodeAgents("ns", "x=y", 9410))  # type: ignore[arg-type]
        results, _, expected = scaler._read_workers(spec, [pod])
        assert list(results) == ["uid0/0"] == sorted(expected)  # one endpoint for the pod
        assert results["uid0/0"].reading.samples == 320
        # With the trainer's self-report, its own series are read instead, per process.
        results, _, _ = Autoscaler(None)._read_workers(spec, [pod])  # type: ignore[arg-type]
        assert list(results) == ["uid0/0", "uid0/1"]
    finally:
        server.shutdown()


def test_a_declared_samples_metric_must_be_a_metric_name():
    from joule.api import TrainingJobSpec
    from joule.api.types import SpecError

    with pytest.raises(SpecError, match=r"spec\.progress\.samplesMetric must be a Prometheus"):
        TrainingJobSpec.parse({"image": "x", "progress": {"samplesMetric": "my samples"}})
    with pytest.raises(SpecError, match=r"spec\.progress\.port must be <= 65535"):
        TrainingJobSpec.parse({"image": "x", "progress": {"samplesMetric": "s", "port": 70000}})
