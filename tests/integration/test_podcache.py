"""The operator's pod cache against the real API server: its watch carries only the pods that
Joule labels (the API server filters them, not the operator), and a reconcile reads each
change of them without listing."""

from __future__ import annotations

from kubernetes import client

from joule.api.types import JobRef
from joule.constants import LABEL_INDEX, LABEL_JOB
from joule.podcache import PodCache
from tests.conftest import wait_for


def make_pod(name: str, labels: dict[str, str], owner: client.V1ConfigMap) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name,
            labels=labels,
            # A real owner, so the garbage collector leaves the pod alone.
            owner_references=[
                client.V1OwnerReference(
                    api_version="v1", kind="ConfigMap", name=owner.metadata.name,
                    uid=owner.metadata.uid, controller=True,
                )
            ],
        ),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="c", image="never:pulled")],
            # No node fits: the pod stays Pending and unchanged while the test looks.
            node_selector={"joule.dev/test": "nowhere"},
        ),
    )  # fmt: skip


def test_the_watch_carries_only_joules_pods_and_follows_them(core, namespace):
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    changes: list[tuple[str, str]] = []
    cache = PodCache(core, [namespace], lambda ns, job: changes.append((ns, job)))
    cache.start()
    try:
        wait_for(lambda: cache.synced(namespace), what="the cache's first listing")
        job = JobRef("train", namespace, owner.metadata.uid)
        assert cache.pods(job) == []

        for i in range(5):  # other pods of the namespace: never sent to the operator
            core.create_namespaced_pod(namespace, make_pod(f"plain-{i}", {"app": "x"}, owner))
        core.create_namespaced_pod(
            namespace, make_pod("train-worker-0", {LABEL_JOB: "train", LABEL_INDEX: "0"}, owner)
        )
        pods = wait_for(lambda: cache.pods(job), what="the worker in the cache")
        assert [p.name for p in pods] == ["train-worker-0"]
        assert (namespace, "train") in changes
        # The watch is ordered: the five plain pods, created first, would have come first.
        assert cache.events == len(changes), (cache.events, changes)

        core.delete_namespaced_pod("train-worker-0", namespace, grace_period_seconds=0)
        wait_for(lambda: cache.pods(job) == [], what="the deleted worker gone from the cache")
        assert changes.count((namespace, "train")) >= 2
    finally:
        cache.stop.set()
