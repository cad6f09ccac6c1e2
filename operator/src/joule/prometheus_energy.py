"""Energy from a Prometheus the cluster already has (the ``prometheus`` energy source): one
PromQL query per evaluation, for the job's running workers.

The query returns, per series, a cumulative energy in joules; each series names its pod in
``pod_label``. Two kinds of counter exist, and they differ in what a pod's first reading
means (``counter``):

- ``pod``: the counter starts with the pod (Joule's node agent; Kepler's per-pod counters):
  its whole value is the pod's.
- ``device``: the GPU's own counter, since its driver loaded (dcgm-exporter's
  ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION``): the first reading is a baseline, and only what
  it adds after counts. The energy a pod used before the operator first read it (at most one
  evaluation interval after it started running) is not counted.

The query text has ``$namespace`` and ``$pods`` (a regex alternation of the workers' names)
filled in. The presets are the queries for the exporters named; ``custom`` takes the user's.
"""

from __future__ import annotations

import json
import math
import string
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from joule.scrape import _OPENER, MAX_BYTES

COUNTER_KINDS = ("pod", "device")


@dataclass(frozen=True)
class PromQuery:
    url: str  # the Prometheus server, e.g. http://prometheus-operated.monitoring:9090
    query: str  # PromQL with $namespace and $pods
    pod_label: str = "pod"
    counter: str = "pod"  # pod | device (see the module's docstring)
    meter: str = "prometheus"  # what status.energy.meter says


PRESETS: dict[str, PromQuery] = {
    # Joule's node agents, scraped by the cluster's Prometheus.
    "joule": PromQuery(
        "",
        "sum by (pod, pod_uid, gpu) (joule_node_pod_gpu_energy_joules_total{"
        'namespace="$namespace",pod=~"$pods"})',
        pod_label="pod",
        counter="pod",
        meter="prometheus/joule",
    ),
    # NVIDIA dcgm-exporter with its Kubernetes pod mapping (labels namespace, pod): the
    # GPU's counter in millijoules since the driver loaded.
    "dcgm": PromQuery(
        "",
        'sum by (pod, gpu) (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{namespace="$namespace",'
        'pod=~"$pods"}) / 1000',
        pod_label="pod",
        counter="device",
        meter="prometheus/dcgm",
    ),
}


def configured(url: str, preset: str, query: str, pod_label: str, counter: str) -> PromQuery:
    """The query a preset names ("custom": the user's), with any setting given overriding
    the preset's."""
    base = PRESETS.get(preset, PromQuery("", "", meter="prometheus"))
    return PromQuery(
        url=url,
        query=query or base.query,
        pod_label=pod_label or base.pod_label,
        counter=counter or base.counter,
        meter=base.meter,
    )


class QueryError(RuntimeError):
    """Prometheus could not be asked, or answered something else than a vector."""


def render(query: PromQuery, namespace: str, pods: Iterable[str]) -> str:
    names = "|".join(sorted(pods))  # DNS labels: nothing to escape in a regex
    return string.Template(query.query).safe_substitute(namespace=namespace, pods=names)


@dataclass(frozen=True)
class Series:
    key: str  # the series' labels but the pod's name: where its counter is kept
    joules: float
    uid: str | None = None  # its pod_uid label, where it has one


def parse_vector(body: Mapping[str, object], pod_label: str) -> dict[str, list[Series]]:
    """The query's answer as pod name -> its series. Pure. A series that names its pod's
    UID (``pod_uid``) can be told from a namesake's: a worker replaced under the same name
    while Prometheus still holds the old one's last sample."""
    if body.get("status") != "success":
        raise QueryError(f"Prometheus said {body.get('errorType')}: {body.get('error')}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        kind = data.get("resultType") if isinstance(data, dict) else None
        raise QueryError(f"the energy query must return an instant vector, not {kind}")
    out: dict[str, list[Series]] = {}
    for series in data.get("result") or []:
        labels = dict(series.get("metric") or {})
        pod = labels.get(pod_label)
        if not pod:
            raise QueryError(f"a series of the energy query has no {pod_label!r} label: {labels}")
        value = float(series["value"][1])
        if not math.isfinite(value) or value < 0:
            raise QueryError(f"the energy of {pod} is not a finite, non-negative counter")
        key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != pod_label)
        out.setdefault(pod, []).append(Series(key, value, labels.get("pod_uid")))
    return out


def query_energy(
    query: PromQuery, namespace: str, pods: Iterable[str], timeout: float
) -> dict[str, list[Series]]:
    """Ask Prometheus (I/O); pod name -> its series."""
    promql = render(query, namespace, pods)
    url = f"{query.url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            raw = response.read(MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        # Prometheus explains a bad query in the body: that is what the user needs to see.
        try:
            raw = exc.read(MAX_BYTES + 1)
        except OSError:
            raise QueryError(f"Prometheus at {query.url}: HTTP {exc.code}") from None
    except OSError as exc:
        raise QueryError(f"Prometheus at {query.url}: {getattr(exc, 'reason', exc)}") from None
    if len(raw) > MAX_BYTES:
        raise QueryError(f"Prometheus's answer is larger than {MAX_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise QueryError(f"Prometheus at {query.url} did not answer JSON") from None
    return parse_vector(body, query.pod_label)
