"""The lifecycle reconciler: makes a job's pods match its spec and the target in its status.

It reads the job and its pods, asks ``reconcile.plan`` (pure) what to do, writes the status
that explains it, then creates and deletes pods and posts Events, in that order. It never
reads the workers' metrics or asks the scaling policy: the energy and scaling loop
(``autoscaler``) does, and writes what it chose (``status.targetReplicas``, the per-GPU power
limit) for this reconciler to act on, as KubeRay keeps its autoscaler apart from its cluster
reconciler. A slow worker therefore never holds a job's lifecycle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from joule import metrics
from joule.api.events import Event
from joule.api.types import JobRef, SpecError, TrainingJobSpec
from joule.builders.tensorboard import tensorboard_status
from joule.constants import CREATE_FANOUT, POWER_LIMIT_ANNOTATION
from joule.job_metrics import JOB_SERIES, figures
from joule.kube import Conflict, JobApi
from joule.reconcile import (
    Plan,
    Rejection,
    follow_user_scale,
    plan,
    power_limit,
    power_limit_patches,
    rejection_status,
)
from joule.scaling import next_evaluation

log = logging.getLogger("joule.reconcile")
FIRST_BATCH = 2  # workers created at once in a job's first round; each next one doubles


@dataclass
class Outcome:
    """What one reconcile did, for the caller (and tests)."""

    plan: Plan | None
    status_written: bool
    gone: bool = False  # the job no longer exists: forget it everywhere
    # Seconds until the energy and scaling loop should next look at the job (None: never,
    # as for a job without a policy, an energy limit or a hang timeout, or one that has
    # finished).
    evaluate_after: float | None = None


class Reconciler:
    """Reconciles TrainingJobs one at a time per job (a lock each), any number in parallel."""

    def __init__(self, api: JobApi) -> None:
        self.api = api
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._fanout = ThreadPoolExecutor(max_workers=CREATE_FANOUT, thread_name_prefix="create")

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)
        self.api.forget_job(namespace, name)
        self.api.forget_events(namespace, name)

    def reconcile(self, namespace: str, name: str, cached: bool = False) -> Outcome:
        """``cached``: start from the job's body as its watch reported it (a watch event
        triggered this), instead of reading it; a redo after a conflict always reads."""
        with self.lock(namespace, name):
            for attempt in range(3):  # a status conflict means we decided on stale data: redo
                started = time.monotonic()
                try:
                    return self._reconcile_once(namespace, name, cached and attempt == 0)
                except Conflict:
                    metrics.RECONCILE_CONFLICTS.inc()
                    continue
                finally:
                    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            return Outcome(None, False)

    def _reconcile_once(self, namespace: str, name: str, cached: bool) -> Outcome:
        api = self.api
        body = api.job(namespace, name, cached)
        if body is None:
            self.forget(namespace, name)
            metrics.JOBS.set(namespace, name, None)
            JOB_SERIES.set(namespace, name, None)
            return Outcome(None, False, gone=True)
        if body["metadata"].get("deletionTimestamp"):
            return Outcome(None, False)  # the garbage collector takes the children
        job = JobRef.from_body(body)
        stored = body.get("status") or {}
        try:
            spec = TrainingJobSpec.parse(body.get("spec") or {}, name=job.name)
        except SpecError as exc:
            return self._invalid(body, job, stored, str(exc))

        pods = api.pods(job)
        now = api.clock()
        status = dict(stored)
        scaled = follow_user_scale(spec, status, now)
        generation = body["metadata"].get("generation", 1)
        stage = api.stage_pod(job) if spec.data is not None else None
        p = plan(job, spec, status, generation, pods, now, stage)
        p.status = tensorboard_status(job, spec, p.status)
        if scaled is not None:
            p.events.insert(0, scaled)
        # Status first, then pods: the status says what is about to be done and why
        # (startTime, a counted restart, the new target), so an operator killed in between,
        # or a write refused with 409, loses nothing and makes the next reconcile redo the
        # same plan. Events are posted once the plan's status is stored, so a redo after a
        # conflict does not post them twice.
        written = p.status != stored
        if written:
            body = api.write_status(body, p.status)
        for pod in p.delete:
            api.delete_pod(namespace, pod)
        uids = {pod.name: pod.uid for pod in pods}
        for pod_name in p.force_delete:  # pods stuck Terminating (a lost node): see plan
            api.delete_pod(namespace, pod_name, force=True, uid=uids.get(pod_name))
        rejected = self._create(job, spec, p) if p.create else None
        if p.create_stage:
            rejected = api.create_stage_pod(job, spec)
        self._tensorboard(job, spec, stored, p)
        for pod_name, value in power_limit_patches(spec, p.status, pods).items():
            if pod_name not in p.delete:
                api.annotate_pod(namespace, pod_name, POWER_LIMIT_ANNOTATION, value)
        for event in p.events:
            api.post_event(job, event)
            metrics.DECISIONS.labels(reason=event.reason).inc()
            JOB_SERIES.decided(namespace, name, event.reason)
        after = rejection_status(p.status, rejected, now, generation)
        if after != p.status:
            p.status = after
            try:
                api.write_status(body, after)
                written = True
            except Conflict:
                rejected = None  # the next reconcile tries the create again and says so
            if rejected is not None:  # once, when the refusal first shows in status
                api.post_event(job, Event("Warning", rejected.reason, rejected.message))
        metrics.JOBS.set(namespace, name, p.status.get("phase"))
        JOB_SERIES.set(namespace, name, figures(spec, p.status))
        if p.delete_job:
            log.info("deleting %s/%s: ttlSecondsAfterFinished is up", namespace, name)
            api.delete_job(namespace, name)
        return Outcome(p, written, evaluate_after=next_evaluation(spec, p.status, now))

    def _create(self, job: JobRef, spec: TrainingJobSpec, p: Plan) -> Rejection | None:
        """The plan's workers, in parallel batches that double (2, 4, 8, ...) as the API
        server accepts them, as a ReplicaSet's slow start: a refusal (quota, admission)
        stops at the batch it met, and a small job is one round trip. The Service and the
        NetworkPolicy go with the first batch: created only when workers are, so every
        other reconcile is spared a POST answered by 409."""
        api, limit = self.api, power_limit(spec, p.status)
        calls: list[Callable[[], Rejection | None]] = [
            lambda: api.ensure_service(job),
            lambda: api.ensure_network_policy(job, spec),
        ]
        pending, size = list(p.create), FIRST_BATCH
        while pending:
            batch, pending = pending[:size], pending[size:]
            calls += [partial(api.create_pod, job, spec, index, limit) for index in batch]
            # map re-raises the first error: the reconcile fails as a sequential one would.
            answers = list(self._fanout.map(lambda call: call(), calls))
            refused = next((a for a in answers if a is not None), None)
            if refused is not None:
                return refused  # the next batch would be refused for the same reason
            calls, size = [], size * 2
        return None

    def _tensorboard(
        self, job: JobRef, spec: TrainingJobSpec, stored: dict[str, Any], p: Plan
    ) -> None:
        """Its TensorBoard made with the first workers (or when turned on), removed when
        turned off. A refusal is said in an Event; it never holds up the training."""
        if "tensorboard" in p.status and (p.create or "tensorboard" not in stored):
            refused = self.api.ensure_tensorboard(job, spec)
            if refused is not None:
                self.api.post_event(job, Event("Warning", refused.reason, refused.message))
        elif "tensorboard" in stored and "tensorboard" not in p.status:
            self.api.remove_tensorboard(job)

    def _invalid(
        self, body: dict[str, Any], job: JobRef, status: dict[str, Any], message: str
    ) -> Outcome:
        """A spec the schema should have refused: say so in status, touch no pod."""
        new = {
            **status,
            "phase": status.get("phase", "Pending"),
            "reason": "InvalidSpec",
            "message": message,
        }
        if new != status:
            self.api.write_status(body, new)
            self.api.post_event(job, Event("Warning", "InvalidSpec", message))
        return Outcome(None, new != status)
