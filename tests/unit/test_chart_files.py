"""The chart's files agree with the rest of the tree (no Helm needed for these)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "joule"


def test_the_charts_version_is_the_packages():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == version
    assert chart["appVersion"] == version


def test_the_charts_crds_are_the_top_level_crds():
    # crds/ is the source; the chart carries a copy (Helm, Argo CD and Flux all need the file
    # inside the chart, and Flux refuses links that leave it).
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == top
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/joule/crds/{name} differs from crds/{name}: cp crds/{name} charts/joule/crds/"
        )


def test_the_rules_file_and_dashboard_parse_and_use_only_exported_series():
    from prometheus_client import REGISTRY

    from joule import metrics  # noqa: F401  (registers the operator's series)

    exported = {m.name for m in REGISTRY.collect()} | {"joule_operator_jobs"}
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = {word for word in _words(expr) if word.startswith("joule_")}
        for name in names:
            base = name.removesuffix("_bucket").removesuffix("_total")
            assert base in exported or name in exported, f"{name} in {expr!r} is not exported"


def _words(expr: str) -> list[str]:
    import re

    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
