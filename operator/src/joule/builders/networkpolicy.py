"""A job's NetworkPolicy: its workers take traffic only from each other (the rendezvous,
NCCL and gloo, on any port) and, on their /metrics ports, from the peers the cluster names
(the operator, a Prometheus). Egress is left alone: datasets and registries are the
cluster's business."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from joule.api.types import JobRef, TrainingJobSpec
from joule.builders.labels import child_metadata, selector
from joule.constants import METRICS_PORT


def network_policy_name(job: JobRef) -> str:
    return f"{job.name}-workers"


def metrics_ports(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """Where workers serve /metrics: spec.progress.port, or 9090 plus each process's local
    rank (one port per GPU of a worker)."""
    if spec.progress.port:
        return [{"protocol": "TCP", "port": spec.progress.port}]
    last = METRICS_PORT + spec.nproc_per_node - 1
    port: dict[str, Any] = {"protocol": "TCP", "port": METRICS_PORT}
    if last > METRICS_PORT:
        port["endPort"] = last
    return [port]


def job_network_policy(
    job: JobRef, spec: TrainingJobSpec, metrics_from: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(job, network_policy_name(job)),
        "spec": {
            "podSelector": {"matchLabels": selector(job)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": selector(job)}}]},
                {"from": list(metrics_from), "ports": metrics_ports(spec)},
            ],
        },
    }
