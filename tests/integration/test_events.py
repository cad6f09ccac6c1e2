"""A job's Events on the real API server: the same Event again is one object counted twice,
and a job past its rate posts no more (the operator's own JobApi, against kube-apiserver)."""

from __future__ import annotations

from kubernetes import client

from joule.api.eventgate import BURST
from joule.api.events import Event
from joule.api.types import JobRef
from joule.kube import JobApi


def events(core: client.CoreV1Api, namespace: str) -> list[client.CoreV1Event]:
    return core.list_namespaced_event(namespace, field_selector="involvedObject.name=train").items


def test_a_repeated_event_is_counted_on_one_object_and_a_flood_is_cut(api, core, namespace):
    edge = JobApi(api)
    job = JobRef("train", namespace, "uid-train")
    failed = Event("Warning", "WorkerFailed", "train-worker-1 failed (Error, exit code 1)")
    for _ in range(3):
        edge.post_event(job, failed)
    [one] = events(core, namespace)
    assert (one.reason, one.count, one.message) == ("WorkerFailed", 3, failed.message)

    for i in range(2 * BURST):  # a job flapping between sizes
        edge.post_event(job, Event("Normal", "Resizing", f"resizing to {i % 7 + 1} workers"))
    seen = events(core, namespace)
    resizing = [e for e in seen if e.reason == "Resizing"]
    # 3 calls went to the first Event; the burst's rest, and no more, to these.
    assert sum(e.count for e in resizing) == BURST - 3
    assert len(resizing) == 7  # the same message again is counted, not repeated
