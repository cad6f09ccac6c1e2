"""plan(): from a job and its pods to a plan, rule by rule, with no cluster."""

import datetime as dt

import pytest

from joule.api import JobRef, TrainingJobSpec
from joule.observe import Failure, PodView
from joule.reconcile import fmt_time, plan

JOB = JobRef("j", "ns", "uid")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def spec(**kw):
    return TrainingJobSpec.parse({"image": "x", "replicas": 2, **kw})


def pod(
    index, phase="Running", ready=None, scheduled=True, uid=None, failure=None, terminating=False
):
    return PodView(
        name=f"j-worker-{index}",
        uid=uid or f"uid-{index}",
        index=index,
        phase=phase,
        ready=(phase == "Running") if ready is None else ready,
        scheduled=scheduled,
        terminating=terminating,
        failure=failure,
    )


def run(s, pods, status=None, now=T0):
    return plan(JOB, s, status or {}, 1, pods, now)


def reasons(plan):
    return [e.reason for e in plan.events]


def test_a_new_job_creates_every_worker_and_starts_its_clock():
    plan = run(spec(), [])
    assert plan.create == [0, 1]
    assert plan.status["phase"] == "Pending"
    assert plan.status["startTime"] == plan.status["attemptStartTime"] == fmt_time(T0)
    assert plan.requeue_after == 300
    assert "CreatedWorkers" in reasons(plan)


def test_all_workers_running_makes_the_job_ready():
    plan = run(spec(gpusPerReplica=8), [pod(0), pod(1)], {"phase": "Starting"})
    assert plan.create == [] and plan.delete == []
    st = plan.status
    assert (st["phase"], st["replicas"], st["readyReplicas"], st["gpus"]) == ("Running", 2, 2, 16)
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert st["selector"] == "joule.dev/job-name=j"


def test_deciding_again_on_the_same_world_changes_nothing():
    first = run(spec(), [pod(0), pod(1)], {"phase": "Starting"})
    again = run(spec(), [pod(0), pod(1)], first.status, now=T0 + dt.timedelta(seconds=30))
    assert again.status == first.status
    assert again.create == [] and again.delete == [] and again.events == []


def test_a_failed_worker_is_counted_once_and_without_backoff_replaced_at_once():
    s = spec(backoffLimit=3, restartBackoffSeconds=0)
    oom = Failure("OOMKilled", "killed", 137)
    pods = [pod(0), pod(1, phase="Failed", failure=oom)]
    plan = run(s, pods, {"phase": "Running"})
    assert plan.delete == ["j-worker-1"]
    assert plan.status["restarts"] == 1
    assert plan.status["podFailure"]["reason"] == "OOMKilled"
    assert "WorkerFailed" in reasons(plan)
    assert "replacing it now" in plan.events[0].message
    assert plan.status["reason"] != "BackingOff" and plan.requeue_after is None
    # The operator restarts before the pod is gone: the same failure is not counted again.
    again = run(s, pods, plan.status)
    assert again.status["restarts"] == 1
    # Once the failed pod is gone, its replacement is created.
    replaced = run(s, [pod(0)], again.status)
    assert replaced.create == [1]
    assert "handledFailures" not in replaced.status


def test_past_the_backoff_limit_the_job_fails_with_the_pod_reason():
    pods = [pod(0), pod(1, phase="Failed", uid="second", failure=Failure("Error", "boom", 1))]
    plan = run(spec(backoffLimit=1), pods, {"phase": "Running", "restarts": 1})
    st = plan.status
    assert (st["phase"], st["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "exit code 1" in st["message"]
    assert st["completionTime"] == fmt_time(T0)
    assert "j-worker-0" in plan.delete  # the running rest is cleaned (cleanPodPolicy Running)
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True"


def test_an_incomplete_gang_is_released_at_the_startup_timeout():
    status = {"phase": "Starting", "attemptStartTime": fmt_time(T0), "startTime": fmt_time(T0)}
    unsched = Failure("Unschedulable", "0/4 nodes: Insufficient nvidia.com/gpu")
    pods = [pod(0), pod(1, phase="Pending", scheduled=False, failure=unsched)]
    early = run(spec(startupTimeoutSeconds=60), pods, status, now=T0 + dt.timedelta(seconds=30))
    assert early.delete == [] and early.requeue_after == 30
    assert early.status["reason"] == "Unschedulable"
    late = run(spec(startupTimeoutSeconds=60), pods, status, now=T0 + dt.timedelta(seconds=61))
    assert sorted(late.delete) == ["j-worker-0", "j-worker-1"]
    assert late.create == []
    assert late.status["phase"] == "Pending" and late.status["restarts"] == 1
    assert "attemptStartTime" not in late.status
    assert "StartupTimeout" in reasons(late)


def test_a_gang_that_never_fits_fails_once_the_backoff_limit_is_spent():
    status = {"phase": "Starting", "attemptStartTime": fmt_time(T0), "restarts": 1}
    pods = [
        pod(
            0,
            phase="Pending",
            scheduled=False,
            failure=Failure("Unschedulable", "Insufficient nvidia.com/gpu"),
        )
    ]
    plan = run(
        spec(replicas=1, backoffLimit=1, startupTimeoutSeconds=5),
        pods,
        status,
        now=T0 + dt.timedelta(seconds=6),
    )
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "Unschedulable")
    assert plan.delete == ["j-worker-0"]


def test_scaling_down_removes_the_highest_indices_and_up_adds_the_missing():
    elastic = {"elastic": {"minReplicas": 1, "maxReplicas": 4}}
    pods = [pod(0), pod(1), pod(2), pod(3)]
    down = run(spec(replicas=2, **elastic), pods, {"phase": "Running"})
    assert down.delete == ["j-worker-3", "j-worker-2"]
    assert down.status["phase"] == "Resizing"
    assert down.status["replicas"] == 2
    up = run(spec(replicas=4, **elastic), [pod(0), pod(1)], {"phase": "Running"})
    assert up.create == [2, 3]
    assert up.status["phase"] == "Resizing"


def test_suspend_deletes_every_worker_and_resume_recreates_them():
    plan = run(spec(suspend=True), [pod(0), pod(1)], {"phase": "Running"})
    assert sorted(plan.delete) == ["j-worker-0", "j-worker-1"] and plan.create == []
    assert plan.status["phase"] == "Suspended"
    resumed = run(spec(suspend=False), [], plan.status)
    assert resumed.create == [0, 1]
    assert "Resumed" in reasons(resumed)


def test_success_when_workers_exit_zero_and_the_ttl_then_deletes_the_job():
    s = spec(ttlSecondsAfterFinished=60)
    waiting = run(s, [pod(0, phase="Succeeded"), pod(1)], {"phase": "Running"})
    assert waiting.status["phase"] == "Running" and waiting.status["reason"] == "Completing"
    done = run(s, [pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], waiting.status)
    assert done.status["phase"] == "Succeeded"
    assert done.status["completionTime"] == fmt_time(T0)
    assert done.delete == []  # cleanPodPolicy Running keeps finished pods for their logs
    assert done.requeue_after == 60 and not done.delete_job
    later = run(s, [], done.status, now=T0 + dt.timedelta(seconds=61))
    assert later.delete_job


def test_a_worker_that_never_exits_after_the_end_is_deleted_not_waited_for():
    s = spec()
    ended = [pod(0, phase="Succeeded"), pod(1)]
    waiting = run(s, ended, {"phase": "Running"})
    assert waiting.status["completingSince"] == fmt_time(T0) and waiting.delete == []
    assert waiting.requeue_after == 360  # checked again when the grace is up
    later = run(s, ended, waiting.status, now=T0 + dt.timedelta(seconds=359))
    assert later.delete == [] and later.status["reason"] == "Completing"
    stuck = run(s, ended, waiting.status, now=T0 + dt.timedelta(seconds=360))
    assert stuck.delete == ["j-worker-1"] and reasons(stuck) == ["CompletionTimeout"]
    gone = run(s, [pod(0, phase="Succeeded"), pod(1, terminating=True)], stuck.status)
    assert gone.status["phase"] == "Succeeded" and "completingSince" not in gone.status


def test_clean_pod_policy_all_deletes_finished_pods_too():
    s = spec(cleanPodPolicy="All")
    plan = run(s, [pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], {"phase": "Running"})
    assert sorted(plan.delete) == ["j-worker-0", "j-worker-1"]


def test_the_deadline_fails_a_running_job():
    status = {"phase": "Running", "startTime": fmt_time(T0)}
    plan = run(
        spec(activeDeadlineSeconds=100),
        [pod(0), pod(1)],
        status,
        now=T0 + dt.timedelta(seconds=100),
    )
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "DeadlineExceeded")
    assert sorted(plan.delete) == ["j-worker-0", "j-worker-1"]


def test_a_finished_job_is_never_restarted():
    status = {"phase": "Failed", "completionTime": fmt_time(T0)}
    plan = run(spec(), [], status)
    assert plan.create == [] and plan.status["phase"] == "Failed"


def test_condition_times_move_only_when_a_condition_changes():
    first = run(spec(), [pod(0), pod(1)], {"phase": "Starting"})
    later = run(spec(), [pod(0), pod(1)], first.status, now=T0 + dt.timedelta(hours=1))
    assert [c["lastTransitionTime"] for c in later.status["conditions"]] == [
        c["lastTransitionTime"] for c in first.status["conditions"]
    ]


def test_kubectl_scale_on_a_managed_job_becomes_its_target_and_starts_the_cooldown():
    from joule.reconcile import desired_replicas, follow_user_scale

    managed = {"elastic": {"minReplicas": 1, "maxReplicas": 4}, "scaling": {"policy": "Throughput"}}
    st: dict = {}
    assert follow_user_scale(spec(**managed), st, T0) is None  # first sight: just noted
    st["targetReplicas"] = 4  # the policy grew the job
    # A GitOps tool re-applies the same manifest (replicas: 2): the policy's size stays.
    assert follow_user_scale(spec(**managed), st, T0) is None
    assert desired_replicas(spec(**managed), st) == 4
    event = follow_user_scale(spec(**{**managed, "replicas": 1}), st, T0)  # kubectl scale
    assert event is not None and event.reason == "ScaledByUser"
    assert "4 -> 1 workers" in event.message
    assert desired_replicas(spec(**{**managed, "replicas": 1}), st) == 1
    assert st["lastScaleTime"] == fmt_time(T0)  # the policy's cooldown counts from here
    assert "growingSince" not in st  # a shrink cannot fail to finish
    follow_user_scale(spec(**{**managed, "replicas": 3}), st, T0)
    assert st["growingSince"] == fmt_time(T0)  # growth can: its clock starts
    assert follow_user_scale(spec(replicas=3), {"specReplicas": 2}, T0) is None  # unmanaged


def test_a_worker_the_operator_deleted_is_neither_a_failure_nor_a_success():
    # A real kubelet marks a deleted pod Failed (exit 143 after SIGTERM) before it goes.
    sigterm = Failure("Error", "exited with code 143", 143)
    s = spec(replicas=1, backoffLimit=0)
    pods = [pod(0), pod(1, phase="Failed", failure=sigterm, terminating=True)]
    plan = run(s, pods, {"phase": "Resizing", "restarts": 0})
    assert plan.status["restarts"] == 0
    assert plan.status["phase"] != "Failed"
    assert "WorkerFailed" not in reasons(plan) and "BackoffLimitExceeded" not in reasons(plan)
    assert "podFailure" not in plan.status
    # A user script that exits 0 on SIGTERM does not end the job either.
    done = [pod(0), pod(1, phase="Succeeded", terminating=True)]
    plan = run(s, done, {"phase": "Resizing", "restarts": 0})
    assert plan.status["phase"] == "Running"
    assert "completionTime" not in plan.status


def after(seconds):
    return T0 + dt.timedelta(seconds=seconds)


def test_the_deadline_does_not_run_while_the_job_is_suspended():
    s = spec(activeDeadlineSeconds=100)
    st = run(s, [pod(0), pod(1)], {"phase": "Running", "startTime": fmt_time(T0)}, after(60)).status
    suspended = run(spec(activeDeadlineSeconds=100, suspend=True), [pod(0), pod(1)], st, after(60))
    assert suspended.status["phase"] == "Suspended"
    # An hour suspended: far past the deadline on the wall clock, yet nothing fails.
    still = run(spec(activeDeadlineSeconds=100, suspend=True), [], suspended.status, after(3660))
    assert still.status["phase"] == "Suspended"
    resumed = run(s, [], still.status, after(3660))
    assert resumed.status["phase"] != "Failed" and resumed.create == [0, 1]
    assert resumed.status["suspendedSeconds"] == 3600
    assert resumed.requeue_after == 40  # 60 s used before, 40 s left
    running = run(s, [pod(0), pod(1)], resumed.status, after(3699))
    assert running.status["phase"] == "Running"
    over = run(s, [pod(0), pod(1)], running.status, after(3700))
    assert over.status["reason"] == "DeadlineExceeded"


def budget_spec(**energy):
    return spec(energy=energy) if energy else spec()


def test_a_job_suspended_by_its_budget_resumes_when_the_budget_is_raised_or_removed():
    exhausted = {
        "phase": "Running",
        "energy": {"consumedJoules": 1000.0},
        "lastDecision": {"reason": "BudgetExhausted", "message": "1000 J of 1000 J used",
                         "suspend": True, "replicas": 2},
    }  # fmt: skip
    stopped = run(budget_spec(budget=1000), [pod(0), pod(1)], exhausted)
    assert (stopped.status["phase"], stopped.status["reason"]) == ("Suspended", "BudgetExhausted")
    # Still exhausted: stays suspended.
    again = run(budget_spec(budget=1000), [], stopped.status)
    assert again.status["phase"] == "Suspended" and again.create == []
    # Raised: the workers come back, with a Resumed event.
    raised = run(budget_spec(budget=5000), [], stopped.status)
    assert raised.create == [0, 1] and "Resumed" in reasons(raised)
    assert not raised.status["lastDecision"]["suspend"]
    # Removed, on a job that is then Fixed with no energy limit (the policy no longer runs).
    removed = run(budget_spec(), [], stopped.status)
    assert removed.create == [0, 1] and "Resumed" in reasons(removed)


def test_a_worker_refused_by_the_api_server_shows_stalled_with_its_message_until_created():
    from joule.reconcile import Rejection, rejection_status

    plan = run(spec(), [])
    refused = Rejection("worker 0", "PodRejected", 'pods "j-worker-0" is forbidden: exceeded quota')
    st = rejection_status(plan.status, refused, T0, 1)
    stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and "exceeded quota" in stalled["message"]
    assert st["podFailure"]["reason"] == "PodRejected"
    # The next reconcile decides the same: no flapping between two reasons.
    again = run(spec(), [], st, after(30))
    assert again.create == [0, 1]
    assert again.status["reason"] == "PodRejected"
    assert rejection_status(again.status, refused, after(30), 1) == again.status
    # Created at last: the refusal is cleared.
    cleared = rejection_status(again.status, None, after(60), 1)
    assert "podFailure" not in cleared
    nxt = run(spec(), [pod(0), pod(1)], cleared)
    assert nxt.status["phase"] == "Running"


def test_unreadable_workers_show_as_a_condition():
    from joule.reconcile import conditions

    st = {"phase": "Running", "lastDecision": {"reason": "NoMeasurement"},
          "metricsError": "j-worker-1 rank 0: no answer within 5s"}  # fmt: skip
    cond = {c["type"]: c for c in conditions(st, 1, [], T0)}
    assert cond["MetricsUnavailable"]["status"] == "True"
    assert "j-worker-1 rank 0" in cond["MetricsUnavailable"]["message"]
    st.pop("metricsError")
    cond = {c["type"]: c for c in conditions(st, 1, [], T0)}
    assert cond["MetricsUnavailable"]["status"] == "False"


def test_growth_that_cannot_finish_falls_back_to_the_size_reached_with_a_reason():
    s = spec(replicas=2, elastic={"minReplicas": 1, "maxReplicas": 4},
             scaling={"policy": "Throughput"}, startupTimeoutSeconds=120)  # fmt: skip
    st = {"phase": "Running", "targetReplicas": 4, "lastScaleTime": fmt_time(T0),
          "growingSince": fmt_time(T0), "specReplicas": 2}  # fmt: skip
    unschedulable = Failure("Unschedulable", "0/4 nodes are available: 4 Insufficient gpu")
    pods = [pod(0), pod(1), pod(2), pod(3, phase="Pending", scheduled=False, failure=unschedulable)]
    growing = run(s, pods, st, after(60))
    assert growing.status["phase"] == "Resizing" and growing.status["reason"] == "Unschedulable"
    assert growing.requeue_after == 60  # wakes up when the growth runs out of time
    late = run(s, pods, growing.status, after(120))
    assert late.status["targetReplicas"] == 3
    assert late.delete == ["j-worker-3"]  # the worker that never fit lets go of its claim
    assert "resizing to 3" in late.status["message"]  # until worker 3 is gone
    event = next(e for e in late.events if e.reason == "ResizeTimeout")
    assert "Unschedulable" in event.message and "back to 3" in event.message
    assert late.status["lastScaleTime"] == fmt_time(after(120))  # the cooldown starts again
    assert "growingSince" not in late.status
    # A Fixed job without limits is not the operator's to resize: it keeps waiting.
    fixed_spec = spec(replicas=4, startupTimeoutSeconds=120)
    fixed = run(fixed_spec, pods, {"phase": "Resizing"}, after(999))
    assert fixed.status["phase"] == "Resizing" and "ResizeTimeout" not in reasons(fixed)


def test_a_worker_lost_long_after_the_last_resize_is_replaced_not_given_up():
    """A failed or deleted worker of a job that last resized an hour ago is no growth: it is
    replaced, and no healthy worker is deleted (the timeout measured from lastScaleTime once
    shrank the job on every lost worker)."""
    s = spec(replicas=4, elastic={"minReplicas": 1, "maxReplicas": 4}, backoffLimit=5,
             scaling={"policy": "Throughput"}, startupTimeoutSeconds=120)  # fmt: skip
    st = run(s, [pod(i) for i in range(4)], {"phase": "Running", "targetReplicas": 4,
             "lastScaleTime": fmt_time(T0), "specReplicas": 4}, after(3600)).status  # fmt: skip
    gone = run(s, [pod(0), pod(1), pod(3)], st, after(3601))
    assert gone.create == [2] and gone.delete == []
    assert gone.status["targetReplicas"] == 4 and "ResizeTimeout" not in reasons(gone)
    oom = Failure("OOMKilled", "killed", 137)
    failed = run(s, [pod(0), pod(1), pod(2, phase="Failed", failure=oom), pod(3)], st, after(3601))
    assert failed.delete == ["j-worker-2"] and failed.status["restarts"] == 1
    assert "WorkerFailed" in reasons(failed) and "ResizeTimeout" not in reasons(failed)


def test_a_partly_refused_gang_keeps_one_status_instead_of_flapping():
    from joule.reconcile import Rejection, rejection_status

    s = spec(replicas=2)
    refused = Rejection("worker 1", "PodRejected", "exceeded quota: pods=1")
    # Worker 0 was created and scheduled; worker 1 is refused on every try.
    first = run(s, [], {})
    st = rejection_status(first.status, refused, T0, 1)
    for i in range(3):
        again = run(s, [pod(0, phase="Pending", ready=False)], st, after(10 * (i + 1)))
        assert again.create == [1]
        assert again.status["reason"] == "PodRejected"
        after_create = rejection_status(again.status, refused, after(10 * (i + 1)), 1)
        assert after_create == again.status  # nothing to write: no write, no new Event
        st = after_create


def test_energy_conditions_and_unread_workers_go_with_the_policy():
    managed = {"energy": {"powerCapWatts": 10}}
    st = {"phase": "Running", "metricsError": "j-worker-1 rank 0: refused",
          "lastDecision": {"reason": "PowerCapExceeded", "overCap": True}}  # fmt: skip
    capped = run(spec(**managed), [pod(0), pod(1)], st)
    cond = {c["type"]: c["status"] for c in capped.status["conditions"]}
    assert cond["PowerCapExceeded"] == "True" and cond["MetricsUnavailable"] == "True"
    # The cap is removed: no policy runs any more, so nothing of it is left to go stale.
    plain = run(spec(), [pod(0), pod(1)], capped.status)
    types = {c["type"] for c in plain.status["conditions"]}
    assert "PowerCapExceeded" not in types and "MetricsUnavailable" not in types
    # Finished: nobody reads the workers.
    done = run(spec(**managed), [pod(0, phase="Succeeded"), pod(1, phase="Succeeded")], st)
    assert "metricsError" not in done.status


def test_a_suspension_before_the_job_started_does_not_lengthen_its_deadline():
    s = spec(activeDeadlineSeconds=600)
    held = run(spec(activeDeadlineSeconds=600, suspend=True), [], {})
    resumed = run(s, [], held.status, after(3600))
    assert "suspendedSeconds" not in resumed.status
    running = run(s, [pod(0), pod(1)], resumed.status, after(3600 + 599))
    assert running.status["phase"] == "Running"
    over = run(s, [pod(0), pod(1)], running.status, after(3600 + 600))
    assert over.status["reason"] == "DeadlineExceeded"  # 600 s from its start, not 4200 s


@pytest.mark.parametrize(
    ("phase", "reason", "ready", "reconciling", "stalled"),
    [
        ("Running", "AllWorkersRunning", "True", "False", "False"),
        ("Succeeded", "Completed", "True", "False", "False"),  # nothing left to do
        ("Suspended", "Suspended", "True", "False", "False"),  # as the user asked
        ("Pending", "WaitingForScheduling", "False", "True", "False"),
        ("Pending", "Unschedulable", "False", "False", "True"),  # stalled, not reconciling
        ("Starting", "ImagePullBackOff", "False", "False", "True"),
        ("Failed", "BackoffLimitExceeded", "False", "False", "True"),
        # Waiting to replace a failed worker: the operator will retry by itself.
        ("Resizing", "BackingOff", "False", "True", "False"),
    ],
)
def test_conditions_say_what_kstatus_reads(phase, reason, ready, reconciling, stalled):
    """Flux (kstatus) reads Reconciling, then Stalled, then Ready: a stalled job must not say
    Reconciling, and a finished or suspended one is Ready, or `wait: true` never ends."""
    from joule.reconcile import conditions

    st = {"phase": phase, "reason": reason, "message": "m"}
    got = {c["type"]: c["status"] for c in conditions(st, 1, [], dt.datetime(2026, 1, 1))}
    assert (got["Ready"], got["Reconciling"], got["Stalled"]) == (ready, reconciling, stalled)


# --- restart backoff: a worker that fails on every start ------------------------------------


def condition(st, ctype):
    return next(c["status"] for c in st["conditions"] if c["type"] == ctype)


def test_restart_delays_double_from_the_base_up_to_the_cap():
    from joule.reconcile import restart_delay

    delays = [restart_delay(spec(), n) for n in range(1, 9)]
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]  # the default base, 10 s
    assert [restart_delay(spec(restartBackoffSeconds=2), n) for n in (1, 2, 3)] == [2, 4, 8]
    assert restart_delay(spec(restartBackoffSeconds=0), 5) == 0  # replace at once
    assert restart_delay(spec(restartBackoffSeconds=900), 3) == 900  # a base above the cap
    assert restart_delay(spec(), 10_000) == 300  # no overflow, however many restarts


def test_a_failed_worker_is_replaced_only_once_its_backoff_is_over():
    s = spec(backoffLimit=3)
    oom = Failure("OOMKilled", "exited with code 137", 137)
    failed = run(s, [pod(0), pod(1, phase="Failed", failure=oom)], {"phase": "Running"})
    st = failed.status
    assert st["lastFailureTime"] == fmt_time(T0) and st["restarts"] == 1
    assert failed.delete == ["j-worker-1"] and failed.create == []
    event = next(e for e in failed.events if e.reason == "WorkerFailed")
    assert event.message == (
        "j-worker-1 failed (OOMKilled, exit code 137): exited with code 137; "
        "replacing it in 10s (restart 1 of 3)"
    )
    assert (st["phase"], st["reason"]) == ("Resizing", "BackingOff")
    assert st["message"] == (
        "j-worker-1 failed (OOMKilled, exit code 137): exited with code 137; replacing it "
        "in 10s, at 2026-01-01T00:00:10Z (restart 1 of 3)"
    )
    assert failed.requeue_after == 10  # woken when the wait is over
    # Waiting is progress, not a stall: the operator retries by itself.
    assert condition(st, "Reconciling") == "True"
    assert (condition(st, "Stalled"), condition(st, "Ready")) == ("False", "False")

    # The failed pod is gone; the wait is not over: nothing is created, the status stands
    # (its message names the end of the wait, so it is not rewritten while the job waits).
    waiting = run(s, [pod(0)], st, after(3))
    assert waiting.create == [] and waiting.requeue_after == 7
    assert (waiting.status["reason"], waiting.status["message"]) == (st["reason"], st["message"])
    assert run(s, [pod(0)], waiting.status, after(6)).status == waiting.status

    replaced = run(s, [pod(0)], waiting.status, after(10))
    assert replaced.create == [1]
    assert replaced.status["reason"] != "BackingOff"
    running = run(s, [pod(0), pod(1)], replaced.status, after(20))
    assert running.status["phase"] == "Running" and "podFailure" not in running.status


def test_each_failure_doubles_the_wait():
    s = spec(backoffLimit=5)
    st = {"phase": "Running"}
    waits = []
    for n in range(1, 5):
        now = after(1000 * n)
        crash = Failure("Error", "boom", 1)
        failed = run(s, [pod(0), pod(1, phase="Failed", uid=f"crash-{n}", failure=crash)], st, now)
        assert failed.status["restarts"] == n
        waits.append(failed.requeue_after)
        st = run(s, [pod(0), pod(1)], failed.status, now + dt.timedelta(seconds=500)).status
    assert waits == [10, 20, 40, 80]


def test_an_operator_restart_mid_wait_keeps_the_wait():
    """All the wait needs is in the stored status: a new operator (a fresh plan from the
    status read back from the API server) waits out the rest, no more and no less."""
    import json

    s = spec(backoffLimit=3, restartBackoffSeconds=30)
    crash = Failure("Error", "ValueError: bad lr", 1)
    failed = run(s, [pod(0), pod(1, phase="Failed", failure=crash)], {"phase": "Running"})
    stored = json.loads(json.dumps(failed.status))  # as the API server keeps it
    resumed = run(s, [pod(0)], stored, after(25))
    assert resumed.create == [] and resumed.requeue_after == 5
    assert resumed.status["reason"] == "BackingOff"
    assert "ValueError: bad lr" in resumed.status["message"]
    assert run(s, [pod(0)], stored, after(30)).create == [1]


def test_a_worker_failing_at_once_on_every_start_backs_off_then_fails_with_its_reason():
    s = spec(replicas=1, backoffLimit=2, restartBackoffSeconds=2)
    crash = Failure("Error", "config.yaml: no such file", 1)
    st = run(s, [], {}).status  # created
    now, seen = T0, []
    for n in range(1, 4):
        now += dt.timedelta(seconds=1)
        dead = [pod(0, phase="Failed", uid=f"start-{n}", failure=crash)]
        p = run(s, dead, st, now)
        st = p.status
        seen.append((st["phase"], st["reason"], p.requeue_after))
        if st["phase"] == "Failed":
            break
        # Before the startup timeout of a gang that never ran: the clock starts again with
        # the replacement, so the wait does not use it up.
        assert "attemptStartTime" not in st
        assert run(s, [], st, now).create == []  # the pod is gone; still waiting
        now += dt.timedelta(seconds=p.requeue_after)
        p = run(s, [], st, now)
        assert p.create == [0]
        st = p.status
    assert seen == [("Pending", "BackingOff", 2), ("Pending", "BackingOff", 4),
                    ("Failed", "BackoffLimitExceeded", None)]  # fmt: skip
    assert st["message"] == (
        "j-worker-0 failed (Error, exit code 1): config.yaml: no such file; "
        "3 restarts > backoffLimit=2"
    )
    assert st["podFailure"] == {
        "pod": "j-worker-0", "reason": "Error", "message": "config.yaml: no such file",
        "exitCode": 1,
    }  # fmt: skip
    assert condition(st, "Stalled") == "True"


def test_an_oom_killed_worker_past_the_limit_fails_the_job_naming_the_oom_kill():
    oom = Failure("OOMKilled", "exited with code 137", 137)
    p = run(spec(replicas=1, backoffLimit=0), [pod(0, phase="Failed", failure=oom)],
            {"phase": "Running"})  # fmt: skip
    assert (p.status["phase"], p.status["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "j-worker-0 failed (OOMKilled, exit code 137)" in p.status["message"]
    assert p.create == [] and p.requeue_after is None


def test_a_shorter_backoff_in_the_spec_takes_effect_at_once():
    s = spec(backoffLimit=3, restartBackoffSeconds=60)
    crash = Failure("Error", "boom", 1)
    st = run(s, [pod(0), pod(1, phase="Failed", failure=crash)], {"phase": "Running"}).status
    assert run(s, [pod(0)], st, after(10)).create == []
    assert run(spec(backoffLimit=3, restartBackoffSeconds=0), [pod(0)], st, after(10)).create == [1]


def test_worker_0_deleted_releases_the_others_at_once_uncounted():
    """Worker 0 hosts the rendezvous store: its replacement starts a new one that the
    others cannot follow, so they go at once (no failure counted, no backoff waited)."""
    s = spec(replicas=3)
    running = {"phase": "Running", "restarts": 0}
    plan = run(s, [pod(1), pod(2)], running)
    assert plan.create == [0]
    assert sorted(plan.delete) == ["j-worker-1", "j-worker-2"]
    assert reasons(plan).count("RendezvousHostLost") == 1 and plan.status["restarts"] == 0
    # Deleted with a grace period: still there, terminating; the others go all the same.
    plan = run(s, [pod(0, terminating=True), pod(1), pod(2)], running)
    assert plan.create == [] and sorted(plan.delete) == ["j-worker-1", "j-worker-2"]
    # Next: the new worker 0 and the others on their way out; nothing more, said once.
    gone = Failure("Error", "RendezvousConnectionError", 1)
    later = [pod(0, phase="Pending", uid="new"), pod(1, terminating=True),
             pod(2, phase="Failed", failure=gone, terminating=True)]  # fmt: skip
    plan = run(s, later, {**running, "phase": "Resizing"})
    assert plan.delete == [] and "RendezvousHostLost" not in reasons(plan)
    assert plan.status["restarts"] == 0 and "WorkerFailed" not in reasons(plan)


def test_worker_0_lost_with_its_node_or_refused_at_the_start_is_not_this():
    s = spec(replicas=2)
    lost = Failure("NodeLost", "node gone")
    plan = run(s, [pod(0, failure=lost, terminating=True), pod(1)], {"phase": "Running"})
    assert "RendezvousHostLost" not in reasons(plan)
    # A worker 0 refused (quota) while worker 1 was created: the group never formed.
    plan = run(s, [pod(1, phase="Pending")], {"phase": "Starting"})
    assert plan.delete == [] and plan.create == [0]
