"""What a demo leaves running when it dies without tearing down (SIGKILL, a crash, the
machine's OOM killer), and how the next demo finds and stops it.

The operator runs in a session of its own (Ctrl-C in the terminal must not reach it before
the demo has deleted the jobs), so it outlives a demo that dies; the demo records it (pid +
start time) as it starts it, and itself, so that a second demo refuses to start beside a live
one. Nothing is signalled unless its start time still matches (``joule.cluster.process``), so
a process that reused a pid is never touched. The cluster (control plane, node, containers)
is not recorded here: ``joule.cluster.down`` finds all of it by the cluster's name.
"""

from __future__ import annotations

import json
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
    killed demo; its cluster is still found and removed by name)."""
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
    """What was stopped, in words: operator (pid 12), registry (pid 13)."""
    return ", ".join(f"{r.name} (pid {r.pid})" for r in stopped)
