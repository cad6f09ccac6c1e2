"""The real node's figures on this machine: bring-up, image pull, first step, resize. Prints.

    .venv/bin/python benchmarks/real_node.py [--keep]

1. `joule cluster up` of a cluster with a real node (kubelet + containerd), no kwok nodes;
2. the trainer image into the node: build (cached by content), push, pull;
3. the operator and a 2-worker elastic GPT job (the trainer image, CPU, gloo): from apply to
   the first training step;
4. `kubectl scale` 2 -> 1 -> 2: from the command until training runs at the new size (the
   trainer's "step" events at that world size, read from the kubelet's pod logs).

Needs root on Linux. Not a test: nothing is asserted. The cluster is removed at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from kubernetes import config

from joule.cluster import ClusterSettings, down, up
from joule.cluster.nodebuild import node_binaries_for
from joule.cluster.realnode import NodeRecord, pull_image
from joule.cluster.settings import KUBERNETES_VERSION
from joule.demo.run import wait_established
from joule.images import ensure_trainer, push

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ghcr.io/joule-dev/trainer:0.1.0"


def say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def step_events(logs: Path, job: str) -> list[dict]:
    """Rank 0's JSON lines from the kubelet's log files of the job's pods (CRI format)."""
    out = []
    for log in logs.glob(f"*_{job}-worker-*/*/*.log"):
        for raw in log.read_text(errors="replace").splitlines():
            text = raw.split(" ", 3)[-1]
            if text.startswith('{"ts"'):
                try:
                    out.append(json.loads(text))
                except ValueError:
                    continue
    return sorted(out, key=lambda e: e["ts"])


def wait_step(logs: Path, job: str, world: int, after: float, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in step_events(logs, job):
            if e["event"] == "step" and e["world"] == world and e["ts"] > after:
                return e["ts"]
        time.sleep(0.2)
    raise SystemExit(f"no step at world {world} within {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = parser.parse_args()
    settings = ClusterSettings(name="bench-node", nodes=0, real_node=True)
    figures: dict[str, str] = {}
    started = time.monotonic()
    info = up(settings, progress=say)
    figures["cluster up (control plane + real node)"] = f"{info.started_in_s or 0:.1f} s"
    operator = None
    try:
        assert info.node is not None
        node = NodeRecord.from_json(info.node)
        layout = node.layout()
        t = time.monotonic()
        image = ensure_trainer(progress=say)
        figures["trainer image build"] = f"{time.monotonic() - t:.1f} s" + (
            "" if image.built else " (cached)"
        )
        pushed = push(image, registry=node.registry, progress=say)
        figures["push to the cluster's registry"] = f"{pushed.seconds:.1f} s" + (
            "" if pushed.pushed else " (already there)"
        )
        pulled = pull_image(node_binaries_for(KUBERNETES_VERSION).ctr, layout, IMAGE)
        figures["pull into containerd (3 GiB)"] = f"{pulled:.1f} s"

        kubectl = [str(info.kubectl), f"--kubeconfig={info.kubeconfig}"]
        subprocess.run([*kubectl, "apply", "-f", str(ROOT / "crds")], check=True)
        wait_established(config.new_client_from_config(config_file=str(info.kubeconfig)))
        env = {**os.environ, "KUBECONFIG": str(info.kubeconfig), "JOULE_LOG_FORMAT": "plain"}
        log = Path(tempfile.mkdtemp(prefix="joule-bench-")) / "operator.log"
        with open(log, "ab") as out:
            operator = subprocess.Popen(
                [sys.executable, "-m", "joule", "operator"], env=env, stdout=out, stderr=out
            )
        ckpt = Path(tempfile.mkdtemp(prefix="joule-bench-ckpt-"))
        ckpt.chmod(0o777)
        job = {
            "apiVersion": "joule.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "bench", "namespace": "default"},
            "spec": {
                "image": IMAGE,
                "args": ["--model", "gpt", "--steps", "100000", "--global-batch", "16",
                         "--micro-batch", "8", "--checkpoint-every-steps", "10",
                         "--log-every", "5"],
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"},
                        {"name": "JOULE_ENERGY_SOURCE", "value": "estimated"}],
                "replicas": 2,
                "elastic": {"minReplicas": 1, "maxReplicas": 2},
                "gpusPerReplica": 1,
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
                "sharedMemory": "64Mi",
                "checkpoint": {"path": "/checkpoints", "volume": "ckpt"},
                "volumes": [{"name": "ckpt", "hostPath": {"path": str(ckpt)}}],
            },
        }  # fmt: skip
        applied = time.time()
        subprocess.run([*kubectl, "apply", "-f", "-"], input=yaml.safe_dump(job), text=True)
        first = wait_step(layout.pod_logs, "bench", 2, applied)
        figures["apply -> first training step (2 workers)"] = f"{first - applied:.1f} s"
        for size in (1, 2):
            sent = time.time()
            subprocess.run([*kubectl, "scale", "tj/bench", f"--replicas={size}"], check=True)
            at = wait_step(layout.pod_logs, "bench", size, sent)
            figures[f"kubectl scale -> training at {size} worker(s)"] = f"{at - sent:.1f} s"
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(15)
        if not args.keep:
            down(settings)
    print(f"\nreal node figures ({time.monotonic() - started:.0f} s in all):")
    for name, value in figures.items():
        print(f"  {name:<44} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
