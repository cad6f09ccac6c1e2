"""The comparison table (and plot) over one or more seeds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from joule.sim.engine import Result, compare, mean, p95
from joule.sim.model import workload


def run(seeds: list[int], jobs: int, gpus: int) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = defaultdict(list)
    for seed in seeds:
        for r in compare(seed, workload(seed, jobs), gpus):
            out[r.name].append(r)
    return dict(out)


def table(results: dict[str, list[Result]]) -> str:
    base = results["static-max"]
    oracle = results["oracle"]
    hpa_rescales = sum(r.rescales for r in results["hpa"])
    head = (
        f"{'policy':<18} {'energy MJ':>10} {'vs static':>9} {'J/sample':>9} {'JCT mean h':>10} "
        f"{'vs static':>9} {'JCT p95 h':>9} {'cap win %':>9} {'overruns':>8} {'misses':>6} "
        f"{'rescales':>8} {'GPU-h':>8} {'vs oracle':>9} {'unfinished':>10}"
    )
    lines = [head, "-" * len(head)]
    base_e = sum(r.energy for r in base)
    base_jct = mean([x for r in base for x in r.jct])
    oracle_e = sum(r.energy for r in oracle)
    for name, rs in results.items():
        energy = sum(r.energy for r in rs)
        samples = sum(r.samples for r in rs)
        jct = [x for r in rs for x in r.jct]
        windows = sum(r.windows for r in rs)
        over = sum(r.windows_over for r in rs)
        rescales = sum(r.rescales for r in rs)
        lines.append(
            f"{name:<18} {energy / 1e6:>10.0f} {energy / base_e - 1:>+9.1%} "
            f"{energy / samples:>9.3f} {mean(jct) / 3600:>10.2f} "
            f"{mean(jct) / base_jct - 1:>+9.1%} {p95(jct) / 3600:>9.2f} "
            f"{over / windows if windows else 0:>9.1%} {sum(r.overruns for r in rs):>8} "
            f"{sum(r.misses for r in rs):>6} {rescales:>8} {sum(r.gpu_hours for r in rs):>8.0f} "
            f"{energy / oracle_e - 1:>+9.1%} {sum(r.unfinished for r in rs):>10}"
        )
    joule = results.get("joule")
    if joule and hpa_rescales:
        lines.append("")
        lines.append(
            f"joule rescales vs hpa: {sum(r.rescales for r in joule) / hpa_rescales - 1:+.0%}"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[Result]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from None
    names = list(results)
    energy = [sum(r.energy for r in results[n]) / 1e9 for n in names]
    jct = [mean([x for r in results[n] for x in r.jct]) / 3600 for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(names, energy, color="#4c72b0")
    a.set_ylabel("energy to finish the same work (GJ)")
    b.bar(names, jct, color="#dd8452")
    b.set_ylabel("mean job completion time (h)")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Joule policy simulation (same jobs, same seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
