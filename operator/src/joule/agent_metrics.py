"""What a node agent's /metrics says about the pods on its node, reduced to what the energy
loop uses. Pure; the agent's side is ``joule.nodeagent.exporter``."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# A limit NVML reports within this of the one asked is that limit (milliwatts, rounding).
LIMIT_TOLERANCE_WATTS = 0.5


@dataclass(frozen=True)
class PodGpu:
    """One GPU of one pod, as its node's agent reports it."""

    gpu: str
    joules: float  # since the agent began accounting this pod's use of the GPU
    since: float | None = None  # when that was (unix seconds); a new one is a new counter
    utilization: float | None = None
    enforced: float | None = None  # the power limit in force
    default: float | None = None
    requested: float | None = None  # the limit the agent saw the pod ask for
    refused: str | None = None  # NVML's reason, while the limit asked is refused


@dataclass(frozen=True)
class AgentReading:
    meter: str  # "nvml" or "simulated": what the agent reads its GPUs with
    pods: Mapping[str, tuple[PodGpu, ...]] = field(default_factory=dict)  # pod UID -> GPUs
    # pod UID -> devices it holds that the agent cannot measure (MIG slices, hidden GPUs)
    unmeasured: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def parse_agent_metrics(text: str) -> AgentReading:
    gpus: dict[str, dict[str, float | str]] = {}
    energy: dict[tuple[str, str], dict[str, float]] = {}
    meter = "?"
    blind: dict[str, list[str]] = {}
    names = {
        "joule_node_gpu_utilization_ratio": "utilization",
        "joule_node_gpu_power_limit_watts": "enforced",
        "joule_node_gpu_default_power_limit_watts": "default",
        "joule_node_gpu_requested_power_limit_watts": "requested",
    }
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == "joule_node_agent_info":
                meter = labels.get("source", "?")
            elif s.name in names:
                gpus.setdefault(labels.get("gpu", ""), {})[names[s.name]] = s.value
            elif s.name == "joule_node_pod_gpu_unmeasured" and s.value:
                blind.setdefault(labels.get("pod_uid", ""), []).append(labels.get("gpu", ""))
            elif s.name == "joule_node_gpu_power_limit_refused" and s.value:
                gpus.setdefault(labels.get("gpu", ""), {})["refused"] = labels.get("error", "?")
            elif s.name.startswith("joule_node_pod_gpu_energy_joules"):
                key = (labels.get("pod_uid", ""), labels.get("gpu", ""))
                if s.name.endswith("_total"):
                    if not math.isfinite(s.value) or s.value < 0:
                        raise ValueError("a pod's GPU energy is not a finite, non-negative counter")
                    energy.setdefault(key, {})["joules"] = s.value
                elif s.name.endswith("_created"):
                    energy.setdefault(key, {})["since"] = s.value
    pods: dict[str, list[PodGpu]] = {}
    for (uid, gpu), e in sorted(energy.items()):
        if "joules" not in e:
            continue
        g = gpus.get(gpu, {})
        pods.setdefault(uid, []).append(
            PodGpu(
                gpu=gpu,
                joules=e["joules"],
                since=e.get("since"),
                utilization=_num(g.get("utilization")),
                enforced=_num(g.get("enforced")),
                default=_num(g.get("default")),
                requested=_num(g.get("requested")),
                refused=str(g["refused"]) if "refused" in g else None,
            )
        )
    return AgentReading(
        meter,
        {uid: tuple(v) for uid, v in pods.items()},
        {uid: tuple(sorted(v)) for uid, v in blind.items()},
    )


def _num(value: float | str | None) -> float | None:
    return value if isinstance(value, float) else None


def counter_key(pod_uid: str, gpu: PodGpu) -> str:
    """Where a pod's GPU energy is kept in the job's bookkeeping: a record the agent started
    afresh (a new ``since``) is a new counter, not one that went backwards."""
    key = f"{pod_uid}/{gpu.gpu}"
    return key if gpu.since is None else f"{key}@{gpu.since:.2f}"


@dataclass(frozen=True)
class LimitReport:
    """Whether the job's GPUs run at the limit the operator asks for: confirmed; refused
    (NVML's reason); or pending, the agents answered and it is not in force yet. ``unknown``:
    a worker's GPUs were not reported at all this time (an agent missed, restarting, not yet
    updated): that says nothing either way, and no wait is counted against it."""

    confirmed: bool
    refused: str | None = None  # "<pod> <gpu>: NVML's reason"
    unknown: bool = False


def limit_report(
    desired: float | None, pods: Iterable[tuple[str, Iterable[PodGpu]]]
) -> LimitReport:
    """``pods``: (pod name, its GPUs) of the workers that run. Confirmed when each GPU's
    agent saw the pod ask for ``desired`` (None: no limit) and NVML has it in force."""
    confirmed, unknown = True, False
    for name, gpus in pods:
        gpus = list(gpus)
        if not gpus:
            unknown = True  # no agent reports this worker's GPUs (yet)
        for g in gpus:
            if g.refused is not None:
                return LimitReport(False, f"{name} {g.gpu}: {g.refused}")
            target = desired if desired is not None else g.default
            asked = (g.requested is None) if desired is None else _near(g.requested, desired)
            if not asked or target is None or not _near(g.enforced, target):
                confirmed = False
    if unknown:
        return LimitReport(False, unknown=True)
    return LimitReport(confirmed)


def _near(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= LIMIT_TOLERANCE_WATTS
