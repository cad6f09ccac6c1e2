"""The operator's calls share one connection to the API server: every answer it does not
need is still read to its end, so its connection goes back to the pool. An answer left
unread used to drop its connection, and the next call opened a new TLS connection (a
handshake on both sides: 6 ms instead of 2 for an Event here, and 3 ms more of the
operator's CPU)."""

from __future__ import annotations

from kubernetes import client, config

from joule.api.events import Event
from joule.api.types import JobRef, TrainingJobSpec
from joule.kube import JobApi


def connections(api: client.ApiClient) -> tuple[int, int]:
    """(opened so far, idle in the pool now) of the client's connections."""
    by_host = api.rest_client.pool_manager.pools
    pools = [by_host[key] for key in by_host.keys()]  # noqa: SIM118 (not iterable itself)
    opened = sum(pool.num_connections for pool in pools)
    idle = sum(conn is not None for pool in pools for conn in list(pool.pool.queue))
    return opened, idle


def test_one_connection_serves_a_jobs_creates_events_and_deletes_one_after_another(
    cluster, core, namespace
):
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # its own pool
    edge = JobApi(api)
    edge.metrics_from = []  # a NetworkPolicy per job, as the chart makes by default
    job = JobRef("train", namespace, "uid-train")
    spec = TrainingJobSpec.parse({"image": "trainer:test", "replicas": 2}, name="train")
    assert connections(api) == (0, 0)
    edge.pods(job)  # a LIST (no pod cache here): the pool's first connection
    assert connections(api) == (1, 1)
    calls = [
        ("the Service", lambda: edge.ensure_service(job)),
        ("the Service again (409)", lambda: edge.ensure_service(job)),
        ("the NetworkPolicy", lambda: edge.ensure_network_policy(job, spec)),
        ("worker 0", lambda: edge.create_pod(job, spec, 0, None)),
        ("worker 1", lambda: edge.create_pod(job, spec, 1, None)),
        ("an Event", lambda: edge.post_event(job, Event("Normal", "CreatedWorkers", "0, 1"))),
        ("the same Event (a count)", lambda: edge.post_event(
            job, Event("Normal", "CreatedWorkers", "0, 1"))),
        ("an annotation", lambda: edge.annotate_pod(namespace, "train-worker-0", "a", "1")),
        ("a delete", lambda: edge.delete_pod(namespace, "train-worker-1")),
        ("a forced delete", lambda: edge.delete_pod(namespace, "train-worker-0", force=True)),
    ]  # fmt: skip
    for what, call in calls:
        call()
        assert connections(api) == (1, 1), f"{what}: its connection did not go back"
    assert {p.metadata.name for p in core.list_namespaced_pod(namespace).items} <= {
        "train-worker-0",
        "train-worker-1",
    }
    [event] = [
        e for e in core.list_namespaced_event(namespace).items if e.reason == "CreatedWorkers"
    ]
    assert event.count == 2
