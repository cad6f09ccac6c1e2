"""The operator's edge to the Kubernetes API: read a job and its pods, apply a Plan.

Everything here is I/O and tolerant of races that a level-triggered operator meets all the
time: creating what exists (409), deleting what is gone (404), writing a status over a newer
version (409, answered by reconciling again from a fresh read).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from joule import metrics
from joule.api.types import JobRef, Phase, SpecError, TrainingJobSpec
from joule.builders import worker_pod, worker_service
from joule.builders.labels import selector_string
from joule.capacity import Capacity, capacity
from joule.constants import (
    API_VERSION,
    COMPONENT,
    GROUP,
    KIND,
    METRICS_PORT,
    PLURAL,
    POWER_LIMIT_ANNOTATION,
    VERSION,
)
from joule.observe import PodView, view
from joule.reconcile import (
    Event,
    Plan,
    Rejection,
    decide,
    desired_replicas,
    follow_user_scale,
    power_limit,
    power_limit_patches,
    rejection_status,
)
from joule.scaling import counter_key, evaluate
from joule.scrape import Target, scrape_all

log = logging.getLogger("joule.reconcile")
CLUSTER_VIEW_SECONDS = 5.0
# Every API call gives up after (connect, read) seconds: a hung API server must not hold a
# job's lock (and with it every later event of that job) for ever.
API_TIMEOUT = (5.0, 30.0)
# One evaluation waits this long, in all, for the workers' /metrics.
SCRAPE_DEADLINE_SECONDS = 5.0


@dataclass
class Outcome:
    """What one reconcile did, for the caller (and tests)."""

    plan: Plan | None
    status_written: bool
    gone: bool = False  # the job no longer exists: forget it everywhere


class Reconciler:
    """Reconciles TrainingJobs one at a time per job (a lock each), any number in parallel."""

    def __init__(
        self, api: client.ApiClient, clock: Callable[[], dt.datetime] | None = None
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._cluster: tuple[float, Capacity] | None = None
        self._last_wait: float | None = None  # when a pod last waited for GPUs (monotonic)

    def lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)

    def reconcile(self, namespace: str, name: str) -> Outcome:
        with self.lock(namespace, name):
            for _ in range(3):  # a status conflict means we decided on stale data: redo
                started = time.monotonic()
                try:
                    return self._reconcile_once(namespace, name)
                except _Conflict:
                    metrics.RECONCILE_CONFLICTS.inc()
                    continue
                finally:
                    metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            return Outcome(None, False)

    def _reconcile_once(self, namespace: str, name: str) -> Outcome:
        try:
            body = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=API_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                self.forget(namespace, name)
                metrics.JOBS.set(namespace, name, None)
                return Outcome(None, False, gone=True)
            raise
        if body["metadata"].get("deletionTimestamp"):
            return Outcome(None, False)  # the garbage collector takes the children
        job = JobRef.from_body(body)
        status = stored = body.get("status") or {}
        try:
            spec = TrainingJobSpec.parse(body.get("spec") or {})
        except SpecError as exc:
            return self._invalid(body, job, status, str(exc))

        pods = self._pods(job)
        now = self.clock()
        early: list[Event] = []  # decided before the plan; posted with its Events
        if spec.managed:
            status = dict(status)
            scaled = follow_user_scale(spec, status, now)
            early += [scaled] if scaled else []
            status, evaluated = self._evaluate(job, spec, status, pods, now)
            early += evaluated
        plan = decide(job, spec, status, body["metadata"].get("generation", 1), pods, now)
        plan.events[:0] = early
        if spec.managed and not Phase(plan.status["phase"]).finished:
            every = spec.scaling.evaluation_interval_seconds
            plan.requeue_after = min(plan.requeue_after or every, every)
        # Status first, then pods: the status says what is about to be done and why
        # (startTime, a counted restart, the new target), so an operator killed in between,
        # or a write refused with 409, loses nothing and makes the next reconcile redo the
        # same plan. Events are posted once the plan's status is stored, so a redo after a
        # conflict does not post them twice.
        written = plan.status != stored
        if written:
            body = self._write_status(body, plan.status)
        for pod in plan.delete:
            self._delete_pod(namespace, pod)
        rejected = None
        if plan.create:
            # Only when workers are being created: the service is needed from then on, and
            # every other reconcile (pod events, resyncs) is spared a POST answered by 409.
            rejected = self._ensure_service(job)
        limit = power_limit(spec, plan.status)
        for index in plan.create:
            if rejected is not None:
                break  # the next one would be refused for the same reason
            rejected = self._create_pod(job, spec, index, limit)
        for pod_name, value in power_limit_patches(spec, plan.status, pods).items():
            if pod_name not in plan.delete:
                self._annotate_pod(namespace, pod_name, POWER_LIMIT_ANNOTATION, value)
        for event in plan.events:
            self.post_event(job, event)
            metrics.DECISIONS.labels(reason=event.reason).inc()
        after = rejection_status(plan.status, rejected, now, body["metadata"].get("generation", 1))
        if after != plan.status:
            plan.status = after
            if rejected is not None:
                self.post_event(job, Event("Warning", rejected.reason, rejected.message))
            try:
                self._write_status(body, after)
                written = True
            except _Conflict:
                pass  # the next reconcile tries the create again and says so again
        metrics.JOBS.set(namespace, name, plan.status.get("phase"))
        if plan.delete_job:
            log.info("deleting %s/%s: ttlSecondsAfterFinished is up", namespace, name)
            self._delete_job(namespace, name)
        return Outcome(plan, written)

    def _evaluate(
        self,
        job: JobRef,
        spec: TrainingJobSpec,
        status: dict[str, Any],
        pods: list[PodView],
        now: dt.datetime,
    ) -> tuple[dict[str, Any], list[Event]]:
        """Every evaluationIntervalSeconds: read the workers' /metrics, account energy, ask
        the policy. Returns the status the reconcile then decides from, and the Events to post
        once that status is stored."""
        phase = status.get("phase")
        stopped = bool((status.get("lastDecision") or {}).get("suspend"))
        if phase not in ("Running", "Resizing") and not stopped:
            return status, []
        window = (status.get("energy") or {}).get("window") or [[0.0]]
        if now.timestamp() - window[-1][0] < spec.scaling.evaluation_interval_seconds:
            return status, []
        # Every process that runs, including workers on their way out: a terminating pod's
        # last reading still counts (it trains until SIGTERM and checkpoints after it).
        targets, names, expected = [], {}, set()
        for pod in pods:
            if not pod.ip or pod.phase != "Running":
                continue
            for rank in range(spec.nproc_per_node):
                targets.append(Target(f"{pod.uid}/{rank}", pod.ip, METRICS_PORT + rank))
                names[targets[-1].key] = f"{pod.name} rank {rank}"
                if pod.ready and pod.active:  # one on its way out may have stopped serving
                    expected.add(targets[-1].key)
        results = scrape_all(targets, SCRAPE_DEADLINE_SECONDS)
        readings = []
        for key, result in results.items():
            if result.reading is not None:
                uid, rank = key.split("/")
                readings.append((counter_key(uid, int(rank), result.reading), result.reading))
        running = sum(1 for p in pods if p.ready and p.active)
        unread = sorted(
            f"{names[k]}: {r.error}" for k, r in results.items() if r.error and k in expected
        )
        # A round that missed a worker says nothing about the job's rate at this size.
        steady = phase == "Running" and running == desired_replicas(spec, status) and not unread
        cluster = self._capacity().view_for(
            spec.gpus_per_replica, spec.pod.get("nodeSelector"), spec.pod.get("tolerations") or ()
        )
        result = evaluate(
            spec, status, readings, cluster, now, running, steady, alive={p.uid for p in pods}
        )
        metrics.POLICY_DECISIONS.labels(reason=result.decision.reason).inc()
        st = dict(result.status)
        if unread:
            st["metricsError"] = "; ".join(unread)[:1024]
        else:
            st.pop("metricsError", None)
        return st, list(result.events)

    def _capacity(self) -> Capacity:
        """Free GPUs per node and waiting GPUs, shared by every job's evaluation for a few
        seconds: it lists every node and pod, which each of a hundred jobs need not do."""
        with self._guard:
            cached = self._cluster
        if cached and time.monotonic() - cached[0] < CLUSTER_VIEW_SECONDS:
            return cached[1]
        serialize = self.core.api_client.sanitize_for_serialization
        room = capacity(
            [serialize(n) for n in self.core.list_node(_request_timeout=API_TIMEOUT).items],
            [
                serialize(p)
                for p in self.core.list_pod_for_all_namespaces(_request_timeout=API_TIMEOUT).items
            ],
        )
        now = time.monotonic()
        with self._guard:
            if room.waiting_gpus:
                self._last_wait = now
            quiet = None if self._last_wait is None else now - self._last_wait
            room = replace(room, quiet_seconds=quiet)
            self._cluster = (now, room)
        return room

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
            self._write_status(body, new)
            self.post_event(job, Event("Warning", "InvalidSpec", message))
        return Outcome(None, new != status)

    def _pods(self, job: JobRef) -> list[PodView]:
        items = self.core.list_namespaced_pod(
            job.namespace, label_selector=selector_string(job), _request_timeout=API_TIMEOUT
        ).items
        views = [view(self.core.api_client.sanitize_for_serialization(p)) for p in items]
        # Only pods this job owns: a pod that merely carries the label (a namesake job's
        # leftover, a hand-made pod) is neither counted, nor deleted, nor scraped.
        return [v for v in views if v is not None and v.owner == job.uid]

    def _ensure_service(self, job: JobRef) -> Rejection | None:
        try:
            self.core.create_namespaced_service(
                job.namespace, worker_service(job), _request_timeout=API_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            if exc.status is not None and 400 <= exc.status < 500:
                return Rejection(f"service {job.name}", "ServiceRejected", _api_message(exc))
            raise
        return None

    def _create_pod(
        self, job: JobRef, spec: TrainingJobSpec, index: int, limit: float | None
    ) -> Rejection | None:
        try:
            self.core.create_namespaced_pod(
                job.namespace,
                worker_pod(job, spec, index, limit),
                _request_timeout=API_TIMEOUT,
            )
            metrics.PODS_CREATED.inc()
        except ApiException as exc:
            if exc.status == 409:
                return None  # created by an earlier reconcile (or an earlier operator)
            if exc.status is not None and 400 <= exc.status < 500:
                # Refused by admission (quota, PodSecurity, an invalid field): on the job.
                log.warning(
                    "creating worker %s of %s/%s was refused: %s %s",
                    index, job.namespace, job.name, exc.status, exc.reason,
                )  # fmt: skip
                return Rejection(f"worker {index}", "PodRejected", _api_message(exc))
            raise
        return None

    def _annotate_pod(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one annotation: a merge patch touches nothing else."""
        try:
            self.core.patch_namespaced_pod(
                name,
                namespace,
                {"metadata": {"annotations": {key: value}}},
                _request_timeout=API_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace, _request_timeout=API_TIMEOUT)
            metrics.PODS_DELETED.inc()
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body=client.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=API_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _write_status(self, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """Replace the status; returns the stored object (its new resourceVersion)."""
        meta = body["metadata"]
        # A full replace of the status subresource, guarded by resourceVersion: fields the
        # plan dropped really disappear, and a concurrent change makes us decide again.
        new_body = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "resourceVersion": meta["resourceVersion"],
            },
            "spec": body.get("spec", {}),
            "status": status,
        }
        try:
            return self.custom.replace_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                new_body,
                _request_timeout=API_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status == 409:
                raise _Conflict() from exc
            if exc.status == 404:
                return body
            raise

    def post_event(self, job: JobRef, event: Event) -> None:
        now = self.clock()
        try:
            self.core.create_namespaced_event(
                job.namespace,
                client.CoreV1Event(
                    metadata=client.V1ObjectMeta(
                        name=f"{job.name}.{uuid.uuid4().hex[:12]}", namespace=job.namespace
                    ),
                    involved_object=client.V1ObjectReference(
                        api_version=API_VERSION,
                        kind=KIND,
                        name=job.name,
                        namespace=job.namespace,
                        uid=job.uid,
                    ),
                    type=event.type,
                    reason=event.reason,
                    message=event.message[:1024],
                    first_timestamp=now,
                    last_timestamp=now,
                    count=1,
                    source=client.V1EventSource(component=COMPONENT),
                    reporting_component=COMPONENT,
                    reporting_instance=COMPONENT,
                ),
                _request_timeout=API_TIMEOUT,
            )
        except ApiException as exc:  # an event is worth a log line, never a failed reconcile
            log.warning(
                "could not record event %s on %s/%s: %s",
                event.reason,
                job.namespace,
                job.name,
                exc.status,
            )
        log.info("%s/%s %s: %s", job.namespace, job.name, event.reason, event.message)


class _Conflict(Exception):
    pass


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
