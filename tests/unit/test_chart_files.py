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


def exported_series() -> set[str]:
    """Every series name Joule exports: the operator's (its job series for a job with every
    figure set), the node agent's (a GPU held by a pod) and the rules' recorded ones."""
    from prometheus_client import REGISTRY, CollectorRegistry

    from joule import metrics  # noqa: F401  (registers the operator's series)
    from joule.api import TrainingJobSpec
    from joule.job_metrics import JobSeries, figures
    from joule.nodeagent.exporter import Snapshot, SnapshotCollector
    from joule.nodeagent.gpu import GpuReading
    from joule.nodeagent.ledger import Holder, Record
    from joule.nodeagent.limits import Refusal

    names = {m.name for m in REGISTRY.collect()} | {"joule_operator_jobs"}
    jobs = JobSeries()
    spec = TrainingJobSpec.parse({"image": "x", "energy": {"powerCapWatts": 10, "budget": 100,
                                  "gpuPowerLimitWatts": 5}})  # fmt: skip
    energy = {"consumedJoules": 1.0, "samples": 2.0, "averageWatts": 3.0, "source": "node"}
    status = {"energy": energy, "conditions": [{"type": "Ready", "status": "True"}]}
    jobs.set("ns", "j", figures(spec, status))
    jobs.decided("ns", "j", "ScaleUp")
    agent = SnapshotCollector()
    held = [Holder("u", "ns", "p", "j")]
    agent.snapshot = Snapshot(
        "n", "simulated", 0.0,
        gpus={"G": GpuReading("G", 0, "x", 1.0, 2.0, 0.5, 3.0, 4.0, 5.0, 6.0, 1.0, 7.0)},
        holders={"G": held}, requested={"G": 5.0}, refused={"G": Refusal(5.0, "no", 0.0)},
        ledger={("u", "G"): Record("u", "ns", "p", "j", "G", 0.0, 1.0, last_time=0.0)},
        cpu_joules={"package-0": 1.0}, errors={"update": 1}, unmeasured={"MIG-x": held},
    )  # fmt: skip
    for collector in (jobs, agent):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        names |= {m.name for m in registry.collect() if m.samples}
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    return names | {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def test_the_rules_file_and_dashboard_parse_and_use_only_exported_series():
    exported = exported_series()
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert exprs
    for expr in exprs:
        words = {word for word in _words(expr) if word.startswith(("joule_", "joule:"))}
        names = words - {"joule_job"}  # the label, not a series
        for name in names:
            base = name.removesuffix("_bucket").removesuffix("_total")
            assert base in exported or name in exported, f"{name} in {expr!r} is not exported"


def _words(expr: str) -> list[str]:
    import re

    return re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
