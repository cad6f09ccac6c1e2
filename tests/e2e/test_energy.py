"""Energy limits on the real loop: trainer processes on the local node report (estimated)
joules, the operator accounts them and acts: a power cap lowers the per-GPU power limit where
allowed and shrinks the job where not, an exhausted budget suspends it, with the reasons in
status and in Events."""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from joule.constants import POWER_LIMIT_ANNOTATION
from tests.conftest import wait_for
from tests.e2e.test_local_loop import apply, assert_no_drift, events, running_pods, status

TRAIN = ["--steps", "100000", "--checkpoint-every-steps", "20", "--log-every", "10"]


def reasons(core, namespace: str, name: str) -> list[str]:
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [e.reason for e in items.items]


def posted(core, namespace: str, name: str, reason: str) -> None:
    """Wait for an Event: the operator posts them just after the status they explain."""
    wait_for(lambda: reason in reasons(core, namespace, name), timeout=15, what=f"a {reason} Event")


def condition(st: dict, kind: str) -> str | None:
    return next((c["status"] for c in st.get("conditions", []) if c["type"] == kind), None)


@pytest.mark.timeout(400)
def test_a_job_over_its_power_cap_is_scaled_down_and_says_why(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    # Two CPU workers draw 13-30 W (estimated: their CPU time x 15 W per core; less when
    # the machine is busy). A 10 W cap is over either way.
    manifest = apply(
        kubectl, namespace, "capped", local_node, tmp_path, TRAIN,
        replicas=2, elastic={"minReplicas": 1, "maxReplicas": 2},
        scaling={"policy": "Fixed", "evaluationIntervalSeconds": 5},
        energy={"powerCapWatts": 10, "windowSeconds": 10},
    )  # fmt: skip

    def capped():
        st = status(api, namespace, "capped")
        return st if st.get("targetReplicas") == 1 else None

    st = wait_for(capped, timeout=240, interval=1.0, what="the power cap to shrink the job")
    assert st["lastDecision"]["reason"] == "PowerCapExceeded"
    assert "over the 10 W cap" in st["lastDecision"]["message"]
    assert condition(st, "PowerCapExceeded") == "True"
    assert st["energy"]["source"] == "estimated" and st["energy"]["consumedJoules"] > 0
    wait_for(lambda: len(running_pods(core, namespace, "capped")) == 1, timeout=60,
             what="one worker left")  # fmt: skip
    posted(core, namespace, "capped", "PowerCapExceeded")
    assert_no_drift(kubectl, namespace, manifest)  # resized by the operator: status only


@pytest.mark.timeout(400)
def test_over_its_cap_a_job_first_runs_at_a_lower_power_limit_and_keeps_its_workers(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    # As above, but the policy may lower each GPU's limit to 1 W. On the local node the
    # estimated meter enforces a limit by idling between steps (labelled an estimate).
    manifest = apply(
        kubectl, namespace, "limited", local_node, tmp_path, TRAIN,
        replicas=2, elastic={"minReplicas": 1, "maxReplicas": 2},
        scaling={"policy": "Fixed", "evaluationIntervalSeconds": 5},
        energy={"powerCapWatts": 10, "windowSeconds": 10, "minGpuPowerLimitWatts": 1},
    )  # fmt: skip

    def lowered():
        st = status(api, namespace, "limited")
        return st if st.get("energy", {}).get("gpuPowerLimitWatts") else None

    st = wait_for(lowered, timeout=240, interval=1.0, what="a lowered power limit")
    limit = st["energy"]["gpuPowerLimitWatts"]
    assert 1 <= limit < 10
    posted(core, namespace, "limited", "PowerLimitLowered")
    assert st["targetReplicas"] == 2

    def annotated():
        pods = running_pods(core, namespace, "limited")
        values = {(p.metadata.annotations or {}).get(POWER_LIMIT_ANNOTATION) for p in pods}
        return len(pods) == 2 and values == {f"{limit:g}"}

    wait_for(annotated, timeout=30, what="both workers annotated with the limit")
    applied = wait_for(
        lambda: [e for e in events(local_node, namespace, "limited")
                 if e.get("event") == "power_limit" and e.get("watts") == limit],
        timeout=30, what="the trainer to apply the limit",
    )  # fmt: skip
    assert applied[0]["source"] == "estimated"

    def under_cap():
        st = status(api, namespace, "limited")
        return st if condition(st, "PowerCapExceeded") == "False" else None

    st = wait_for(under_cap, timeout=120, interval=1.0, what="the job back under its cap")
    assert st["energy"]["averageWatts"] <= 10
    assert st["targetReplicas"] == 2 and len(running_pods(core, namespace, "limited")) == 2
    assert "lastScaleTime" not in st  # the workers were never resized
    assert_no_drift(kubectl, namespace, manifest)  # the lowered limit is in status only

    # kubectl scale on a job Joule manages: the new size is taken, and kept.
    kubectl("scale", "-n", namespace, "tj/limited", "--replicas=1")
    wait_for(lambda: len(running_pods(core, namespace, "limited")) == 1, timeout=90,
             what="one worker after kubectl scale")  # fmt: skip
    posted(core, namespace, "limited", "ScaledByUser")
    wait_for(lambda: status(api, namespace, "limited").get("phase") == "Running", timeout=90,
             what="training at one worker")  # fmt: skip
    time.sleep(15)  # three evaluations
    st = status(api, namespace, "limited")
    assert st["targetReplicas"] == 1 and len(running_pods(core, namespace, "limited")) == 1


@pytest.mark.timeout(400)
def test_a_job_that_used_its_budget_is_suspended_and_its_energy_kept(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    apply(
        kubectl, namespace, "budget", local_node, tmp_path, TRAIN, replicas=1,
        scaling={"evaluationIntervalSeconds": 5},
        energy={"budget": "150J", "onBudgetExhausted": "Suspend", "windowSeconds": 10},
    )  # fmt: skip

    def suspended():
        st = status(api, namespace, "budget")
        return st if st.get("phase") == "Suspended" else None

    st = wait_for(suspended, timeout=300, interval=1.0, what="the budget to suspend the job")
    assert st["reason"] == "BudgetExhausted"
    assert st["energy"]["consumedJoules"] >= 150
    assert st["energy"]["budgetRemainingJoules"] == 0
    assert condition(st, "BudgetExhausted") == "True"
    assert st["lastDecision"]["suspend"] is True
    wait_for(
        lambda: (
            not core.list_namespaced_pod(
                namespace, label_selector="joule.dev/job-name=budget"
            ).items
        ),
        timeout=90,
        what="the workers to be deleted",
    )
    posted(core, namespace, "budget", "BudgetExhausted")
    # The accounting survives: the consumed energy stays in status while suspended.
    assert status(api, namespace, "budget")["energy"]["consumedJoules"] >= 150
    with pytest.raises(client.ApiException):
        core.read_namespaced_pod("budget-worker-0", namespace)
