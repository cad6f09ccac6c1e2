"""joule_trainer.report: a user's own training loop tells Joule its progress in one call.

In process, the endpoint says what the operator's parser needs and claims no energy (the node
agent measures that); under torchrun, a plain DDP script's ranks each serve their own.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from joule_trainer.report import Reporter

from joule.trainer_metrics import parse_trainer_metrics
from tests.trainer.test_torchrun import ENV, events, free_port, torchrun, wait_event

ROOT = Path(__file__).resolve().parents[2]
# `joule_trainer.report` is the function (the package exports it), so the module by its name.
REPORT_MODULE = sys.modules[Reporter.__module__]


def scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


def value(reporter: Reporter, name: str) -> float | None:
    return reporter.metrics.registry.get_sample_value(name, reporter.metrics.labels)


def env_for(port: int, **more: str) -> dict[str, str]:
    return {"JOULE_METRICS_PORT": str(port), "JOULE_METRICS_ADDR": "127.0.0.1", **more}


def test_the_endpoint_says_what_the_operator_reads_and_claims_no_energy():
    port = free_port()
    env = env_for(port, JOULE_JOB_NAME="mine", JOULE_REPLICA_INDEX="3", RANK="5", WORLD_SIZE="8")
    reporter = Reporter(env)
    try:
        reporter.report(16)
        text = scrape(port)
        first = parse_trainer_metrics(text)
        assert first is not None and (first.steps, first.samples) == (1, 16)
        assert first.loss is None  # not reported: absent, not 0
        assert "joule_trainer_loss" not in text
        for _ in range(3):
            time.sleep(0.05)
            reporter.report(16, loss=2.5)
        reporter.report(32, steps=2, loss=1.25)
        text = scrape(port)
        assert value(reporter, "joule_trainer_world_size") == 8
    finally:
        reporter.close()
    reading = parse_trainer_metrics(text)
    assert reading is not None
    assert (reading.rank, reading.steps, reading.samples, reading.loss) == (5, 6, 96, 1.25)
    assert 0 < reading.throughput < 80 / 0.15 * 1.01  # 80 samples after the first in >= 0.15 s
    assert reading.started is not None and reading.started <= time.time()
    gpu = "0" if torch.cuda.is_available() else "none"  # as the built-in trainer labels it
    assert reporter.metrics.labels == {"job": "mine", "replica": "3", "rank": "5", "gpu": gpu}
    # No meter here: no power or energy series at all, so nothing claims a source. The
    # parser reads that as watts None, joules 0.0 (its default for an absent counter) and
    # source "?" (unknown): the operator's energy for such a worker comes from elsewhere.
    assert "joule_trainer_energy" not in text and "joule_trainer_power" not in text
    assert 'source="' not in text
    assert (reading.watts, reading.joules, reading.source) == (None, 0.0, "?")


def test_the_first_call_starts_one_endpoint_for_the_process(monkeypatch):
    import joule_trainer

    port = free_port()
    for key, value in env_for(port, LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(REPORT_MODULE, "_reporter", None)
    try:
        joule_trainer.report(samples=8)
        reporter = REPORT_MODULE._reporter
        joule_trainer.report(samples=8, loss=0.5)
        assert REPORT_MODULE._reporter is reporter and reporter.port == port
        reading = parse_trainer_metrics(scrape(port))
    finally:
        if REPORT_MODULE._reporter is not None:
            REPORT_MODULE._reporter.close()
    assert reading is not None and (reading.steps, reading.samples, reading.loss) == (2, 16, 0.5)


def test_the_base_port_follows_the_built_in_trainers_knob_and_the_local_rank():
    base = free_port()
    reporter = Reporter(env_for(base - 1, LOCAL_RANK="1"))
    try:
        assert reporter.port == base
        reporter.report(1)
        assert parse_trainer_metrics(scrape(base)) is not None
    finally:
        reporter.close()
    off = Reporter({"JOULE_METRICS_PORT": "0"})  # 0 turns it off, as for `train`
    off.report(1)
    assert off.port is None


def test_a_taken_port_costs_the_metrics_not_the_training(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        reporter = Reporter(env_for(port))
        for _ in range(3):
            reporter.report(4, loss=1.0)
    err = capsys.readouterr().err
    assert reporter.port is None
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "continues" in err


def test_throughput_is_the_rate_over_the_last_ten_seconds(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(REPORT_MODULE, "time", SimpleNamespace(monotonic=lambda: now[0]))
    reporter = Reporter({"JOULE_METRICS_PORT": "0"})

    def at(t: float, samples: float) -> float:
        now[0] = 1000.0 + t
        reporter.report(samples)
        return value(reporter, "joule_trainer_throughput_samples_per_second") or 0.0

    assert at(0, 10) == 0  # one call: no interval yet
    assert at(1, 10) == 10
    for t in range(2, 30):
        rate = at(t, 100)
    assert rate == pytest.approx(100)  # the slow start has left the window
    assert at(30.5, 50) == pytest.approx(950 / 10.5)  # from t=20: >= 10 s back
    # Steps slower than the window: the rate of the last interval, never 0 between them.
    assert at(90.5, 300) == pytest.approx(300 / 60)
    assert at(120.5, 300) == pytest.approx(300 / 30)
    # A fast loop keeps a bounded window, not one point per call.
    for k in range(20_000):
        now[0] = 1121 + k * 1e-3
        reporter.report(1)
    assert len(reporter._points) <= 10 / 0.1 + 2
    assert value(reporter, "joule_trainer_throughput_samples_per_second") == pytest.approx(
        1000, rel=0.02
    )


def test_concurrent_calls_are_all_counted():
    reporter = Reporter({"JOULE_METRICS_PORT": "0"})

    def loop() -> None:
        for _ in range(2000):
            reporter.report(3, loss=1.0)

    threads = [threading.Thread(target=loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert value(reporter, "joule_trainer_steps_total") == 16_000
    assert value(reporter, "joule_trainer_samples_total") == 48_000


@pytest.mark.parametrize("samples, steps", [(-1, 1), (math.nan, 1), (math.inf, 1), (1, -1)])
def test_impossible_counts_are_refused(samples, steps):
    reporter = Reporter({"JOULE_METRICS_PORT": "0"})
    with pytest.raises(ValueError, match="must be >= 0"):
        reporter.report(samples, steps=steps)
    assert value(reporter, "joule_trainer_samples_total") == 0


def test_importing_the_package_starts_nothing_and_loads_neither_torch_nor_prometheus():
    """`joule-launch` imports the package before it execs torchrun: it must stay light."""
    code = (
        "import sys, joule_trainer\n"
        "assert callable(joule_trainer.report)\n"
        "print(sorted(m for m in ('torch', 'prometheus_client') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_examples_differ_by_the_one_call_and_its_import():
    scripts = ROOT / "examples" / "scripts"
    plain = (scripts / "plain_ddp.py").read_text().splitlines()
    reporting = (scripts / "ddp_with_report.py").read_text().splitlines()
    changed = [
        line
        for line in difflib.unified_diff(plain, reporting, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    assert changed == ["+import joule_trainer", "+        joule_trainer.report(samples=args.batch)"]
    assert not any("joule" in line for line in plain if line.startswith(("import", "from")))


# A user's DDP script: torch, and the one call. Every rank stops at the same step once the
# stop file exists (an all-reduce of the flag), so the group finishes cleanly.
PLAIN_DDP = """
import json, os, sys, time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from joule_trainer import report

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(nn.Linear(8, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
stop, step = sys.argv[1], 0


def say(**fields):
    # One write per line: two ranks share stdout, and print() can split a line in two.
    sys.stdout.write(json.dumps({"rank": rank, **fields}) + "\\n")
    sys.stdout.flush()


while True:
    loss = model(torch.randn(4, 8)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step += 1
    report(samples=4, loss=loss.item())
    say(event="step", step=step)
    flag = torch.tensor([float(os.path.exists(stop))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        break
    time.sleep(0.02)
say(event="done", step=step)
dist.destroy_process_group()
# As joule_trainer.train's exit_now: gloo sometimes aborts in static destructors at exit.
os._exit(0)
"""


def free_port_pair() -> int:
    """A base port with the next one free too (local ranks 0 and 1)."""
    for _ in range(50):
        base = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", base + 1))
            return base
    raise RuntimeError("no two consecutive free ports")


def test_a_plain_ddp_script_under_torchrun_serves_each_ranks_progress(tmp_path):
    script, stop, log = tmp_path / "plain_ddp.py", tmp_path / "stop", tmp_path / "log"
    script.write_text(PLAIN_DDP)
    base = free_port_pair()
    env = {**ENV, **env_for(base, JOULE_JOB_NAME="plain", JOULE_REPLICA_INDEX="0")}
    proc = torchrun(log=log, env=env, program=[str(script), str(stop)])
    try:
        for rank in (0, 1):
            wait_event(log, lambda e, r=rank: e.get("rank") == r and e["step"] >= 10, proc=proc)
        texts = {rank: scrape(base + rank) for rank in (0, 1)}
        stop.touch()
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for rank, text in texts.items():
        reading = parse_trainer_metrics(text)
        assert reading is not None and reading.rank == rank
        # The two counters are read one after the other, while the rank trains on.
        assert reading.steps >= 10 and abs(reading.samples - 4 * reading.steps) <= 4
        assert reading.throughput > 0 and reading.loss is not None
        assert reading.source == "?" and "joule_trainer_energy" not in text
        assert 'job="plain"' in text
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    assert all(json.loads(line) for line in lines)  # no two ranks' lines merged into one
    done = {e["rank"]: e["step"] for e in events(log) if e["event"] == "done"}
    assert set(done) == {0, 1} and done[0] == done[1]
