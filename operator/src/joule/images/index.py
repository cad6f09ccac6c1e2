"""The record of what was built and pushed: input hash -> image id, and per registry
destination the image and manifest digest that went there. A small JSON file beside
buildah's storage; losing it costs one rebuild check, never a wrong image (every hit is
checked against buildah's storage or the registry)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update(path: Path, key: str, value: object) -> None:
    """Set one entry, written atomically (a build interrupted mid-write leaves the old file),
    under a lock (two processes updating different entries both keep theirs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = load(path)
        data[key] = value
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)
