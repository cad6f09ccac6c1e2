"""Checkpoints that survive being killed at any moment.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
renamed into place: the name ``step-<N>.pt`` only ever points at a complete file. Loading
walks the checkpoints newest first and skips any that does not load (a disk that lied, a
file copied by hand, a file that is not plain data), so a torn or planted checkpoint is never
used. The last ``keep`` are kept, and temporary files left by killed saves are removed by a
later save.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("joule_trainer.checkpoint")
NAME = re.compile(r"^step-(\d{9})\.pt$")
TEMP_PREFIX = ".tmp-"
# When this process started, near enough: the trainer imports this module first thing.
PROCESS_STARTED = time.time()


def path_for(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.pt"


def save(
    directory: Path,
    step: int,
    state: dict[str, Any],
    keep: int = 3,
    *,
    started: float = PROCESS_STARTED,
) -> Path:
    """Write ``state`` as step ``step``; ``started`` (wall clock) is when the writer started,
    and temporary files older than that are removed (see ``_remove_stale_temps``)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = path_for(directory, step)
    # The host name too: pods on different machines sharing the folder may have equal pids.
    tmp = directory / f"{TEMP_PREFIX}{final.name}.{socket.gethostname()}.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    written_here = time.time()
    written_there = tmp.stat().st_mtime  # the same moment on the file system's clock
    os.replace(tmp, final)
    _fsync_dir(directory)
    _remove_stale_temps(directory, started + (written_there - written_here))
    for old in list_steps(directory)[:-keep]:
        path_for(directory, old).unlink(missing_ok=True)
    return final


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


def load_latest(directory: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that loads, as (step, state); None if there is none.

    ``weights_only=True``: a checkpoint may only hold tensors and plain data (dicts, lists,
    tuples, numbers, strings, None), so a planted file cannot run code when it is unpickled;
    one that holds anything else is skipped as unreadable. The trainer's state needs nothing
    more (the Python RNG state is a tuple of ints), so no other type is allowlisted.
    """
    for step in reversed(list_steps(directory)):
        path = path_for(directory, step)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is skipped, never trusted
            log.warning("skipping unreadable checkpoint %s: %s", path, exc)
            continue
        if isinstance(state, dict) and state.get("step") == step:
            return step, state
        log.warning("skipping checkpoint %s: its content is not step %d", path, step)
    return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
