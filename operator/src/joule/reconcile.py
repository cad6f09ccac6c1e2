"""The heart of the operator: from the job and its observed pods to what to do. Pure.

``plan`` is level-triggered: it looks only at the current spec, the last written status and
the pods that exist now, never at what happened in between. Running it twice in a row, or
after an operator restart, plans nothing new: pods have deterministic names (a second create
is refused by the API server) and failures are counted by pod UID (a failure already counted
is not counted again).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from joule import hang
from joule.api.events import Event, fmt_time, parse_time
from joule.api.growth import mark_growth
from joule.api.privacy import STOP_REASON, stopped_at_budget
from joule.api.scaling import OnBudgetExhausted
from joule.api.types import CleanPodPolicy, JobRef, Phase, TrainingJobSpec
from joule.builders.labels import selector_string
from joule.observe import CONFIG_ERROR, NODE_LOST, Failure, PodView, restart_cannot_fix
from joule.staging import plan_staging


@dataclass
class Plan:
    create: list[int] = field(default_factory=list)  # replica indices
    delete: list[str] = field(default_factory=list)  # pod names
    # Pods stuck Terminating past their grace period: deleted with grace period 0.
    force_delete: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False
    create_stage: bool = False  # spec.data's staging pod
    # Seconds until a timer (startup timeout, deadline, TTL) fires; None: nothing pending.
    requeue_after: float | None = None


@dataclass(frozen=True)
class Rejection:
    """The API server refused to create one of the job's objects (admission, quota, an
    invalid field): what, why, and its message."""

    what: str  # "worker 1", "service j"
    reason: str  # PodRejected | ServiceRejected | NetworkPolicyRejected | TensorboardRejected
    message: str


REJECTED = ("PodRejected", "ServiceRejected", "NetworkPolicyRejected")


def plan(
    job: JobRef,
    spec: TrainingJobSpec,
    status: dict[str, Any],
    generation: int,
    pods: list[PodView],
    now: dt.datetime,
    stage: PodView | None = None,
) -> Plan:
    """``pods``: the job's workers; ``stage``: spec.data's staging pod, where there is one."""
    st = dict(status)
    out = Plan()
    previous = Phase(st["phase"]) if st.get("phase") in Phase._value2member_map_ else None

    if previous is not None and previous.finished:
        _finished(spec, st, pods, now, out)
        return _close(out, st, job, spec, generation, pods, now)

    budget_stop = bool((st.get("lastDecision") or {}).get("suspend"))
    if budget_stop and not _budget_still_stops(spec, st):
        # The budget was raised or removed (or no longer suspends): the stop is lifted here,
        # not by the policy, which no longer runs at all for a job left without limits.
        st["lastDecision"] = {
            **st["lastDecision"],
            "suspend": False,
            "reason": "BudgetAvailable",
            "message": "the energy budget was raised, removed or no longer suspends the job",
        }
        budget_stop = False
    if spec.suspend or budget_stop:
        out.delete = [p.name for p in pods if not p.terminating]
        st.pop("attemptStartTime", None)
        st.setdefault("suspendedSince", fmt_time(now))
        if spec.suspend:
            _set_phase(st, Phase.SUSPENDED, "Suspended", "spec.suspend is true; workers deleted")
        else:
            why = st["lastDecision"].get("message", "the energy budget is used up")
            _set_phase(st, Phase.SUSPENDED, "BudgetExhausted", f"{why}; workers deleted")
        if previous != Phase.SUSPENDED:
            out.events.append(
                Event("Normal", "Suspended", f"suspended: deleting {len(out.delete)} worker pods")
            )
        return _close(out, st, job, spec, generation, pods, now)
    since = parse_time(st.pop("suspendedSince", None))
    started_at = parse_time(st.get("startTime"))
    if since is not None and started_at is not None:
        # The deadline did not run while the job was suspended (after it had started: a
        # job suspended before its start has no clock running yet).
        paused = (now - max(since, started_at)).total_seconds()
        st["suspendedSeconds"] = round(float(st.get("suspendedSeconds", 0.0)) + paused, 3)
    if previous == Phase.SUSPENDED:
        out.events.append(Event("Normal", "Resumed", "resuming: recreating workers"))

    deadline = spec.active_deadline_seconds
    started = parse_time(st.get("startTime"))
    if deadline and started:
        end = started + dt.timedelta(seconds=deadline + float(st.get("suspendedSeconds", 0.0)))
        left = (end - now).total_seconds()
        if left <= 0:
            _finish(
                st,
                Phase.FAILED,
                "DeadlineExceeded",
                f"the job ran longer than activeDeadlineSeconds={deadline}",
                now,
                out,
            )
            _finished(spec, st, pods, now, out, also_running=True)
            return _close(out, st, job, spec, generation, pods, now)
        out.requeue_after = left

    if spec.data is not None and _staging(spec, st, stage, pods, now, out):
        return _close(out, st, job, spec, generation, pods, now)

    succeeded = [p for p in pods if p.phase == "Succeeded" and not p.terminating]
    if succeeded:
        # Training is over once a worker has exited 0; wait for the rest to exit too, but not
        # forever: a worker stuck after the end (a hung exit barrier) is deleted.
        lingering = [p for p in pods if p.active]
        if not lingering:
            st.pop("completingSince", None)
            budget = _privacy_stop(spec, succeeded)
            if budget is not None:
                st["privacy"] = budget
                _finish(st, Phase.SUCCEEDED, STOP_REASON, _budget_message(budget), now, out)
            else:
                _finish(
                    st, Phase.SUCCEEDED, "Succeeded", f"{len(succeeded)} workers exited 0", now, out
                )
            _finished(spec, st, pods, now, out)
        else:
            since = parse_time(st.get("completingSince")) or now
            st["completingSince"] = fmt_time(since)
            waited = (now - since).total_seconds()
            _set_phase(
                st,
                Phase.RUNNING,
                "Completing",
                f"{len(succeeded)} workers finished; waiting for the others to exit",
            )
            if waited >= COMPLETION_GRACE_SECONDS:
                out.delete = [p.name for p in lingering if not p.terminating]
                names = ", ".join(p.name for p in lingering)
                out.events.append(
                    Event("Warning", "CompletionTimeout",
                          f"training ended {waited:.0f}s ago and {names} did not exit: deleting")
                )  # fmt: skip
            else:
                out.requeue_after = COMPLETION_GRACE_SECONDS - waited
        return _close(out, st, job, spec, generation, pods, now)

    fallback = _fall_back_from_growth(spec, st, pods, now)
    if fallback is not None:
        out.events.append(fallback)
    counted = int(st.get("restarts", 0))
    if _count_failures(spec, st, pods, now, out):
        return _close(out, st, job, spec, generation, pods, now)
    # A failure counted just now restarts the group already: no hang is counted on top.
    if int(st.get("restarts", 0)) == counted and _restart_hung(spec, st, pods, now, out):
        return _close(out, st, job, spec, generation, pods, now)

    released = _release_after_host_lost(pods, previous)
    if released:
        names = ", ".join(str(p.index) for p in released)
        out.delete += [p.name for p in released]
        out.events.append(Event(
            "Warning", "RendezvousHostLost",
            f"worker 0 (the rendezvous host) was deleted; releasing workers {names} to re-form "
            "the group from the newest checkpoint (not counted as a restart)",
        ))  # fmt: skip

    desired = desired_replicas(spec, st)
    present = {p.index for p in pods}
    # A failed worker's replacement waits out its backoff (no worker is created meanwhile),
    # so that a worker failing at once on every start does not spin through backoffLimit.
    backoff = _backoff_left(spec, st, now)
    if backoff is None:
        out.create = [i for i in range(desired) if i not in present]
    # Shrink from the highest index down, so worker 0 (the rendezvous host) stays.
    surplus = sorted(
        (p for p in pods if p.index >= desired and not p.terminating), key=lambda p: -p.index
    )
    out.delete += [p.name for p in surplus]
    if out.create and not st.get("attemptStartTime"):
        st["attemptStartTime"] = fmt_time(now)
    if out.create and not st.get("startTime"):
        st["startTime"] = fmt_time(now)
        if deadline:
            out.requeue_after = float(deadline)
    if out.create:
        names = ", ".join(str(i) for i in out.create)
        out.events.append(Event("Normal", "CreatedWorkers", f"creating workers {names}"))
    if surplus:
        names = ", ".join(str(p.index) for p in surplus)
        out.events.append(
            Event(
                "Normal", "RemovedWorkers", f"scaling down to {desired}: removing workers {names}"
            )
        )

    wanted = [p for p in pods if p.index < desired and p.active]
    all_running = len(wanted) == desired and all(p.ready for p in wanted) and not surplus
    blocking = next((p for p in wanted if p.failure), None)
    # The wait is shown while a worker is missing (not once the job no longer needs it);
    # the failure waited on stays in podFailure meanwhile.
    waiting = backoff if backoff is not None and len(wanted) < desired else None
    if blocking and blocking.failure and waiting is None:
        st["podFailure"] = _failure_dict(blocking.name, blocking.failure)

    if all_running:
        st.pop("attemptStartTime", None)
        st.pop("podFailure", None)
        st.pop("growingSince", None)
        if previous != Phase.RUNNING:
            out.events.append(Event("Normal", "Running", f"all {desired} workers are running"))
        _set_phase(st, Phase.RUNNING, "AllWorkersRunning", f"{desired} workers running")
    elif previous in (Phase.RUNNING, Phase.RESIZING) and (
        surplus or out.create or len(wanted) != desired or not all(p.ready for p in wanted)
    ):
        msg = f"resizing to {desired} workers ({sum(p.ready for p in wanted)} running)"
        if previous != Phase.RESIZING:
            out.events.append(Event("Normal", "Resizing", msg))
        reason = blocking.failure.reason if blocking and blocking.failure else "Resizing"
        gone = next((q for q in pods if q.lost and q.terminating and q.index < desired), None)
        if gone is not None and blocking is None:  # say why a worker is missing, and until when
            reason, msg = NODE_LOST, f"{_lost_message(gone)}; {msg}"
        refused = _refused(st)
        if refused and len(wanted) < desired:  # a worker is still missing: still refused
            reason, msg = refused
        left = _growth_time_left(spec, st, now)
        if left is not None:
            out.requeue_after = _min(out.requeue_after, left)
        _set_phase(st, Phase.RESIZING, reason, msg)
    else:
        _starting(spec, st, wanted, desired, blocking, now, out)
        restarting = hang.restarting(st)
        if restarting and st["reason"] in ("WaitingForScheduling", "WaitingForWorkers"):
            st["reason"], st["message"] = "Hung", restarting  # what the new group is for
    if waiting is not None and not Phase(st["phase"]).finished:
        _backing_off(spec, st, waiting, now, out)
    return _close(out, st, job, spec, generation, pods, now)


def _privacy_stop(spec: TrainingJobSpec, succeeded: list[PodView]) -> dict[str, Any] | None:
    """spec.privacy: what the trainer said as it stopped at its target epsilon, if it did."""
    if spec.privacy is None:
        return None
    return next((b for p in succeeded if (b := stopped_at_budget(p.summary)) is not None), None)


def _budget_message(budget: dict[str, Any]) -> str:
    def said(key: str) -> str:
        value = budget.get(key)
        return f"{value:g}" if isinstance(value, int | float) else "?"

    return (
        f"training stopped at its privacy budget: epsilon {said('epsilon')} of targetEpsilon "
        f"{said('targetEpsilon')} (delta {said('delta')}) at step {said('step')}"
    )


def _release_after_host_lost(pods: list[PodView], previous: Phase | None) -> list[PodView]:
    """Worker 0 serves the group's c10d rendezvous store. Deleted while the group runs (not
    lost with its node, which is counted), its replacement starts a new store the other
    workers' torchrun cannot follow: they would fail in seconds (RendezvousConnectionError),
    each counted as a restart, and be replaced only after their backoff. They are released
    at once instead, uncounted, and the group re-forms from the newest checkpoint. Only once
    the group had formed (Running, Resizing): a worker 0 refused at the start is not this."""
    if previous not in (Phase.RUNNING, Phase.RESIZING):
        return []
    host = next((p for p in pods if p.index == 0), None)
    if host is not None and not (host.terminating and host.failure is None):
        return []
    return [p for p in pods if p.index > 0 and p.active]


def _staging(
    spec: TrainingJobSpec,
    st: dict[str, Any],
    stage: PodView | None,
    pods: list[PodView],
    now: dt.datetime,
    out: Plan,
) -> bool:
    """spec.data: True while the workers wait for the dataset (or staging failed the job)."""
    staging = plan_staging(spec, st, stage)
    st["data"] = staging.data
    out.events += staging.events
    out.create_stage = staging.create_pod
    if staging.delete_pod is not None:
        out.delete.append(staging.delete_pod)
    if not staging.wait:
        return False
    if staging.create_pod and not st.get("startTime"):
        st["startTime"] = fmt_time(now)  # the deadline counts staging too
        if spec.active_deadline_seconds:
            out.requeue_after = _min(out.requeue_after, float(spec.active_deadline_seconds))
    if staging.failed:
        _finish(st, Phase.FAILED, staging.reason, staging.message, now, out)
        _finished(spec, st, pods, now, out)
    else:
        _set_phase(st, Phase.PENDING, staging.reason, staging.message)
    return True


# Kubernetes Jobs' pod backoff: the base delay doubles with each failure, up to 6 min there.
MAX_RESTART_BACKOFF_SECONDS = 300


def restart_delay(spec: TrainingJobSpec, restarts: int) -> float:
    """Seconds a failed worker's replacement waits, once ``restarts`` restarts are counted
    (1 for the first failure): restartBackoffSeconds * 2^(restarts-1), at most 300 s (or
    restartBackoffSeconds itself, where larger); 0 with restartBackoffSeconds 0."""
    base = spec.restart_backoff_seconds
    if base <= 0 or restarts <= 0:
        return 0.0
    cap = max(MAX_RESTART_BACKOFF_SECONDS, base)
    return float(min(base * 2 ** min(restarts - 1, 16), cap))  # 2^16: past any cap


def _backoff_left(spec: TrainingJobSpec, st: dict[str, Any], now: dt.datetime) -> float | None:
    """Seconds left before a failed worker may be replaced (from status.lastFailureTime,
    so an operator restart keeps the wait); None: no wait."""
    failed_at = parse_time(st.get("lastFailureTime"))
    if failed_at is None:
        return None
    delay = restart_delay(spec, int(st.get("restarts", 0)))
    left = delay - (now - failed_at).total_seconds()
    return left if left > 0 else None


def _backing_off(
    spec: TrainingJobSpec, st: dict[str, Any], left: float, now: dt.datetime, plan: Plan
) -> None:
    """Say that the job waits to replace a failed worker, and wake it when the wait is over.
    The message names the end of the wait rather than counting down, so that it does not
    change (and the status is not rewritten) on every reconcile while the job waits."""
    restarts = int(st.get("restarts", 0))
    delay = restart_delay(spec, restarts)
    failed_at = parse_time(st.get("lastFailureTime")) or now
    failure = st.get("podFailure") or {}
    what = "a worker failed"
    if failure.get("pod"):
        what = f"{failure['pod']} failed ({_describe(failure)}): {failure.get('message', '')}"
    until = fmt_time(failed_at + dt.timedelta(seconds=delay))
    st["reason"] = "BackingOff"
    st["message"] = (
        f"{what}; replacing it in {delay:.0f}s, at {until} "
        f"(restart {restarts} of {spec.backoff_limit})"
    )
    plan.requeue_after = _min(plan.requeue_after, left)


def _describe(failure: dict[str, Any]) -> str:
    """'OOMKilled, exit code 137': a failure's reason and exit code, as a status says them."""
    code = failure.get("exitCode")
    return f"{failure.get('reason', 'Failed')}{'' if code is None else f', exit code {code}'}"


def _growth_time_left(spec: TrainingJobSpec, st: dict[str, Any], now: dt.datetime) -> float | None:
    """Seconds a managed job's growth has left to finish: startupTimeoutSeconds from when
    its target was raised above the workers running (status.growingSince, set where the
    target is raised: the policy's decision, kubectl scale). None: no growth under way. A
    worker replaced after a failure is no growth, and never times out here."""
    since = parse_time(st.get("growingSince"))
    if not spec.managed or since is None:
        return None
    return spec.startup_timeout_seconds - (now - since).total_seconds()


def _fall_back_from_growth(
    spec: TrainingJobSpec, st: dict[str, Any], pods: list[PodView], now: dt.datetime
) -> Event | None:
    """Growth that has not finished in time (no node fits, a refused pod) goes back to the
    workers that run, rather than hold the job Resizing for ever; the cooldown starts again.
    Updates st; returns the Event that says so."""
    left = _growth_time_left(spec, st, now)
    if left is None or left > 0:
        return None
    desired = desired_replicas(spec, st)
    ready = sum(1 for p in pods if p.ready and p.active and p.index < desired)
    back = max(ready, spec.bounds[0])
    st.pop("growingSince")
    if back >= desired:
        return None  # nothing to give up: what is missing is a start, not growth
    pending = next((p for p in pods if p.index < desired and p.active and p.failure), None)
    why = f" ({pending.name}: {pending.failure.reason})" if pending and pending.failure else ""
    st["targetReplicas"] = back
    st["lastScaleTime"] = fmt_time(now)
    return Event(
        "Warning",
        "ResizeTimeout",
        f"growing to {desired} workers did not finish in startupTimeoutSeconds="
        f"{spec.startup_timeout_seconds}{why}: back to {back}",
    )


def rejection_status(
    st: dict[str, Any], rejected: Rejection | None, now: dt.datetime, generation: int
) -> dict[str, Any]:
    """The status after creating workers: a refusal is shown as ``podFailure``, the job's
    reason and a Stalled condition, with the API server's own message (it stays while the
    creates keep failing: ``plan`` keeps it); a create that went through clears it."""
    shown = (st.get("podFailure") or {}).get("reason") in REJECTED
    if rejected is None and not shown:
        return st
    new = dict(st)
    if rejected is None:
        new.pop("podFailure")
        return new
    message = f"{rejected.what} was refused by the API server: {rejected.message}"
    new["podFailure"] = {"pod": rejected.what, "reason": rejected.reason, "message": message}
    new["reason"], new["message"] = rejected.reason, message
    new["conditions"] = conditions(new, generation, new.get("conditions", []), now)
    return new


def _refused(st: dict[str, Any]) -> tuple[str, str] | None:
    """The refusal shown in status (reason, message), while no pod says more."""
    failure = st.get("podFailure") or {}
    if failure.get("reason") in REJECTED:
        return failure["reason"], failure.get("message", "")
    return None


def _budget_still_stops(spec: TrainingJobSpec, st: dict[str, Any]) -> bool:
    """Whether the energy budget still suspends the job: it is set, used up, and says
    Suspend. Raising it, removing it or choosing another action resumes the job."""
    budget = spec.energy.budget_joules
    consumed = float((st.get("energy") or {}).get("consumedJoules", 0.0))
    return (
        budget is not None
        and consumed >= budget
        and spec.energy.on_budget_exhausted == OnBudgetExhausted.SUSPEND
    )


def power_limit(spec: TrainingJobSpec, st: dict[str, Any]) -> float | None:
    """The per-GPU power limit workers should run at: the policy's, else the spec's; none
    while limits are refused for the job (the GPUs run at their default)."""
    energy = st.get("energy") or {}
    if energy.get("gpuPowerLimitRefused"):
        return None
    chosen = energy.get("gpuPowerLimitWatts")
    return float(chosen) if chosen is not None else spec.energy.gpu_power_limit_watts


def power_limit_patches(
    spec: TrainingJobSpec, st: dict[str, Any], pods: list[PodView]
) -> dict[str, str | None]:
    """Running workers whose power-limit annotation differs from the limit: pod name ->
    the annotation's new value (None: remove it)."""
    limit = power_limit(spec, st)
    want = None if limit is None else f"{limit:g}"
    return {p.name: want for p in pods if p.active and p.power_limit != want}


def follow_user_scale(spec: TrainingJobSpec, st: dict[str, Any], now: dt.datetime) -> Event | None:
    """On a managed job, a new spec.replicas (kubectl scale, an edit in Git) becomes the
    target, and the policy's cooldown starts now. A spec.replicas that did not change (a
    GitOps tool re-applying the same manifest) leaves the policy's size alone. Updates st."""
    if not spec.managed:
        return None
    seen = st.get("specReplicas")
    st["specReplicas"] = spec.replicas
    if seen is None or int(seen) == spec.replicas:
        return None
    before = desired_replicas(spec, st)
    st["targetReplicas"] = spec.replicas
    st["lastScaleTime"] = fmt_time(now)
    mark_growth(st, before, spec.replicas, now)
    return Event(
        "Normal",
        "ScaledByUser",
        f"spec.replicas {seen} -> {spec.replicas}: {before} -> {spec.replicas} workers; "
        f"the policy holds this size for cooldownSeconds",
    )


def desired_replicas(spec: TrainingJobSpec, st: dict[str, Any]) -> int:
    """spec.replicas, unless the scaling policy or an energy limit chose another size."""
    target = st.get("targetReplicas")
    if not spec.managed or target is None:
        return spec.replicas
    low, high = spec.bounds
    return min(max(int(target), low), high)


def _starting(
    spec: TrainingJobSpec,
    st: dict[str, Any],
    wanted: list[PodView],
    desired: int,
    blocking: PodView | None,
    now: dt.datetime,
    plan: Plan,
) -> None:
    """All or nothing: a group that is not fully running by the startup timeout lets go of
    its pods, so that a partial gang never holds GPUs that another job could use."""
    running = sum(p.ready for p in wanted)
    attempt = parse_time(st.get("attemptStartTime"))
    timeout = spec.startup_timeout_seconds
    reason = blocking.failure.reason if blocking and blocking.failure else None
    if attempt is not None:
        left = (attempt + dt.timedelta(seconds=timeout) - now).total_seconds()
        if left <= 0:
            st["restarts"] = int(st.get("restarts", 0)) + 1
            why = f"{running}/{desired} workers running after startupTimeoutSeconds={timeout}"
            if reason:
                why += f" ({blocking.name if blocking else ''}: {reason})"
            if st["restarts"] > spec.backoff_limit:
                _finish(
                    st,
                    Phase.FAILED,
                    reason or "StartupTimeout",
                    f"{why}; backoffLimit={spec.backoff_limit} reached",
                    now,
                    plan,
                )
                plan.create = []
                plan.delete = [p.name for p in wanted]
                return
            plan.create = []
            plan.delete = [p.name for p in wanted]
            st.pop("attemptStartTime", None)
            plan.events.append(
                Event(
                    "Warning",
                    "StartupTimeout",
                    f"{why}; releasing all pods and retrying "
                    f"(restart {st['restarts']} of {spec.backoff_limit})",
                )
            )
            _set_phase(st, Phase.PENDING, "StartupTimeout", f"{why}; retrying")
            return
        plan.requeue_after = _min(plan.requeue_after, left)
    scheduled = sum(p.scheduled for p in wanted)
    refused = _refused(st)
    if refused and len(wanted) < desired:  # a worker is still missing: still refused
        _set_phase(st, Phase.PENDING if scheduled == 0 else Phase.STARTING, *refused)
    elif scheduled == 0:
        _set_phase(
            st, Phase.PENDING, reason or "WaitingForScheduling", f"0/{desired} workers scheduled"
        )
    else:
        _set_phase(
            st,
            Phase.STARTING,
            reason or "WaitingForWorkers",
            f"{running}/{desired} workers running, {scheduled} scheduled",
        )


def _count_failures(
    spec: TrainingJobSpec, st: dict[str, Any], pods: list[PodView], now: dt.datetime, plan: Plan
) -> bool:
    """Replace failed workers and count them; True when the job has failed for good.

    A worker lost with its node (evicted by the taint manager, or removed by the pod GC with
    its Node) counts too, though it is being deleted rather than Failed: the group restarts
    all the same (torchrun re-forms it and the trainer resumes from its checkpoint), so it
    uses up backoffLimit and restarts the backoff as a crash does; its Event says NodeLost,
    so that a user tells it from a crash."""
    failed = [p for p in pods if p.phase == "Failed" and not p.terminating]
    lost = [p for p in pods if p.lost and p.phase != "Succeeded" and p not in failed]
    counted = failed + lost
    handled = set(st.get("handledFailures", []))
    new = [p for p in counted if p.uid not in handled]
    # Only failures whose pod still exists need remembering: keeps the list short.
    st["handledFailures"] = sorted(({p.uid for p in counted} & handled) | {p.uid for p in new})
    if not st["handledFailures"]:
        st.pop("handledFailures")
    # A lost worker is being deleted already (by the taint manager, the pod GC, or at last
    # by _force_stuck): deleting it again gracefully would change nothing.
    plan.delete += [p.name for p in failed]
    if not new:
        return False
    unfixable = next((p for p in new if restart_cannot_fix(p.failure)), None)
    if unfixable is not None and unfixable.failure is not None:
        # A configuration error (exit code 78: say, checkpoints that the job's key cannot
        # open): every restart would end the same way, so none is spent on it.
        st["podFailure"] = _failure_dict(unfixable.name, unfixable.failure)
        st["lastFailureTime"] = fmt_time(now)
        _finish(
            st,
            Phase.FAILED,
            CONFIG_ERROR,
            f"{unfixable.name} failed ({_describe(st['podFailure'])}: a configuration error "
            f"that a restart cannot fix): {unfixable.failure.message}",
            now,
            plan,
        )
        plan.delete = sorted({*plan.delete, *(p.name for p in pods if p.active)})
        return True
    st["restarts"] = int(st.get("restarts", 0)) + len(new)
    first = new[0]
    fail = first.failure or Failure("Failed", "pod failed")
    st["podFailure"] = _failure_dict(first.name, fail)
    # The replacement's wait runs from now (see _backoff_left), kept in status so that an
    # operator restart keeps it too.
    st["lastFailureTime"] = fmt_time(now)
    if st["restarts"] > spec.backoff_limit:
        _finish(
            st,
            Phase.FAILED,
            "BackoffLimitExceeded",
            f"{first.name} failed ({_describe(st['podFailure'])}): {fail.message}; "
            f"{st['restarts']} restarts > backoffLimit={spec.backoff_limit}",
            now,
            plan,
        )
        plan.delete = sorted({*plan.delete, *(p.name for p in pods if p.active)})
        return True
    # The startup clock starts again with the replacement: a wait never uses up
    # startupTimeoutSeconds.
    st.pop("attemptStartTime", None)
    delay = restart_delay(spec, st["restarts"])
    when = f"in {delay:.0f}s" if delay > 0 else "now"
    for pod in new:
        f = _failure_dict(pod.name, pod.failure or Failure("Failed", "pod failed"))
        count = f"(restart {st['restarts']} of {spec.backoff_limit})"
        if pod.lost:
            plan.events.append(Event("Warning", NODE_LOST, f"{_lost_message(pod)} {count}"))
            continue
        plan.events.append(
            Event(
                "Warning",
                "WorkerFailed",
                f"{pod.name} failed ({_describe(f)}): {f['message']}; replacing it {when} {count}",
            )
        )
    return False


def _lost_message(pod: PodView) -> str:
    """'j-worker-1 was lost with node n (Taint manager: ...); replacing it once it is gone,
    force-deleted at T if its node never confirms': what a NodeLost Event and status say."""
    why = pod.failure.message if pod.failure else "its node is gone"
    where = f"node {pod.node}" if pod.node else "its node"
    text = f"{pod.name} was lost with {where} ({why}); replacing it once it is gone"
    if pod.terminating and pod.deletion_deadline is not None:
        forced = pod.deletion_deadline + dt.timedelta(seconds=STUCK_TERMINATING_SECONDS)
        text += f", force-deleted at {fmt_time(forced)} if its node never confirms"
    return text


# How long past its deletion time a pod may stay Terminating before it is force-deleted. Its
# deletionTimestamp already includes the grace period, by the end of which a kubelet has
# killed the containers; this leaves it time to say so (a busy node, a slow API server).
STUCK_TERMINATING_SECONDS = 30.0


def _force_stuck(pods: list[PodView], now: dt.datetime, plan: Plan) -> None:
    """Force-delete (grace period 0, as ``kubectl delete --force --grace-period=0``) the pods
    still Terminating STUCK_TERMINATING_SECONDS past their deletion time, and wake the job
    when the next one is due.

    Only a pod's kubelet confirms its deletion. On a lost node none ever does, and since
    workers have fixed names (<job>-worker-<index>, which torchrun's ranks and the DNS names
    hang on) such a pod holds its index, so its replacement could never be created: the pod
    GC removes it only once someone deletes the Node object. A kubelet that is alive has
    killed the containers by the deadline and confirms within the margin, so this applies
    to a lost node (or a hung kubelet) only, whatever deleted the pod (an eviction, a
    scale-down, a suspend). The risk Kubernetes warns of, two pods of one name, exists only
    for a node cut off from the API server but not from its peers; its kubelet kills the old
    container when it is back, and a training group meets it as one more re-rendezvous,
    while a job that can never replace a worker is stuck for good.

    Why not a new name for the replacement, as a ReplicaSet's generateName gives: the fixed
    name is what makes creating a worker idempotent across operator restarts (a second
    create is refused, 409) without tracking pods per index, and it is the worker's hostname,
    which worker 0's rendezvous endpoint (PET_RDZV_ENDPOINT) and the others' DNS names use."""
    for pod in pods:
        if not pod.terminating or pod.deletion_deadline is None:
            continue
        due = pod.deletion_deadline + dt.timedelta(seconds=STUCK_TERMINATING_SECONDS)
        left = (due - now).total_seconds()
        if left > 0:
            plan.requeue_after = _min(plan.requeue_after, left)
            continue
        plan.force_delete.append(pod.name)
        late = (now - pod.deletion_deadline).total_seconds()
        where = f"on node {pod.node}" if pod.node else "on no node"
        plan.events.append(
            Event(
                "Warning",
                "ForceDeleted",
                f"{pod.name} {where} is still Terminating {late:.0f}s past its grace period "
                "(its node does not confirm the deletion: lost, or its kubelet hung): "
                "force-deleting it (grace period 0) so that it can be replaced",
            )
        )
    if plan.force_delete:
        plan.requeue_after = 0.0  # its replacement is the next reconcile's: at once


def _restart_hung(
    spec: TrainingJobSpec, st: dict[str, Any], pods: list[PodView], now: dt.datetime, plan: Plan
) -> bool:
    """Release every worker of a job whose workers hung (see ``joule.hang``: the last look
    found no new sample for hangTimeoutSeconds) and count a restart; past backoffLimit the
    job fails. True when it did either."""
    why = hang.hang(spec, st)
    if why is None:
        return False
    st["restarts"] = int(st.get("restarts", 0)) + 1
    plan.create = []
    workers = [p.name for p in pods if p.active]
    plan.delete = sorted({*plan.delete, *workers})
    if st["restarts"] > spec.backoff_limit:
        message = f"{why}; {st['restarts']} restarts > backoffLimit={spec.backoff_limit}"
        _finish(st, Phase.FAILED, "Hung", message, now, plan, event="WorkerHung")
        return True
    message = (
        f"{why}: restarting all {len(workers)} workers as a group "
        f"(restart {st['restarts']} of {spec.backoff_limit})"
    )
    st.pop("attemptStartTime", None)  # the new group's startup clock starts at its create
    # No backoff wait: the workers ran since any earlier failure, and the timeout itself
    # spaces hangs far apart.
    st.pop("lastFailureTime", None)
    st["progress"] = {"hung": message}  # the reason while the new group starts (keep())
    plan.events.append(Event("Warning", "WorkerHung", message))
    _set_phase(st, Phase.PENDING, "Hung", message)
    return True


def _finished(
    spec: TrainingJobSpec,
    st: dict[str, Any],
    pods: list[PodView],
    now: dt.datetime,
    plan: Plan,
    also_running: bool = False,
) -> None:
    """A finished job: clean its pods as cleanPodPolicy says, delete it when its TTL is up."""
    policy = spec.clean_pod_policy
    doomed = [
        p
        for p in pods
        if not p.terminating
        and (
            policy == CleanPodPolicy.ALL
            or (policy == CleanPodPolicy.RUNNING and not p.finished)
            or (also_running and not p.finished)
        )
    ]
    plan.delete = sorted({*plan.delete, *(p.name for p in doomed)})
    ttl = spec.ttl_seconds_after_finished
    done = parse_time(st.get("completionTime"))
    if ttl is not None and done is not None:
        left = (done + dt.timedelta(seconds=ttl) - now).total_seconds()
        if left <= 0:
            plan.delete_job = True
        else:
            plan.requeue_after = _min(plan.requeue_after, left)


def _finish(
    st: dict[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: dt.datetime,
    plan: Plan,
    event: str | None = None,  # the Event's reason, where not the status's
) -> None:
    st["completionTime"] = fmt_time(now)
    st.pop("attemptStartTime", None)
    _set_phase(st, phase, reason, message)
    plan.create = []
    kind = "Normal" if phase == Phase.SUCCEEDED else "Warning"
    plan.events.append(Event(kind, event or reason, message))


# How long the other workers may take to exit once one has finished. torchrun's own exit
# barrier waits 300 s; past that, a worker still there is stuck, not finishing.
COMPLETION_GRACE_SECONDS = 360.0


def _set_phase(st: dict[str, Any], phase: Phase, reason: str, message: str) -> None:
    st["phase"] = phase.value
    st["reason"] = reason
    st["message"] = message


def _failure_dict(pod: str, failure: Failure) -> dict[str, Any]:
    out: dict[str, Any] = {"pod": pod, "reason": failure.reason, "message": failure.message}
    if failure.exit_code is not None:
        out["exitCode"] = failure.exit_code
    return out


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _close(
    plan: Plan,
    st: dict[str, Any],
    job: JobRef,
    spec: TrainingJobSpec,
    generation: int,
    pods: list[PodView],
    now: dt.datetime,
) -> Plan:
    """Fill in the counts and conditions every status carries, from the same observation;
    and, whatever the job's state, let go of pods stuck Terminating."""
    _force_stuck(pods, now, plan)
    deleting = set(plan.delete)
    alive = [p for p in pods if p.active and p.name not in deleting]
    st["observedGeneration"] = generation
    st["replicas"] = len(alive) + len(plan.create)
    st["readyReplicas"] = sum(p.ready for p in alive)
    st["gpus"] = sum(spec.gpus_per_replica for p in alive if p.scheduled)
    st["selector"] = selector_string(job)
    st.setdefault("restarts", 0)
    hang.keep(spec, st)  # the progress clock only runs while every worker does
    if not spec.managed or st["phase"] not in (Phase.RUNNING, Phase.RESIZING):
        st.pop("metricsError", None)  # nobody reads the workers now: nothing to report
    if not spec.managed and not st.get("lastDecision", {}).get("suspend"):
        st.pop("lastDecision", None)  # no policy or limit any more: its conditions go too
    st["conditions"] = conditions(st, generation, st.get("conditions", []), now)
    plan.status = st
    return plan


def conditions(
    st: dict[str, Any], generation: int, old: list[dict[str, Any]], now: dt.datetime
) -> list[dict[str, Any]]:
    """kstatus conditions (Ready, Reconciling, Stalled) plus Succeeded and Suspended.

    lastTransitionTime only moves when a condition's status changes, as the API conventions
    ask, so that an unchanged status compares equal and is not written again.
    """
    phase = Phase(st["phase"])
    reason, message = st.get("reason", ""), st.get("message", "")
    stalled_reasons = {
        "BackoffLimitExceeded",
        "DeadlineExceeded",
        "Unschedulable",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "StartupTimeout",
        *REJECTED,
    }
    stalled = phase == Phase.FAILED or reason in stalled_reasons
    # kstatus (Flux's health) reads Reconciling before Stalled and falls back to Ready: a
    # stalled job must not also say Reconciling, and a finished or suspended job, which has
    # nothing left to reconcile, is Ready (kstatus Current, as a complete batch/v1 Job).
    settled = phase in (Phase.SUCCEEDED, Phase.SUSPENDED)
    want = {
        "Ready": (
            (phase == Phase.RUNNING and reason != "Completing") or settled,
            reason,
            message,
        ),
        "Reconciling": (
            phase in (Phase.PENDING, Phase.STARTING, Phase.RESIZING) and not stalled,
            reason,
            message,
        ),
        "Stalled": (stalled, reason, message),
        "Succeeded": (phase == Phase.SUCCEEDED, reason, message),
        "Suspended": (phase == Phase.SUSPENDED, reason, message),
    }
    last = st.get("lastDecision")
    if last:  # energy conditions, once the policy has decided
        why, text = last.get("reason", ""), last.get("message", "")
        want["BudgetExhausted"] = (why == "BudgetExhausted", why, text)
        want["BudgetAtRisk"] = (bool(last.get("atRisk")), why, text)
        over = bool(last.get("overCap")) or why == "PowerCapExceeded"
        want["PowerCapExceeded"] = (over, why, text)
        unread = st.get("metricsError")
        want["MetricsUnavailable"] = (
            bool(unread),
            "WorkersUnreadable" if unread else "WorkersRead",
            f"could not read /metrics of {unread}" if unread else "every worker answered",
        )
        refused = (st.get("energy") or {}).get("gpuPowerLimitRefused")
        if refused or "PowerLimitRefused" in {c.get("type") for c in old}:
            want["PowerLimitRefused"] = (
                bool(refused),
                "PowerLimitRefused" if refused else "PowerLimitAccepted",
                str(refused or "power limits are applied"),
            )
    before = {c["type"]: c for c in old}
    out = []
    for ctype, (flag, why, text) in want.items():
        status = "True" if flag else "False"
        prev = before.get(ctype)
        changed = prev is None or prev.get("status") != status
        when = fmt_time(now) if changed or prev is None else prev.get("lastTransitionTime")
        out.append(
            {
                "type": ctype,
                "status": status,
                "reason": why or ctype,
                "message": text,
                "observedGeneration": generation,
                "lastTransitionTime": when,
            }
        )
    return out
