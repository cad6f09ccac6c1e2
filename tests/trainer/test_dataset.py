"""Prepared datasets (``joule-data prepare`` and the trainer's reader), in process: the
manifest's digests, shards that read back as the text's tokens, the errors, and samples as a
pure function of their index."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from joule_trainer import data_cli, dataset
from joule_trainer.data import TextWindows, bundled_corpus
from joule_trainer.dataset import DataError, Permutation, ShardWindows, Tokenizer

TEXT_A = "To be, or not to be: that is the question.\n" * 40
TEXT_B = "Whether 'tis nobler in the mind to suffer" * 30  # no newline at the end


def write_inputs(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXT_A)
    (src / "sub" / "b.txt").write_text(TEXT_B)
    (src / "notes.md").write_text("not a .txt: not read from a folder")
    return src


def stream(data: ShardWindows) -> np.ndarray:
    return data.tokens(0, data.total)


def test_prepare_writes_shards_whose_digests_and_version_the_manifest_states(tmp_path):
    src = write_inputs(tmp_path)
    c = tmp_path / "c.txt"
    c.write_text("tail")
    out = tmp_path / "ds"
    done = dataset.prepare([src, c], out, shard_tokens=500)
    m = json.loads((out / "manifest.json").read_text())
    assert m == done.manifest
    assert done.files == [src / "a.txt", src / "sub" / "b.txt", c]
    # Files in order; a newline only between a file without one at its end and the next.
    text = TEXT_A + TEXT_B + "\n" + "tail"
    assert m["total_tokens"] == len(text)
    assert m["format"] == "joule-dataset" and m["format_version"] == 1
    assert m["tokenizer"] == {
        "name": "chars",
        "vocab_size": len(set(text)),
        "vocabulary": "".join(sorted(set(text))),
    }
    assert m["dtype"] == "<u2"
    assert [s["tokens"] for s in m["shards"]] == [500] * (len(text) // 500) + [len(text) % 500]
    for s in m["shards"]:
        raw = (out / s["file"]).read_bytes()
        assert s["bytes"] == len(raw)
        assert s["sha256"] == hashlib.sha256(raw).hexdigest()
    body = {k: v for k, v in m.items() if k != "version"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert m["version"] == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", *(s["file"] for s in m["shards"])]
    )

    # Round trip: the shards are the text's tokens with the trainer's --corpus tokenizer.
    data = ShardWindows(out, block=8, seed=0)
    vocab = m["tokenizer"]["vocabulary"]
    assert "".join(vocab[t] for t in stream(data)) == text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    windows = TextWindows(corpus, block=8, seed=0)
    assert windows.vocab == data.vocab
    assert torch.equal(windows.data, torch.from_numpy(stream(data).astype(np.int64)))

    # The same input and options: the same version; other options: another.
    again = dataset.prepare([src, c], tmp_path / "again", shard_tokens=500)
    assert again.manifest["version"] == m["version"]
    other = dataset.prepare([src, c], tmp_path / "other", shard_tokens=400)
    assert other.manifest["version"] != m["version"]


def test_bytes_tokenizer_takes_any_bytes_and_round_trips(tmp_path):
    raw = bytes(range(256)) * 3 + "naïve ☃\n".encode()
    (tmp_path / "bin.txt").write_bytes(raw)
    with pytest.raises(DataError, match=r"bin.txt is not UTF-8 text .*--tokenizer bytes"):
        dataset.prepare([tmp_path / "bin.txt"], tmp_path / "chars")
    m = dataset.prepare([tmp_path / "bin.txt"], tmp_path / "ds", tokenizer="bytes").manifest
    assert m["tokenizer"] == {"name": "bytes", "vocab_size": 256}
    data = ShardWindows(tmp_path / "ds", block=4, seed=1)
    assert bytes(stream(data).astype(np.uint8)) == raw


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000))  # past the BMP: no surrogates
    (tmp_path / "han.txt").write_text(text)
    m = dataset.prepare([tmp_path / "han.txt"], tmp_path / "ds").manifest
    assert m["tokenizer"]["vocab_size"] == len(set(text)) > 2**16 and m["dtype"] == "<u4"
    data = ShardWindows(tmp_path / "ds", block=16, seed=0)
    assert "".join(m["tokenizer"]["vocabulary"][t] for t in stream(data)) == text


def test_prepare_refuses_what_it_cannot_make_a_dataset_of(tmp_path, monkeypatch):
    src = write_inputs(tmp_path)
    with pytest.raises(DataError, match=r"missing.txt: no such file or folder"):
        dataset.prepare([src, tmp_path / "missing.txt"], tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    with pytest.raises(DataError, match=r"^no text: .*empty holds no characters"):
        dataset.prepare([tmp_path / "empty"], tmp_path / "ds1")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"^no text: no file in .*nothing"):
        dataset.prepare([tmp_path / "nothing"], tmp_path / "ds2")

    real_open = open

    def refused(path, *args, **kwargs):
        if str(path).endswith("b.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(dataset, "open", refused, raising=False)
    with pytest.raises(DataError, match=r"^cannot read .*b.txt: Permission denied$"):
        dataset.prepare([src], tmp_path / "ds3")
    monkeypatch.undo()

    out = tmp_path / "ds4"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    with pytest.raises(DataError, match=r"ds4 exists and is not empty \(--force replaces"):
        dataset.prepare([src], out)
    first = dataset.prepare([src], out, force=True, shard_tokens=100).manifest
    second = dataset.prepare([src / "a.txt"], out, force=True, shard_tokens=10_000).manifest
    # --force replaces the dataset's own files (no stale shard is left) and nothing else.
    assert len(first["shards"]) > 1 and len(second["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "manifest.json", "shard-00000.npy"]


def test_the_cli_prints_a_summary_and_says_what_is_wrong_in_one_line(tmp_path, capsys):
    src = write_inputs(tmp_path)
    out = tmp_path / "ds"
    assert data_cli.main(["prepare", str(src), "--out", str(out), "--shard-tokens", "300"]) == 0
    line = capsys.readouterr().out.strip()
    m = json.loads((out / "manifest.json").read_text())
    assert line.startswith(f"joule-data: prepared {out}: {m['total_tokens']} tokens in ")
    assert line.endswith(f"dataset version {m['version']}") and "\n" not in line
    assert data_cli.main(["verify", str(out)]) == 0
    assert m["version"] in capsys.readouterr().out
    assert data_cli.main(["prepare", str(src), "--out", str(out)]) == dataset.EXIT_DATA == 65
    err = capsys.readouterr().err
    assert err == f"joule-data: {out} exists and is not empty (--force replaces a dataset there)\n"
    # The console script: the same, as a program.
    run = subprocess.run(
        [sys.executable, "-m", "joule_trainer.data_cli", "prepare", str(tmp_path / "no")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2 and "--out" in run.stderr


def test_a_corrupted_shard_is_refused_with_its_name_and_both_digests(tmp_path, capsys):
    src = write_inputs(tmp_path)
    out = tmp_path / "ds"
    m = dataset.prepare([src], out, shard_tokens=300).manifest
    bad = m["shards"][1]
    path = out / bad["file"]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # one bit of one token: same size
    path.write_bytes(bytes(raw))
    actual = hashlib.sha256(raw).hexdigest()
    data = ShardWindows(out, block=8, seed=0)  # sizes agree: opens
    data.tokens(0, 300)  # shard 0 is fine
    with pytest.raises(DataError) as refused:
        data.tokens(290, 310)  # touches shard 1
    assert str(refused.value) == (
        f"dataset shard {path} is corrupt: expected sha256 {bad['sha256']}, actual {actual}"
    )
    assert data_cli.main(["verify", str(out)]) == 65
    assert capsys.readouterr().err == f"joule-data: {refused.value}\n"

    path.write_bytes(bytes(raw[:-2]))  # cut short: found when the dataset is opened
    with pytest.raises(DataError, match=rf"shard {path} is {len(raw) - 2} bytes, the manifest"):
        ShardWindows(out, block=8, seed=0)
    path.unlink()
    with pytest.raises(DataError, match=rf"shard {path} cannot be read: No such file"):
        ShardWindows(out, block=8, seed=0)


def test_a_changed_or_missing_manifest_is_refused(tmp_path):
    src = write_inputs(tmp_path)
    out = tmp_path / "ds"
    dataset.prepare([src], out)
    manifest = out / "manifest.json"
    m = json.loads(manifest.read_text())
    m["shards"][0]["sha256"] = "0" * 64  # a shard swapped in with its digest edited to match
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match="was changed after it was prepared: its version says"):
        ShardWindows(out, block=8, seed=0)
    manifest.write_text(json.dumps({**m, "format_version": 9}))
    with pytest.raises(DataError, match="format version 9; this trainer reads version 1"):
        ShardWindows(out, block=8, seed=0)
    manifest.unlink()
    with pytest.raises(DataError, match=r"is not a prepared dataset: it has no manifest.json"):
        ShardWindows(out, block=8, seed=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.integers(0, 2**64))
def test_the_window_order_is_a_permutation_for_every_size_and_key(n, key):
    perm = Permutation(n, key)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_samples_are_a_pure_function_of_seed_and_index_and_each_epoch_visits_every_window(
    tmp_path,
):
    (tmp_path / "t.txt").write_text(bundled_corpus()[:5000])
    out = tmp_path / "ds"
    dataset.prepare([tmp_path / "t.txt"], out, shard_tokens=700)  # windows cross shards
    data = ShardWindows(out, block=16, seed=3)
    n = data.windows
    assert n == (5000 - 1) // 16
    epoch0 = [data.window(i) for i in range(n)]
    epoch1 = [data.window(i) for i in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))  # shuffled, differently per epoch
    # Any split of the indices gives the same samples: a rank's share is its slice.
    x, y = data.batch(range(40, 72))
    fresh = ShardWindows(out, block=16, seed=3)
    for i in reversed(range(40, 72)):
        xi, yi = fresh.batch([i])
        assert torch.equal(xi[0], x[i - 40]) and torch.equal(yi[0], y[i - 40])
    whole = torch.from_numpy(stream(data).astype(np.int64))
    for r, i in enumerate(range(40, 72)):
        start = data.window(i) * 16
        assert torch.equal(x[r], whole[start : start + 16])
        assert torch.equal(y[r], whole[start + 1 : start + 17])
    assert x.dtype == torch.int64 and x.shape == (32, 16)
    assert ShardWindows(out, block=16, seed=4).window(40) != data.window(40) or (
        ShardWindows(out, block=16, seed=4).window(41) != data.window(41)
    )


def test_tokenizer_refuses_characters_outside_its_vocabulary():
    tok = Tokenizer.chars("abc")
    assert tok.encode("cab").tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("abd")
