"""The simulator compares strategies fairly, and Joule's policy keeps its promises there."""

from joule.sim.engine import compare
from joule.sim.model import ARCHETYPES, speed, workload
from joule.sim.report import plot, run, table


def test_energy_per_sample_is_u_shaped_in_the_power_limit():
    kind = ARCHETYPES[0]
    jps = {f: kind.joules_per_sample(2, f) for f in (0.4, 0.7, 1.0)}
    assert jps[0.7] < jps[0.4] and jps[0.7] < jps[1.0]
    assert speed(1.0) == 1.0 and speed(0.7) < 1.0


def test_every_strategy_does_the_same_work_and_static_ones_never_resize():
    jobs = workload(7, 12)
    results = {r.name: r for r in compare(7, jobs, 64)}
    total = sum(j.kind.samples for j in jobs)
    for r in results.values():
        assert r.unfinished == 0, r.name
        assert abs(r.samples - total) / total < 1e-9, r.name
    assert results["static-max"].rescales == 0 and results["oracle"].rescales == 0
    # The oracle's choice is never worse than running everything at full size.
    assert results["oracle"].energy < results["static-max"].energy


def test_joule_keeps_caps_and_uses_less_energy_than_static_max():
    results = run([1, 2], 30, 64)
    joule = results["joule"]
    assert sum(r.windows_over for r in joule) <= 0.01 * sum(r.windows for r in joule)
    assert sum(r.energy for r in joule) < sum(r.energy for r in results["static-max"])


def test_the_table_and_the_plot(tmp_path):
    results = run([3], 8, 64)
    text = table(results)
    for name in ("static-max", "hpa", "pollux", "static+powerlimit", "joule", "oracle"):
        assert name in text
    png = tmp_path / "sim.png"
    plot(results, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
