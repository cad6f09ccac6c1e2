"""Checkpoints that survive being killed at any moment.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
renamed into place: the name ``step-<N>.pt`` only ever points at a complete file. Loading
walks the checkpoints newest first and skips any that does not load (a disk that lied, a
file copied by hand, a file that is not plain data), so a torn or planted checkpoint is never
used. The last ``keep`` are kept, and temporary files left by killed saves are removed by a
later save.

Storage that cannot take a checkpoint (read-only, full, not permitted) is an ``OSError`` from
``save``, which then leaves nothing of its own behind and has touched no earlier checkpoint;
``check_storage`` finds it before training. ``StorageError`` says so in one line, and
``EXIT_STORAGE`` is the trainer's exit code for it.

With a key (``crypt``), checkpoints are encrypted and authenticated (AES-256-GCM, bound to
their step): one that does not verify (another key, a changed or renamed file, a plaintext
file) is skipped with a warning naming it, and the newest that verifies is used. Where there
are checkpoints and none can be used for that reason, ``load_latest`` raises
``CheckpointsRefused`` rather than let the job start over from step 0 beside them.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch

from joule_trainer import crypt

log = logging.getLogger("joule_trainer.checkpoint")
NAME = re.compile(r"^step-(\d{9})\.pt$")
TEMP_PREFIX = ".tmp-"
# When this process started, near enough: the trainer imports this module first thing.
PROCESS_STARTED = time.time()
# The trainer's exit code when its checkpoint directory cannot take a checkpoint: sysexits.h's
# EX_IOERR. joule-launch makes it the container's too (torchrun alone exits 1 whatever its
# process did), so a pod's status shows it.
EXIT_STORAGE = 74
EXIT_CONFIG = crypt.EXIT_CONFIG  # 78: checkpoints this job's key cannot open, a bad key file


class StorageError(Exception):
    """The checkpoint directory cannot take a checkpoint; ``str()`` is the one line that says
    where, why (the system's words and errno) and which checkpoint is the newest."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.code = code  # an errno, never 0: ranks agree on it with an all-reduce (max)


class CheckpointsRefused(crypt.ConfigError):
    """Checkpoints are there, and none can be used: each was refused for the key (see
    ``load_latest``); ``str()`` is one line naming the directory, how many and why."""


def path_for(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.pt"


def save(
    directory: Path,
    step: int,
    state: dict[str, Any],
    keep: int = 3,
    *,
    started: float = PROCESS_STARTED,
    key: bytes | None = None,
) -> Path:
    """Write ``state`` as step ``step``; ``started`` (wall clock) is when the writer started,
    and temporary files older than that are removed (see ``_remove_stale_temps``). With
    ``key``, the file is the serialized state encrypted for that step (``crypt.seal``)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = path_for(directory, step)
    # The host name too: pods on different machines sharing the folder may have equal pids.
    tmp = directory / f"{TEMP_PREFIX}{final.name}.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if key is None:
                torch.save(state, f)
            else:
                plain = io.BytesIO()
                torch.save(state, plain)
                f.write(crypt.seal(key, step, plain.getbuffer()))
            f.flush()
            os.fsync(f.fileno())
        written_here = time.time()
        written_there = tmp.stat().st_mtime  # the same moment on the file system's clock
        os.replace(tmp, final)
    except BaseException as exc:
        # Our partial file goes at once: a full disk is left as full as before this save,
        # so the checkpoints already there stay whole and readable. None of them has been
        # touched: the oldest are removed only below, once this one is in place.
        _discard(tmp)
        cause = os_error(exc)
        if cause is not None and cause is not exc:  # torch.save wraps it in a RuntimeError
            raise OSError(cause.errno, cause.strerror, str(tmp)) from exc
        raise
    _fsync_dir(directory)
    _remove_stale_temps(directory, started + (written_there - written_here))
    for old in list_steps(directory)[:-keep]:
        try:
            path_for(directory, old).unlink(missing_ok=True)
        except OSError as exc:  # the new checkpoint is in place: this save succeeded
            log.warning("could not remove old checkpoint step %d: %s", old, exc)
    return final


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        # A read-only volume refuses even to unlink a file that is not there.
        if os.path.lexists(tmp):  # it turned read-only midway: a later save removes it
            log.warning("could not remove %s: %s", tmp, exc)


def os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one it was raised from or while handling
    (torch.save reports a full disk as "RuntimeError: ... unexpected pos", raised while
    handling the OSError that says ENOSPC)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    return None


def why(err: OSError) -> str:
    """The system's words and the errno: "No space left on device (errno 28)"."""
    return f"{err.strerror or err} (errno {err.errno})" if err.errno else str(err)


def newest_text(step: int | None) -> str:
    if step is None:
        return "there is no complete checkpoint yet"
    return f"the newest complete checkpoint is step {step}"


def save_failed(directory: Path, step: int, err: OSError, newest: int | None) -> StorageError:
    """The line for a save that failed; ``newest`` is the last checkpoint known whole."""
    return StorageError(
        f"checkpoint step {step} to {directory} failed: {why(err)}; {newest_text(newest)}",
        err.errno or errno.EIO,
    )


def _state(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "is read-only"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "is full"
    return "cannot be written"


def check_storage(directory: Path, newest: int | None) -> StorageError | None:
    """Before training: can ``directory`` take the next checkpoint? None if so, else why not.

    A file is made there, written, fsynced and removed, which a read-only volume, a folder
    the trainer may not write or a full disk refuses. Where a checkpoint exists already
    (``newest``, the step resumed from), the file system must also have room for one more
    of its size: a save writes the new checkpoint before removing the oldest, so with less
    room the next save fails, and the steps trained until then are lost. That is what a
    restart after a save that failed for space finds; it stops here instead of training a
    whole checkpoint interval again. File systems that report no size (f_blocks 0, some
    FUSE) are not judged by it."""
    tail = f"no step is trained, as none could be saved; {newest_text(newest)}"
    probe = directory / f"{TEMP_PREFIX}probe.{socket.gethostname()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"joule")
                f.flush()
                os.fsync(f.fileno())
        finally:
            _discard(probe)
    except OSError as err:
        return StorageError(
            f"checkpoint directory {directory} {_state(err)}: {why(err)}; {tail}",
            err.errno or errno.EIO,
        )
    if newest is None:
        return None
    try:
        size = path_for(directory, newest).stat().st_size
        fs = os.statvfs(directory)
    except OSError as exc:  # not a verdict on the storage: the save will tell
        log.warning("could not measure the room in %s: %s", directory, exc)
        return None
    free = fs.f_bavail * fs.f_frsize
    if fs.f_blocks == 0 or free >= size:
        return None
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return StorageError(
        f"checkpoint directory {directory} is full: {why(full)}, {_mib(free)} free and a "
        f"checkpoint takes {_mib(size)}; {tail}",
        errno.ENOSPC,
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _remove_stale_temps(directory: Path, started_fs_clock: float) -> None:
    """Remove temporary files that a killed save left behind.

    The rule: only rank 0 writes checkpoints and a group has one rank 0, so a temporary
    file last modified before this writer started belongs to a save that is over (killed,
    here or on another machine sharing the volume); a save still running keeps touching its
    file. A pid check cannot tell that across machines. Times are compared on the file
    system's clock (``started_fs_clock`` is our start shifted by the skew seen on the file
    just written), so nodes whose clocks disagree do not remove each other's live files.
    The skew is measured after the fsync, so it errs towards keeping a file, never removing.
    """
    for path in directory.iterdir():
        if not path.name.startswith(TEMP_PREFIX):
            continue
        try:
            if path.stat().st_mtime < started_fs_clock:
                path.unlink()
                log.info("removed %s, left by a save that did not finish", path)
        except FileNotFoundError:
            continue  # another cleaner got there first
        except OSError as exc:  # a leftover must never fail a good save
            log.warning("could not remove %s: %s", path, exc)


def list_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := NAME.match(p.name)))


def load_latest(directory: Path, key: bytes | None = None) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that loads, as (step, state); None if there is none.

    ``weights_only=True``: a checkpoint may only hold tensors and plain data (dicts, lists,
    tuples, numbers, strings, None), so a planted file cannot run code when it is unpickled;
    one that holds anything else is skipped as unreadable. The trainer's state needs nothing
    more (the Python RNG state is a tuple of ints), so no other type is allowlisted.

    With ``key``, only files that verify with it (``crypt.open_sealed``) are unpickled; the
    others are refused, and so is an encrypted file found without a key. Refused files are
    skipped as unreadable ones are, each with a warning naming it, but if every checkpoint
    there is unusable and any was refused, this raises ``CheckpointsRefused``: starting over
    from step 0 would train beside checkpoints that only the right key can tell apart.
    """
    steps = list(reversed(list_steps(directory)))
    refused: dict[str, list[str]] = {}  # why, in short -> the files refused for it
    for step in steps:
        path = path_for(directory, step)
        try:
            source = _source(path, step, key)
        except _Refused as exc:
            log.warning("%s: %s", path.name, exc)
            refused.setdefault(exc.short, []).append(path.name)
            continue
        except OSError as exc:
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is skipped, never trusted
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        if isinstance(state, dict) and state.get("step") == step:
            return step, state
        log.warning("skipping checkpoint %s: its content is not step %d", path, step)
    if refused:
        count = sum(len(names) for names in refused.values())
        whys = "; ".join(f"{', '.join(names)}: {why}" for why, names in refused.items())
        none = "verifies with this job's key" if key else "can be read without the job's key"
        # Short enough for a pod's status (the operator quotes 256 characters of it).
        raise CheckpointsRefused(
            f"checkpoint directory {directory}: {count} of {len(steps)} checkpoints refused, "
            f"none {none} ({whys}); not starting over from step 0 beside them"
        )
    return None


class _Refused(Exception):
    """A checkpoint refused for the key; ``str()`` says why, ``short`` in a few words."""

    def __init__(self, why: str, short: str) -> None:
        super().__init__(why)
        self.short = short


def _source(path: Path, step: int, key: bytes | None) -> Path | io.BytesIO:
    """What torch.load reads for ``path``: the file itself where there is no key and it is
    not encrypted, else its verified plaintext. _Refused for a file the key does not fit."""
    if key is None:
        with open(path, "rb") as f:
            head = f.read(len(crypt.MAGIC))
        if crypt.is_sealed(head):
            raise _Refused(
                "is encrypted, and this job has no key: it needs the key it was written with "
                "(spec.checkpoint.encryption.secretRef)",
                "encrypted, and this job has no key",
            )
        return path
    try:
        return io.BytesIO(crypt.open_sealed(key, step, path.read_bytes()))
    except crypt.NotVerified as exc:
        raise _Refused(f"does not verify with this job's key ({exc})", str(exc)) from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
