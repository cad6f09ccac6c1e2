"""The `helm` CLI, built once from its published Go module and cached like the control plane.

The chart's tests (lint, template, install, upgrade, rollback, uninstall) run this real Helm
against the local API server; nothing stands in for it.
"""

from __future__ import annotations

from pathlib import Path

from joule.cluster.build import BuildError, Progress, _find_go, _go_json, _stderr, go_install
from joule.cluster.settings import cache_dir

HELM_VERSION = "v3.22.0"
HELM_MODULE = "helm.sh/helm/v3"
# The Prometheus Operator's CRDs, so that the chart's ServiceMonitor and PrometheusRule can be
# checked by the real API server. Its module carries them; the Go proxy serves it.
PROMETHEUS_OPERATOR = "github.com/prometheus-operator/prometheus-operator@v0.85.0"
MONITORING_CRDS = ("servicemonitors", "prometheusrules")


def helm_binary(version: str = HELM_VERSION, root: Path | None = None) -> Path:
    """Where Helm of this version lives in the cache (built or not)."""
    return (root or cache_dir()) / "helm" / version / "bin" / "helm"


def ensure_helm(
    version: str = HELM_VERSION, progress: Progress | None = None, root: Path | None = None
) -> Path:
    """The cached helm binary, building it first if it is missing (about 4 minutes cold on
    2 cores; its module has no replace lines, so `go install pkg@version` works)."""
    target = helm_binary(version, root)
    if not target.is_file():
        say = progress or _stderr
        say(f"building helm {version} once into {target.parent}")
        # `helm version` reports what the release build stamps in; go install stamps nothing.
        stamp = f"-ldflags=-s -w -X {HELM_MODULE}/internal/version.version={version}"
        go_install(
            _find_go(),
            [[f"{HELM_MODULE}/cmd/helm@{version}"]],
            target.parent,
            f"helm {version}",
            say,
            flags=[[stamp]],
        )
        if not target.is_file():
            raise BuildError(f"go install {HELM_MODULE}/cmd/helm@{version} left no {target}")
    return target


def monitoring_crds(module: str = PROMETHEUS_OPERATOR) -> list[Path]:
    """The ServiceMonitor and PrometheusRule CRDs, from the Prometheus Operator's module in
    the Go module cache (downloaded once)."""
    folder = Path(_go_json(_find_go(), ["mod", "download", "-json", module], Path.cwd())["Dir"])
    files = [
        folder / "example" / "prometheus-operator-crd" / f"monitoring.coreos.com_{name}.yaml"
        for name in MONITORING_CRDS
    ]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise BuildError(f"{module} has no {', '.join(missing)}")
    return files
