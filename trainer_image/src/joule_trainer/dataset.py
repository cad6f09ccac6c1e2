"""A prepared dataset: tokenized shards and a manifest, made by ``joule-data prepare``, read by
the trainer's ``--dataset DIR``.

On disk::

    DIR/manifest.json        format version, tokenizer, shards, total tokens, dataset version
    DIR/shard-00000.npy      one little-endian uint16 (uint32 past 65536 tokens of vocabulary)
    DIR/shard-00001.npy      array of token ids each, in the order of the input text

The dataset version is the sha256 of the canonical manifest (its JSON with sorted keys and no
spaces, less the ``version`` field itself): the same input prepared with the same options gets
the same version, and any change to a shard's bytes or to the manifest gives another one.

Samples are what the trainer has always drawn: sample ``i`` of a run is a pure function of
(seed, i), so the position in the data is the global sample cursor the checkpoint keeps. Here
the token stream is cut into ``(total - 1) // block`` windows of ``block + 1`` tokens (window
``w`` starts at token ``w * block``; x is its first ``block`` tokens, y the last ``block``),
and epoch ``e`` = ``i // windows`` visits every window once, in an order that a keyed
permutation of (seed, e) gives. No index of the whole dataset is built: a shard is a memory map,
and a sample reads its ``block + 1`` tokens.

A shard is checked against the manifest before its first use in a process: its size when the
dataset is opened, its sha256 when a sample first touches it unless ``verified`` already
holds it (the trainer hashes every shard before its first step, its ranks sharing the work).
A mismatch is ``DataError``, whose ``str()`` is one line naming the shard and both digests;
the trainer exits ``EXIT_DATA`` (65) with it.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "joule-dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# sysexits.h's EX_DATAERR: the trainer's exit code for a dataset that is not what its manifest
# says (a shard corrupt, missing or cut short; the manifest changed or unreadable).
# joule-launch makes it the container's too, as it does checkpoint.EXIT_STORAGE.
EXIT_DATA = 65
TOKENIZERS = ("chars", "bytes")
_M64 = (1 << 64) - 1


class DataError(Exception):
    """The dataset is not what its manifest says, or there is none; ``str()`` is one line."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


# --- the tokenizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenizer:
    """The trainer's tokenizers.

    ``chars`` is the one the trainer has always used on ``--corpus``: one token per character,
    the vocabulary the sorted characters of the text (so token ids follow code points).
    ``bytes``: one token per byte of UTF-8 (or any) text, a fixed vocabulary of 256 that needs
    no pass over the input first and takes any bytes.
    """

    name: str
    vocabulary: str | None = None  # chars: the characters, in token-id order

    @classmethod
    def chars(cls, seen: Iterable[str]) -> Tokenizer:
        return cls("chars", "".join(sorted(set(seen))))

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> Tokenizer:
        name = entry.get("name")
        if name == "bytes":
            return cls("bytes")
        if name == "chars" and isinstance(entry.get("vocabulary"), str):
            return cls("chars", entry["vocabulary"])
        raise DataError(f"unknown tokenizer in the manifest: {entry!r}")

    @property
    def vocab_size(self) -> int:
        return 256 if self.name == "bytes" else len(self.vocabulary or "")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.vocab_size <= 2**16 else np.dtype("<u4")

    def encode(self, text: str | bytes) -> np.ndarray:
        """Token ids of ``text`` (bytes for ``bytes``, str for ``chars``), as ``self.dtype``."""
        if self.name == "bytes":
            data = text.encode() if isinstance(text, str) else text
            return np.frombuffer(data, dtype=np.uint8).astype(self.dtype)
        assert isinstance(text, str)
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        table = self._table
        if len(points) and (points.max() >= len(table) or (table[points] < 0).any()):
            missing = sorted(set(text) - set(self.vocabulary or ""))
            raise ValueError(f"characters outside the vocabulary: {missing[:10]!r}")
        return table[points].astype(self.dtype)

    @cached_property
    def _table(self) -> np.ndarray:
        """chars: token id by code point (-1: not in the vocabulary)."""
        points = np.frombuffer((self.vocabulary or "").encode("utf-32-le"), dtype="<u4")
        table = np.full(int(points.max()) + 1 if len(points) else 0, -1, dtype=np.int64)
        table[points] = np.arange(len(points))
        return table

    def manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "vocab_size": self.vocab_size}
        if self.vocabulary is not None:
            entry["vocabulary"] = self.vocabulary
        return entry


# --- the manifest ----------------------------------------------------------------------------


def version_of(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical manifest, less its ``version``: ``sha256:<hex>``."""
    body = {k: v for k, v in manifest.items() if k != "version"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory``, checked for form and against its own version."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{directory} is not a prepared dataset: it has no {MANIFEST} "
            "(make one with `joule-data prepare`)"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {manifest.get('format_version')!r}; this trainer reads "
            f"version {FORMAT_VERSION}: prepare the dataset again"
        )
    actual = version_of(manifest)
    if manifest.get("version") != actual:
        raise DataError(
            f"{path} was changed after it was prepared: its version says "
            f"{manifest.get('version')}, its content is {actual}"
        )
    return manifest


# --- reading: samples from memory-mapped shards -----------------------------------------------


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A keyed pseudo-random permutation of ``range(n)`` in O(1) memory: a 4-round Feistel
    network on the smallest even number of bits that holds ``n``, cycle-walked into range
    (at most 4 tries expected). Each call is a few microseconds."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError("a permutation of nothing")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = [_mix((key & _M64) ^ _mix(r)) for r in range(4)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class ShardWindows:
    """Training samples from a prepared dataset, as ``data.TextWindows`` draws them from a
    corpus: ``batch(indices) -> (x, y)``, each of shape (len(indices), block), int64."""

    def __init__(self, directory: Path, block: int, seed: int) -> None:
        self.directory = directory
        manifest = read_manifest(directory)
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.tokenizer = Tokenizer.from_manifest(manifest["tokenizer"])
        self.vocab = self.tokenizer.vocab_size
        self.dtype = np.dtype(manifest["dtype"])
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.total = int(manifest["total_tokens"])
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + int(s["tokens"]))
        if self.starts[-1] != self.total:
            raise DataError(
                f"{directory / MANIFEST}: its shards hold {self.starts[-1]} tokens, "
                f"its total says {self.total}"
            )
        for s in self.shards:  # cheap checks first, every rank, before any step
            path = directory / s["file"]
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise DataError(f"dataset shard {path} cannot be read: {exc.strerror}") from None
            if size != s["bytes"]:
                raise DataError(
                    f"dataset shard {path} is {size} bytes, the manifest says {s['bytes']}; "
                    f"expected sha256 {s['sha256']}, actual {file_sha256(path)}"
                )
        self.block, self.seed = block, seed
        self.windows = (self.total - 1) // block
        if self.windows < 1:
            raise DataError(f"dataset {directory} of {self.total} tokens is shorter than a block")
        self._maps: dict[int, np.ndarray] = {}
        self.verified: set[int] = set()  # shards whose sha256 is known to match
        self._perm: tuple[int, Permutation] | None = None

    def window(self, index: int) -> int:
        """The window (its first token is ``window * block``) of global sample ``index``."""
        epoch, j = divmod(index, self.windows)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.windows, self.seed * 1_000_003 + epoch))
        return self._perm[1](j)

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``start:stop`` of the whole stream, across shard boundaries."""
        parts = []
        pos = start
        while pos < stop:
            k = bisect_right(self.starts, pos) - 1
            end = min(stop, self.starts[k + 1])
            shard = self._shard(k)
            parts.append(shard[pos - self.starts[k] : end - self.starts[k]])
            pos = end
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def check(self, k: int) -> None:
        """Shard ``k``'s sha256 against the manifest; DataError, naming it, if it differs."""
        entry = self.shards[k]
        path = self.directory / entry["file"]
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise DataError(
                f"dataset shard {path} is corrupt: expected sha256 {entry['sha256']}, "
                f"actual {actual}"
            )
        self.verified.add(k)

    def _shard(self, k: int) -> np.ndarray:
        shard = self._maps.get(k)
        if shard is not None:
            return shard
        if k not in self.verified:
            self.check(k)
        entry = self.shards[k]
        path = self.directory / entry["file"]
        try:
            shard = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"dataset shard {path} cannot be read: {exc}") from None
        if shard.dtype != self.dtype or shard.shape != (entry["tokens"],):
            raise DataError(
                f"dataset shard {path} holds {shard.shape} {shard.dtype}, the manifest says "
                f"({entry['tokens']},) {self.dtype}"
            )
        self._maps[k] = shard
        return shard

    def batch(self, indices: Sequence[int]) -> tuple[Any, Any]:
        import torch

        rows = np.empty((len(indices), self.block + 1), dtype=np.int64)
        for r, i in enumerate(indices):
            start = self.window(i) * self.block
            rows[r] = self.tokens(start, start + self.block + 1)
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


# --- writing: joule-data prepare -------------------------------------------------------------

DEFAULT_SHARD_TOKENS = 2**24  # 32 MiB a shard at uint16
CHUNK_BYTES = 2**22


@dataclass
class Prepared:
    manifest: dict[str, Any]
    files: list[Path]
    input_bytes: int
    seconds: float


def input_files(inputs: Sequence[Path]) -> list[Path]:
    """The files to read, in order: each file given, and each folder's ``*.txt`` files (all
    depths, sorted by path)."""
    files: list[Path] = []
    for given in inputs:
        if given.is_dir():
            files += sorted(p for p in given.rglob("*.txt") if p.is_file())
        elif given.exists():
            files.append(given)
        else:
            raise DataError(f"{given}: no such file or folder")
    return files


def _chunks(files: Sequence[Path], binary: bool, progress: Any) -> Iterable[str | bytes]:
    """The input text in chunks, files in order; a newline between two files where the first
    does not end with one. ``progress(done_bytes)`` after each chunk."""
    newline: str | bytes = b"\n" if binary else "\n"
    done = 0
    ends_line = True
    for path in files:
        try:
            with open(path, "rb") if binary else open(path, encoding="utf-8") as f:
                raw = f if binary else f.buffer
                first = True
                while chunk := f.read(CHUNK_BYTES):
                    if first and not ends_line:
                        yield newline
                    first = False
                    ends_line = chunk.endswith(newline)  # type: ignore[arg-type]
                    yield chunk
                    progress(done + raw.tell())
                done += raw.tell()
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk); "
                "--tokenizer bytes takes any bytes"
            ) from None
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


class _HashingFile:
    """Writes through to a file and hashes what it writes (numpy's .npy writer calls write)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        return self.f.write(view)


def _write_shard(directory: Path, index: int, tokens: np.ndarray) -> dict[str, Any]:
    import os

    name = shard_name(index)
    tmp = directory / f".tmp-{name}"
    with open(tmp, "wb") as f:
        out = _HashingFile(f)
        np.lib.format.write_array(out, tokens, allow_pickle=False)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    return {"file": name, "tokens": len(tokens), "bytes": out.size, "sha256": out.sha.hexdigest()}


def _clear(directory: Path) -> None:
    """A dataset's own files: what ``--force`` replaces (nothing else in the folder)."""
    for p in directory.iterdir():
        if p.name == MANIFEST or (p.name.startswith(("shard-", ".tmp-shard-", ".tmp-manifest"))):
            p.unlink()


def prepare(
    inputs: Sequence[Path],
    out: Path,
    *,
    tokenizer: str = "chars",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    force: bool = False,
    progress: Any = None,
) -> Prepared:
    """Tokenize the text of ``inputs`` into shards and a manifest in ``out``.

    ``progress(phase, done_bytes, total_bytes)``, if given, is called after every chunk read
    (``phase`` "scanning" for the vocabulary pass of ``chars``, then "tokenizing")."""
    import os
    import time

    began = time.monotonic()
    if tokenizer not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer!r}: one of {', '.join(TOKENIZERS)}")
    if shard_tokens < 1:
        raise DataError("--shard-tokens must be >= 1")
    if not inputs:
        raise DataError("no input given")
    files = input_files(inputs)
    if not files:
        raise DataError(f"no text: no file in {', '.join(map(str, inputs))} (folders: *.txt)")
    try:
        total_bytes = sum(p.stat().st_size for p in files)
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename}: {exc.strerror}") from None
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out} exists and is not empty (--force replaces a dataset there)")
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)

    def report(phase: str) -> Any:
        return lambda done: progress(phase, done, total_bytes) if progress else None

    binary = tokenizer == "bytes"
    if binary:
        tok = Tokenizer("bytes")
    else:
        seen: set[str] = set()
        for chunk in _chunks(files, False, report("scanning")):
            seen.update(chunk)  # type: ignore[arg-type]
        tok = Tokenizer.chars(seen)
    shards: list[dict[str, Any]] = []
    pending: list[np.ndarray] = []
    held = 0
    total = 0
    for chunk in _chunks(files, binary, report("tokenizing")):
        ids = tok.encode(chunk)
        pending.append(ids)
        held += len(ids)
        total += len(ids)
        while held >= shard_tokens:
            joined = np.concatenate(pending)
            shards.append(_write_shard(out, len(shards), joined[:shard_tokens]))
            rest = joined[shard_tokens:]
            pending, held = ([rest] if len(rest) else []), len(rest)
    if held:
        shards.append(_write_shard(out, len(shards), np.concatenate(pending)))
    if total == 0:
        raise DataError(f"no text: {', '.join(map(str, inputs))} holds no characters")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.manifest(),
        "dtype": tok.dtype.str,
        "shard_tokens": shard_tokens,
        "shards": shards,
        "total_tokens": total,
    }
    manifest["version"] = version_of(manifest)
    tmp = out / f".tmp-{MANIFEST}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    return Prepared(manifest, files, total_bytes, time.monotonic() - began)


def verify(directory: Path) -> dict[str, Any]:
    """Every shard of ``directory`` against its manifest; the manifest, or DataError."""
    data = ShardWindows(directory, block=1, seed=0)
    for k in range(len(data.shards)):
        data._shard(k)
    return data.manifest
