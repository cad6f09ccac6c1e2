"""The trainer for real: torchrun, 2 processes, gloo on CPU. Kill, resume, resize, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from joule_trainer.launch import TORCHRUN_ENV, torchrun_argv

# The environment joule-launch gives torchrun in a pod, plus an honest CPU meter.
ENV = {**os.environ, **TORCHRUN_ENV, "JOULE_ENERGY_SOURCE": "estimated", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    *args: str,
    nnodes: str = "1",
    nproc: int = 2,
    endpoint: str | None = None,
    log: Path,
    env: dict | None = None,
    program: list[str] | None = None,
) -> subprocess.Popen:
    """torchrun as joule-launch starts it in a pod, from the operator's PET_* contract;
    ``program`` in place of the built-in trainer module."""
    pet = {"PET_NNODES": nnodes, "PET_NPROC_PER_NODE": str(nproc), "PET_MAX_RESTARTS": "3"}
    if endpoint:
        pet |= {"PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": endpoint, "PET_RDZV_ID": "test"}
    full_env = {**(env or ENV), **pet, "JOULE_MONITOR_INTERVAL": "0.5"}
    argv = torchrun_argv(full_env, [*(program or ["-m", "joule_trainer.train"]), *args])
    out = open(log, "ab")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(
        argv, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def wait_event(log: Path, pred, timeout: float = 120, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [e for e in events(log) if pred(e)]
        if hits:
            return hits[-1]
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no matching event in {log}:\n{log.read_text()[-3000:]}")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun's workers run in sessions of their
    own, so killing the agent's process group would leave them running)."""
    for child in children(pid):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def common(tmp_path: Path, steps: int, every: int = 10) -> list[str]:
    return [
        "--steps",
        str(steps),
        "--global-batch",
        "16",
        "--micro-batch",
        "4",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--checkpoint-every-steps",
        str(every),
        "--log-every",
        "5",
        "--metrics-port",
        "0",
    ]


def test_two_workers_train_the_language_model_and_the_loss_falls(tmp_path):
    log = tmp_path / "log"
    proc = torchrun(*common(tmp_path, 80, every=40), log=log)
    assert proc.wait(300) == 0, log.read_text()[-3000:]
    steps = [e for e in events(log) if e["event"] == "step"]
    assert steps[0]["world"] == 2
    first, last = steps[0]["loss"], steps[-1]["loss"]
    assert last < first - 0.5, (first, last)  # ln(96) = 4.6 at random; well below after 80
    assert steps[-1]["energy_source"] == "estimated"
    assert (tmp_path / "ckpt" / "step-000000080.pt").is_file()


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(tmp_path):
    log = tmp_path / "log"
    proc = torchrun(*common(tmp_path, 60), log=log)
    try:
        wait_event(log, lambda e: e["event"] == "checkpoint" and e["step"] >= 20, proc=proc)
        workers = children(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        resumed = wait_event(log, lambda e: e["event"] == "resumed", proc=proc)
        assert resumed["step"] >= 20  # continued, not from 0
        assert proc.wait(300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert events(log)[-1]["event"] == "done"


def test_sigterm_writes_a_final_checkpoint_within_the_grace_period(tmp_path):
    log = tmp_path / "log"
    proc = torchrun(*common(tmp_path, 100000, every=100000), log=log)
    try:
        wait_event(log, lambda e: e["event"] == "step" and e["step"] >= 15, proc=proc)
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # what the kubelet does to the container
        proc.wait(60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stop = wait_event(log, lambda e: e["event"] == "sigterm")
    assert took < 30, took  # the pod's grace period is 60 s
    assert (tmp_path / "ckpt" / f"step-{stop['step']:09d}.pt").is_file()
    assert stop["step"] >= 15


def test_after_sigterm_every_rank_waits_for_rank_0s_last_checkpoint(tmp_path):
    """A rank that left before rank 0's final save was on disk would let its torchrun agent
    tear the group down, rank 0 mid-save. Rank 0's write takes 3 s here (a slow volume): the
    other rank must leave only after it, and the checkpoint must be whole."""
    from joule_trainer import checkpoint

    log = tmp_path / "log"
    env = {**ENV, "JOULE_TEST_SAVE_DELAY": "3"}
    program = [str(Path(__file__).with_name("slow_save_trainer.py"))]
    proc = torchrun(*common(tmp_path, 100000, every=100000), log=log, env=env, program=program)
    try:
        wait_event(log, lambda e: e["event"] == "step" and e["step"] >= 10, proc=proc)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stop = wait_event(log, lambda e: e["event"] == "sigterm")
    saved = wait_event(log, lambda e: e["event"] == "checkpoint")
    assert saved["step"] == stop["step"]
    exited = {e["rank"]: e["ts"] for e in events(log) if e["event"] == "exited"}
    assert set(exited) == {0, 1}, log.read_text()[-3000:]
    assert min(exited.values()) >= saved["ts"]  # no rank left before the file was in place
    waited = {e["rank"]: e for e in events(log) if e["event"] == "final_save_waited"}
    assert set(waited) == {0, 1}, log.read_text()[-3000:]
    assert all(e["ok"] and e["step"] == stop["step"] for e in waited.values())
    assert waited[1]["waited_s"] >= 2.5  # rank 1 did wait through the slow write
    found = checkpoint.load_latest(tmp_path / "ckpt")
    assert found is not None and found[0] == stop["step"] and "model" in found[1]


def test_metrics_endpoint_exposes_training_and_estimated_energy(tmp_path):
    log = tmp_path / "log"
    port = free_port()
    args = common(tmp_path, 100000, every=100000)
    args[args.index("--metrics-port") + 1] = str(port)
    env = {**ENV, "JOULE_JOB_NAME": "demo", "JOULE_REPLICA_INDEX": "0"}
    proc = torchrun(*args, log=log, env=env, nproc=1)
    try:
        wait_event(log, lambda e: e["event"] == "step" and e["step"] >= 10, proc=proc)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            series[name_labels] = float(value)

    def value(name: str) -> tuple[str, float]:
        hits = [(k, v) for k, v in series.items() if k.startswith(name + "{")]
        assert hits, f"{name} missing from /metrics"
        return hits[0]

    labels, steps = value("joule_trainer_steps_total")
    assert steps >= 10 and 'job="demo"' in labels and 'rank="0"' in labels
    assert value("joule_trainer_samples_total")[1] >= 160
    assert 0 < value("joule_trainer_loss")[1] < 10
    assert value("joule_trainer_throughput_samples_per_second")[1] > 0
    assert value("joule_trainer_step_duration_seconds_count")[1] >= 10
    energy_labels, joules = value("joule_trainer_energy_joules_total")
    assert joules > 0 and 'source="estimated"' in energy_labels
    assert 'source="estimated"' in value("joule_trainer_power_watts")[0]
    # No GPU is measured here: utilisation and memory are unknown, so absent (a 0 would tell
    # the operator the GPU is idle).
    assert "joule_trainer_gpu_utilization_ratio" not in text
    assert "joule_trainer_gpu_memory_used_bytes" not in text


@pytest.mark.timeout(400)
def test_resize_two_to_one_to_two_resumes_with_the_same_global_batch(tmp_path):
    """Single-process "nodes" rendezvous elastically (1:2), as the operator's pods do: one
    disappears and the other carries on alone from the checkpoint; a new one joins and the
    pair resumes together. The global batch is the same at every size."""
    endpoint = f"127.0.0.1:{free_port()}"
    args = common(tmp_path, 100000, every=5)
    log_a, log_b, log_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # As in a pod group, the first agent ("worker 0") hosts the rendezvous store and stays.
    a = torchrun(*args, nnodes="1:2", nproc=1, endpoint=endpoint, log=log_a)
    time.sleep(3)
    b = torchrun(*args, nnodes="1:2", nproc=1, endpoint=endpoint, log=log_b)
    c = None
    try:
        two = wait_event(
            log_a, lambda e: e["event"] == "step" and e["world"] == 2 and e["step"] >= 10, proc=a
        )
        kill_tree(b.pid)  # a node disappears: its agent and its worker processes
        alone = wait_event(log_a, lambda e: e["event"] == "resumed" and e["world"] == 1, proc=a)
        assert alone["previous_world"] == 2
        assert alone["step"] >= two["step"] - 5  # from the checkpoint, not from 0
        wait_event(
            log_a,
            lambda e: e["event"] == "step" and e["world"] == 1 and e["step"] > alone["step"],
            proc=a,
        )
        c = torchrun(*args, nnodes="1:2", nproc=1, endpoint=endpoint, log=log_c)
        pair = wait_event(log_a, lambda e: e["event"] == "resumed" and e["world"] == 2, proc=a)
        assert pair["previous_world"] == 1 and pair["step"] > alone["step"]
        wait_event(
            log_a,
            lambda e: e["event"] == "step" and e["world"] == 2 and e["step"] > pair["step"],
            proc=a,
        )
    finally:
        for p in (a, b, c):
            if p is not None and p.poll() is None:
                kill_tree(p.pid)
    import torch

    states = [
        torch.load(path, weights_only=True)
        for path in sorted((tmp_path / "ckpt").glob("step-*.pt"))[-3:]
    ]
    assert {s["global_batch"] for s in states} == {16}
    assert states[-1]["world"] == 2
