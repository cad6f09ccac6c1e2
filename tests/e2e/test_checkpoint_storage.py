"""A checkpoint volume that fills up, then turns read-only, under Joule's trainer on the real
node. The volume is a hostPath on a 2 MiB tmpfs: room for one checkpoint of the small GPT
(1.4 MiB) but not two. Full: the save at step 20 fails, the job is Failed with the trainer's
line (its termination message) and exit code 74, and the step-10 checkpoint is whole. Then
read-only: the job resumes from it and stops before its first step, saying so.

The node runs in a mount namespace of its own, which a mount made here does not reach (the
host's / is private): the tmpfs is mounted inside it, and read through /proc/<pid>/root."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.e2e.test_local_loop import apply, events
from tests.e2e.test_restart_backoff import watch_until_finished

TRAIN = ["--steps", "1000", "--checkpoint-every-steps", "10", "--log-every", "5"]
CKPT = "/checkpoints"  # the volume's path in the container (apply's checkpoint.path)


class NodeTmpfs:
    """A tmpfs at ``path`` as the node's kubelet and containerd see it."""

    def __init__(self, node_pid: int, path: Path) -> None:
        self.pid = node_pid
        self.path = path

    def run(self, *argv: str) -> None:
        subprocess.run(["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--", *argv], check=True)

    @property
    def seen(self) -> Path:
        """The same folder, as the node sees it."""
        return Path(f"/proc/{self.pid}/root{self.path}")


@pytest.fixture
def node_tmpfs(local_node, tmp_path) -> Iterator[NodeTmpfs]:
    from joule.cluster.realnode import node_processes

    _, node = node_processes(local_node.record)  # kubelet, containerd, the namespace holder
    holder = [p for p in node if Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"sleep")]
    fs = NodeTmpfs(min(holder or node), tmp_path / "ckpt")
    fs.path.mkdir()
    fs.run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0777", "tmpfs", str(fs.path))
    try:
        yield fs
    finally:
        try:
            fs.run("umount", str(fs.path))
        except subprocess.CalledProcessError:
            fs.run("umount", "-l", str(fs.path))  # a container not yet gone holds it


@pytest.mark.timeout(300)
def test_a_full_then_read_only_checkpoint_volume_fails_the_job_saying_so_and_keeps_its_checkpoint(
    kubectl, api, namespace, operator, local_node, node_tmpfs
):
    ckpt = node_tmpfs.path
    once = {"backoffLimit": 0, "restartBackoffSeconds": 1}
    started = time.monotonic()
    apply(kubectl, namespace, "full", local_node, ckpt, TRAIN, **once)
    final = watch_until_finished(api, namespace, "full", timeout=150)[-1]
    took_full = time.monotonic() - started
    message = final.get("message", "")
    assert (final["phase"], final["reason"]) == ("Failed", "BackoffLimitExceeded"), final
    # The trainer's line, whole, from the termination message it wrote: torchrun's restarts
    # in the pod found the room missing before training (the last one's line is quoted).
    full = re.compile(
        r"full-worker-0 failed \(Error, exit code 74\): checkpoint directory /checkpoints is "
        r"full: No space left on device \(errno 28\), [\d.]+ MiB free and a checkpoint takes "
        r"[\d.]+ MiB; no step is trained, as none could be saved; the newest complete "
        r"checkpoint is step 10; 1 restarts > backoffLimit=0"
    )
    assert full.fullmatch(message), message
    assert final["podFailure"]["exitCode"] == 74, final
    # The save that failed first said so, in the log.
    log = "".join(p.read_text(errors="replace") for p in local_node.pod_logs(namespace, "full-"))
    assert (
        f"checkpoint step 20 to {CKPT} failed: No space left on device (errno 28); the newest "
        "complete checkpoint is step 10\n"
    ) in log, log[-3000:]
    run = events(local_node, namespace, "full")
    assert max(e["step"] for e in run if e["event"] == "step") == 20, run[-5:]
    assert [e["step"] for e in run if e["event"] == "checkpoint"] == [10]

    names = sorted(p.name for p in node_tmpfs.seen.iterdir())
    assert names == ["step-000000010.pt"], names  # no partial file left, the first kept
    kept = torch.load(node_tmpfs.seen / names[0], map_location="cpu", weights_only=True)
    assert kept["step"] == 10 and {"model", "optimizer", "rng"} <= set(kept)

    node_tmpfs.run("mount", "-o", "remount,ro", str(ckpt))
    started = time.monotonic()
    apply(kubectl, namespace, "ro", local_node, ckpt, TRAIN, **once)
    final = watch_until_finished(api, namespace, "ro", timeout=120)[-1]
    took_ro = time.monotonic() - started
    message = final.get("message", "")
    assert (final["phase"], final["reason"]) == ("Failed", "BackoffLimitExceeded"), final
    assert "ro-worker-0 failed (Error, exit code 74): " in message, message
    assert message.endswith(
        f"checkpoint directory {CKPT} is read-only: Read-only file system (errno 30); no step "
        "is trained, as none could be saved; the newest complete checkpoint is step 10; "
        "1 restarts > backoffLimit=0"
    ), message
    run = events(local_node, namespace, "ro")
    assert {e["step"] for e in run if e["event"] == "resumed"} == {10}  # it read the volume
    assert not [e for e in run if e["event"] == "step"], run[-5:]
    print(f"\nfull volume: Failed in {took_full:.0f}s; read-only: Failed in {took_ro:.0f}s")
