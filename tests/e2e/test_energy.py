"""Energy limits on the real loop, measured at the node: the chart's node agent runs on the
local node (privileged, as on a GPU node) and maps each worker's GPU slot to it through the
kubelet's pod-resources API. The node has no GPUs, so the agent reads an NVML double that
draws a constant 30 W per GPU under its limit, labelled "simulated" everywhere. The operator
accounts the agent's per-pod energy and acts: a power cap lowers the per-GPU power limit (the
agent sets it and confirms it) where allowed and shrinks the job where not, an exhausted
budget suspends it, with the reasons in status and in Events; the agent restores a lowered
limit once the job is gone. Workers run unprivileged, as uid 1000."""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from joule.agent_metrics import parse_agent_metrics
from joule.cluster import ClusterSettings
from joule.cluster.lifecycle import restart
from joule.constants import POWER_LIMIT_ANNOTATION
from tests.conftest import TEST_CLUSTER, plain_script_job, wait_for
from tests.e2e.test_local_loop import apply, assert_no_drift, running_pods, status

TRAIN = ["--steps", "100000", "--checkpoint-every-steps", "20", "--log-every", "10"]


def reasons(core, namespace: str, name: str) -> list[str]:
    items = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
    return [e.reason for e in items.items]


def posted(core, namespace: str, name: str, reason: str) -> None:
    """Wait for an Event: the operator posts them just after the status they explain."""
    wait_for(lambda: reason in reasons(core, namespace, name), timeout=15, what=f"a {reason} Event")


def condition(st: dict, kind: str) -> str | None:
    return next((c["status"] for c in st.get("conditions", []) if c["type"] == kind), None)


def budgeted_job(kubectl, core, namespace: str, local_node, name: str) -> str:
    """An unmodified script with a budget it will not reach, evaluated every 5 s: its one
    worker's UID, once it runs."""
    plain_script_job(
        kubectl, namespace, name, local_node.placement(),
        scaling={"evaluationIntervalSeconds": 5},
        energy={"budget": "1MJ", "windowSeconds": 10},
    )  # fmt: skip
    (pod,) = wait_for(lambda: running_pods(core, namespace, name), timeout=120,
                      what="the worker to run")  # fmt: skip
    return pod.metadata.uid


@pytest.mark.timeout(400)
def test_a_job_over_its_power_cap_is_scaled_down_and_says_why(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    # Two workers' simulated GPUs draw 2 x 30 W: over a 10 W cap, with no limit allowed.
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
    assert st["energy"]["source"] == "node" and st["energy"]["meter"] == "simulated"
    assert st["energy"]["consumedJoules"] > 0
    wait_for(lambda: len(running_pods(core, namespace, "capped")) == 1, timeout=60,
             what="one worker left")  # fmt: skip
    posted(core, namespace, "capped", "PowerCapExceeded")
    assert_no_drift(kubectl, namespace, manifest)  # resized by the operator: status only


@pytest.mark.timeout(400)
def test_over_its_cap_a_job_first_runs_at_a_lower_power_limit_and_keeps_its_workers(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    # As above, but the policy may lower each GPU's limit to 1 W: the node agent sets it
    # (the double clamps its draw to it) and confirms it in force.
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
    wait_for(lambda: status(api, namespace, "limited")["energy"].get("gpuPowerLimitConfirmed"),
             timeout=30, what="the node agent to confirm the limit in force")  # fmt: skip
    uids = {p.metadata.uid for p in running_pods(core, namespace, "limited")}
    seen = parse_agent_metrics(operator.agent_metrics())
    gpus = [g for uid in uids for g in seen.pods.get(uid, ())]
    assert len(gpus) == 2 and {(g.requested, g.enforced) for g in gpus} == {(limit, limit)}

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

    # The job goes: no lowered limit outlives it (the next tenant gets the default).
    kubectl("delete", "-n", namespace, "tj/limited", "--wait=true")

    def restored():
        lines = operator.agent_metrics().splitlines()
        limits = [float(x.rsplit(" ", 1)[1]) for x in lines
                  if x.startswith("joule_node_gpu_power_limit_watts{")]  # fmt: skip
        return len(limits) == 4 and set(limits) == {50.0}  # the double's default

    wait_for(restored, timeout=60, what="every GPU back at its default power limit")


@pytest.mark.timeout(400)
def test_an_unmodified_torchrun_script_is_measured_at_the_node_and_stopped_at_its_budget(
    kubectl, api, core, namespace, operator, local_node
):
    # A plain DDP script (torch only, no Joule import), started by torchrun through
    # joule-launch: nothing in the worker reports energy, yet the budget holds. The
    # namespace enforces the restricted Pod Security Standard: the workers need no
    # privilege, their GPU power is the node agent's business.
    kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    plain_script_job(
        kubectl, namespace, "plain", local_node.placement(),
        podSecurityContext={"runAsNonRoot": True},  # the image runs as uid 1000
        scaling={"evaluationIntervalSeconds": 5},
        energy={"budget": "300J", "onBudgetExhausted": "Suspend", "windowSeconds": 10},
    )  # fmt: skip
    wait_for(lambda: running_pods(core, namespace, "plain"), timeout=120,
             what="the worker to run under the restricted standard")  # fmt: skip

    def suspended():
        st = status(api, namespace, "plain")
        return st if st.get("phase") == "Suspended" else None

    st = wait_for(suspended, timeout=300, interval=1.0, what="the budget to suspend the job")
    assert st["reason"] == "BudgetExhausted"
    energy = st["energy"]
    assert energy["source"] == "node" and energy["meter"] == "simulated"
    assert energy["consumedJoules"] >= 300
    assert "no worker reports samples" in energy["progress"]
    assert condition(st, "MetricsUnavailable") == "False"  # no /metrics is no error here
    posted(core, namespace, "plain", "BudgetExhausted")


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


@pytest.mark.timeout(400)
def test_a_node_agent_restart_loses_and_doubles_none_of_a_jobs_energy(
    kubectl, api, core, namespace, operator, local_node
):
    uid = budgeted_job(kubectl, core, namespace, local_node, "steady")

    def record():
        (gpu,) = parse_agent_metrics(operator.agent_metrics()).pods.get(uid, (None,))
        return gpu

    before = wait_for(record, timeout=30, what="the agent's record of the worker's GPU")
    wait_for(lambda: status(api, namespace, "steady").get("energy", {}).get("consumedJoules"),
             timeout=60, what="a first accounting")  # fmt: skip
    old = operator.pod("node-agent")["metadata"]["name"]
    kubectl("delete", "pod", "-n", "joule-e2e", old, "--wait=true")
    started = time.monotonic()
    wait_for(lambda: operator.pod("node-agent")["metadata"]["name"] != old, timeout=60,
             what="the DaemonSet's new agent")  # fmt: skip
    after = wait_for(record, timeout=90, what="the new agent's record of the worker's GPU")
    # The same record (kept on the node), still counting: the time the agent was away is
    # the pod's too, at the double's 30 W.
    assert after.since == before.since
    assert after.joules >= before.joules + 30 * (time.monotonic() - started) * 0.5

    def read_again():  # an evaluation that read the new agent (it missed the old one's end)
        st = status(api, namespace, "steady")
        at = st.get("energy", {}).get("evaluatedAt", "")
        return st if at > seen and not st.get("metricsError") else None

    seen = status(api, namespace, "steady")["energy"]["evaluatedAt"]
    first = wait_for(read_again, timeout=60, what="an evaluation after the agent's restart")
    time.sleep(12)
    st = status(api, namespace, "steady")
    gained = st["energy"]["consumedJoules"] - first["energy"]["consumedJoules"]
    # About 12 s at 30 W, give or take an evaluation (5 s): no doubled count, no jump.
    assert 0 < gained <= 30 * (12 + 2 * 5), gained
    assert st["phase"] == "Running"


@pytest.mark.timeout(600)
def test_the_operator_api_server_or_etcd_killed_lose_and_double_none_of_a_jobs_energy(
    kubectl, api, core, namespace, operator, local_node
):
    """While a job with an energy budget runs: the operator SIGKILLed (no shutdown, mid-loop),
    then kube-apiserver, then etcd (each down 2 s). The operator goes on from the job's
    bookkeeping, neither losing the joules drawn meanwhile nor counting any twice; the job
    keeps its worker, start time and restarts throughout."""
    uid = budgeted_job(kubectl, core, namespace, local_node, "kept")

    def gap() -> tuple[float, dict]:
        """The agent's joules for the worker minus the job's consumedJoules, read just after
        an evaluation (the agent updates its record every 2 s, so both read the same record,
        or one an update apart). What the operator dropped or doubled moves it."""
        seen = status(api, namespace, "kept").get("energy", {}).get("consumedJoules")

        def evaluated() -> dict | None:
            st = status(api, namespace, "kept")
            consumed = st.get("energy", {}).get("consumedJoules")
            return st if consumed is not None and consumed != seen else None

        st = wait_for(evaluated, timeout=90, interval=0.1, what="an evaluation")
        (gpu,) = parse_agent_metrics(operator.agent_metrics()).pods[uid]
        return gpu.joules - st["energy"]["consumedJoules"], st

    wait_for(lambda: uid in parse_agent_metrics(operator.agent_metrics()).pods, timeout=60,
             what="the agent's record of the worker's GPU")  # fmt: skip
    gap()  # the first accounting
    before, first = gap()
    settings = ClusterSettings(name=TEST_CLUSTER)
    faults = {
        "operator SIGKILLed": operator.kill,
        "kube-apiserver SIGKILLed, down 2 s": lambda: restart(settings, "kube-apiserver", 2.0),
        "etcd SIGKILLed, down 2 s": lambda: restart(settings, "etcd", 2.0),
    }
    for fault, cause in faults.items():
        _, st_before = gap()
        restarts = operator.restart_count()
        began = time.monotonic()
        cause()
        after, _ = gap()
        recovered = time.monotonic() - began
        later, st = gap()  # and one more: a count doubled at the second read shows here
        # The kill restarts it; an outage longer than its renew deadline may too (it exits
        # when it cannot renew its Lease, and the kubelet starts it again).
        restarted = operator.restart_count() - restarts
        operator.restarts_caused += restarted
        drawn = st["energy"]["consumedJoules"] - st_before["energy"]["consumedJoules"]
        print(
            f"\n{fault}: accounting again {recovered:.1f} s after; {drawn:.0f} J accounted "
            f"across it; agent minus job: {before:.1f} J at first, {after:.1f} J and "
            f"{later:.1f} J after (lost: {later - before:+.1f} J); operator restarted "
            f"{restarted} times"
        )
        # The simulated GPU draws 30 W and the agent updates its record every 2 s: two reads
        # may be an update apart (60 J), never the seconds the operator was away or could not
        # write (>= 5 s, 150 J) nor an evaluation counted twice (5 s, 150 J).
        assert abs(after - before) <= 75 and abs(later - before) <= 75, (fault, after, later)
        assert drawn >= 30 * recovered * 0.8, (fault, drawn, recovered)
    (now,) = running_pods(core, namespace, "kept")
    assert now.metadata.uid == uid  # the same worker: nothing was restarted
    assert st.get("restarts", 0) == first.get("restarts", 0) == 0
    assert st["startTime"] == first["startTime"] and st["phase"] == "Running"
