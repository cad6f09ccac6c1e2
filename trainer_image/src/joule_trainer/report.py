"""Progress from any training script: ``joule_trainer.report(samples=n)`` after each step.

The operator learns a job's progress from every worker process's /metrics (port 9090 plus
the local rank), which the built-in trainer (``train``) serves. A user's own loop serves the
same series by calling ``report``: the first call starts the endpoint, on the port, address
and labels the built-in trainer uses, from the same environment. It exports progress only:
there is no meter here (the node agent measures the energy), so no power or energy series,
and no loss until one is reported (see ``metrics``).

Cheap enough for every step (two counters and a clock, under a lock; no I/O) and safe for the
loop: a taken port costs the metrics, with one warning on stderr, never the training.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the first call needs them: `import joule_trainer` stays light
    from wsgiref.simple_server import WSGIServer

    from joule_trainer.metrics import TrainerMetrics

WINDOW_SECONDS = 10.0  # throughput is the rate over about this much of the recent past
_RESOLUTION_SECONDS = 0.1  # the window keeps one point per this much time: bounded memory

_lock = threading.Lock()
_reporter: Reporter | None = None


def report(samples: int | float, *, steps: int = 1, loss: float | None = None) -> None:
    """Count ``samples`` (this process's share) and ``steps`` done since the last call, and
    set the training ``loss`` if given. The first call starts /metrics on 9090 + LOCAL_RANK.

    Numbers, not tensors: pass ``loss.item()`` where the loop has it anyway (a tensor is
    converted, which waits for the GPU)."""
    reporter = _reporter
    if reporter is None:
        reporter = _start()
    reporter.report(samples, steps=steps, loss=loss)


def _start() -> Reporter:
    global _reporter
    with _lock:
        if _reporter is None:
            _reporter = Reporter(os.environ)
        return _reporter


class Reporter:
    """One process's progress series and their endpoint. ``report`` uses one per process;
    tests make their own from an environment of their choosing."""

    def __init__(self, env: Mapping[str, str]) -> None:
        from joule_trainer.metrics import TrainerMetrics

        local_rank = int(env.get("LOCAL_RANK", "0"))
        self.metrics: TrainerMetrics = TrainerMetrics.create(
            env.get("JOULE_JOB_NAME", "local"),
            env.get("JOULE_REPLICA_INDEX", "0"),
            int(env.get("RANK", "0")),
            str(local_rank) if _cuda() else "none",
            None,  # no meter: the energy is the node's to measure
            loss_from_start=False,
        )
        self.metrics.world_size.set(int(env.get("WORLD_SIZE", "1")))
        self._lock = threading.Lock()
        self._samples = 0.0
        # (monotonic time, samples counted by then): the oldest point is at or just before
        # the window's start, so that the rate always spans at least one interval.
        self._points: deque[tuple[float, float]] = deque()
        self.port: int | None = None
        self._server: WSGIServer | None = None
        base = int(env.get("JOULE_METRICS_PORT", "9090"))  # 0 turns it off, as in `train`
        if base:
            self._serve(base + local_rank, env.get("JOULE_METRICS_ADDR", "0.0.0.0"))

    def _serve(self, port: int, addr: str) -> None:
        try:
            self._server, _ = self.metrics.serve(port, addr)
        except OSError as exc:  # the port is taken: train on, without metrics
            sys.stderr.write(
                f"joule_trainer.report: no /metrics on {addr}:{port} ({exc}); training "
                "continues, but Joule cannot see its progress\n"
            )
            return
        self.port = port

    def report(self, samples: int | float, *, steps: int = 1, loss: float | None = None) -> None:
        samples = float(samples)
        if not (math.isfinite(samples) and samples >= 0) or steps < 0:
            raise ValueError(f"report: samples={samples}, steps={steps}: must be >= 0")
        now = time.monotonic()
        m = self.metrics
        with self._lock:
            m.samples.inc(samples)
            m.steps.inc(steps)
            if loss is not None:
                m.loss.set(float(loss))
            self._samples += samples
            points = self._points
            if not points or now - points[-1][0] >= _RESOLUTION_SECONDS:
                points.append((now, self._samples))
            while len(points) > 2 and points[1][0] <= now - WINDOW_SECONDS:
                points.popleft()
            then, before = points[0]
            if now > then:
                m.throughput.set((self._samples - before) / (now - then))

    def close(self) -> None:
        """Stop serving /metrics (the process's exit does too: the server is a daemon)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _cuda() -> bool:
    """Whether this process trains on a GPU, as the built-in trainer decides it: the gpu
    label is the local rank there and "none" otherwise."""
    import torch

    return torch.cuda.is_available()
