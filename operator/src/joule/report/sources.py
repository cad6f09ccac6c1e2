"""Where a report's data comes from: a Prometheus that scrapes the operator (the history of
the job's series), or else the API server (the job's status and its Events)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from joule.api.types import JobRef
from joule.builders.bookkeeping import bookkeeping_name, read_bookkeeping
from joule.constants import GROUP, KIND, PLURAL, VERSION
from joule.report.model import (
    DECISIONS_QUERY,
    Report,
    decisions_from_counters,
    decisions_from_events,
    matrix_line,
    queries,
    selector,
    status_panels,
    step_for,
)


class SourceError(RuntimeError):
    """The data could not be read; the message says from where and why."""


def query_range(url: str, promql: str, start: float, end: float, step: float) -> list[dict]:
    """``data.result`` of a range query (a matrix: series with ``values``)."""
    params = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": step})
    address = f"{url.rstrip('/')}/api/v1/query_range?{params}"
    try:
        with urllib.request.urlopen(address, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as err:  # a bad query: Prometheus says why in the body
        detail = err.read().decode(errors="replace")[:300]
        raise SourceError(f"Prometheus at {url} refused {promql!r}: {err.code} {detail}") from None
    except (OSError, ValueError) as err:
        raise SourceError(f"could not ask Prometheus at {url}: {err}") from None
    if body.get("status") != "success" or body.get("data", {}).get("resultType") != "matrix":
        raise SourceError(f"Prometheus at {url} answered {promql!r} with {str(body)[:300]}")
    return list(body["data"]["result"])


def from_prometheus(url: str, namespace: str, job: str, start: float, end: float) -> Report:
    step = step_for(end - start)
    panels = {
        title: [
            matrix_line(name, query_range(url, promql, start, end, step))
            for name, promql in lines.items()
        ]
        for title, lines in queries(namespace, job).items()
    }
    counters = query_range(
        url, DECISIONS_QUERY.replace("$sel", selector(namespace, job)), start, end, step
    )
    report = Report(
        namespace, job, start, end, f"Prometheus {url}, one point every {step:.0f}s",
        panels, decisions_from_counters(counters, start),
    )  # fmt: skip
    if len(report.empty_panels()) == len(panels):
        raise SourceError(
            f"Prometheus at {url} has no joule_job_* series for {namespace}/{job} in this "
            "window: does it scrape the operator, and is the job's name right?"
        )
    return report


def from_cluster(api: Any, namespace: str, job: str, start: float, now: float) -> Report:
    """The job's status and Events, read with a kubernetes ``ApiClient``."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    try:
        body = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    except ApiException as err:
        if err.status == 404:
            raise SourceError(f"no TrainingJob {namespace}/{job}") from None
        raise SourceError(f"could not read TrainingJob {namespace}/{job}: {err.reason}") from None
    uid = body["metadata"]["uid"]
    events = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind={KIND},involvedObject.name={job}"
    ).items
    ours = [
        {
            "reason": e.reason, "message": e.message, "count": e.count,
            "firstTimestamp": e.first_timestamp, "lastTimestamp": e.last_timestamp,
            "eventTime": e.event_time,
        }
        for e in events
        if e.involved_object.uid == uid  # not a deleted namesake's
    ]  # fmt: skip
    status = dict(body.get("status") or {})
    # The power window's points are the operator's bookkeeping, in the job's ConfigMap.
    try:
        kept = read_bookkeeping(
            core.read_namespaced_config_map(bookkeeping_name(JobRef(job, namespace, uid)),
                                            namespace).to_dict()
        )  # fmt: skip
    except ApiException:  # not measured yet, or not readable by this user: no window
        kept = {}
    status["energy"] = {**(status.get("energy") or {}), "window": kept.get("window") or []}
    panels = status_panels(body.get("spec") or {}, status, now)
    return Report(
        namespace, job, start, now, "the job's status and Events (no history: give --prometheus)",
        panels, decisions_from_events(ours, start),
        notes=[
            "Without Prometheus: energy, power and throughput over the policy's window only; "
            "the other figures as they are now.",
        ],
    )  # fmt: skip
