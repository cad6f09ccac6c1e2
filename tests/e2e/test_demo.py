"""`joule demo` (what `make demo` runs), end to end on its real node (kubelet + containerd,
root on Linux as CI runs): it builds and pushes the trainer image, brings everything up,
trains, shows the view, and leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from kubernetes import client, config

from joule.cluster import ClusterSettings, process, status
from joule.cluster.process import ProcessRecord

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


def job(name: str, replicas: int, args: list[str]) -> dict:
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
        },
    }


def write_examples(folder: Path, name: str, replicas: int, args: list[str]) -> Path:
    folder.mkdir()
    (folder / f"{name}.yaml").write_text(
        yaml.safe_dump_all([claim(name), job(name, replicas, args)])
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
    """`joule operator` processes on the demo cluster (other tests run theirs on others)."""
    want = f"KUBECONFIG={ClusterSettings(name='demo').kubeconfig}".encode()
    found = []
    for pid in _pids():
        argv = _read(pid, "cmdline").split(b"\0")
        if b"joule" in argv and b"operator" in argv and want in _read(pid, "environ").split(b"\0"):
            found.append(pid)
    return found


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
    assert "http://127.0.0.1:" in text  # the operator's metrics URL was shown
    assert "logs -f short-worker-0" in text  # where the worker logs are
    assert "stopped; nothing left running" in text
    # Both workers wrote through the one ReadWriteMany volume, as uid 1000.
    final = DEMO_DATA / "checkpoints" / "short" / "step-000000120.pt"
    assert final.is_file() and final.stat().st_uid == 1000
    assert [e["step"] for e in trainer_events("done")] == [120]
    assert workers(MARKER) == [] and demo_operators() == []
    assert demo_cluster_down()


# -- a demo that ends without Ctrl-C: a closed terminal, or killed outright --------------------

LONG = "100000"  # steps: the job never finishes while these tests look at it
SEED = "4243"  # finds these tests' workers in /proc


def long_examples(folder: Path) -> Path:
    """One tiny worker that checkpoints every step."""
    args = (
        f"--steps {LONG} --global-batch 4 --micro-batch 4 --seed {SEED} --dim 16 "
        "--layers 1 --heads 1 --block 16 --checkpoint-every-steps 1 --log-every 1"
    ).split()
    return write_examples(folder, "long", 1, args)


@pytest.mark.timeout(900)
def test_a_closed_terminal_sighup_tears_the_demo_down_as_ctrl_c_does(demos, tmp_path) -> None:
    demo, log = demos.start(long_examples(tmp_path / "examples"))
    # Up first: until then the worker logs of an earlier run may still be there.
    wait_for(lambda: "workers are starting" in log.read_text(), 600, "the examples", log)
    wait_for(lambda: trainer_events("start"), 240, "the worker to train", log)
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
