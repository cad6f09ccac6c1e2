"""Two `joule operator` replicas on one Lease against the real control plane: one reconciles,
the other waits; killing the leader mid-burst hands every job to the other, with no duplicate
pods and no lost status; a clean stop hands over at once; a leader that was frozen past its
lease exits instead of reconciling beside the new one.

Both replicas watch only the test's namespace and keep their Lease there, so the test does
not depend on (or disturb) any other operator of the run.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client

from tests.conftest import OperatorProcess, wait_for
from tests.integration.test_operator import GROUP, PLURAL, VERSION, manifest, pods_of

pytestmark = pytest.mark.cluster
LEASE = "joule-operator"


class Replica(OperatorProcess):
    """One replica as the chart runs it: leader election on, probes on their own port."""

    def __init__(self, kubeconfig: Path, log: Path, identity: str, namespace: str) -> None:
        super().__init__(kubeconfig, log)
        self.identity = identity
        self.namespace = namespace
        self.extra_env = {
            "JOULE_WATCH_NAMESPACES": namespace,
            "JOULE_LEADER_ELECT": "true",
            "JOULE_LEASE_NAME": LEASE,
            "JOULE_LEASE_NAMESPACE": namespace,
            "JOULE_POD_NAME": identity,
        }

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def probe(self, path: str) -> int:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}{path}", timeout=2
            ) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def metric(self, name: str) -> float | None:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        return None


@pytest.fixture
def replicas(cluster, crd, namespace, tmp_path, no_shared_operator):
    made: list[Replica] = []

    def make(identity: str) -> Replica:
        replica = Replica(cluster.kubeconfig, tmp_path / f"{identity}.log", identity, namespace)
        made.append(replica)
        return replica

    yield make
    for replica in made:
        replica.stop()
        print(f"\n{replica.identity} log: {replica.log}")


def holder(coordination: client.CoordinationV1Api, namespace: str) -> str | None:
    try:
        lease = coordination.read_namespaced_lease(LEASE, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return lease.spec.holder_identity


def elect(replicas, coordination, namespace) -> tuple[Replica, Replica]:
    """Start two replicas together; return (leader, standby) once both have settled."""
    a, b = replicas("joule-a"), replicas("joule-b")
    a.start()
    b.start()
    first = wait_for(lambda: holder(coordination, namespace), timeout=60, what="a lease holder")
    leader, standby = (a, b) if first == a.identity else (b, a)
    wait_for(lambda: f"acquired lease {namespace}/{LEASE} as {leader.identity}" in leader.text())
    wait_for(
        lambda: f"lease {namespace}/{LEASE} is held by {leader.identity}" in standby.text(),
        what="the standby to see the leader",
    )
    return leader, standby


def apply_jobs(kubectl, namespace: str, names: list[str]) -> None:
    # No GPUs: 20 jobs of 2 pods fit the kwok nodes whatever else the run left there.
    docs = "---\n".join(manifest(name, replicas=2, gpusPerReplica=0) for name in names)
    kubectl("apply", "-n", namespace, "-f", "-", stdin=docs)


def test_one_replica_leads_and_the_other_takes_over_when_it_is_killed_mid_burst(
    replicas, kubectl, api, core, namespace
):
    coordination = client.CoordinationV1Api(api)
    jobs = client.CustomObjectsApi(api)
    leader, standby = elect(replicas, coordination, namespace)

    # Both replicas are live and ready: the standby is a healthy replica.
    for replica in (leader, standby):
        wait_for(
            lambda r=replica: r.probe("/healthz") == 200 and r.probe("/readyz") == 200,
            what=f"{replica.identity}'s probes to answer 200",
        )
    assert standby.metric("joule_operator_leader") == 0
    assert leader.metric("joule_operator_leader") == 1

    names = [f"burst-{i:02d}" for i in range(20)]
    apply_jobs(kubectl, namespace, names[:10])
    # The leader is at work on the first half of the burst...
    wait_for(
        lambda: sum(bool(pods_of(core, namespace, n)) for n in names[:10]) >= 3,
        interval=0.05,
        what="the leader to create pods",
    )
    # ...and only the leader: the standby has created nothing and logged no job.
    assert standby.metric("joule_operator_pods_created_total") == 0
    assert f"{namespace}/burst-" not in standby.text()
    assert "acquired lease" not in standby.text()

    killed = time.monotonic()
    leader.kill()
    apply_jobs(kubectl, namespace, names[10:])  # the second half lands while nobody leads
    wait_for(
        lambda: holder(coordination, namespace) == standby.identity,
        timeout=30,
        interval=0.1,
        what="the standby to take the lease",
    )
    takeover = time.monotonic() - killed
    print(f"leader takeover: {takeover:.1f}s")
    assert takeover < 15
    assert f"acquired lease {namespace}/{LEASE} as {standby.identity}" in standby.text()

    # Every job runs with exactly its two pods, and its status says so.
    def all_running() -> bool:
        items = jobs.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        phases = {i["metadata"]["name"]: i.get("status", {}).get("phase") for i in items}
        return all(phases.get(n) == "Running" for n in names)

    try:
        wait_for(all_running, timeout=60, what="all 20 jobs to run")
    except AssertionError:
        items = jobs.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        late = {
            i["metadata"]["name"]: (
                i.get("status"),
                [
                    (p.metadata.name, p.status.phase, p.spec.node_name)
                    for p in pods_of(core, namespace, i["metadata"]["name"])
                ],
            )
            for i in items
            if i.get("status", {}).get("phase") != "Running"
        }
        raise AssertionError(f"jobs not running: {late}") from None
    for name in names:
        pods = pods_of(core, namespace, name)
        assert [p.metadata.name for p in pods] == [f"{name}-worker-0", f"{name}-worker-1"]
        status = jobs.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)[
            "status"
        ]
        assert (status["replicas"], status["readyReplicas"]) == (2, 2), (name, status)
    lease = coordination.read_namespaced_lease(LEASE, namespace)
    assert lease.spec.lease_transitions == 1
    wait_for(lambda: standby.probe("/healthz") == 200 and standby.probe("/readyz") == 200)
    assert standby.metric("joule_operator_leader") == 1

    # A clean stop (a rolling update) hands over within a retry period, not a lease duration.
    leader.start()  # the killed replica comes back, as a standby now
    wait_for(
        lambda: leader.text().count(f"is held by {standby.identity}") >= 1,
        what="the restarted replica to wait",
    )
    stopped = time.monotonic()
    standby.stop()
    assert standby.proc is not None and standby.proc.returncode == 0
    assert f"released lease {namespace}/{LEASE} as {standby.identity}" in standby.text()
    wait_for(
        lambda: holder(coordination, namespace) == leader.identity,
        interval=0.1,
        what="the restarted replica to take the released lease",
    )
    handover = time.monotonic() - stopped
    print(f"handover on SIGTERM: {handover:.1f}s")
    assert handover < 5  # stop, release, one retry period; waiting for expiry would be 8+


def test_a_leader_frozen_past_its_lease_exits_when_it_wakes(
    replicas, kubectl, api, core, namespace
):
    coordination = client.CoordinationV1Api(api)
    leader, standby = elect(replicas, coordination, namespace)
    assert leader.proc is not None
    os.kill(leader.proc.pid, signal.SIGSTOP)  # a long GC pause, a frozen VM, a partition
    try:
        wait_for(
            lambda: holder(coordination, namespace) == standby.identity,
            timeout=30,
            what="the standby to take the lease from the frozen leader",
        )
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
    # It wakes up believing it leads, finds it does not, and stops at once.
    assert leader.proc.wait(10) == 1
    assert f"lost leadership as {leader.identity}" in leader.text()
    assert holder(coordination, namespace) == standby.identity
    # The new leader reconciles.
    apply_jobs(kubectl, namespace, ["after"])
    wait_for(lambda: len(pods_of(core, namespace, "after")) == 2, what="the new leader's pods")
