"""What GitOps tools make of the jobs the real operator runs.

Argo CD judges a TrainingJob with the Lua health check of examples/gitops/argocd/health.lua;
Flux (``wait: true``) and kpt with kstatus (cli-utils' ``status.Compute``, run here by the
joule-kstatus program). Both read what the operator really wrote, for jobs driven into each
phase on kwok GPU nodes. And a job applied from git must not drift once the operator has
written its status: the operator writes status only.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from joule.cluster import kstatus
from joule.reconcile import conditions
from tests.conftest import CHART, ROOT, make_namespace, wait_for
from tests.integration.test_operator import GROUP, VERSION, finish_pod, manifest
from tests.unit.test_argocd_health import argocd_health

pytestmark = pytest.mark.cluster

GITOPS = ROOT / "examples" / "gitops"
JOBS = GITOPS / "jobs"


@pytest.fixture(scope="module")
def kstatus_binary() -> Path:
    return kstatus.ensure_kstatus(progress=lambda m: print(f"joule: {m}", flush=True))


def get_json(kubectl, namespace: str, *what: str) -> dict:
    return json.loads(kubectl("get", *what, "-n", namespace, "-o", "json").stdout)


def wait_status(kubectl, namespace: str, name: str, phase: str, reason: str | None = None):
    """The job as the operator left it in ``phase`` (and ``reason``), for its current spec."""

    def check():
        body = get_json(kubectl, namespace, "tj", name)
        st = body.get("status") or {}
        ok = st.get("phase") == phase and (reason is None or st.get("reason") == reason)
        return (
            body if ok and st.get("observedGeneration") == body["metadata"]["generation"] else None
        )

    try:
        return wait_for(check, timeout=30, what=f"{name} to be {phase}")
    except AssertionError:
        st = get_json(kubectl, namespace, "tj", name).get("status")
        raise AssertionError(f"{name} never reached {phase} ({reason}); status: {st}") from None


def test_jobs_applied_from_git_do_not_drift_once_the_operator_writes_status(
    kubectl, operator, namespace, kstatus_binary
):
    # First in this file: its 24 GPUs fit the 4 x 8 GPU nodes before the `states` jobs hold any.
    # As Argo CD (ServerSideApply=true) and Flux apply: server-side, the folder as it is.
    kubectl("apply", "--server-side", "-n", namespace, "-f", str(JOBS))
    bodies = [wait_status(kubectl, namespace, n, "Running") for n in ("cnn-elastic", "gpt-fixed")]
    assert [argocd_health(b)[0] for b in bodies] == ["Healthy", "Healthy"]
    assert [r.status for r in kstatus.compute(bodies, kstatus_binary)] == ["Current", "Current"]
    diff = kubectl("diff", "--server-side", "-n", namespace, "-f", str(JOBS), check=False)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    # `kubectl scale` writes spec.replicas, which git holds too: drift, by design. The scale
    # subresource's manager now owns the field, so a plain server-side apply of git's manifest
    # conflicts; Argo CD and Flux force conflicts and set it back (examples/gitops/README.md).
    kubectl("scale", "tj/cnn-elastic", "-n", namespace, "--replicas=3")
    diff = kubectl("diff", "--server-side", "-n", namespace, "-f", str(JOBS), check=False)
    assert diff.returncode > 1 and 'conflict with "kubectl" with subresource "scale"' in (
        diff.stderr
    ), diff.stderr
    diff = kubectl(
        "diff", "--server-side", "--force-conflicts", "-n", namespace, "-f", str(JOBS),
        check=False,
    )  # fmt: skip
    assert diff.returncode == 1, diff.stderr
    changed = [line for line in diff.stdout.splitlines() if line[:1] in "+-"]
    # Only the field the user scaled (and the generation that a spec change bumps).
    assert [line for line in changed if not line.startswith(("+++", "---"))] == [
        "-  generation: 2",
        "+  generation: 3",
        "-  replicas: 3",
        "+  replicas: 2",
    ]


@dataclass
class Observed:
    namespace: str
    jobs: dict[str, dict]  # by state: running, succeeded, failed, suspended, pending, stale


@pytest.fixture(scope="module")
def states(core, kubectl, operator) -> Iterator[Observed]:
    """One real job in each phase, as `kubectl get -o json` shows it (one namespace, all
    driven at once), plus ``stale``: the API server's answer to a spec patch of the running
    job, whose metadata.generation is one past status.observedGeneration because the
    operator has not reconciled it yet (a real object, not one edited here)."""
    ns = make_namespace(core)
    specs = {
        "running": {},
        "succeeded": {},
        "failed": {"backoffLimit": 0},
        "suspended": {"suspend": True},
        # 16 GPUs in one pod: no 8-GPU node fits it; the long timeout keeps it Pending.
        "pending": {"gpusPerReplica": 16, "startupTimeoutSeconds": 600},
    }
    for name, spec in specs.items():
        kubectl("apply", "-n", ns, "-f", "-", stdin=manifest(name, replicas=1, **spec))
    for name in ("running", "succeeded", "failed"):
        wait_status(kubectl, ns, name, "Running")
    # Workers exit as a kubelet reports it (kwok runs no process).
    finish_pod(core, ns, "succeeded-worker-0", 0)
    finish_pod(core, ns, "failed-worker-0", 1, "Error")
    out = {
        "running": wait_status(kubectl, ns, "running", "Running"),
        "succeeded": wait_status(kubectl, ns, "succeeded", "Succeeded"),
        "failed": wait_status(kubectl, ns, "failed", "Failed"),
        "suspended": wait_status(kubectl, ns, "suspended", "Suspended"),
        "pending": wait_status(kubectl, ns, "pending", "Pending", reason="Unschedulable"),
    }
    patch = json.dumps({"spec": {"ttlSecondsAfterFinished": 3600}})
    stale = kubectl("patch", "tj", "running", "-n", ns, "--type=merge", "-p", patch, "-o", "json")
    out["stale"] = json.loads(stale.stdout)
    yield Observed(ns, out)
    core.delete_namespace(ns)


def test_argocd_health_of_each_phase_the_operator_writes(states):
    health = {k: argocd_health(v) for k, v in states.jobs.items()}
    assert health["running"] == ("Healthy", "AllWorkersRunning: 1 workers running")
    assert health["succeeded"][0] == "Healthy"
    assert health["failed"][0] == "Degraded"
    assert health["failed"][1].startswith("BackoffLimitExceeded: failed-worker-0 failed (Error")
    assert health["suspended"] == ("Suspended", "Suspended: spec.suspend is true; workers deleted")
    assert health["pending"][0] == "Progressing"
    assert health["pending"][1].startswith("Unschedulable: ")
    assert health["stale"] == (
        "Progressing",
        "Waiting for the operator to observe generation 2 (status is of generation 1)",
    )


def test_kstatus_of_running_failed_and_stale_jobs(states, kstatus_binary):
    names = ["running", "failed", "stale"]
    results = kstatus.compute([states.jobs[n] for n in names], kstatus_binary)
    got = {n: (r.status, r.message) for n, r in zip(names, results, strict=True)}
    assert got["running"] == ("Current", "Resource is Ready")
    assert got["failed"][0] == "Failed"
    assert got["failed"][1].startswith("failed-worker-0 failed (Error")
    assert got["stale"] == (
        "InProgress",
        "TrainingJob generation is 2, but latest observed generation is 1",
    )


def test_the_operator_catches_up_with_a_spec_change(states, kubectl, kstatus_binary):
    ns = states.namespace
    body = wait_status(kubectl, ns, "running", "Running")  # observedGeneration is 2 now
    assert argocd_health(body)[0] == "Healthy"
    assert kstatus.compute([body], kstatus_binary)[0].status == "Current"


def test_kstatus_reads_the_list_kubectl_prints(states, kubectl, kstatus_binary):
    ns = states.namespace
    listed = get_json(kubectl, ns, "tj")
    results = kstatus.compute([listed], kstatus_binary)
    assert sorted(r.name for r in results) == [
        "failed", "pending", "running", "succeeded", "suspended",
    ]  # fmt: skip
    assert {r.namespace for r in results} == {ns}
    assert {r.kind for r in results} == {"TrainingJob"}


# A finished or suspended job has nothing left to reconcile (kstatus Current, as a complete
# batch/v1 Job), and a job whose Stalled condition is True is Failed, not InProgress: otherwise
# Flux's `wait: true` over a folder holding a finished job would time out.
@pytest.mark.parametrize(
    ("state", "want"),
    [
        ("succeeded", "Current"),
        ("suspended", "Current"),
        ("pending", "Failed"),
    ],
)
def test_kstatus_of_finished_suspended_and_stalled_jobs(states, kstatus_binary, state, want):
    assert kstatus.compute([states.jobs[state]], kstatus_binary)[0].status == want


@pytest.mark.parametrize(
    ("phase", "reason", "want"),
    [
        ("Pending", "WaitingForScheduling", "InProgress"),
        ("Starting", "WaitingForWorkers", "InProgress"),
        ("Resizing", "ScaleUp", "InProgress"),
        ("Running", "AllWorkersRunning", "Current"),
        ("Running", "Completing", "InProgress"),  # some workers done, others still running
        ("Failed", "BackoffLimitExceeded", "Failed"),
        ("Succeeded", "Completed", "Current"),
        ("Suspended", "Suspended", "Current"),
        ("Pending", "Unschedulable", "Failed"),
        ("Starting", "ImagePullBackOff", "Failed"),
        ("Pending", "PodRejected", "Failed"),
    ],
)
def test_kstatus_of_the_conditions_each_phase_gets(kstatus_binary, phase, reason, want):
    """reconcile.conditions() for every phase, without a cluster: the whole table at once."""
    st = {"phase": phase, "reason": reason, "message": "m", "observedGeneration": 3}
    st["conditions"] = conditions(st, 3, [], dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "generation": 3},
        "status": st,
    }
    assert kstatus.compute([body], kstatus_binary)[0].status == want


def test_the_gitops_jobs_pass_the_api_servers_validation(kubectl, crd, namespace):
    out = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(JOBS)).stdout
    assert out.count("trainingjob.joule.dev/") == 2, out


@pytest.mark.parametrize(
    ("example", "values_at"),
    [
        ("argocd/joule.yaml", ("spec", "source", "helm", "valuesObject")),
        ("flux/operator/helmrelease.yaml", ("spec", "values")),
    ],
)
def test_the_examples_helm_values_pass_the_charts_schema(helm, tmp_path, example, values_at):
    """The chart's values.schema.json refuses unknown keys: an example out of step with the
    chart would fail to sync."""
    (body,) = [d for d in yaml.safe_load_all((GITOPS / example).read_text()) if d]
    values = body
    for key in values_at:
        values = values[key]
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = helm("template", "joule", str(CHART), "-n", "joule-system", "-f", str(path)).stdout
    assert "kind: Deployment" in out
