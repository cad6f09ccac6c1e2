"""A checkpoint directory that cannot take a checkpoint: full or read-only, on real file
systems (a small tmpfs, remounted read-only; root only, as mounting is). A failed save leaves
nothing behind and no earlier checkpoint touched; the trainer says so in one line and exits
74, and a restart finds it before its first step."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from joule_trainer import checkpoint

from tests.trainer.test_torchrun import ENV, common, events, torchrun


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``, unmounted on the way out."""
    # CI runs as root (as the real node needs): a test that cannot mount fails, never skips.
    assert os.geteuid() == 0, "mounting a tmpfs needs root; run the tests as root, as CI does"
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path}: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def free(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def state(step: int, kib: int) -> dict:
    return {"step": step, "w": torch.full((kib * 256,), float(step))}  # kib KiB of float32


def temps(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.startswith(checkpoint.TEMP_PREFIX)]


def test_a_save_that_finds_the_disk_full_leaves_nothing_and_the_earlier_checkpoints_whole(
    tmp_path,
):
    with tmpfs(tmp_path / "ckpt", "64k") as ckpt:
        checkpoint.save(ckpt, 10, state(10, 20))
        checkpoint.save(ckpt, 20, state(20, 20))
        room = free(ckpt)
        assert room < 20 * 1024  # the third cannot fit
        with pytest.raises(OSError) as failed:
            checkpoint.save(ckpt, 30, state(30, 20))
        # The OSError itself, not torch.save's RuntimeError("unexpected pos") around it.
        assert type(failed.value) is OSError and failed.value.errno == errno.ENOSPC
        assert temps(ckpt) == [] and free(ckpt) == room  # its partial file is gone
        assert checkpoint.list_steps(ckpt) == [10, 20]
        for step in (10, 20):
            loaded = torch.load(checkpoint.path_for(ckpt, step), weights_only=True)
            assert loaded["step"] == step and torch.equal(loaded["w"], state(step, 20)["w"])
        # A restart finds that one more would not fit, before training for it.
        problem = checkpoint.check_storage(ckpt, 20)
        assert problem is not None and problem.code == errno.ENOSPC
        assert str(problem).startswith(f"checkpoint directory {ckpt} is full: No space left ")
        assert str(problem).endswith("the newest complete checkpoint is step 20")
        assert "\n" not in str(problem)
        # Where there is room for one more, or nothing yet to measure, it lets training go.
        checkpoint.path_for(ckpt, 10).unlink()
        assert checkpoint.check_storage(ckpt, 20) is None
        assert checkpoint.check_storage(ckpt, None) is None
        assert temps(ckpt) == []  # its probe file is gone too


def test_a_read_only_directory_is_found_before_training_and_its_checkpoints_still_load(
    tmp_path,
):
    with tmpfs(tmp_path / "ckpt", "64k") as ckpt:
        checkpoint.save(ckpt, 10, state(10, 4))
        read_only(ckpt)
        found = checkpoint.load_latest(ckpt)  # resuming reads, which a read-only volume allows
        assert found is not None and found[0] == 10
        problem = checkpoint.check_storage(ckpt, 10)
        assert problem is not None and problem.code == errno.EROFS
        assert str(problem) == (
            f"checkpoint directory {ckpt} is read-only: Read-only file system (errno 30); "
            "no step is trained, as none could be saved; "
            "the newest complete checkpoint is step 10"
        )
        with pytest.raises(OSError) as failed:
            checkpoint.save(ckpt, 20, state(20, 4))
        assert failed.value.errno == errno.EROFS
        assert checkpoint.list_steps(ckpt) == [10]
        # A directory not there yet on a read-only volume cannot be made: said the same way.
        problem = checkpoint.check_storage(ckpt / "job", None)
        assert problem is not None and " is read-only: " in str(problem)
        assert str(problem).endswith("there is no complete checkpoint yet")


def test_a_directory_the_trainer_may_not_write_is_said_to_be_so(tmp_path, monkeypatch):
    """Root writes through any mode bits, so the refusal is made up here."""

    def refused(path: object, mode: str = "r") -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(checkpoint, "open", refused, raising=False)
    problem = checkpoint.check_storage(tmp_path, None)
    assert problem is not None and problem.code == errno.EACCES
    assert str(problem).startswith(
        f"checkpoint directory {tmp_path} cannot be written: Permission denied (errno 13); "
    )
    with pytest.raises(PermissionError):
        checkpoint.save(tmp_path, 10, state(10, 1))
    assert temps(tmp_path) == []


def last_lines(log: Path) -> list[str]:
    """The log's lines that are neither JSON events nor torchrun's report."""
    return [
        line for line in log.read_text(errors="replace").splitlines()
        if line.strip() and not line.startswith(("{", " ", "-", "=", "[", "E1", "W1", "I1"))
    ]  # fmt: skip


@pytest.mark.timeout(300)
def test_the_trainer_stops_with_one_line_and_exit_code_74_on_a_full_then_read_only_volume(
    tmp_path,
):
    """Two ranks under joule-launch's torchrun, checkpoints on a tmpfs with room for one
    (1.4 MiB each) but not two. The save at step 20 fails: every rank stops there, rank 0's
    line says why and which checkpoint is whole, and torchrun's restarts (3) each stop
    before training. Then, the volume read-only: the group resumes from it and stops."""
    message = tmp_path / "termination-log"
    message.write_text("stale, from an earlier container\n")
    env = {**ENV, "JOULE_TERMINATION_LOG": str(message)}
    with tmpfs(tmp_path / "ckpt", "2m") as ckpt:
        log = tmp_path / "full.log"
        proc = torchrun(*common(tmp_path, 1000, every=10), log=log, env=env)
        assert proc.wait(240) == checkpoint.EXIT_STORAGE, log.read_text()[-3000:]
        failed = (
            f"checkpoint step 20 to {ckpt} failed: No space left on device (errno 28); "
            "the newest complete checkpoint is step 10"
        )
        lines = last_lines(log)
        assert failed in lines and f"rank 1: stopped at step 20: rank 0 cannot write " \
            f"checkpoints to {ckpt}: No space left on device (errno 28)" in lines  # fmt: skip
        run = events(log)
        assert max(e["step"] for e in run if e["event"] == "step") == 20  # no step past it
        resumed = [e for e in run if e["event"] == "resumed"]
        assert len(resumed) == 3 and all(e["step"] == 10 for e in resumed)  # each restart
        restarted = lines[lines.index(failed) + 1 :]
        full = f"checkpoint directory {ckpt} is full: No space left on device (errno 28), "
        assert sum(line.startswith(full) for line in restarted) == 3, restarted
        assert lines[-1] == "joule-launch: joule_trainer.train failed: rank 0 exited with code 74"
        # The container's termination message: rank 0's line of the last attempt.
        assert message.read_text().startswith(full) and message.read_text().count("\n") == 1
        assert checkpoint.list_steps(ckpt) == [10] and temps(ckpt) == []
        kept = torch.load(checkpoint.path_for(ckpt, 10), weights_only=True)
        assert kept["step"] == 10 and "model" in kept and "optimizer" in kept

        read_only(ckpt)
        log = tmp_path / "ro.log"
        proc = torchrun(*common(tmp_path, 1000, every=10), log=log, env=env)
        assert proc.wait(240) == checkpoint.EXIT_STORAGE, log.read_text()[-3000:]
        run = events(log)
        assert [e["step"] for e in run if e["event"] == "resumed"] == [10] * 4
        assert not [e for e in run if e["event"] == "step"]  # not one step trained
        stopped = (
            f"checkpoint directory {ckpt} is read-only: Read-only file system (errno 30); "
            "no step is trained, as none could be saved; the newest complete checkpoint is "
            "step 10"
        )
        assert last_lines(log).count(stopped) == 4
        assert message.read_text() == stopped + "\n"


def test_joule_launch_ends_a_failure_with_the_failed_rank_and_keeps_torchruns_exit_code(
    tmp_path,
):
    """Any other failure: torchrun's exit code (1) as before, and a last line that names the
    rank and its code, where torchrun's report ends with a row of "=". Each try exits 3."""
    script = tmp_path / "fails.py"
    script.write_text("import sys; print('config.yaml not found', flush=True); sys.exit(3)\n")
    log = tmp_path / "log"
    proc = torchrun(log=log, nproc=1, program=[str(script)])
    assert proc.wait(120) == 1, log.read_text()[-3000:]
    lines = log.read_text().splitlines()
    assert lines[-1] == f"joule-launch: {script} failed: rank 0 exited with code 3", lines[-5:]
    assert "exitcode  : 3" in log.read_text()  # torchrun's own report is still there


def test_saves_due_by_each_ranks_own_clock_keep_the_ranks_collectives_matched(tmp_path):
    """Whether a save is due by time is each rank's own reading of its clock, so the ranks
    may disagree: whether rank 0's save failed travels in the collective every rank makes
    every step anyway, never in one of its own that only some ranks would make."""
    log = tmp_path / "log"
    args = common(tmp_path, 60, every=1000)
    proc = torchrun(*args, "--checkpoint-every-seconds", "0.05", log=log)
    assert proc.wait(240) == 0, log.read_text()[-3000:]
    saved = [e["step"] for e in events(log) if e["event"] == "checkpoint"]
    assert len(saved) > 3 and saved[-1] == 60, saved
