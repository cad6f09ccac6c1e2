"""kstatus, as Flux and kpt compute it, for checking what the operator writes in status.

GitOps tools judge a custom resource by its status: Flux's ``wait``/``healthChecks`` and kpt
through ``sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute``; Argo CD through a Lua health
check (examples/gitops/argocd/health.lua). A small Go program (``kstatus/main.go``, shipped
with this package) runs that very ``Compute`` on objects given on stdin, so tests can hold
the operator's conditions to it rather than to a reading of its rules. See kstatus/README.md.

Built and cached like the device plugin (``build.build_go_program``): under
``<cache>/kstatus/<hash of the Go sources>/bin/``, so an edit builds anew and an unchanged
tree never rebuilds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joule.cluster.build import Progress, _find_go, _stderr, build_go_program, go_program_hash
from joule.cluster.settings import cache_dir

SOURCE_DIR = Path(__file__).with_name("kstatus")
BINARY_NAME = "joule-kstatus"


class KStatusError(RuntimeError):
    """The program refused its input (not YAML/JSON objects); the message quotes it."""


@dataclass(frozen=True)
class Result:
    """One object's kstatus: ``status`` is Current, InProgress, Failed, Terminating,
    NotFound or Unknown; ``message`` is kstatus' own explanation."""

    kind: str
    namespace: str
    name: str
    status: str
    message: str


def kstatus_binary(root: Path | None = None, source: Path = SOURCE_DIR) -> Path:
    """Where the binary built from these sources lives (built or not)."""
    return (
        (root or cache_dir()) / "kstatus" / go_program_hash(source, "kstatus") / "bin" / BINARY_NAME
    )


def build_kstatus(go: str, target: Path, say: Progress, source: Path = SOURCE_DIR) -> None:
    """Build the program into ``target``."""
    build_go_program(go, source, target, "kstatus", say)


def ensure_kstatus(progress: Progress | None = None, root: Path | None = None) -> Path:
    """The cached binary for the current sources, building it first if needed (~25 s cold on
    2 cores: only apimachinery and cli-utils' status package are compiled)."""
    target = kstatus_binary(root)
    if not target.is_file():
        build_kstatus(_find_go(), target, progress or _stderr)
    return target


def compute(
    objects: Iterable[dict[str, Any]], binary: Path | None = None, timeout_s: float = 30.0
) -> list[Result]:
    """kstatus of each object, in order (a ``List`` counts as its items)."""
    stdin = "".join(json.dumps(obj) + "\n" for obj in objects)
    proc = subprocess.run(
        [str(binary or ensure_kstatus())],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise KStatusError(f"{BINARY_NAME} exited {proc.returncode}: {proc.stderr.strip()}")
    results = []
    for line in proc.stdout.splitlines():
        data = json.loads(line)
        results.append(
            Result(
                kind=data["kind"],
                namespace=data.get("namespace", ""),
                name=data["name"],
                status=data["status"],
                message=data["message"],
            )
        )
    return results
