"""Shared by the unit tests."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def pod_metrics(monkeypatch) -> Iterator[Callable[[str], None]]:
    """A pod's /metrics served on 127.0.0.1, where the energy and scaling loop reads a pod
    (its METRICS_PORT pointed here): call it with the exposition to serve."""
    from joule import autoscaler

    served = {"text": ""}

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served["text"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(autoscaler, "METRICS_PORT", server.server_address[1])
    yield lambda text: served.update(text=text)
    server.shutdown()
