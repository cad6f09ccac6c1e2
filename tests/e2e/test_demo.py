"""`joule demo` (what `make demo` runs), end to end with a short job: it brings everything
up, trains, shows the view, and leaves nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MARKER = "4242"  # a seed no other test uses: finds this demo's processes in /proc


def job(checkpoints: Path) -> dict:
    return {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "short"},
        "spec": {
            "image": "ghcr.io/joule-dev/trainer:0.1.0",
            "args": ["--steps", "120", "--global-batch", "16", "--seed", MARKER],
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "replicas": 2,
            "gpusPerReplica": 1,
            "sharedMemory": "64Mi",
            "checkpoint": {"path": "/checkpoints", "volume": "c"},
            "volumes": [{"name": "c", "hostPath": {"path": str(checkpoints)}}],
        },
    }


def demo_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--seed" in argv and MARKER.encode() in argv:
            found.append(entry.name)
    return found


@pytest.mark.timeout(600)
def test_joule_demo_trains_the_examples_and_tears_everything_down(tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "short.yaml").write_text(yaml.safe_dump(job(tmp_path / "ckpt")))
    argv = [sys.executable, "-m", "joule", "demo", "--until-done", "--timeout", "400"]
    out = subprocess.run(
        [*argv, "--examples", str(examples)],
        capture_output=True,
        text=True,
        timeout=560,
        env={**os.environ, "JOULE_ENERGY_SOURCE": "estimated"},
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "first training step" in text
    assert "short" in text and "Succeeded" in text
    assert "http://127.0.0.1:" in text  # the operator's metrics URL was shown
    assert "stopped; nothing left running" in text
    assert (tmp_path / "ckpt" / "step-000000120.pt").is_file()
    assert demo_processes() == []
    status = subprocess.run(
        [sys.executable, "-m", "joule", "cluster", "status", "--name", "demo"],
        capture_output=True,
        text=True,
    )
    assert status.returncode == 1 and "not running" in status.stdout
