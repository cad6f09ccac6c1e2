"""The trainer on a prepared dataset, for real (torchrun, gloo on CPU): it learns, it goes on
at exactly the next sample after a restart at another world size or global batch, and a
corrupt shard stops it with one line and exit code 65."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from joule_trainer import checkpoint, dataset
from joule_trainer.data import bundled_corpus
from joule_trainer.metrics import TrainerMetrics
from prometheus_client import generate_latest

from tests.trainer.test_storage import last_lines
from tests.trainer.test_torchrun import ENV, common, events, torchrun


def prepared(tmp_path: Path, shard_tokens: int = 40_000) -> tuple[Path, dict]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(bundled_corpus())
    out = tmp_path / "ds"
    done = dataset.prepare([corpus], out, shard_tokens=shard_tokens)  # 4 shards
    return out, done.manifest


def trained(sample_log: Path) -> dict[int, list[tuple[int, int, int]]]:
    """Step -> [(first sample, end, world)] of every micro-batch any rank trained in it."""
    steps: dict[int, list[tuple[int, int, int]]] = {}
    for line in sample_log.read_text().splitlines():
        e = json.loads(line)
        steps.setdefault(e["step"], []).extend((a, b, e["world"]) for a, b in e["samples"])
    return steps


@pytest.mark.timeout(500)
def test_a_restart_at_another_world_size_and_batch_goes_on_at_exactly_the_next_sample(
    tmp_path,
):
    """2 processes train 40 steps of 16 samples and stop (a checkpoint at 40); 1 process
    resumes and trains to step 80; then 1 process with a global batch of 8 to step 90. Every
    global sample index from 0 to 1359 is trained exactly once, in order, step by step, and
    the loss falls as it does on the bundled corpus."""
    data, manifest = prepared(tmp_path)
    assert len(manifest["shards"]) == 4
    sample_log = tmp_path / "samples.jsonl"
    env = {**ENV, "JOULE_SAMPLE_LOG": str(sample_log), "JOULE_DATASET_DIR": str(data)}
    log = tmp_path / "log"
    two = torchrun(*common(tmp_path, 40, every=20), log=log, env=env, nproc=2)
    assert two.wait(300) == 0, log.read_text()[-3000:]
    one = torchrun(*common(tmp_path, 80, every=20), log=log, env=env, nproc=1)
    assert one.wait(300) == 0, log.read_text()[-3000:]
    args = common(tmp_path, 90, every=20)
    args[args.index("--global-batch") + 1] = "8"
    small = torchrun(*args, log=log, env=env, nproc=1)
    assert small.wait(300) == 0, log.read_text()[-3000:]

    run = events(log)
    seen = [e for e in run if e["event"] == "dataset"]
    assert len(seen) == 3 and {e["version"] for e in seen} == {manifest["version"]}
    assert seen[0]["tokens"] == len(bundled_corpus()) and seen[0]["shards"] == 4
    resumed = [e for e in run if e["event"] == "resumed"]
    assert [(e["step"], e["samples"], e["previous_world"]) for e in resumed] == [
        (40, 640, 2),
        (80, 1280, 1),
    ]

    steps = trained(sample_log)
    assert sorted(steps) == list(range(90))
    cursor = 0
    for step in range(90):
        batch = sorted(steps[step])
        world = 2 if step < 40 else 1
        size = 16 if step < 80 else 8
        assert {w for _, _, w in batch} == {world}, (step, batch)
        for a, b, _ in batch:  # contiguous micro-batches from the cursor on, none again
            assert a == cursor, (step, batch)
            cursor = b
        assert cursor == sum(16 if s < 80 else 8 for s in range(step + 1))
        assert sum(b - a for a, b, _ in batch) == size
    assert cursor == 40 * 16 + 40 * 16 + 10 * 8

    losses = [e["loss"] for e in run if e["event"] == "step"]
    assert losses[-1] < losses[0] - 0.5, losses  # ln(96) = 4.6 at random, as the corpus test
    final = checkpoint.load_latest(tmp_path / "ckpt")
    assert final is not None and final[0] == 90 and final[1]["samples"] == 1360


@pytest.mark.timeout(300)
def test_a_corrupt_shard_stops_every_rank_before_training_with_exit_code_65(tmp_path):
    """Two ranks share the hashing (rank 1 hashes shard 1): rank 1 names the shard and both
    digests, rank 0 stops too and says who found what, and joule-launch exits 65."""
    data, manifest = prepared(tmp_path, shard_tokens=70_000)  # 2 shards
    assert len(manifest["shards"]) == 2
    shard = manifest["shards"][1]
    path = data / shard["file"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit: the size is right, the digest is not
    path.write_bytes(bytes(raw))
    actual = dataset.file_sha256(path)
    message = tmp_path / "termination-log"
    message.write_text("")
    env = {**ENV, "JOULE_TERMINATION_LOG": str(message)}
    log = tmp_path / "log"
    proc = torchrun(*common(tmp_path, 10), "--dataset", str(data), log=log, env=env, nproc=2)
    assert proc.wait(240) == dataset.EXIT_DATA == 65, log.read_text()[-3000:]
    found = f"dataset shard {path} is corrupt: expected sha256 {shard['sha256']}, actual {actual}"
    stopped = f"rank 0: stopped before training: rank 1 found dataset shard {path} corrupt"
    lines = last_lines(log)
    # The first try and torchrun's 3 restarts, each stopped before a step on both ranks.
    assert lines.count(found) == 4 and lines.count(stopped) == 4, lines
    assert re.fullmatch(
        r"joule-launch: joule_trainer.train failed: rank [01] exited with code 65", lines[-1]
    )
    assert message.read_text() == stopped + "\n"  # local rank 0 writes the message
    assert not [e for e in events(log) if e["event"] in ("step", "dataset")]
    assert "Traceback" not in log.read_text()


def test_the_dataset_version_is_exported_and_flags_are_checked(tmp_path, capsys):
    from joule_trainer.train import parse_args

    m = TrainerMetrics.create("job", "0", 0, "none", None)
    m.dataset("sha256:abc")
    text = generate_latest(m.registry).decode()
    assert (
        'joule_trainer_dataset_info{gpu="none",job="job",rank="0",replica="0",'
        'version="sha256:abc"} 1.0'
    ) in text
    assert parse_args(["--dataset", str(tmp_path)]).dataset == tmp_path
    for wrong, said in (
        (["--dataset", "d", "--corpus", "c"], "one or the other"),
        (["--dataset", "d", "--model", "cnn"], "(--model gpt)"),
    ):
        with pytest.raises(SystemExit):
            parse_args(wrong)
        assert said in capsys.readouterr().err


def test_a_checkpoint_without_a_cursor_resumes_at_step_times_its_global_batch(tmp_path):
    """Checkpoints written before the cursor was kept: their global batch never changed."""
    from types import SimpleNamespace

    from joule_trainer.train import Trainer

    checkpoint.save(tmp_path, 7, {"step": 7, "global_batch": 12, "world": 2})
    logged: list[dict] = []
    t = SimpleNamespace(
        args=SimpleNamespace(checkpoint_dir=tmp_path), world=1, _log=lambda **f: logged.append(f),
        model=SimpleNamespace(load_state_dict=lambda s: None),
        optimizer=SimpleNamespace(load_state_dict=lambda s: None),
        schedule=SimpleNamespace(load_state_dict=lambda s: None), key=None, dp_settings=None,
    )  # fmt: skip
    state = torch.load(checkpoint.path_for(tmp_path, 7), weights_only=True)
    state |= {"model": {}, "optimizer": {}, "schedule": {}}
    state["rng"] = {"torch": torch.get_rng_state(), "python": __import__("random").getstate()}
    checkpoint.save(tmp_path, 7, state)
    Trainer._resume(t)  # type: ignore[arg-type]
    assert t.samples == 84 and logged[-1]["samples"] == 84
