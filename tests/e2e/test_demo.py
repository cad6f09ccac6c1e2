"""`joule demo` (what `make demo` runs), end to end on its real node (kubelet + containerd,
root on Linux as CI runs): it builds and pushes the trainer image, brings everything up,
trains, shows the view, and leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from kubernetes import client, config
from PIL import Image

from joule.cluster import ClusterSettings, process, status
from joule.cluster.nodeconfig import run_key
from joule.cluster.process import ProcessRecord
from joule.report.draw import PANELS_KEY
from joule.report.model import PANELS
from tests.report_checks import DECISIONS, colours, not_blank, pixels_of

DEMO_DATA = Path("/tmp/joule-demo")
MARKER = "4242"  # a seed no other test uses: finds this demo's workers in /proc
CLAIM_CLASS = "joule-local-rwx"  # the demo makes a ReadWriteMany volume for each such claim
T = TypeVar("T")


@pytest.fixture(scope="module", autouse=True)
def trainer_image() -> None:
    """The trainer image built (or found cached) first, so that the demos' timeouts do not
    include a cold build (minutes: torch from PyPI). The demo builds it the same way."""
    from joule.images import ensure_trainer

    ensure_trainer(progress=lambda m: print(f"joule: {m}", flush=True))


def claim(job: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{job}-checkpoints"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": CLAIM_CLASS,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }


def job(name: str, replicas: int, args: list[str], **spec: object) -> dict:
    return {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": "ghcr.io/joule-dev/trainer:0.1.0",
            "args": args,
            "env": [
                {"name": "OMP_NUM_THREADS", "value": "1"},
                {"name": "JOULE_ENERGY_SOURCE", "value": "estimated"},
            ],
            "replicas": replicas,
            "gpusPerReplica": 1,
            "sharedMemory": "64Mi",
            "checkpoint": {"path": "/checkpoints", "volume": "c"},
            "volumes": [
                {"name": "c", "persistentVolumeClaim": {"claimName": f"{name}-checkpoints"}}
            ],
            **spec,
        },
    }


def write_examples(folder: Path, name: str, replicas: int, args: list[str], **spec: object) -> Path:
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(
        yaml.safe_dump_all([claim(name), job(name, replicas, args, **spec)])
    )
    return folder


def _read(pid: int, what: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / what).read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def workers(marker: str) -> list[int]:
    """The workers' processes (in their containers, seen from here) by their --seed."""
    return [
        pid for pid in _pids() if b"--seed" in (argv := _read(pid, "cmdline").split(b"\0"))
        and marker.encode() in argv
    ]  # fmt: skip


def demo_operators() -> list[int]:
    """`joule operator` processes in the demo node's pods (found by the node's cgroup: other
    tests run theirs on other clusters' nodes)."""
    demo = ClusterSettings(name="demo")
    root = f"/joule-{run_key(demo.name, demo.state_dir)}/".encode()
    found = []
    for pid in _pids():
        argv = _read(pid, "cmdline").split(b"\0")
        is_operator = any(a.endswith(b"joule") for a in argv) and b"operator" in argv
        if is_operator and root in _read(pid, "cgroup"):
            found.append(pid)
    return found


def prometheus_url(log: Path) -> str:
    """The demo's Prometheus, as its output names it."""
    found = re.search(r"Prometheus: (http://127\.0\.0\.1:\d+)", log.read_text())
    assert found, f"the demo did not say where Prometheus is:\n{log.read_text()[-3000:]}"
    return found.group(1)


def prometheus_get(url: str, path: str, **params: str) -> dict:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{query}", timeout=10) as response:
        return json.load(response)["data"]


def series_names(url: str) -> set[str]:
    """The sample names a target serves (a counter's ``_created`` is no series in
    Prometheus 3 unless asked for)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        s.name
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def cluster_processes() -> list[ProcessRecord]:
    """The demo cluster's processes (control plane, containerd, kubelet, registry, ...)."""
    info = status(ClusterSettings(name="demo"))
    return list(info.processes) if info else []


def demo_cluster_down() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "joule", "cluster", "status", "--name", "demo"],
        capture_output=True,
        text=True,
    )
    return out.returncode == 1 and "not running" in out.stdout


def trainer_events(event: str) -> list[dict]:
    """Rank 0's JSON log lines of one kind, from the demo's copies of its pods' logs (CRI
    format: <time> <stream> <P|F> <text>)."""
    found = []
    for log in (DEMO_DATA / "logs" / "pods").glob("*/*/*.log"):
        for line in log.read_text(errors="replace").splitlines():
            text = line.split(" ", 3)[-1]
            if text.startswith("{") and f'"event": "{event}"' in text:
                with contextlib.suppress(ValueError):
                    found.append(json.loads(text))
    return found


def wait_for(predicate: Callable[[], T], timeout: float, what: str, log: Path) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; demo output:\n{log.read_text()[-4000:]}")


def identity(pid: int) -> ProcessRecord:
    record = process.record("p", pid)
    assert record is not None, f"pid {pid} is gone"
    return record


def job_uid(name: str) -> str:
    kubeconfig = str(ClusterSettings(name="demo").kubeconfig)
    with config.new_client_from_config(config_file=kubeconfig) as api:
        body = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "joule.dev", "v1alpha1", "default", "trainingjobs", name
        )
    return str(body["metadata"]["uid"])


class Demos:
    """`joule demo` processes started by a test, their output in files; whatever a failed test
    leaves (the demo, its operator, the cluster with its workers) goes at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen] = []

    def start(self, examples: Path, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.tmp_path / f"demo-{len(self.started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "joule", "demo", "--examples", str(examples), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                # As from a terminal, even where this test runs under nohup: the demo keeps
                # an ignored SIGHUP ignored.
                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
            )
        self.started.append(proc)
        return proc, log

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in demo_operators():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "joule", "cluster", "down", "--name", "demo"])


@pytest.fixture
def demos(tmp_path: Path) -> Iterator[Demos]:
    made = Demos(tmp_path)
    yield made
    made.cleanup()


@pytest.mark.timeout(900)
def test_joule_demo_trains_the_examples_and_tears_everything_down(demos, tmp_path):
    args = ["--steps", "120", "--global-batch", "16", "--seed", MARKER]
    examples = write_examples(tmp_path / "examples", "short", 2, args)
    demo, log = demos.start(examples, "--until-done", "--timeout", "780")
    assert demo.wait(840) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "first training step" in text
    assert "short" in text and "Succeeded" in text
    assert "Prometheus: http://127.0.0.1:" in text  # where to look was shown
    assert "logs -f short-worker-0" in text  # where the worker logs are
    assert "stopped; nothing left running" in text
    # Both workers wrote through the one ReadWriteMany volume, as uid 1000.
    final = DEMO_DATA / "checkpoints" / "short" / "step-000000120.pt"
    assert final.is_file() and final.stat().st_uid == 1000
    assert [e["step"] for e in trainer_events("done")] == [120]
    # A `joule report` of the job, from the demo's Prometheus, kept after the teardown.
    png = DEMO_DATA / "reports" / "short.png"
    assert f"report of default/short: {png.with_suffix('.html')}" in text
    boxes = json.loads(Image.open(png).text[PANELS_KEY])
    assert list(boxes) == list(PANELS) and not_blank(png) > 0.02
    # A fixed job without energy limits is not measured: its workers and decisions show.
    workers_box = tuple(boxes["Workers"])
    for colour in colours("target", "ready"):
        assert pixels_of(png, colour, workers_box) > 20, colour
    assert pixels_of(png, DECISIONS, workers_box) > 20
    assert workers(MARKER) == [] and demo_operators() == []
    assert demo_cluster_down()


def prometheus_sees_every_joule_series(url: str, log: Path) -> None:
    """The demo's Prometheus scrapes the operator, the node agent and the worker, found by
    discovery, and holds every series each of them serves, the job's among them."""

    def targets() -> dict[str, str] | None:
        active = prometheus_get(url, "/api/v1/targets", state="active")["activeTargets"]
        up = {t["labels"].get("kubernetes_pod", ""): t["scrapeUrl"] for t in active
              if t["health"] == "up"}  # fmt: skip
        agent = [p for p in up if p.startswith("joule-node-agent-")]
        operator = [p for p in up if p.startswith("joule-") and p not in agent]
        return up if agent and operator and "long-worker-0" in up else None

    up = wait_for(targets, 120, "Prometheus to scrape the operator, agent and worker", log)
    wanted = {"joule_job_phase", "joule_job_energy_joules_total",
              "joule_node_pod_gpu_energy_joules_total", "joule_trainer_samples_total"}  # fmt: skip

    def missing() -> set[str]:
        served = set().union(*(series_names(u) for u in up.values()))
        names = set(prometheus_get(url, "/api/v1/label/__name__/values"))
        return {n for n in served if n.startswith("joule_")} - names | (wanted - names)

    deadline = time.monotonic() + 90
    while (gone := missing()) and time.monotonic() < deadline:
        time.sleep(2)
    assert not gone, f"series the demo's Prometheus lacks: {sorted(gone)}"
    job = prometheus_get(url, "/api/v1/query", query='joule_job_phase{joule_job="long"} == 1')
    assert [r["metric"]["phase"] for r in job["result"]] == ["Running"]


# -- a demo that ends without Ctrl-C: a closed terminal, or killed outright --------------------

LONG = "100000"  # steps: the job never finishes while these tests look at it
SEED = "4243"  # finds these tests' workers in /proc


def long_examples(folder: Path) -> Path:
    """One tiny worker that checkpoints every step, with a budget it never reaches: a job
    with energy limits is measured (its joule_job_energy_* series)."""
    args = (
        f"--steps {LONG} --global-batch 4 --micro-batch 4 --seed {SEED} --dim 16 "
        "--layers 1 --heads 1 --block 16 --checkpoint-every-steps 1 --log-every 1"
    ).split()
    return write_examples(
        folder, "long", 1, args, energy={"budget": "100MJ", "windowSeconds": 10},
        scaling={"evaluationIntervalSeconds": 5},
    )  # fmt: skip


@pytest.mark.timeout(900)
def test_a_closed_terminal_sighup_tears_the_demo_down_as_ctrl_c_does(demos, tmp_path) -> None:
    demo, log = demos.start(long_examples(tmp_path / "examples"))
    # Up first: until then the worker logs of an earlier run may still be there.
    wait_for(lambda: "workers are starting" in log.read_text(), 600, "the examples", log)
    wait_for(lambda: trainer_events("start"), 240, "the worker to train", log)
    prometheus_sees_every_joule_series(prometheus_url(log), log)
    started = [identity(p) for p in demo_operators() + workers(SEED)]
    node = cluster_processes()
    assert len(started) >= 2 and node, (started, node)
    # Closing a terminal sends SIGHUP twice: the kernel to the foreground group, and the
    # shell to its jobs. The second lands in the teardown and must not cut it short.
    demo.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    demo.send_signal(signal.SIGHUP)
    assert demo.wait(180) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "stopped; nothing left running" in text, text[-4000:]
    # The job went first: the kubelet sent the worker SIGTERM, and it checkpointed and said so.
    (stopped,) = trainer_events("sigterm")
    assert (DEMO_DATA / "checkpoints" / "long" / f"step-{stopped['step']:09d}.pt").is_file()
    assert [r for r in [*started, *node] if process.alive(r)] == []
    assert demo_operators() == workers(SEED) == []
    assert demo_cluster_down()


@pytest.mark.timeout(1200)
def test_a_demo_killed_outright_is_cleaned_up_by_the_next_one(demos, tmp_path) -> None:
    examples = long_examples(tmp_path / "examples")
    first, log = demos.start(examples)
    # Up first: until then the checkpoints of an earlier run may still be there.
    wait_for(lambda: "workers are starting" in log.read_text(), 600, "the examples", log)
    checkpoints = DEMO_DATA / "checkpoints" / "long"
    wait_for(lambda: list(checkpoints.glob("*.pt")), 240, "a first checkpoint", log)
    old_uid = job_uid("long")
    old = [identity(p) for p in demo_operators()] + cluster_processes()
    old_workers = [identity(p) for p in workers(SEED)]
    assert len(demo_operators()) == 1 and old_workers
    first.kill()  # nothing tears down: the operator and the cluster with its worker outlive it
    first.wait()
    assert all(process.alive(r) for r in [*old, *old_workers])

    second, log = demos.start(examples)
    wait_for(lambda: "workers are starting" in log.read_text(), 600, "the examples", log)
    assert [r for r in old if process.alive(r)] == [], "the old operator or cluster runs on"
    assert [r for r in old_workers if process.alive(r)] == []
    assert "stopped what a previous demo left running" in log.read_text()
    assert len(demo_operators()) == 1
    new_uid = job_uid("long")
    assert new_uid != old_uid  # a new job, not the old one applied over
    started = wait_for(lambda: trainer_events("start"), 240, "the new worker to train", log)
    assert [e["step"] for e in started] == [0]  # from scratch, not from the old checkpoint
    assert trainer_events("resumed") == []
    assert len(demo_operators()) == 1

    second.send_signal(signal.SIGINT)
    assert second.wait(180) == 0, log.read_text()[-4000:]
    assert demo_operators() == workers(SEED) == []
    assert demo_cluster_down()
