"""Encrypted checkpoints (spec.checkpoint.encryption): AES-256-GCM with the job's key. A file
that does not verify (another key, a changed byte, renamed to another step, a plaintext file
where encryption is on) is refused with its name, and the newest that verifies is used; an
encrypted file found without a key is refused too. Where checkpoints exist and none can be
used, the trainer stops with one line and exit code 78, never starting over beside them."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import pytest
import torch
from joule_trainer import checkpoint, crypt
from joule_trainer.train import main as train_main

from tests.trainer.test_storage import last_lines
from tests.trainer.test_torchrun import ENV, common, events, torchrun

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
WRONG = "does not verify with this job's key (wrong key, or the file was changed)"


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((64,), float(step))}


def save_all(directory: Path, key: bytes | None, *steps: int) -> None:
    for step in steps:
        checkpoint.save(directory, step, state(step), key=key)


def loaded_step(directory: Path, key: bytes | None) -> int:
    found = checkpoint.load_latest(directory, key)
    assert found is not None
    step, got = found
    assert torch.equal(got["w"], state(step)["w"])
    return step


def test_an_encrypted_checkpoint_round_trips_and_is_not_a_plaintext_one(tmp_path):
    save_all(tmp_path, KEY, 10)
    path = checkpoint.path_for(tmp_path, 10)
    data = path.read_bytes()
    assert data.startswith(crypt.MAGIC + bytes([crypt.VERSION]))
    assert b"PK" not in data[:64]  # torch.save's zip header is not there in the clear
    with pytest.raises(Exception):  # noqa: B017 - whatever torch says, it is not a checkpoint
        torch.load(path, weights_only=True)
    assert loaded_step(tmp_path, KEY) == 10
    # Two saves of the same state differ (a fresh nonce each), and both open.
    save_all(tmp_path / "again", KEY, 10)
    assert (tmp_path / "again" / path.name).read_bytes() != data
    assert loaded_step(tmp_path / "again", KEY) == 10


def test_a_wrong_key_is_refused_and_the_older_checkpoint_that_verifies_is_used(tmp_path, caplog):
    save_all(tmp_path, KEY, 10)
    save_all(tmp_path, OTHER, 20)  # written by someone else's key into this job's folder
    with caplog.at_level("WARNING", logger="joule_trainer.checkpoint"):
        assert loaded_step(tmp_path, KEY) == 10
    assert f"step-000000020.pt: {WRONG}" in caplog.text


def test_a_flipped_byte_is_refused_with_the_file_named(tmp_path, caplog):
    save_all(tmp_path, KEY, 10, 20)
    path = checkpoint.path_for(tmp_path, 20)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="joule_trainer.checkpoint"):
        assert loaded_step(tmp_path, KEY) == 10
    assert f"step-000000020.pt: {WRONG}" in caplog.text
    # Cut short (a torn write on a disk that lied) is refused the same way.
    path.write_bytes(bytes(data[:20]))
    assert loaded_step(tmp_path, KEY) == 10


def test_a_checkpoint_renamed_to_another_step_is_refused(tmp_path, caplog):
    save_all(tmp_path, KEY, 10, 20)
    # Step 10's file as step 30: its content says step 10 and the key is right, but the
    # step is bound into its authentication, so it is no step-30 checkpoint.
    os.replace(checkpoint.path_for(tmp_path, 10), checkpoint.path_for(tmp_path, 30))
    with caplog.at_level("WARNING", logger="joule_trainer.checkpoint"):
        assert loaded_step(tmp_path, KEY) == 20
    assert f"step-000000030.pt: {WRONG}" in caplog.text


def test_a_plaintext_checkpoint_is_refused_where_encryption_is_on(tmp_path, caplog):
    save_all(tmp_path, KEY, 10)
    save_all(tmp_path, None, 20)  # planted by whoever may write the volume, without the key
    with caplog.at_level("WARNING", logger="joule_trainer.checkpoint"):
        assert loaded_step(tmp_path, KEY) == 10
    assert (
        "step-000000020.pt: does not verify with this job's key (not encrypted, and this job "
        "encrypts its checkpoints)"
    ) in caplog.text


def test_an_encrypted_checkpoint_is_refused_where_the_job_has_no_key(tmp_path, caplog):
    save_all(tmp_path, None, 10)
    save_all(tmp_path, KEY, 20)
    with caplog.at_level("WARNING", logger="joule_trainer.checkpoint"):
        assert loaded_step(tmp_path, None) == 10
    assert "step-000000020.pt: is encrypted, and this job has no key: it needs" in caplog.text
    checkpoint.path_for(tmp_path, 10).unlink()
    with pytest.raises(checkpoint.CheckpointsRefused) as refused:
        checkpoint.load_latest(tmp_path, None)
    assert str(refused.value) == (
        f"checkpoint directory {tmp_path}: 1 of 1 checkpoints refused, none can be read "
        "without the job's key (step-000000020.pt: encrypted, and this job has no key); not "
        "starting over from step 0 beside them"
    )


def test_where_none_verifies_loading_refuses_rather_than_starting_over(tmp_path):
    save_all(tmp_path, OTHER, 10, 20)
    save_all(tmp_path, None, 30)
    with pytest.raises(checkpoint.CheckpointsRefused) as refused:
        checkpoint.load_latest(tmp_path, KEY)
    line = str(refused.value)
    assert line == (
        f"checkpoint directory {tmp_path}: 3 of 3 checkpoints refused, none verifies with "
        "this job's key (step-000000030.pt: not encrypted, and this job encrypts its "
        "checkpoints; step-000000020.pt, step-000000010.pt: wrong key, or the file was "
        "changed); not starting over from step 0 beside them"
    )
    assert isinstance(refused.value, crypt.ConfigError)
    # Nothing there at all: a fresh start, as without encryption.
    assert checkpoint.load_latest(tmp_path / "empty", KEY) is None


@pytest.mark.parametrize(
    "text",
    [
        KEY,
        base64.b64encode(KEY) + b"\n",
        KEY.hex().encode(),
        base64.urlsafe_b64encode(b"\xff" * 32),
    ],
    ids=["raw", "base64", "hex", "base64url"],
)
def test_the_key_file_takes_32_bytes_raw_or_as_base64_or_hex(tmp_path, text):
    (tmp_path / "key").write_bytes(text)
    assert len(crypt.load_key(tmp_path / "key")) == 32
    assert crypt.key_from_env({crypt.KEY_ENV: str(tmp_path / "key")}) == crypt.load_key(
        tmp_path / "key"
    )
    assert crypt.key_from_env({}) is None


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (b"", "is empty"),
        (b"hunter2\n", "holds 8 bytes that are not such a key"),
        (base64.b64encode(bytes(16)), "holds 24 bytes that are not such a key"),  # AES-128
        (b"x" * 4096, "holds more than 1024 bytes"),
    ],
)
def test_a_key_file_that_is_no_key_is_one_clear_line(tmp_path, text, found):
    (tmp_path / "key").write_bytes(text)
    with pytest.raises(crypt.KeyFileError) as bad:
        crypt.load_key(tmp_path / "key")
    assert str(bad.value) == (
        f"checkpoint key file {tmp_path / 'key'} {found}; expected 32 bytes of key, raw or as "
        "base64 or hex text (openssl rand -base64 32)"
    )
    with pytest.raises(crypt.KeyFileError, match="cannot be read: No such file or directory"):
        crypt.load_key(tmp_path / "missing")


def test_the_trainer_exits_78_with_the_line_on_a_key_file_that_is_no_key(tmp_path, capsys):
    """Before torch.distributed is touched: every rank stops alike, none waits for another."""
    (tmp_path / "key").write_text("not a key\n")
    message = tmp_path / "termination-log"
    message.write_text("")
    os.environ["JOULE_TERMINATION_LOG"] = str(message)
    try:
        code = train_main(["--checkpoint-key-file", str(tmp_path / "key"), "--metrics-port", "0"])
    finally:
        del os.environ["JOULE_TERMINATION_LOG"]
    assert code == checkpoint.EXIT_CONFIG == 78
    line = f"checkpoint key file {tmp_path / 'key'} holds 10 bytes that are not such a key"
    assert capsys.readouterr().err.startswith(line)
    assert message.read_text().startswith(line) and message.read_text().count("\n") == 1


@pytest.mark.timeout(400)
def test_the_trainer_resumes_with_its_key_and_stops_with_78_under_another(tmp_path):
    """Two ranks under joule-launch's torchrun. With its key (from JOULE_CHECKPOINT_KEY_FILE,
    base64 as a Secret holds it) the trainer writes encrypted checkpoints and resumes from
    them; with another key it trains no step, and every attempt (torchrun's restarts) ends
    with the one line, exit code 78 from joule-launch's torchrun and the termination message."""
    ckpt = tmp_path / "ckpt"
    key, other = tmp_path / "key", tmp_path / "other"
    key.write_text(base64.b64encode(KEY).decode() + "\n")
    other.write_bytes(OTHER)
    message = tmp_path / "termination-log"
    env = {**ENV, crypt.KEY_ENV: str(key), "JOULE_TERMINATION_LOG": str(message)}

    log = tmp_path / "first.log"
    proc = torchrun(*common(tmp_path, 20, every=10), log=log, env=env)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    assert checkpoint.list_steps(ckpt) == [10, 20]
    for step in (10, 20):
        with pytest.raises(Exception):  # noqa: B017 - not loadable as a plaintext checkpoint
            torch.load(checkpoint.path_for(ckpt, step), weights_only=True)

    log = tmp_path / "resumed.log"
    proc = torchrun(*common(tmp_path, 30, every=10), log=log, env=env)
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    assert [e["step"] for e in events(log) if e["event"] == "resumed"] == [20]
    assert checkpoint.load_latest(ckpt, KEY)[0] == 30

    message.write_text("stale, from an earlier container\n")
    log = tmp_path / "other.log"
    proc = torchrun(
        *common(tmp_path, 40, every=10), log=log, env={**env, crypt.KEY_ENV: str(other)}
    )
    assert proc.wait(240) == checkpoint.EXIT_CONFIG, log.read_text()[-3000:]
    run = events(log)
    assert not [e for e in run if e["event"] in ("step", "start", "resumed")]  # nothing trained
    line = (
        f"checkpoint directory {ckpt}: 3 of 3 checkpoints refused, none verifies with this "
        "job's key (step-000000030.pt, step-000000020.pt, step-000000010.pt: wrong key, or "
        "the file was changed); not starting over from step 0 beside them"
    )
    lines = last_lines(log)
    assert lines.count(line) == 4 * 2, lines  # both ranks, on each of torchrun's 4 attempts
    assert re.fullmatch(
        r"joule-launch: joule_trainer.train failed: rank [01] exited with code 78", lines[-1]
    )
    assert message.read_text() == line + "\n"
    assert checkpoint.list_steps(ckpt) == [10, 20, 30]  # untouched
