"""A real node lost while a job trains on it, and what the job loses: at most the steps
since its last checkpoint.

The node is the test cluster's real node (kubelet + containerd), "lost" by stopping every
process of it (SIGSTOP): the kubelet no longer renews its Lease, kube-controller-manager
marks the node Unknown after node-monitor-grace-period (50 s) and taints it unreachable,
the workers are evicted after nodeLostTimeoutSeconds and stay Terminating (the kubelet
confirms nothing), and the operator force-deletes them 30 s past their grace period and
creates them again. There is one real node only, so the replacements wait (unschedulable,
the node is tainted) until the node comes back: its containers are killed, as a machine
that rebooted has none, and the rest of it (kubelet, containerd) continues. The new
workers then resume from the newest checkpoint on the shared volume, which is what a
replacement on another node would do too.

The operator runs here as a process on the host, not as the chart's pod: on the one real
node it would be lost with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
from kubernetes import client

from joule.cluster.realnode import node_processes
from tests.conftest import OperatorProcess, wait_for
from tests.e2e.test_local_loop import apply, events, status, wait_event

CHECKPOINT_EVERY = 10  # steps
NODE_LOST_TIMEOUT = 30  # seconds


def descendants(pids: set[int]) -> set[int]:
    """The processes and all their children (a container's torchrun and its trainers are in
    its cgroup already; this also takes any that left it)."""
    out: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            out.add(pid)
            for task in Path(f"/proc/{pid}/task").iterdir():
                children = {int(c) for c in (task / "children").read_text().split()}
                out |= descendants(children)
    return out


def signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def pod_uids(core: client.CoreV1Api, namespace: str) -> dict[str, str]:
    return {p.metadata.name: p.metadata.uid for p in core.list_namespaced_pod(namespace).items}


def job_events(core: client.CoreV1Api, namespace: str, name: str, reason: str) -> list[str]:
    items = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},reason={reason}"
    ).items
    return [e.message for e in items]


@pytest.mark.timeout(900)
def test_a_lost_node_costs_the_job_at_most_one_checkpoint_interval_of_steps(
    kubectl, api, core, namespace, local_node, operator_kubeconfig, tmp_path
):
    op = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log")
    op.start()
    containers: set[int] = set()
    rest: set[int] = set()
    try:
        train = ["--steps", "100000", "--checkpoint-every-steps", str(CHECKPOINT_EVERY),
                 "--log-every", "1"]  # fmt: skip
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        # Not a few seconds: a node back from a long stop may say NotReady for a moment (its
        # kubelet catching up), and workers that tolerate less are evicted again then.
        apply(kubectl, namespace, "lost", local_node, ckpt, train, replicas=2,
              nodeLostTimeoutSeconds=NODE_LOST_TIMEOUT, backoffLimit=6)  # fmt: skip
        # Lose it between two checkpoints, where it costs the most: past a checkpoint by
        # more than half an interval.
        first = 2 * CHECKPOINT_EVERY
        saved = wait_event(
            local_node, namespace, "lost",
            lambda e: e["event"] == "checkpoint" and e["step"] >= first, timeout=300,
        )  # fmt: skip
        midway = saved["step"] + CHECKPOINT_EVERY // 2 + 1
        wait_event(
            local_node, namespace, "lost",
            lambda e: e["event"] == "step" and e["step"] >= midway, after=saved["ts"],
        )  # fmt: skip
        uids = pod_uids(core, namespace)

        containers, rest = node_processes(local_node.record)
        containers = descendants(containers)
        signal_all(containers | rest, signal.SIGSTOP)
        lost_at = time.time()
        started = time.monotonic()
        last = max(e["step"] for e in events(local_node, namespace, "lost")
                   if e["event"] == "step" and e["ts"] <= lost_at)  # fmt: skip

        def forced() -> bool:
            pods = pod_uids(core, namespace)
            return all(pods.get(name) not in (None, uid) for name, uid in uids.items())

        # 50 s to Unknown, 30 s to the eviction, 60 s of grace period and 30 s more.
        wait_for(forced, timeout=360, interval=1, what="both workers forced out and recreated")
        forced_after = time.monotonic() - started
        assert len(job_events(core, namespace, "lost", "NodeLost")) == 2
        assert len(job_events(core, namespace, "lost", "ForceDeleted")) == 2
        assert status(api, namespace, "lost")["restarts"] == 2  # both workers were there

        # The node comes back without its containers, as a rebooted machine.
        signal_all(containers, signal.SIGKILL)
        signal_all(rest, signal.SIGCONT)
        back_at = time.time()
        resumed = wait_event(
            local_node, namespace, "lost",
            lambda e: e["event"] == "resumed", after=back_at, timeout=300,
        )  # fmt: skip
        steps_lost = last - resumed["step"]
        print(
            f"\nnode lost at step {last}; workers forced out and recreated after "
            f"{forced_after:.0f}s; resumed from the step-{resumed['step']} checkpoint: "
            f"{steps_lost} steps lost (checkpoint every {CHECKPOINT_EVERY})"
        )
        assert 0 <= steps_lost <= CHECKPOINT_EVERY, (last, resumed)
        wait_event(local_node, namespace, "lost",
                   lambda e: e["event"] == "step" and e["step"] > resumed["step"],
                   after=resumed["ts"])  # fmt: skip
        assert status(api, namespace, "lost")["phase"] == "Running"
    finally:
        signal_all(rest, signal.SIGCONT)  # never leave the node stopped
        signal_all(containers, signal.SIGCONT)
        op.stop()
        print(f"operator log: {op.log}")
        node = type(local_node).name
        said = core.list_namespaced_event(
            "default", field_selector=f"involvedObject.kind=Node,involvedObject.name={node}"
        ).items
        for e in sorted(said, key=lambda e: str(e.last_timestamp)):
            print(f"node {node}: {e.last_timestamp} {e.reason}: {e.message}")
