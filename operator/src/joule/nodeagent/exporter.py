"""The node agent's /metrics: per-GPU and per-pod series, from the latest update's snapshot.

Names follow Prometheus' conventions (base units, ``_total`` counters). Labels: ``node``;
``gpu`` (the GPU's UUID) and ``gpu_index``; ``namespace``, ``pod``, ``pod_uid`` and
``joule_job`` of the pod holding the GPU (empty when none does; ``joule_job`` rather than
``job``, which Prometheus sets to the scrape job's name); ``source`` (``nvml`` or
``simulated``). How they map to NVIDIA dcgm-exporter's fields (README, "Energy sources"):

==========================================  ======================================  ==========
Joule                                       dcgm-exporter                           conversion
==========================================  ======================================  ==========
joule_node_gpu_power_watts                  DCGM_FI_DEV_POWER_USAGE                 W = W
joule_node_gpu_energy_joules_total          DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION    J = mJ/1e3
joule_node_gpu_utilization_ratio            DCGM_FI_DEV_GPU_UTIL                    = %/100
joule_node_gpu_memory_used_bytes            DCGM_FI_DEV_FB_USED                     = MiB*2^20
joule_node_gpu_power_limit_watts            DCGM_FI_DEV_ENFORCED_POWER_LIMIT        W = W
joule_node_pod_gpu_energy_joules_total      (none: per pod; Kepler's are closest)
==========================================  ======================================  ==========

A series is exported only once its value is known: an unset gauge would read 0, and the
operator would take a 0 utilisation for an idle GPU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from joule.nodeagent.gpu import GpuReading
from joule.nodeagent.ledger import Holder, Record
from joule.nodeagent.limits import Refusal

GPU_LABELS = ["node", "gpu", "gpu_index", "namespace", "pod", "pod_uid", "joule_job", "source"]
POD_LABELS = ["node", "gpu", "namespace", "pod", "pod_uid", "joule_job", "source"]


@dataclass(frozen=True)
class Snapshot:
    """What one update saw and did; the collector only formats it."""

    node: str
    source: str
    updated: float  # unix seconds
    gpus: Mapping[str, GpuReading] = field(default_factory=dict)
    holders: Mapping[str, list[Holder]] = field(default_factory=dict)
    requested: Mapping[str, float] = field(default_factory=dict)  # GPU -> the limit asked
    refused: Mapping[str, Refusal] = field(default_factory=dict)
    ledger: Mapping[tuple[str, str], Record] = field(default_factory=dict)
    cpu_joules: Mapping[str, float] = field(default_factory=dict)  # RAPL package -> joules
    errors: Mapping[str, int] = field(default_factory=dict)  # stage -> failed updates
    # Held devices NVML does not list (a MIG slice; a GPU it cannot see): their pods are not
    # measured, and say so rather than read as 0 J.
    unmeasured: Mapping[str, list[Holder]] = field(default_factory=dict)


class SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None  # swapped whole by the agent: no lock needed

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        yield from _gpu_families(snap)
        yield from _pod_families(snap)
        info = GaugeMetricFamily(
            "joule_node_agent_info", "The node agent and where its GPU readings come from",
            labels=["node", "source"],
        )  # fmt: skip
        info.add_metric([snap.node, snap.source], 1.0)
        yield info
        updated = GaugeMetricFamily(
            "joule_node_agent_last_update_timestamp_seconds",
            "When the agent last read its GPUs",
            labels=["node"],
        )
        updated.add_metric([snap.node], snap.updated)
        yield updated
        errors = CounterMetricFamily(
            "joule_node_agent_update_errors", "Updates that failed, by stage",
            labels=["node", "stage"],
        )  # fmt: skip
        for stage, count in sorted(snap.errors.items()):
            errors.add_metric([snap.node, stage], float(count))
        yield errors
        if snap.cpu_joules:
            cpu = CounterMetricFamily(
                "joule_node_cpu_package_energy_joules",
                "CPU package energy from RAPL, since the agent started",
                labels=["node", "package"],
            )
            for package, joules in sorted(snap.cpu_joules.items()):
                cpu.add_metric([snap.node, package], joules)
            yield cpu


def _holder_labels(snap: Snapshot, gpu: str) -> list[str]:
    pods = sorted(snap.holders.get(gpu, []), key=lambda h: (h.namespace, h.name))
    if not pods:
        return ["", "", "", ""]
    h = pods[0]  # pods sharing a GPU (time-slicing) share its series: the first is named
    return [h.namespace, h.name, h.uid, h.job]


def _gpu_families(snap: Snapshot) -> Iterator[Metric]:
    def family(name: str, doc: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=GPU_LABELS)

    power = family("joule_node_gpu_power_watts", "GPU power draw")
    util = family("joule_node_gpu_utilization_ratio", "Fraction of time the GPU was busy")
    memory = family("joule_node_gpu_memory_used_bytes", "GPU memory in use")
    limit = family("joule_node_gpu_power_limit_watts", "The power limit in force")
    default = family("joule_node_gpu_default_power_limit_watts", "The GPU's default limit")
    asked = family(
        "joule_node_gpu_requested_power_limit_watts", "The power limit the GPU's pod asks for"
    )
    refused = GaugeMetricFamily(
        "joule_node_gpu_power_limit_refused",
        "1 while NVML refuses the limit the GPU's pod asks for; error: NVML's reason",
        labels=[*GPU_LABELS, "error"],
    )
    energy = CounterMetricFamily(
        "joule_node_gpu_energy_joules",
        "The GPU's energy counter (since its driver loaded)",
        labels=GPU_LABELS,
    )
    for gpu, r in sorted(snap.gpus.items()):
        labels = [snap.node, gpu, str(r.index), *_holder_labels(snap, gpu), snap.source]
        for fam, value in (
            (power, r.power_watts),
            (util, r.utilization_ratio),
            (memory, r.memory_used_bytes),
            (limit, r.power_limit_watts),
            (default, r.default_limit_watts),
            (asked, snap.requested.get(gpu)),
        ):
            if value is not None:
                fam.add_metric(labels, value)
        if r.energy_joules is not None:
            energy.add_metric(labels, r.energy_joules)
        why = snap.refused.get(gpu)
        if why is not None:
            refused.add_metric([*labels, why.error], 1.0)
    yield from (power, util, memory, limit, default, asked, refused, energy)


def _pod_families(snap: Snapshot) -> Iterator[Metric]:
    energy = CounterMetricFamily(
        "joule_node_pod_gpu_energy_joules",
        "Energy of a GPU while this pod held it; _created: when its accounting began",
        labels=POD_LABELS,
    )
    for record in sorted(snap.ledger.values(), key=lambda r: (r.namespace, r.pod, r.gpu)):
        if record.last_time is None:
            continue  # never read: no figure yet, rather than a 0
        energy.add_metric(
            [snap.node, record.gpu, record.namespace, record.pod, record.uid, record.job,
             snap.source],
            record.joules,
            created=record.since,
        )  # fmt: skip
    yield energy
    unmeasured = GaugeMetricFamily(
        "joule_node_pod_gpu_unmeasured",
        "1 for a device a pod holds that NVML does not list (a MIG slice, a hidden GPU)",
        labels=["node", "gpu", "namespace", "pod", "pod_uid", "joule_job"],
    )
    for gpu, pods in sorted(snap.unmeasured.items()):
        for h in pods:
            unmeasured.add_metric([snap.node, gpu, h.namespace, h.name, h.uid, h.job], 1.0)
    yield unmeasured
