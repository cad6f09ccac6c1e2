"""The trainer's pure parts: the launch command, the batch split, checkpoints on disk."""

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from joule_trainer import batching, checkpoint
from joule_trainer.launch import backend, torchrun_argv


def test_launch_reads_the_operators_pet_contract():
    env = {
        "PET_NNODES": "1:4",
        "PET_NPROC_PER_NODE": "8",
        "PET_RDZV_BACKEND": "c10d",
        "PET_RDZV_ENDPOINT": "j-worker-0.j:29400",
        "PET_RDZV_ID": "uid",
        "PET_MAX_RESTARTS": "3",
    }
    argv = torchrun_argv(env, ["-m", "joule_trainer.train", "--steps", "5"])
    assert argv[:3] == [sys.executable, "-m", "joule_trainer.torchrun"]
    for flag in (
        "--nnodes=1:4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=j-worker-0.j:29400",
        "--rdzv-id=uid",
        "--max-restarts=3",
    ):
        assert flag in argv
    assert "--standalone" not in argv
    assert "--rdzv-conf=last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3" in argv
    custom = torchrun_argv(
        {**env, "PET_RDZV_CONF": "is_host=false,last_call_timeout=9"}, ["train.py"]
    )
    conf = next(a for a in custom if a.startswith("--rdzv-conf="))
    assert "is_host=false" in conf and "last_call_timeout=9" in conf
    assert "keep_alive_interval=2" in conf and "last_call_timeout=5" not in conf
    with pytest.raises(SystemExit, match="not key=value"):
        torchrun_argv({**env, "PET_RDZV_CONF": "oops"}, ["train.py"])
    assert argv[-4:] == ["-m", "joule_trainer.train", "--steps", "5"]


def test_launch_without_a_rendezvous_runs_standalone_and_backend_follows_hardware():
    argv = torchrun_argv({}, ["train.py"])
    assert "--standalone" in argv and "--nproc-per-node=1" in argv
    assert not any(a.startswith("--rdzv-conf") for a in argv)
    assert backend(True) == "nccl" and backend(False) == "gloo"


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_sample_of_the_global_batch_is_taken_exactly_once(world):
    seen = []
    for rank in range(world):
        s = batching.share(32, world, rank, max_micro=4)
        assert all(n <= 4 for _, n in s.micro_batches)
        for offset, n in s.micro_batches:
            seen += range(offset, offset + n)
    assert sorted(seen) == list(range(32))


def test_gradient_is_the_global_mean_whatever_the_world_size():
    # Simulate DDP: each rank's gradient of (sum of its losses) * scale, averaged over ranks.
    values = torch.arange(12.0)
    for world in (1, 2, 3, 4):
        grads = []
        for rank in range(world):
            s = batching.share(12, world, rank, max_micro=2)
            w = torch.zeros((), requires_grad=True)
            for offset, n in s.micro_batches:
                (
                    (w * values[offset : offset + n]).sum() * batching.loss_scale(12, world)
                ).backward()
            grads.append(w.grad.item())
        assert sum(grads) / world == pytest.approx(values.mean().item())


def test_batch_split_rejects_impossible_requests():
    with pytest.raises(ValueError, match="smaller than"):
        batching.share(2, 4, 0, 1)


def test_a_torn_checkpoint_is_never_loaded(tmp_path):
    checkpoint.save(tmp_path, 10, {"step": 10, "w": torch.ones(3)})
    checkpoint.save(tmp_path, 20, {"step": 20, "w": torch.ones(3) * 2})
    # A process died while writing step 30 to its final name (what rename prevents), or
    # a temporary file was left behind: neither is loaded.
    good = checkpoint.path_for(tmp_path, 20).read_bytes()
    checkpoint.path_for(tmp_path, 30).write_bytes(good[: len(good) // 2])
    (tmp_path / ".tmp-step-000000040.pt.123").write_bytes(b"partial")
    step, state = checkpoint.load_latest(tmp_path)
    assert step == 20 and torch.equal(state["w"], torch.ones(3) * 2)


def test_a_killed_saves_temporary_file_is_removed_by_the_next_save(tmp_path):
    checkpoint.save(tmp_path, 10, {"step": 10})
    an_hour_ago = time.time() - 3600
    good = checkpoint.path_for(tmp_path, 10)
    os.utime(good, (an_hour_ago, an_hour_ago))  # old, but a checkpoint: never removed
    leftover = tmp_path / ".tmp-step-000000020.pt.worker-1.4242"  # killed before we started
    leftover.write_bytes(b"partial")
    os.utime(leftover, (an_hour_ago, an_hour_ago))
    # Touched since we started: another writer still at it (an old rank 0 finishing its
    # final save on another machine that shares the volume) keeps its file.
    live = tmp_path / ".tmp-step-000000020.pt.worker-0.77"
    live.write_bytes(b"partial")
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    os.utime(other, (an_hour_ago, an_hour_ago))
    checkpoint.save(tmp_path, 30, {"step": 30}, started=time.time() - 60)
    assert not leftover.exists()
    assert live.exists() and other.exists() and good.exists()
    assert checkpoint.list_steps(tmp_path) == [10, 30]
    assert checkpoint.load_latest(tmp_path)[0] == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-000000030")]


class Planted:
    """An object whose unpickling runs a command: what a planted checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_not_executed(tmp_path, caplog):
    checkpoint.save(tmp_path, 10, {"step": 10, "w": torch.ones(3)})
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    torch.save({"step": 20, "w": Planted(marker)}, checkpoint.path_for(tmp_path, 20))
    with caplog.at_level("WARNING", logger="joule_trainer.checkpoint"):
        step, state = checkpoint.load_latest(tmp_path)
    assert not marker.exists()
    assert step == 10 and torch.equal(state["w"], torch.ones(3))
    assert "skipping unreadable checkpoint" in caplog.text and "step-000000020" in caplog.text


def test_the_cuda_rng_state_is_saved_and_restored_where_there_is_cuda(tmp_path, monkeypatch):
    from joule_trainer.train import restore_rng, rng_state

    devices = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored: list[list[torch.Tensor]] = []
    count = 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    checkpoint.save(tmp_path, 5, {"step": 5, "rng": rng_state()})
    drawn = torch.rand(3)
    _, state = checkpoint.load_latest(tmp_path)  # through the weights_only load
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), drawn)  # the CPU generator too
    assert len(restored) == 1
    assert all(torch.equal(a, b) for a, b in zip(restored[0], devices, strict=True))
    count = 4  # resumed on a machine with another number of GPUs: no pairing is right
    restore_rng(state["rng"])
    assert len(restored) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in rng_state()


def test_the_wait_for_the_final_checkpoint_is_bounded_when_rank_0_never_confirms():
    """A dead rank 0 must not hold the other ranks (and their pods) past the grace period."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from joule_trainer.train import Trainer

    logged: list[dict] = []
    rank1 = SimpleNamespace(
        world=2, rank=1, step=7, store=dist.HashStore(),
        args=SimpleNamespace(final_save_timeout=0.3),
        _log=lambda **fields: logged.append(fields),
    )  # fmt: skip
    began = time.monotonic()
    Trainer._wait_for_final_save(rank1)  # type: ignore[arg-type]
    assert time.monotonic() - began < 5
    assert logged[-1]["event"] == "final_save_waited" and logged[-1]["ok"] is False
    rank1.store.set("joule/final-save/7", "on disk")  # confirmed: the rank says it saw it
    Trainer._wait_for_final_save(rank1)  # type: ignore[arg-type]
    assert logged[-1]["ok"] is True and rank1.store.check(["joule/final-save/7/seen/1"])


def test_only_the_last_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, {"step": step}, keep=2)
    assert checkpoint.list_steps(tmp_path) == [4, 5]
    assert checkpoint.load_latest(tmp_path / "missing") is None


def test_trainer_flags_are_checked_before_anything_starts(capsys):
    from joule_trainer.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--model", "bert"])


def test_each_event_line_reaches_stdout_in_one_write(monkeypatch):
    """Ranks share one stdout; an event written as text then newline interleaves with the
    other rank's line and neither parses (seen in CI: '{...sigterm...}{...}')."""
    from types import SimpleNamespace

    from joule_trainer.train import Trainer

    writes: list[str] = []
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(write=writes.append, flush=lambda: None))
    Trainer._log(SimpleNamespace(rank=0), event="sigterm", step=25)
    assert len(writes) == 1
    assert writes[0].endswith("\n") and json.loads(writes[0])["event"] == "sigterm"


def test_launch_bounds_dns_waits_so_the_rendezvous_store_never_stalls_past_heartbeats(
    monkeypatch,
):
    """The store resolves each client's name on its only thread; glibc's default wait for a
    lost DNS answer (5 s, twice) outlasted the 6 s heartbeat tolerance in CI."""
    from joule_trainer import launch

    seen: dict = {}
    monkeypatch.setattr(launch.os, "execvpe", lambda _f, _a, env: seen.update(env))
    monkeypatch.delenv("RES_OPTIONS", raising=False)
    launch.main(["-m", "joule_trainer.train"])
    options = dict(o.split(":") for o in seen["RES_OPTIONS"].split())
    conf = dict(i.split("=") for i in launch.DEFAULT_RDZV_CONF.split(","))
    tolerance = int(conf["keep_alive_interval"]) * int(conf["keep_alive_max_attempt"])
    assert int(options["timeout"]) * int(options["attempts"]) < tolerance / 2
