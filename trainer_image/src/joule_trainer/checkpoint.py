"""Checkpoints that survive being killed at any moment.

A checkpoint is written to a temporary file in the same folder, flushed and fsynced, then
renamed into place: the name ``step-<N>.pt`` only ever points at a complete file. Loading
walks the checkpoints newest first and skips any that does not load (a disk that lied, a
file copied by hand), so a torn checkpoint is never used. The last ``keep`` are kept.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("joule_trainer.checkpoint")
NAME = re.compile(r"^step-(\d{9})\.pt$")


def path_for(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.pt"


def save(directory: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = path_for(directory, step)
    tmp = directory / f".tmp-{final.name}.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_steps(directory)[:-keep]:
        path_for(directory, old).unlink(missing_ok=True)
    return final


def list_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := NAME.match(p.name)))


def load_latest(directory: Path) -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint that loads, as (step, state); None if there is none."""
    for step in reversed(list_steps(directory)):
        path = path_for(directory, step)
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
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
