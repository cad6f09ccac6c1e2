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
import urllib.request
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
from joule.policy import ClusterView
from joule.reconcile import (
    Event,
    Plan,
    decide,
    desired_replicas,
    follow_user_scale,
    power_limit,
    power_limit_patches,
)
from joule.scaling import cluster_view, evaluate
from joule.trainer_metrics import TrainerReading, parse_trainer_metrics

log = logging.getLogger("joule.reconcile")
CLUSTER_VIEW_SECONDS = 5.0


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
        self._cluster: tuple[float, ClusterView] | None = None
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
            body = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
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
        scaled = None
        if spec.managed:
            status = dict(status)
            scaled = follow_user_scale(spec, status, now)
            status = self._evaluate(job, spec, status, pods, now)
        plan = decide(job, spec, status, body["metadata"].get("generation", 1), pods, now)
        if scaled is not None:  # posted with the plan's, once the status is written
            plan.events.insert(0, scaled)
        if spec.managed and not Phase(plan.status["phase"]).finished:
            every = spec.scaling.evaluation_interval_seconds
            plan.requeue_after = min(plan.requeue_after or every, every)
        for pod in plan.delete:
            self._delete_pod(namespace, pod)
        if plan.create:
            # Only when workers are being created: the service is needed from then on, and
            # every other reconcile (pod events, resyncs) is spared a POST answered by 409.
            self._ensure_service(job)
        for index in plan.create:
            self._create_pod(job, spec, index, power_limit(spec, plan.status))
        for pod_name, value in power_limit_patches(spec, plan.status, pods).items():
            if pod_name not in plan.delete:
                self._annotate_pod(namespace, pod_name, POWER_LIMIT_ANNOTATION, value)
        metrics.JOBS.set(namespace, name, plan.status.get("phase"))
        written = False
        if plan.status != stored:  # what evaluation and decision changed, together
            self._write_status(body, plan.status)
            written = True
        for event in plan.events:
            self.post_event(job, event)
            metrics.DECISIONS.labels(reason=event.reason).inc()
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
    ) -> dict[str, Any]:
        """Every evaluationIntervalSeconds: read the workers' /metrics, account energy, ask
        the policy. Returns the status the reconcile then decides from."""
        phase = status.get("phase")
        stopped = bool((status.get("lastDecision") or {}).get("suspend"))
        if phase not in ("Running", "Resizing") and not stopped:
            return status
        window = (status.get("energy") or {}).get("window") or [[0.0]]
        if now.timestamp() - window[-1][0] < spec.scaling.evaluation_interval_seconds:
            return status
        readings = []
        for pod in pods:
            if not (pod.ready and pod.ip) or pod.terminating:
                continue
            for local_rank in range(spec.nproc_per_node):
                reading = scrape_trainer(pod.ip, METRICS_PORT + local_rank)
                if reading is not None:
                    readings.append((f"{pod.uid}/{local_rank}", reading))
        running = sum(1 for p in pods if p.ready and p.active)
        steady = phase == "Running" and running == desired_replicas(spec, status)
        cluster = self._cluster_view()
        result = evaluate(spec, status, readings, cluster, now, running, steady)
        metrics.POLICY_DECISIONS.labels(reason=result.decision.reason).inc()
        for event in result.events:
            self.post_event(job, event)
            metrics.DECISIONS.labels(reason=event.reason).inc()
        return result.status

    def _cluster_view(self) -> ClusterView:
        """Free and waiting GPUs, shared by every job's evaluation for a few seconds: it
        lists every node and pod, which each of a hundred jobs need not do on its own."""
        with self._guard:
            cached = self._cluster
        if cached and time.monotonic() - cached[0] < CLUSTER_VIEW_SECONDS:
            return cached[1]
        serialize = self.core.api_client.sanitize_for_serialization
        view = cluster_view(
            [serialize(n) for n in self.core.list_node().items],
            [serialize(p) for p in self.core.list_pod_for_all_namespaces().items],
        )
        now = time.monotonic()
        with self._guard:
            if view.waiting_gpus:
                self._last_wait = now
            quiet = None if self._last_wait is None else now - self._last_wait
            view = replace(view, quiet_seconds=quiet)
            self._cluster = (now, view)
        return view

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
            job.namespace, label_selector=selector_string(job)
        ).items
        views = [view(self.core.api_client.sanitize_for_serialization(p)) for p in items]
        return [v for v in views if v is not None]

    def _ensure_service(self, job: JobRef) -> None:
        try:
            self.core.create_namespaced_service(job.namespace, worker_service(job))
        except ApiException as exc:
            if exc.status != 409:
                raise

    def _create_pod(
        self, job: JobRef, spec: TrainingJobSpec, index: int, limit: float | None
    ) -> None:
        try:
            self.core.create_namespaced_pod(job.namespace, worker_pod(job, spec, index, limit))
            metrics.PODS_CREATED.inc()
        except ApiException as exc:
            if exc.status == 409:
                return  # created by an earlier reconcile (or an earlier operator)
            # Rejected by admission (quota, PodSecurity, ...): say so on the job.
            reason = exc.reason or "PodRejected"
            self.post_event(
                job,
                Event(
                    "Warning", "PodRejected", f"worker {index} was rejected: {_api_message(exc)}"
                ),
            )
            log.warning(
                "creating worker %s of %s/%s failed: %s %s",
                index,
                job.namespace,
                job.name,
                exc.status,
                reason,
            )

    def _annotate_pod(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one annotation: a merge patch touches nothing else."""
        try:
            self.core.patch_namespaced_pod(
                name, namespace, {"metadata": {"annotations": {key: value}}}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _delete_pod(self, namespace: str, name: str) -> None:
        try:
            self.core.delete_namespaced_pod(name, namespace)
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
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def _write_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
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
            self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], new_body
            )
        except ApiException as exc:
            if exc.status == 409:
                raise _Conflict() from exc
            if exc.status == 404:
                return
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


def scrape_trainer(ip: str, port: int) -> TrainerReading | None:
    """One worker process's /metrics; None when it does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=2.0) as response:
            return parse_trainer_metrics(response.read().decode())
    except (OSError, ValueError):
        return None


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
