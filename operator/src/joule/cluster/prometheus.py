"""Prometheus and promtool, built once from their published Go module and cached like Helm.

The tests that check what the operator, the node agent and the trainer expose run this real
Prometheus against them and ask it PromQL over its HTTP API; promtool checks the configuration
and rules we generate. Nothing stands in for either.

Prometheus publishes its Go module as ``github.com/prometheus/prometheus`` with versions
``v0.3MM.P`` for release ``3.MM.P`` (v0.316.0 is Prometheus 3.16.0). The module has no
``replace`` lines, so ``go install pkg@version`` builds it. The web UI's assets are built with
npm upstream and are not in the module; without the ``builtinassets`` build tag the server
still serves its HTTP API, ``/metrics`` and ``/-/ready``; only the UI's pages answer 500
("Error opening React index.html").
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from joule.cluster.build import BuildError, Progress, _find_go, _fmt_elapsed, _stderr, go_install
from joule.cluster.settings import cache_dir

PROMETHEUS_VERSION = "v0.316.0"  # Prometheus 3.16.0
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
# Kept briefly: a test's server lives for seconds to minutes, its data folder is temporary.
RETENTION = "1h"

_MODULE_VERSION = re.compile(r"v0\.3(\d{2})\.(\d+)(-[0-9A-Za-z.-]+)?")
_JOB = re.compile(r"^[A-Za-z0-9_.:-]+$")


def release_version(version: str = PROMETHEUS_VERSION) -> str:
    """The Prometheus release a module version is (``v0.316.0`` -> ``3.16.0``), as
    ``prometheus --version`` reports it."""
    match = _MODULE_VERSION.fullmatch(version)
    if not match:
        raise ValueError(f"Prometheus module versions look like v0.316.0, got {version!r}")
    minor, patch, pre = match.groups()
    return f"3.{int(minor)}.{patch}{pre or ''}"


def prometheus_binaries(
    version: str = PROMETHEUS_VERSION, root: Path | None = None
) -> tuple[Path, Path]:
    """Where prometheus and promtool of this version live in the cache (built or not)."""
    bin_dir = (root or cache_dir()) / "prometheus" / version / "bin"
    return bin_dir / "prometheus", bin_dir / "promtool"


def ensure_prometheus(
    version: str = PROMETHEUS_VERSION, progress: Progress | None = None, root: Path | None = None
) -> tuple[Path, Path]:
    """The cached prometheus and promtool binaries, building both first if either is missing
    (about 6 minutes cold on 2 cores, seconds with a warm Go build cache)."""
    binaries = prometheus_binaries(version, root)
    if not all(path.is_file() for path in binaries):
        say = progress or _stderr
        release = release_version(version)
        bin_dir = binaries[0].parent
        say(f"building Prometheus {release} ({PROMETHEUS_MODULE}@{version}) once into {bin_dir}")
        # The release build's tags, less `builtinassets` (the UI assets are not in the module);
        # `netgo` is the pure-Go resolver the release binaries use.
        stamp = f"-ldflags=-s -w -X github.com/prometheus/common/version.Version={release}"
        started = time.monotonic()
        go_install(
            _find_go(),
            [[f"{PROMETHEUS_MODULE}/cmd/{name}@{version}" for name in ("prometheus", "promtool")]],
            bin_dir,
            f"prometheus {version}",
            say,
            flags=[["-tags=netgo", stamp]],
        )
        missing = [str(path) for path in binaries if not path.is_file()]
        if missing:
            raise BuildError(f"go install {PROMETHEUS_MODULE}@{version} left no {missing}")
        say(f"Prometheus {release} built in {_fmt_elapsed(time.monotonic() - started)}")
    return binaries


def prometheus_argv(binary: Path, config: Path, data: Path, port: int) -> list[str]:
    """A throwaway local server: the configuration ``config`` (see ``scrape_config``), its
    samples in ``data``, the HTTP API and ``/-/ready`` on ``127.0.0.1:<port>`` only.

    Everything else is Prometheus's default. Retention is set in the configuration file (see
    ``scrape_config``): the ``--storage.tsdb.retention.time`` flag is deprecated in 3.x.
    """
    return [
        str(binary),
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def scrape_config(
    targets: Mapping[str, Sequence[str]], interval_s: float = 2.0, retention: str = RETENTION
) -> str:
    """A prometheus.yml with one static scrape job per entry (job name -> ``host:port``s),
    scraping and evaluating every ``interval_s`` (the scrape timeout is the interval), and
    keeping samples for ``retention``."""
    jobs = []
    for job, addresses in targets.items():
        if not _JOB.match(job):
            raise ValueError(f"job name {job!r}: use letters, digits and _.:-")
        if isinstance(addresses, str):
            raise TypeError(f"job {job!r}: targets must be a list of host:port, not a string")
        for address in addresses:
            if "://" in address or "/" in address or ":" not in address:
                raise ValueError(f"job {job!r}: target {address!r} is not host:port")
        jobs.append({"job_name": job, "static_configs": [{"targets": list(addresses)}]})
    return _config(interval_s, retention, jobs)


def kubernetes_config(
    kubeconfig: Path,
    rule_files: Sequence[Path] = (),
    interval_s: float = 2.0,
    retention: str = RETENTION,
) -> str:
    """A prometheus.yml that finds what to scrape as Prometheus does in a cluster: every pod
    annotated ``prometheus.io/scrape: "true"`` (the chart's operator and node agents), at
    its ``prometheus.io/port`` and ``prometheus.io/path``, discovered through the API server
    of ``kubeconfig``. The pod's namespace and name become ``kubernetes_namespace`` and
    ``kubernetes_pod``, not ``namespace`` and ``pod``: Joule's series carry those of the
    pods they describe, and a target label of the same name would rename them
    ``exported_*``. ``rule_files`` are evaluated (Joule's alerts and recording rules)."""
    meta = "__meta_kubernetes_pod_"
    job = {
        "job_name": "kubernetes-pods",
        "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
        "relabel_configs": [
            {"source_labels": [f"{meta}annotation_prometheus_io_scrape"], "action": "keep",
             "regex": "true"},
            {"source_labels": [f"{meta}phase"], "action": "keep", "regex": "Running"},
            {"source_labels": ["__address__", f"{meta}annotation_prometheus_io_port"],
             "regex": r"([^:]+)(?::\d+)?;(\d+)", "replacement": "$1:$2",
             "target_label": "__address__"},
            {"source_labels": [f"{meta}annotation_prometheus_io_path"], "regex": "(.+)",
             "target_label": "__metrics_path__"},
            {"source_labels": ["__meta_kubernetes_namespace"],
             "target_label": "kubernetes_namespace"},
            {"source_labels": [f"{meta}name"], "target_label": "kubernetes_pod"},
        ],
    }  # fmt: skip
    return _config(interval_s, retention, [job], rule_files)


def _config(
    interval_s: float,
    retention: str,
    jobs: list[dict[str, Any]],
    rule_files: Sequence[Path] = (),
) -> str:
    """A prometheus.yml: scraping and evaluating every ``interval_s`` (the scrape timeout is
    the interval), keeping samples for ``retention``."""
    interval = duration(interval_s)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "storage": {"tsdb": {"retention": {"time": retention}}},
    }
    if rule_files:
        config["rule_files"] = [str(f) for f in rule_files]
    config["scrape_configs"] = jobs
    return yaml.safe_dump(config, sort_keys=False)


def duration(seconds: float) -> str:
    """A Prometheus duration (whole units only): ``2.0`` -> ``2s``, ``0.5`` -> ``500ms``."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"a duration must be at least 1ms, got {seconds!r}s")
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"
