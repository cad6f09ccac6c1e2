"""Reading the workers' /metrics: every process of a job at once, under one deadline.

One evaluation reads every worker process in parallel and waits at most ``deadline``
seconds for all of them together, so a hung worker costs one deadline, not one timeout per
process in turn, and never holds the job's reconcile. Responses larger than ``MAX_BYTES``
are refused (a worker's exposition is a few kB; a runaway one must not fill the operator's
memory), and no proxy from the environment is used: workers are reached by pod IP, and an
``HTTP_PROXY`` set for the operator's outbound traffic would send these reads elsewhere.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from joule.trainer_metrics import TrainerReading, parse_trainer_metrics

MAX_BYTES = 1 << 20
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_POOL = cf.ThreadPoolExecutor(max_workers=16, thread_name_prefix="scrape")


@dataclass(frozen=True)
class Target:
    key: str  # what the caller knows this process by
    ip: str
    port: int


@dataclass(frozen=True)
class Result:
    reading: TrainerReading | None  # None: nothing trained yet, or unreadable (see error)
    error: str | None = None  # why it could not be read; None when it answered


def scrape(ip: str, port: int, timeout: float) -> Result:
    """One process's /metrics."""
    try:
        with _OPENER.open(f"http://{ip}:{port}/metrics", timeout=timeout) as response:
            body = response.read(MAX_BYTES + 1)
    except OSError as exc:
        return Result(None, _why(exc))
    if len(body) > MAX_BYTES:
        return Result(None, f"response larger than {MAX_BYTES} bytes")
    try:
        return Result(parse_trainer_metrics(body.decode()))
    except (ValueError, UnicodeDecodeError) as exc:
        return Result(None, f"unparseable /metrics: {exc}")


def scrape_all(targets: Sequence[Target], deadline: float) -> dict[str, Result]:
    """Every target's Result, read in parallel; those not done by ``deadline`` seconds from
    now are reported as timed out."""
    end = time.monotonic() + deadline
    futures = {t.key: _POOL.submit(scrape, t.ip, t.port, deadline) for t in targets}
    cf.wait(futures.values(), timeout=max(end - time.monotonic(), 0.0))
    out: dict[str, Result] = {}
    for key, future in futures.items():
        if future.done():
            out[key] = future.result()
        else:
            future.cancel()
            out[key] = Result(None, f"no answer within {deadline:g}s")
    return out


def _why(exc: OSError) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc) or type(exc).__name__
