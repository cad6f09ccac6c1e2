"""`joule demo` (what `make demo` runs), end to end with a short job: it brings everything
up, trains, shows the view, and leaves nothing running."""

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

from joule.cluster import ClusterSettings, process
from joule.cluster.process import ProcessRecord

MARKER = "4242"  # a seed no other test uses: finds this demo's processes in /proc


def job(checkpoints: Path) -> dict:
    return {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "short"},
        "spec": {
            "image": "ghcr.io/joule-dev/trainer:0.1.0",
            "args": ["--steps", "120", "--global-batch", "16", "--seed", MARKER],
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "replicas": 2,
            "gpusPerReplica": 1,
            "sharedMemory": "64Mi",
            "checkpoint": {"path": "/checkpoints", "volume": "c"},
            "volumes": [{"name": "c", "hostPath": {"path": str(checkpoints)}}],
        },
    }


def demo_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--seed" in argv and MARKER.encode() in argv:
            found.append(entry.name)
    return found


@pytest.mark.timeout(600)
def test_joule_demo_trains_the_examples_and_tears_everything_down(tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "short.yaml").write_text(yaml.safe_dump(job(tmp_path / "ckpt")))
    argv = [sys.executable, "-m", "joule", "demo", "--until-done", "--timeout", "400"]
    out = subprocess.run(
        [*argv, "--examples", str(examples)],
        capture_output=True,
        text=True,
        timeout=560,
        env={**os.environ, "JOULE_ENERGY_SOURCE": "estimated"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "first training step" in text
    assert "short" in text and "Succeeded" in text
    assert "http://127.0.0.1:" in text  # the operator's metrics URL was shown
    assert "stopped; nothing left running" in text
    assert (tmp_path / "ckpt" / "step-000000120.pt").is_file()
    assert demo_processes() == []
    status = subprocess.run(
        [sys.executable, "-m", "joule", "cluster", "status", "--name", "demo"],
        capture_output=True,
        text=True,
    )
    assert status.returncode == 1 and "not running" in status.stdout


# -- a demo that ends without Ctrl-C: a closed terminal, or killed outright --------------------

DEMO_DATA = Path("/tmp/joule-demo")
LONG = "100000"  # steps: the job never finishes while these tests look at it
SEED = "4243"  # finds these tests' workers in /proc
T = TypeVar("T")


def long_job(name: str, marker: str) -> dict:
    """One tiny worker that checkpoints every step, into the demo's own data dir."""
    return {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": "ghcr.io/joule-dev/trainer:0.1.0",
            "args": (
                f"--steps {LONG} --global-batch 4 --micro-batch 4 --seed {marker} --dim 16 "
                "--layers 1 --heads 1 --block 16 --checkpoint-every-steps 1 --log-every 1"
            ).split(),
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "replicas": 1,
            "gpusPerReplica": 1,
            "sharedMemory": "64Mi",
            "checkpoint": {"path": "/checkpoints", "volume": "c"},
            "volumes": [{"name": "c", "hostPath": {"path": str(DEMO_DATA / "checkpoints" / name)}}],
        },
    }


def _read(pid: int, what: str) -> bytes:
    try:
        return (Path("/proc") / str(pid) / what).read_bytes()
    except OSError:
        return b""


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def demo_operators() -> list[int]:
    """`joule operator` processes on the demo cluster (other tests run theirs on others)."""
    want = f"KUBECONFIG={ClusterSettings(name='demo').kubeconfig}".encode()
    found = []
    for pid in _pids():
        argv = _read(pid, "cmdline").split(b"\0")
        if b"joule" in argv and b"operator" in argv and want in _read(pid, "environ").split(b"\0"):
            found.append(pid)
    return found


def demo_node_agents() -> list[int]:
    return [
        pid
        for pid in _pids()
        if b"node-agent" in (argv := _read(pid, "cmdline").split(b"\0"))
        and str(DEMO_DATA / "node").encode() in argv
    ]


def workers(marker: str) -> list[int]:
    return [
        pid for pid in _pids() if b"--seed" in (argv := _read(pid, "cmdline").split(b"\0"))
        and marker.encode() in argv
    ]  # fmt: skip


def wait_for(predicate: Callable[[], T], timeout: float, what: str, log: Path) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; demo output:\n{log.read_text()[-4000:]}")


def trainer_events(event: str) -> list[dict]:
    """The workers' JSON log lines of one kind, from every pod of the current demo."""
    found = []
    for log in DEMO_DATA.glob("node/pods/*/trainer.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"event": "{event}"' in line:
                found.append(json.loads(line))
    return found


def demo_cluster_down() -> bool:
    status = subprocess.run(
        [sys.executable, "-m", "joule", "cluster", "status", "--name", "demo"],
        capture_output=True,
        text=True,
    )
    return status.returncode == 1 and "not running" in status.stdout


class Demos:
    """`joule demo` processes started by a test, their output in files; whatever a failed test
    leaves (the demo, its operator, node agent and workers, the cluster) goes at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.examples = tmp_path / "examples"
        self.examples.mkdir()
        (self.examples / "long.yaml").write_text(yaml.safe_dump(long_job("long", SEED)))
        self.started: list[subprocess.Popen] = []

    def start(self) -> tuple[subprocess.Popen, Path]:
        log = self.tmp_path / f"demo-{len(self.started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "joule", "demo", "--examples", str(self.examples)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "JOULE_ENERGY_SOURCE": "estimated"},
                # As from a terminal, even where this test runs under nohup: the demo keeps
                # an ignored SIGHUP ignored.
                preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
            )
        self.started.append(proc)
        return proc, log

    def orphan(self, home: Path) -> ProcessRecord:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            env={**os.environ, "HOME": str(home)},
        )
        self.started.append(proc)
        return identity(proc.pid)

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in demo_operators() + demo_node_agents() + workers(SEED):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "joule", "cluster", "down", "--name", "demo"])


@pytest.fixture
def demos(tmp_path: Path) -> Iterator[Demos]:
    made = Demos(tmp_path)
    yield made
    made.cleanup()


def job_uid(name: str) -> str:
    kubeconfig = str(ClusterSettings(name="demo").kubeconfig)
    with config.new_client_from_config(config_file=kubeconfig) as api:
        job = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "joule.dev", "v1alpha1", "default", "trainingjobs", name
        )
    return str(job["metadata"]["uid"])


def identity(pid: int) -> ProcessRecord:
    record = process.record("p", pid)
    assert record is not None, f"pid {pid} is gone"
    return record


@pytest.mark.timeout(300)
def test_a_closed_terminal_sighup_tears_the_demo_down_as_ctrl_c_does(demos: Demos) -> None:
    demo, log = demos.start()
    # Up first: until then the worker logs of an earlier run may still be there.
    wait_for(lambda: "workers are starting" in log.read_text(), 180, "the examples", log)
    wait_for(lambda: trainer_events("start"), 240, "the worker to train", log)
    started = [identity(p) for p in demo_operators() + demo_node_agents() + workers(SEED)]
    assert len(started) >= 3, started
    # Closing a terminal sends SIGHUP twice: the kernel to the foreground group, and the
    # shell to its jobs. The second lands in the teardown and must not cut it short.
    demo.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    demo.send_signal(signal.SIGHUP)
    assert demo.wait(120) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "stopped; nothing left running" in text, text[-4000:]
    assert [r for r in started if process.alive(r)] == []
    assert demo_operators() == demo_node_agents() == workers(SEED) == []
    assert demo_cluster_down()


@pytest.mark.timeout(420)
def test_a_demo_killed_outright_is_cleaned_up_by_the_next_one(demos: Demos) -> None:
    first, log = demos.start()
    # Up first: until then the checkpoints of an earlier run may still be there.
    wait_for(lambda: "workers are starting" in log.read_text(), 180, "the examples", log)
    checkpoints = DEMO_DATA / "checkpoints" / "long"
    wait_for(lambda: list(checkpoints.glob("*.pt")), 240, "a first checkpoint", log)
    old_uid = job_uid("long")
    old = [identity(p) for p in demo_operators() + demo_node_agents()]
    assert len(old) == 2, old
    old_workers = [identity(p) for p in workers(SEED)]
    first.kill()  # nothing tears down: operator, node agent and worker outlive it
    first.wait()
    # And a worker whose node agent died before it (killed with its process group, OOM): only
    # its home in the node agent's pod directory says whose it is.
    orphan = demos.orphan(DEMO_DATA / "node" / "pods" / "default_gone_0")
    assert all(process.alive(r) for r in [*old, *old_workers, orphan])

    second, log = demos.start()
    wait_for(lambda: "workers are starting" in log.read_text(), 180, "the examples", log)
    assert [r for r in old if process.alive(r)] == [], "the old operator or node agent runs on"
    assert [r for r in [*old_workers, orphan] if process.alive(r)] == []
    assert "stopped what a previous demo left running" in log.read_text()
    assert len(demo_operators()) == 1 and len(demo_node_agents()) == 1
    new_uid = job_uid("long")
    assert new_uid != old_uid  # a new job, not the old one applied over
    started = wait_for(lambda: trainer_events("start"), 180, "the new worker to train", log)
    assert [e["step"] for e in started] == [0]  # from scratch, not from the old checkpoint
    assert trainer_events("resumed") == []
    assert len(demo_operators()) == 1 and len(demo_node_agents()) == 1

    second.send_signal(signal.SIGINT)
    assert second.wait(120) == 0, log.read_text()[-4000:]
    assert demo_operators() == demo_node_agents() == workers(SEED) == []
    assert demo_cluster_down()
