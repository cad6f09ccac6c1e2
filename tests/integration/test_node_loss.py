"""A node lost while a job runs on it, against the real control plane.

The node is a kwok node of the test's own, made "lost" by taking its node Lease away from
kwok: kwok then neither renews the Lease (the heartbeat kube-controller-manager's node
lifecycle controller watches) nor acts for the node's pods (it treats a node whose Lease
another holder has as not its own), so the node goes Ready=Unknown after the controller's
node-monitor-grace-period (50 s by default; the cluster sets none), is tainted
node.kubernetes.io/unreachable:NoExecute, its workers are evicted after their
nodeLostTimeoutSeconds, and they stay Terminating as they would on a dead machine: nobody
confirms their end. Removing kwok's annotation from the node would not do: kwok filters its
node watch by that annotation, so it never hears that the node left its selection and goes
on renewing the Lease; and patching Ready=Unknown and the taint by hand would test our
copy of the node lifecycle controller, not it (kwok would also set Ready back at once).

Fresh nodes per test: kwok also rewrites each node's status every 10-20 minutes, which would
bring a lost node back if that fell within the test; a node made here has not had one yet.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import yaml
from kubernetes import client

from joule.cluster.nodes import gpu_node
from joule.cluster.settings import NodeShape
from tests.conftest import Kubectl, wait_for
from tests.integration.test_operator import apply_job, events_of, job, jobs, wait_phase

__all__ = ["jobs"]  # the fixture, used by name

POOL_LABEL = "joule.dev/test-pool"
LOST_HOLDER = "joule-test-node-loss"
# Long enough that kwok never takes the Lease back during the test (it would once expired).
LOST_LEASE_SECONDS = 3600


def make_nodes(kubectl: Kubectl, core: client.CoreV1Api, pool: str, count: int) -> list[str]:
    """``count`` kwok nodes of one GPU each, labelled with ``pool``; Ready. Applied as the
    cluster registers its own (the client's models would want every nodeInfo field)."""
    names = [f"{pool}-{i}" for i in range(count)]
    manifests = []
    for i, name in enumerate(names):
        node = gpu_node(i, NodeShape(gpus=1))
        node["metadata"]["name"] = name
        node["metadata"]["labels"].update({"kubernetes.io/hostname": name, POOL_LABEL: pool})
        manifests.append(node)
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))

    def ready() -> bool:
        nodes = core.list_node(label_selector=f"{POOL_LABEL}={pool}").items
        return len(nodes) == count and all(
            any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            for n in nodes
        )

    wait_for(ready, timeout=60, what=f"kwok to make the {pool} nodes Ready")
    return names


def lose(coordination: client.CoordinationV1Api, node: str) -> None:
    """Take the node's Lease from kwok: its heartbeat stops, and kwok lets the node be."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    coordination.patch_namespaced_lease(
        node,
        "kube-node-lease",
        {"spec": {"holderIdentity": LOST_HOLDER, "leaseDurationSeconds": LOST_LEASE_SECONDS,
                  "renewTime": now}},
    )  # fmt: skip


def pod_named(core: client.CoreV1Api, namespace: str, name: str) -> client.V1Pod | None:
    try:
        return core.read_namespaced_pod(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def evicted(core: client.CoreV1Api, namespace: str, job_name: str, uid: str) -> str | None:
    """How the taint manager's eviction of the job's worker 1 was seen: "terminating" (the
    old pod still there, Terminating, marked DeletionByTaintManager), or "gone" (the old pod
    already removed, and the operator's NodeLost Event quoting the taint manager). The
    second happens in some runs: the old pod is removed within a second of its eviction,
    before its grace period (we believe kwok's pod-delete stage, whose delay has a jitter up
    to the deletion time, acting for a node whose Lease it no longer holds; not proven).
    The operator's force-delete of a pod that stays Terminating is then not needed here; it
    is tested on the real node too (tests/e2e/test_node_loss.py)."""
    pod = pod_named(core, namespace, f"{job_name}-worker-1")
    if pod is not None and pod.metadata.uid == uid:
        if pod.metadata.deletion_timestamp is None:
            return None
        marks = {c.type: c for c in pod.status.conditions or []}
        target = marks.get("DisruptionTarget")
        ok = target is not None and target.reason == "DeletionByTaintManager"
        return "terminating" if ok else None
    said = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={job_name}")
    lost = [e.message for e in said.items if e.reason == "NodeLost"]
    return "gone" if any("Taint manager" in m for m in lost) else None


def replaced(jobs: Any, core: client.CoreV1Api, namespace: str, job_name: str, old_uid: str,
             lost_node: str) -> dict[str, Any] | None:  # fmt: skip
    pod = pod_named(core, namespace, f"{job_name}-worker-1")
    if pod is None or pod.metadata.uid == old_uid or pod.status.phase != "Running":
        return None
    assert pod.spec.node_name != lost_node
    body = job(jobs, namespace, job_name)
    return body if body.get("status", {}).get("phase") == "Running" else None


def test_a_lost_nodes_worker_is_evicted_forced_and_replaced_and_the_job_runs_again(
    kubectl, jobs, core, api, namespace
):
    """Two jobs, each on nodes of its own (one GPU each: two workers and a spare): the node
    of each job's worker 1 is lost at the same moment. One node stays lost (its worker is
    force-deleted by the operator); the other is deleted once its worker was evicted (the
    pod GC then removes the worker, or the operator does first). Either way the worker
    comes back under its name on the spare node, the job runs again, restarts is 1 and a
    NodeLost Event says why."""
    coordination = client.CoordinationV1Api(api)
    started = time.monotonic()
    pools = {"kept": f"{namespace}-kept", "deleted": f"{namespace}-deleted"}
    made: list[str] = []
    try:
        for pool in pools.values():
            made += make_nodes(kubectl, core, pool, 3)
        for name, pool in pools.items():
            apply_job(kubectl, namespace, name, replicas=2, gpusPerReplica=1,
                      nodeSelector={POOL_LABEL: pool}, nodeLostTimeoutSeconds=2)  # fmt: skip
        for name in pools:
            wait_phase(jobs, namespace, name, "Running", timeout=60)
        tolerated = pod_named(core, namespace, "kept-worker-1").spec.tolerations
        assert {(t.key, t.effect, t.toleration_seconds) for t in tolerated} >= {
            ("node.kubernetes.io/unreachable", "NoExecute", 2),
            ("node.kubernetes.io/not-ready", "NoExecute", 2),
        }

        lost: dict[str, tuple[str, str]] = {}  # job -> (node, old pod's uid)
        for name in pools:
            pod = pod_named(core, namespace, f"{name}-worker-1")
            lost[name] = (pod.spec.node_name, pod.metadata.uid)
            lose(coordination, pod.spec.node_name)
        lost_at = time.monotonic()

        # node-monitor-grace-period (50 s) + its 5 s period, the eviction rate limiter (one
        # node per 10 s), the 2 s toleration, and room for a loaded machine.
        seen: dict[str, str] = {}
        for name, (node, uid) in lost.items():
            seen[name] = wait_for(
                lambda n=name, u=uid: evicted(core, namespace, n, u),
                timeout=150, interval=1, what=f"{name}-worker-1 evicted from {node}",
            )  # fmt: skip
            if name == "deleted":
                core.delete_node(node)
        evicted_at = time.monotonic()
        # Evicted and counted at once: the job says why its worker is missing.
        for name in pools:
            body = wait_for(lambda n=name: job(jobs, namespace, n)["status"].get("restarts"),
                            timeout=30, what=f"{name}'s restart counted")  # fmt: skip
            assert body == 1

        # The kept node's worker stays Terminating (nobody confirms it) until the operator
        # forces it: its grace period (60 s) plus 30 s, after its eviction.
        for name, (node, uid) in lost.items():
            body = wait_for(
                lambda n=name, nd=node, u=uid: replaced(jobs, core, namespace, n, u, nd),
                timeout=180, interval=1, what=f"{name}-worker-1 replaced",
            )  # fmt: skip
            status = body["status"]
            assert status["restarts"] == 1, status
            assert status["readyReplicas"] == 2
            assert "NodeLost" in events_of(core, namespace, name)
        back_at = time.monotonic()
        if seen["kept"] == "terminating":  # it stayed Terminating: the operator forced it
            assert "ForceDeleted" in events_of(core, namespace, "kept")
        messages = [
            e.message
            for e in core.list_namespaced_event(
                namespace, field_selector="involvedObject.name=kept"
            ).items
            if e.reason in ("NodeLost", "ForceDeleted")
        ]
        kept_node = lost["kept"][0]
        assert messages and all(f"node {kept_node}" in m for m in messages), messages
        print(
            f"\nnode lost -> evicted {evicted_at - lost_at:.0f}s -> both replaced and Running "
            f"{back_at - lost_at:.0f}s; whole test {time.monotonic() - started:.0f}s; the old "
            f"workers when evicted: {seen}"
        )
    finally:
        for node in made:
            try:
                core.delete_node(node)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
