"""What a demo leaves running when it dies without tearing down (SIGKILL, a crash, the
machine's OOM killer), and how the next demo finds and stops it.

The operator and the node agent run in sessions of their own (Ctrl-C in the terminal must not
reach them before the demo has stopped the workers), so they outlive a demo that dies. The demo
records each of them (pid + start time) as it starts it; the node agent's workers are found in
/proc by their home or working directory, which the node agent puts under its own state dir.
Nothing is signalled unless its start time still matches (``joule.cluster.process``), so a
process that reused a pid is never touched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joule.cluster import process
from joule.cluster.process import ProcessRecord


@dataclass
class DemoState:
    """The demo process itself and what it started, as written to ``demo.json``."""

    demo: ProcessRecord | None = None
    children: list[ProcessRecord] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "demo": self.demo.to_json() if self.demo else None,
            "children": [c.to_json() for c in self.children],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DemoState:
        demo = data.get("demo")
        return cls(
            demo=ProcessRecord.from_json(demo) if demo else None,
            children=[ProcessRecord.from_json(c) for c in data.get("children", [])],
        )


def load(path: Path) -> DemoState:
    """The recorded state; empty when there is none or it cannot be read (a torn write by a
    killed demo: the worker scan still finds its workers)."""
    try:
        return DemoState.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return DemoState()
    except (ValueError, KeyError, TypeError, AttributeError):
        return DemoState()


def save(path: Path, state: DemoState) -> None:
    """Written whole and renamed into place: a demo killed mid-write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2))
    tmp.replace(path)


def _under(path: str, root: Path) -> bool:
    # A directory removed while the process runs reads back as "<path> (deleted)".
    path = path.removesuffix(" (deleted)")
    return path == str(root) or path.startswith(f"{root}/")


def _home(environ: bytes) -> str | None:
    for item in environ.split(b"\0"):
        if item.startswith(b"HOME="):
            return item[5:].decode(errors="replace")
    return None


def workers(pods_dir: Path, proc: Path = Path("/proc")) -> list[ProcessRecord]:
    """Every process whose HOME or working directory is under ``pods_dir``: the node agent sets
    both to the pod's directory there, and torchrun's workers inherit them. Processes of other
    users (unreadable) and this process are skipped."""
    found: list[ProcessRecord] = []
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            home = _home((entry / "environ").read_bytes())
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (home is not None and _under(home, pods_dir)) or _under(cwd, pods_dir):
            rec = process.record("worker", int(entry.name))
            if rec is not None:
                found.append(rec)
    return found


def stop(records: Iterable[ProcessRecord], grace_seconds: float) -> list[ProcessRecord]:
    """Stop those still alive (SIGTERM, then SIGKILL after the grace period); returns those
    that were alive, so the caller can say what it stopped."""
    live = [r for r in records if process.alive(r)]
    process.stop(live, grace_seconds)
    still = [r.name for r in live if process.alive(r)]
    if still:
        raise RuntimeError(f"could not stop {', '.join(still)}")
    return live


def describe(stopped: list[ProcessRecord]) -> str:
    """What was stopped, in words: operator (pid 12), node-agent (pid 13), 2 worker processes."""
    named = [f"{r.name} (pid {r.pid})" for r in stopped if r.name != "worker"]
    count = sum(r.name == "worker" for r in stopped)
    if count:
        named.append(f"{count} worker process{'es' if count > 1 else ''}")
    return ", ".join(named)
