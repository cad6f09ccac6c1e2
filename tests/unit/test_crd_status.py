"""Every status field the operator writes is in the CRD's schema. The API server prunes
unknown fields without a word, so a missing one is silently lost on every write (a
completingSince lost would make the completion timeout never fire)."""

import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from joule.agent_metrics import LimitReport
from joule.api import JobRef, TrainingJobSpec
from joule.autoscaler import NO_PROGRESS
from joule.hang import observe
from joule.observe import Failure, PodView
from joule.policy import ClusterView
from joule.reconcile import follow_user_scale, plan
from joule.scaling import Measured, evaluate, merge_energy, split_energy
from joule.trainer_metrics import TrainerReading

CRD = Path(__file__).resolve().parents[2] / "crds" / "joule.dev_trainingjobs.yaml"
JOB = JobRef("j", "ns", "uid")
T0 = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    version = crd["spec"]["versions"][0]
    return version["schema"]["openAPIV3Schema"]["properties"]["status"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "status") -> list[str]:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            props = schema.get("properties", {})
            sub = props.get(key) or schema.get("additionalProperties")
            if not isinstance(sub, dict):
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, sub, f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [f for item in value for f in unknown_fields(item, schema["items"], f"{path}[]")]
    return []


def pod(index: int, phase: str = "Running", failure: Failure | None = None) -> PodView:
    return PodView(f"j-worker-{index}", f"uid-{index}", index, phase, phase == "Running",
                   True, False, failure, "127.0.1.2", None)  # fmt: skip


def statuses() -> list[dict[str, Any]]:
    """Statuses as the operator writes them, through the same functions, in many states."""
    fixed = TrainingJobSpec.parse({"image": "x", "replicas": 2})
    managed = TrainingJobSpec.parse(managed_body())
    out = []
    new = plan(JOB, fixed, {}, 1, [], T0).status
    running = plan(JOB, fixed, new, 1, [pod(0), pod(1)], T0).status
    oom = Failure("OOMKilled", "exited with code 137", 137)
    failing = plan(JOB, fixed, running, 1, [pod(0), pod(1, "Failed", oom)], T0).status
    completing = plan(JOB, fixed, running, 1, [pod(0, "Succeeded"), pod(1)], T0).status
    done = plan(JOB, fixed, completing, 1, [pod(0, "Succeeded"), pod(1, "Succeeded")], T0)
    out += [new, running, failing, completing, done.status]
    # Progress timed for a hang timeout, and the restart of a hung group.
    watched = TrainingJobSpec.parse({"image": "x", "replicas": 2,
                                     "progress": {"hangTimeoutSeconds": 60}})  # fmt: skip
    st = dict(running)
    for t in (0, 60):
        now = T0 + dt.timedelta(seconds=t)
        st = {**st, "progress": observe(watched, st, 64.0, now)}
        out.append(st)
        st = plan(JOB, watched, st, 1, [pod(0), pod(1)], now).status
    assert st["reason"] == "Hung"
    out.append(st)

    st = dict(running)
    follow_user_scale(managed, st, T0)
    kept: dict[str, Any] = {}  # the bookkeeping, kept in the job's ConfigMap, not status
    for t, joules in ((0, 0.0), (30, 900.0), (60, 1800.0)):  # evaluationIntervalSeconds
        readings = [(f"uid-{i}/0", TrainerReading(i, 2, t * 50.0, 10.0, 2.0, 15.0, joules,
                                                  "estimated")) for i in (0, 1)]  # fmt: skip
        now = T0 + dt.timedelta(seconds=t)
        merged = {**st, "energy": merge_energy(st.get("energy", {}), kept)}
        st = evaluate(managed, merged, readings, ClusterView(4, 0), now, 2, True).status
        st["energy"], kept = split_energy(st["energy"])
        st = plan(JOB, managed, st, 1, [pod(0), pod(1)], now).status
        out.append(st)
    assert "limitHistory" in kept  # the limit search ran, and kept its records aside
    follow_user_scale(TrainingJobSpec.parse({**managed_body(), "replicas": 1}), st, T0)
    out.append(st)
    # Energy from node agents: a limit pending confirmation, then refused.
    st, kept = dict(running), {}
    for t, report in ((0, LimitReport(False)), (30, LimitReport(False)),
                      (60, LimitReport(False, "w0 GPU-a: Insufficient Permissions"))):  # fmt: skip
        m = Measured({"uid-0/GPU-a@1.00": 30.0 * t}, {"uid-0/0": t * 50.0}, "node",
                     "simulated", 0.9, NO_PROGRESS)  # fmt: skip
        now = T0 + dt.timedelta(seconds=t)
        merged = {**st, "energy": merge_energy(st.get("energy", {}), kept)}
        st = evaluate(managed, merged, m, ClusterView(4, 0), now, 2, True, limits=report).status
        st["energy"], kept = split_energy(st["energy"])
        out.append(plan(JOB, managed, st, 1, [pod(0), pod(1)], now).status)
    return out


def managed_body() -> dict[str, Any]:
    return {
        "image": "x", "replicas": 2, "elastic": {"minReplicas": 1, "maxReplicas": 2},
        "scaling": {"policy": "EnergyEfficient"},
        "energy": {"powerCapWatts": 18, "budget": "1MJ", "minGpuPowerLimitWatts": 4},
        "target": {"samples": 100000, "deadline": "2026-11-29T14:00:00Z"},
    }  # fmt: skip


def test_every_status_field_the_operator_writes_survives_the_schema():
    schema = status_schema()
    seen: set[str] = set()
    for st in statuses():
        assert unknown_fields(st, schema) == [], st
        seen |= set(st)
        seen |= {f"energy.{k}" for k in st.get("energy", {})}
        seen |= {f"progress.{k}" for k in st.get("progress", {})}
    # The states above did write the fields this check is for.
    for field in ("completingSince", "specReplicas", "targetReplicas", "lastDecision",
                  "podFailure", "lastFailureTime", "energy.gpuPowerLimitWatts",
                  "progress.lastProgressTime", "progress.checkedAt", "progress.samples",
                  "progress.hung",
                  "energy.evaluatedAt",
                  "energy.budgetRemainingJoules", "energy.meter", "energy.progress",
                  "energy.gpuPowerLimitConfirmed", "energy.gpuPowerLimitRefused"):  # fmt: skip
        assert field in seen, field


def test_the_check_notices_a_field_the_schema_lacks():
    assert unknown_fields({"phase": "Running", "bogus": 1}, status_schema()) == ["status.bogus"]
