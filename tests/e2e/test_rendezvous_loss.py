"""Worker 0 lost while the group trains: the pod that hosts torchrun's c10d rendezvous store
(every worker's PET_RDZV_ENDPOINT names it) is deleted with grace period 0 on a healthy node,
as `kubectl delete pod --force --grace-period=0` does.

What happens, and what the test holds to: the operator creates worker 0 again under its name
at once (a deleted pod is not a failure: nothing is counted for it). The surviving worker's
torchrun agent could not follow the store to the new pod (its client stays connected to the
old address; torch's c10d rendezvous has no failover) and would fail within seconds with
RendezvousConnectionError, counted as a restart and replaced only after
restartBackoffSeconds; so the operator releases it at once instead (RendezvousHostLost, not
counted), and creates it again once it is gone. The new pair forms a group at 2 workers,
resumes from the newest checkpoint on the shared volume and trains to Succeeded, with no
restart counted. No index ever has two pods.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from kubernetes import client, watch

from joule.constants import LABEL_INDEX, LABEL_JOB
from tests.conftest import RealNode
from tests.e2e.test_local_loop import apply, events, status, wait_event, wait_phase

JOB = "rdzv"
CHECKPOINT_EVERY = 50  # steps; 2 workers train 10-20 steps/s here (gpt, batch 16, 2 cores)
STEPS = 800  # about a minute of training after the group re-forms


def running_tasks(node: RealNode) -> set[str]:
    """The IDs of the node's running containers (and sandboxes), from containerd."""
    from joule.cluster.nodebuild import node_binaries_for
    from joule.cluster.realnode import ctr_argv
    from joule.cluster.settings import KUBERNETES_VERSION

    ctr = node_binaries_for(KUBERNETES_VERSION).ctr
    argv = ctr_argv(ctr, node.layout, "task", "ls")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    rows = (line.split() for line in out.splitlines()[1:])
    return {row[0] for row in rows if row[2:3] == ["RUNNING"]}


@dataclass
class PodWatch:
    """The job's pods, from a watch: two pods of one index in the API at once (Terminating
    ones included) is a duplicate. Alongside, containerd's running containers, polled, tell
    how long a deleted pod's container outlived its pod on the node."""

    core: client.CoreV1Api
    namespace: str
    node: RealNode
    seen: list[tuple[float, str, str, str, str, bool]] = field(default_factory=list)
    duplicates: list[tuple[float, str, list[str]]] = field(default_factory=list)
    most: int = 0  # the most worker pods that existed at once
    # pod uid -> (first, last) time its trainer container was seen running
    ran: dict[str, list[float]] = field(default_factory=dict)
    containers: dict[str, str] = field(default_factory=dict)  # container id -> pod uid
    _live: dict[str, str] = field(default_factory=dict)  # uid -> index
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for target in (self._watch, self._poll):
            self._threads.append(threading.Thread(target=target, daemon=True))
            self._threads[-1].start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _watch(self) -> None:
        version = None
        while not self._stop.is_set():
            w = watch.Watch()
            try:
                for item in w.stream(
                    self.core.list_namespaced_pod, self.namespace,
                    label_selector=f"{LABEL_JOB}={JOB}", timeout_seconds=5,
                    **({"resource_version": version} if version else {}),
                ):  # fmt: skip
                    pod: client.V1Pod = item["object"]
                    version = pod.metadata.resource_version
                    self._record(item["type"], pod)
                    if self._stop.is_set():
                        break
            except client.ApiException as exc:
                if exc.status != 410:  # Gone: list again from now
                    raise
                version = None
            finally:
                w.stop()

    def _record(self, kind: str, pod: client.V1Pod) -> None:
        meta = pod.metadata
        gone = meta.deletion_timestamp is not None
        self.seen.append((time.time(), kind, meta.name, meta.uid, pod.status.phase, gone))
        for c in pod.status.container_statuses or []:
            if c.container_id:
                self.containers[c.container_id.split("://")[-1]] = meta.uid
        if kind == "DELETED":
            self._live.pop(meta.uid, None)
        else:
            self._live[meta.uid] = meta.labels.get(LABEL_INDEX, "?")
        self.most = max(self.most, len(self._live))
        for index in set(self._live.values()):
            uids = [uid for uid, i in self._live.items() if i == index]
            if len(uids) > 1:
                self.duplicates.append((time.time(), index, uids))

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                tasks = running_tasks(self.node)
                now = time.time()
                for cid, uid in list(self.containers.items()):
                    if cid in tasks:
                        self.ran.setdefault(uid, [now, now])[1] = now

    def uids(self, name: str) -> list[str]:
        """The UIDs pod ``name`` had, in the order they appeared."""
        out: list[str] = []
        for _, _, n, uid, _, _ in self.seen:
            if n == name and uid not in out:
                out.append(uid)
        return out


def job_events(core: client.CoreV1Api, namespace: str) -> list[client.CoreV1Event]:
    said = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={JOB}").items
    return sorted(
        said, key=lambda e: str(e.first_timestamp or e.event_time or e.metadata.creation_timestamp)
    )


@pytest.mark.timeout(900)  # the first test of a run also brings up the cluster and images
def test_losing_the_rendezvous_host_re_forms_the_group_from_the_newest_checkpoint(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    began = time.monotonic()
    pods = PodWatch(core, namespace, local_node)
    pods.start()
    try:
        train = ["--steps", str(STEPS), "--checkpoint-every-steps", str(CHECKPOINT_EVERY),
                 "--log-every", "1"]  # fmt: skip
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        apply(kubectl, namespace, JOB, local_node, ckpt, train, replicas=2)
        wait_phase(api, namespace, JOB, "Running", timeout=180)
        # Lose it between two checkpoints, past the last one by more than half an interval.
        saved = wait_event(
            local_node, namespace, JOB,
            lambda e: e["event"] == "checkpoint" and e["step"] >= CHECKPOINT_EVERY, timeout=180,
        )  # fmt: skip
        midway = saved["step"] + CHECKPOINT_EVERY // 2 + 1
        wait_event(
            local_node, namespace, JOB,
            lambda e: e["event"] == "step" and e["step"] >= midway, after=saved["ts"],
        )  # fmt: skip
        host = core.read_namespaced_pod(f"{JOB}-worker-0", namespace)
        survivor = core.read_namespaced_pod(f"{JOB}-worker-1", namespace)
        assert status(api, namespace, JOB)["restarts"] == 0

        core.delete_namespaced_pod(host.metadata.name, namespace, grace_period_seconds=0)
        lost_at = time.time()

        # The group re-forms: a "resumed" line from a group that started after the loss.
        resumed = wait_event(
            local_node, namespace, JOB, lambda e: e["event"] == "resumed", after=lost_at,
            timeout=240,
        )  # fmt: skip
        training = wait_event(
            local_node, namespace, JOB,
            lambda e: e["event"] == "step" and e["step"] > resumed["step"], after=resumed["ts"],
            timeout=120,
        )  # fmt: skip
        reformed_s = training["ts"] - lost_at
        before = [e for e in events(local_node, namespace, JOB) if e["ts"] < resumed["ts"]]
        reached = max(e["step"] for e in before if e["event"] == "step")
        newest = max(e["step"] for e in before if e["event"] == "checkpoint")
        final = [e["step"] for e in before if e["event"] == "sigterm"]
        lost = reached - resumed["step"]
        print(
            f"\nworker 0 (the rendezvous host) deleted at step >= {midway}; the old group "
            f"reached step {reached}, newest checkpoint step {newest}"
            f"{' (written on SIGTERM)' if final else ''}; resumed from step "
            f"{resumed['step']} at world {resumed['world']}: {lost} steps lost (checkpoint "
            f"every {CHECKPOINT_EVERY}); training again {reformed_s:.1f}s after the delete"
        )
        assert resumed["step"] == newest, (resumed, newest)  # the newest, not an older one
        assert 0 <= lost <= CHECKPOINT_EVERY, (reached, resumed)
        assert resumed["world"] == training["world"] == 2, (resumed, training)

        done = wait_phase(api, namespace, JOB, "Succeeded", timeout=300)
        finished_s = time.time() - lost_at
        steps = [e for e in events(local_node, namespace, JOB) if e["event"] == "step"]
        assert steps[-1]["step"] == STEPS, steps[-1]
    finally:
        pods.stop()
        said = job_events(core, namespace)
        for e in said:
            print(f"event {e.first_timestamp} x{e.count} {e.type} {e.reason}: {e.message}")
        for t, kind, name, uid, phase, gone in pods.seen:
            print(f"pod {t:.1f} {kind} {name} {uid[:8]} {phase}{' terminating' if gone else ''}")
        print(f"operator log: {operator.log}")

    # No index ever had two pods, and no more than the two workers existed at once.
    assert pods.duplicates == [], pods.duplicates
    assert pods.most == 2, pods.most
    # Worker 0 again under its name, as a new pod, and no more than once.
    old0, *new0 = pods.uids(f"{JOB}-worker-0")
    assert old0 == host.metadata.uid and len(new0) == 1, pods.seen
    # The survivor lost the store with worker 0: released, and replaced once.
    old1, *new1 = pods.uids(f"{JOB}-worker-1")
    assert old1 == survivor.metadata.uid and len(new1) == 1, pods.seen

    # What the job says: worker 0 recreated and worker 1 released, neither counted.
    created = [e.message for e in said if e.reason == "CreatedWorkers"]
    assert created == ["creating workers 0, 1", "creating workers 0", "creating workers 1"], (
        created
    )  # fmt: skip
    released = [e.message for e in said if e.reason == "RendezvousHostLost"]
    assert len(released) == 1 and "releasing workers 1 " in released[0], released
    assert not [e for e in said if e.reason == "WorkerFailed"], said
    assert done["restarts"] == 0, done
    assert not [e for e in said if e.reason in ("NodeLost", "ForceDeleted", "StartupTimeout")]

    # How long the deleted pod's container outlived it on the node (kubelet: SIGTERM, then
    # SIGKILL after its least grace period), against its replacement's start.
    old_ran, new_ran = pods.ran.get(old0), pods.ran.get(new0[0])
    overlap = (
        f"the old worker 0's container ran {old_ran[1] - lost_at:.1f}s past the delete, "
        f"its replacement's from {new_ran[0] - lost_at:.1f}s"
        if old_ran and new_ran else "containers not seen"
    )  # fmt: skip
    print(
        f"worker 0 lost: {overlap}; training again after {reformed_s:.1f}s, Succeeded "
        f"{finished_s:.0f}s after the delete with {done['restarts']} restarts; "
        f"test {time.monotonic() - began:.0f}s"
    )
