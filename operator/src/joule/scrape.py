"""Reading the workers' /metrics: every process of a job at once, under one deadline.

One evaluation reads every worker process in parallel and waits at most ``deadline``
seconds for all of them together, so a hung worker costs one deadline, not one timeout per
process in turn, and never holds the job's reconcile. Responses larger than ``MAX_BYTES``
are refused (a worker's exposition is a few kB; a runaway one must not fill the operator's
memory), and no proxy from the environment is used: workers are reached by pod IP, and an
``HTTP_PROXY`` set for the operator's outbound traffic would send these reads elsewhere.
Redirects are not followed (a worker's image is the user's: it must not steer the operator
to another address), and an error never quotes what a worker sent. Each read keeps to the
deadline as a whole, not per socket operation, so a worker sending a byte at a time cannot
hold one of the shared threads past it; a read still queued at the deadline is not started.
"""

from __future__ import annotations

import concurrent.futures as cf
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from joule.trainer_metrics import parse_trainer_metrics

MAX_BYTES = 1 << 20
CHUNK = 64 * 1024
_OPENER = urllib.request.OpenerDirector()  # plain HTTP: no proxy, no redirect
for _handler in (
    urllib.request.HTTPHandler(),
    urllib.request.HTTPDefaultErrorHandler(),
    urllib.request.HTTPErrorProcessor(),
):
    _OPENER.add_handler(_handler)
_POOL = cf.ThreadPoolExecutor(max_workers=32, thread_name_prefix="scrape")


@dataclass(frozen=True)
class Target:
    key: str  # what the caller knows this process by
    ip: str
    port: int


@dataclass(frozen=True)
class Result:
    # What ``parse`` made of it (a TrainerReading by default); None: nothing trained yet,
    # or unreadable (see error).
    reading: Any
    error: str | None = None  # why it could not be read; None when it answered


Parse = Callable[[str], Any]


def scrape(ip: str, port: int, end: float, parse: Parse = parse_trainer_metrics) -> Result:
    """One process's /metrics, read by ``end`` (time.monotonic())."""
    if time.monotonic() >= end:
        return Result(None, "not read: the deadline passed while it waited its turn")
    body = b""
    try:
        timeout = max(end - time.monotonic(), 0.05)
        with _OPENER.open(f"http://{ip}:{port}/metrics", timeout=timeout) as response:
            while len(body) <= MAX_BYTES:
                if time.monotonic() >= end:
                    return Result(None, "the response did not finish by the deadline")
                chunk = response.read1(CHUNK)
                if not chunk:
                    break
                body += chunk
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Result(None, _why(exc))
    if len(body) > MAX_BYTES:
        return Result(None, f"response larger than {MAX_BYTES} bytes")
    try:
        return Result(parse(body.decode()))
    except (ValueError, UnicodeDecodeError) as exc:
        # The reason's kind only: the text may carry whatever the worker sent.
        return Result(None, f"unparseable /metrics ({type(exc).__name__})")


def scrape_all(
    targets: Sequence[Target], deadline: float, parse: Parse = parse_trainer_metrics
) -> dict[str, Result]:
    """Every target's Result, read in parallel; those not done by ``deadline`` seconds from
    now are reported as timed out."""
    end = time.monotonic() + deadline
    futures = {t.key: _POOL.submit(scrape, t.ip, t.port, end, parse) for t in targets}
    cf.wait(futures.values(), timeout=max(end - time.monotonic(), 0.0))
    out: dict[str, Result] = {}
    for key, future in futures.items():
        if future.done():
            try:
                out[key] = future.result()
            except Exception as exc:  # one worker's reply never fails the whole evaluation
                out[key] = Result(None, f"unreadable ({type(exc).__name__})")
        else:
            future.cancel()
            out[key] = Result(None, f"no answer within {deadline:g}s")
    return out


def _why(exc: Exception) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"  # not its body, nor where a redirect pointed
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP response ({type(exc).__name__})"
    reason = getattr(exc, "reason", None)
    return str(reason or exc) or type(exc).__name__
