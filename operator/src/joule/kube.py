"""The operator's edge to the Kubernetes API: every call the lifecycle reconciler and the
energy and scaling loop make, in one place.

Everything here is I/O and tolerant of races that a level-triggered operator meets all the
time: creating what exists (409), deleting what is gone (404), writing a status over a newer
version (409: ``Conflict``, answered by deciding again from a fresh read). Every call has a
request timeout, so a hung API server cannot hold a job's lock for ever.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from joule import metrics
from joule.api.eventgate import EventGate
from joule.api.events import Event, fmt_time
from joule.api.types import JobRef, TrainingJobSpec
from joule.builders import worker_pod, worker_service
from joule.builders.bookkeeping import (
    bookkeeping_configmap,
    bookkeeping_name,
    read_bookkeeping,
)
from joule.builders.labels import selector_string
from joule.builders.networkpolicy import job_network_policy
from joule.builders.stage import stage_pod
from joule.builders.tensorboard import (
    tensorboard_deployment,
    tensorboard_name,
    tensorboard_service,
)
from joule.capacity import Capacity, capacity
from joule.constants import API_VERSION, COMPONENT, GROUP, KIND, PLURAL, ROLE_STAGE, VERSION
from joule.corev1 import CoreV1
from joule.observe import PodView, view
from joule.podcache import PodCache, version_number
from joule.reconcile import Rejection

log = logging.getLogger("joule.kube")
CLUSTER_VIEW_SECONDS = 5.0
# Every API call gives up after (connect, read) seconds: a hung API server must not hold a
# job's lock (and with it every later event of that job) for ever.
API_TIMEOUT = (5.0, 30.0)


class Conflict(Exception):
    """The job changed since it was read: decide again from a fresh read."""


def _release(answer: Any) -> None:
    """Read what is left of a raw answer (``_preload_content=False``) so that its connection
    goes back to the pool. One left unread is dropped, and the next call opens a new TLS
    connection: about 3 ms more CPU here and 4 ms more per call (benchmarks/operator_latency.py).
    ``CoreV1``'s calls whose answer is not needed preload it instead: it is plain JSON."""
    answer.drain_conn()
    answer.release_conn()


class JobApi:
    """TrainingJobs, their pods, Service and Events; and the cluster's free GPUs."""

    def __init__(
        self, api: client.ApiClient, clock: Callable[[], dt.datetime] | None = None
    ) -> None:
        self._api = api
        self.core = CoreV1(api)  # not client.CoreV1Api: see corev1
        self.custom = client.CustomObjectsApi(api)
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._guard = threading.Lock()
        self._cluster: tuple[float, Capacity] | None = None
        self._last_wait: float | None = None  # when a pod last waited for GPUs (monotonic)
        self._agents: tuple[float, dict[str, str]] | None = None
        # Whether workers apply their power limit themselves (the trainer energy source).
        self.trainer_limits = True
        # Who may scrape workers' /metrics (NetworkPolicyPeers); None: no policy per job.
        self.metrics_from: list[dict[str, Any]] | None = None
        # Jobs' pods from one watch (None: a LIST per read, as before the cache is set).
        self.pod_cache: PodCache | None = None
        self.events = EventGate()  # which Events become calls (dedup, rate per job)
        # The newest body of each job, from its watch events and our own status writes.
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}

    # Made on first use: each group's generated client costs 1-1.5 MiB, and only a job with
    # a TensorBoard or an operator with per-job NetworkPolicies needs these.
    @cached_property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self._api)

    @cached_property
    def networking(self) -> client.NetworkingV1Api:
        return client.NetworkingV1Api(self._api)

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The TrainingJob, or None when it does not exist."""
        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=API_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def job(self, namespace: str, name: str, cached: bool = False) -> dict[str, Any] | None:
        """The TrainingJob: ``cached``, as its watch last reported it (or as this operator
        last wrote it), when there is such a body; else read from the API server. A stale
        body costs nothing lasting: the status write it leads to is refused (409) and the
        reconcile redone from a fresh read."""
        if cached:
            with self._guard:
                held = self._jobs.get((namespace, name))
            if held is not None:
                return copy.deepcopy(held)
        body = self.get_job(namespace, name)
        if body is None:
            self.forget_job(namespace, name)
        else:
            self.remember_job(body)
        return body

    def remember_job(self, body: dict[str, Any]) -> None:
        """A job's body from its watch: kept unless a newer one is held already."""
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        version = version_number(meta.get("resourceVersion"))
        with self._guard:
            held = self._jobs.get(key)
            held_version = version_number((held or {}).get("metadata", {}).get("resourceVersion"))
            if held_version is not None and version is not None and held_version > version:
                return
            # managedFields (often the larger half of a job's metadata) is never read here.
            slim = {**body, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}
            self._jobs[key] = copy.deepcopy(slim)

    def forget_job(self, namespace: str, name: str) -> None:
        with self._guard:
            self._jobs.pop((namespace, name), None)

    def capacity(self) -> Capacity:
        """Free GPUs per node and waiting GPUs, shared by every job's evaluation for a few
        seconds: it lists every node and pod, which each of a hundred jobs need not do."""
        with self._guard:
            cached = self._cluster
        if cached and time.monotonic() - cached[0] < CLUSTER_VIEW_SECONDS:
            return cached[1]
        room = capacity(
            self.core.list_node(_request_timeout=API_TIMEOUT)["items"],
            self.core.list_pod_for_all_namespaces(_request_timeout=API_TIMEOUT)["items"],
        )
        now = time.monotonic()
        with self._guard:
            if room.waiting_gpus:
                self._last_wait = now
            quiet = None if self._last_wait is None else now - self._last_wait
            room = replace(room, quiet_seconds=quiet)
            self._cluster = (now, room)
        return room

    def node_agents(self, namespace: str, selector: str) -> dict[str, str]:
        """The node agents that run: node name -> pod IP (shared for a few seconds, as the
        cluster's view is)."""
        with self._guard:
            cached = self._agents
        if cached and time.monotonic() - cached[0] < CLUSTER_VIEW_SECONDS:
            return cached[1]
        items = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=API_TIMEOUT
        )["items"]
        agents = {
            p["spec"]["nodeName"]: p["status"]["podIP"]
            for p in items
            if p["spec"].get("nodeName") and p["status"].get("podIP")
            and p["status"].get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        }  # fmt: skip
        with self._guard:
            self._agents = (time.monotonic(), agents)
        return agents

    def pods(self, job: JobRef) -> list[PodView]:
        """The job's workers."""
        return [v for v in self._views(job) if v.role != ROLE_STAGE]

    def stage_pod(self, job: JobRef) -> PodView | None:
        """spec.data's staging pod, where there is one."""
        return next((v for v in self._views(job) if v.role == ROLE_STAGE), None)

    def _views(self, job: JobRef) -> list[PodView]:
        if self.pod_cache is not None:
            cached = self.pod_cache.pods(job)
            if cached is not None:
                return cached
        items = self.core.list_namespaced_pod(
            job.namespace, label_selector=selector_string(job), _request_timeout=API_TIMEOUT
        )["items"]
        views = [view(p) for p in items]
        # Only pods this job owns: a pod that merely carries the label (a namesake job's
        # leftover, a hand-made pod) is neither counted, nor deleted, nor scraped.
        return [v for v in views if v is not None and v.owner == job.uid]

    def create_stage_pod(self, job: JobRef, spec: TrainingJobSpec) -> Rejection | None:
        """spec.data's staging pod; refused as a worker would be (a Rejection)."""
        return self._create_pod(job, stage_pod(job, spec), "staging pod")

    def bookkeeping(self, job: JobRef) -> tuple[dict[str, Any], str | None]:
        """The job's energy bookkeeping and its resourceVersion (None: not made yet)."""
        try:
            cm = self.core.read_namespaced_config_map(
                bookkeeping_name(job), job.namespace, _request_timeout=API_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return {}, None
            raise
        version = cm["metadata"]["resourceVersion"]
        owners = {o.get("uid") for o in cm["metadata"].get("ownerReferences") or []}
        if job.uid not in owners:
            # A namesake job's, not yet collected (deleted and re-created under the same
            # name): none of its joules are this job's. The replace takes it over.
            return {}, version
        return read_bookkeeping(cm), version

    def write_bookkeeping(
        self, job: JobRef, state: dict[str, Any], resource_version: str | None
    ) -> None:
        """Create or replace it, guarded: written by someone else since it was read (or
        created meanwhile): Conflict, and the evaluation starts again from a fresh read."""
        body = bookkeeping_configmap(job, state, resource_version)
        try:
            if resource_version is None:
                self.core.create_namespaced_config_map(
                    job.namespace, body, _request_timeout=API_TIMEOUT
                )
            else:
                self.core.replace_namespaced_config_map(
                    bookkeeping_name(job), job.namespace, body, _request_timeout=API_TIMEOUT
                )
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict() from exc
            raise

    def ensure_service(self, job: JobRef) -> Rejection | None:
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

    def ensure_network_policy(self, job: JobRef, spec: TrainingJobSpec) -> Rejection | None:
        """The job's NetworkPolicy, created once with its first workers, where configured."""
        if self.metrics_from is None:
            return None
        body = job_network_policy(job, spec, self.metrics_from)
        try:
            # Raw: the generated client would build its models of the answer, unused.
            _release(self.networking.create_namespaced_network_policy(
                job.namespace, body, _preload_content=False, _request_timeout=API_TIMEOUT
            ))  # fmt: skip
        except ApiException as exc:
            if exc.status == 409:
                return None
            if exc.status is not None and 400 <= exc.status < 500:
                what = f"network policy {body['metadata']['name']}"
                return Rejection(what, "NetworkPolicyRejected", _api_message(exc))
            raise
        return None

    def ensure_tensorboard(self, job: JobRef, spec: TrainingJobSpec) -> Rejection | None:
        """The job's TensorBoard Deployment and Service (spec.tensorboard), created once."""
        for what, create in (
            ("deployment", lambda: self.apps.create_namespaced_deployment(
                job.namespace, tensorboard_deployment(job, spec), _request_timeout=API_TIMEOUT)),
            ("service", lambda: self.core.create_namespaced_service(
                job.namespace, tensorboard_service(job), _request_timeout=API_TIMEOUT)),
        ):  # fmt: skip
            try:
                create()
            except ValueError as exc:  # a field no Pod has, from the flat spec: as for workers
                name = f"tensorboard {what} {tensorboard_name(job)}"
                return Rejection(name, "TensorboardRejected", _invalid_fields(exc, what))
            except ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status is not None and 400 <= exc.status < 500:
                    name = f"tensorboard {what} {tensorboard_name(job)}"
                    return Rejection(name, "TensorboardRejected", _api_message(exc))
                raise
        return None

    def remove_tensorboard(self, job: JobRef) -> None:
        """spec.tensorboard turned off: its Deployment and Service go."""
        name = tensorboard_name(job)
        for delete in (
            lambda: self.apps.delete_namespaced_deployment(
                name, job.namespace, _request_timeout=API_TIMEOUT),
            lambda: self.core.delete_namespaced_service(
                name, job.namespace, _request_timeout=API_TIMEOUT),
        ):  # fmt: skip
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise

    def create_pod(
        self, job: JobRef, spec: TrainingJobSpec, index: int, limit: float | None
    ) -> Rejection | None:
        body = worker_pod(job, spec, index, limit, self.trainer_limits)
        return self._create_pod(job, body, f"worker {index}", worker=True)

    def _create_pod(
        self, job: JobRef, body: dict[str, Any], what: str, worker: bool = False
    ) -> Rejection | None:
        """Create one of the job's pods; a refusal is a Rejection said on the job."""
        try:
            created = self.core.create_namespaced_pod(
                job.namespace,
                body,
                # A field the API server does not know (a typo inside spec.template, which
                # the CRD keeps as written) refuses the pod and is named, rather than being
                # dropped with a warning nobody reads.
                field_validation="Strict",
                _preload_content=False,
                _request_timeout=API_TIMEOUT,
            )
            if worker:
                metrics.PODS_CREATED.inc()
            self._observe(created)
        except ApiException as exc:
            if exc.status == 409:
                return None  # created by an earlier reconcile (or an earlier operator)
            if exc.status is not None and 400 <= exc.status < 500:
                # Refused by admission (quota, PodSecurity) or as invalid: a field no Pod
                # has, from spec.template's parts the CRD keeps as written, is named by the
                # strict decoding. Said on the job, never retried in a loop that says nothing.
                log.warning(
                    "creating %s of %s/%s was refused: %s %s",
                    what, job.namespace, job.name, exc.status, exc.reason,
                )  # fmt: skip
                return Rejection(what, "PodRejected", _api_message(exc))
            raise
        return None

    def annotate_pod(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """Set (or, with None, remove) one annotation: a merge patch touches nothing else."""
        try:
            patched = self.core.patch_namespaced_pod(
                name,
                namespace,
                {"metadata": {"annotations": {key: value}}},
                _preload_content=False,
                _request_timeout=API_TIMEOUT,
            )
            self._observe(patched)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_pod(
        self, namespace: str, name: str, force: bool = False, uid: str | None = None
    ) -> None:
        """``force``: with grace period 0, as ``kubectl delete --force --grace-period=0``:
        the API server removes the pod at once instead of waiting for its kubelet to say the
        containers are gone (one on a lost node never does; see reconcile._force_stuck).
        ``uid``: only that pod, not a namesake created since (409, ignored as 404 is)."""
        options: dict[str, Any] = {}
        if force:
            options["gracePeriodSeconds"] = 0
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            deleted = self.core.delete_namespaced_pod(
                name,
                namespace,
                body=options or None,
                _preload_content=False,
                _request_timeout=API_TIMEOUT,
            )
            metrics.PODS_DELETED.inc()
            self._observe(deleted, gone=force)
        except ApiException as exc:
            if exc.status == 409 and uid:
                return  # that pod is gone already; a namesake is not ours to delete
            if exc.status != 404:
                raise

    def _observe(self, answer: Any, gone: bool = False) -> None:
        """What a pod call returned (raw: the client's models cost milliseconds of CPU per
        pod), into the cache at once: the next reconcile must see what this one did,
        though the watch has not reported it yet. ``gone``: a delete with grace period 0,
        which removed the pod (unless a finalizer holds it): its answer is its last state."""
        if answer is None:
            return
        data = getattr(answer, "data", answer)  # read whole: its connection goes back
        if self.pod_cache is None:
            return
        try:
            pod = json.loads(data) if isinstance(data, (bytes, str)) else data
        except ValueError:
            return
        if isinstance(pod, dict) and pod.get("kind", "Pod") == "Pod" and "spec" in pod:
            held = bool((pod.get("metadata") or {}).get("finalizers"))
            self.pod_cache.observe(pod, deleted=gone and not held)

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                body={"propagationPolicy": "Background"},
                _request_timeout=API_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def write_status(self, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
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
            stored = self.custom.replace_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                new_body,
                _request_timeout=API_TIMEOUT,
            )
            self.remember_job(stored)
            return stored
        except ApiException as exc:
            if exc.status == 409:
                self.forget_job(meta["namespace"], meta["name"])  # the redo reads afresh
                raise Conflict() from exc
            if exc.status == 404:
                return body
            raise

    def post_event(self, job: JobRef, event: Event) -> None:
        """Record it as an Event of the job: a new object, or a count on the same Event made
        in the last ten minutes, or nothing once the job has used its rate (``eventgate``)."""
        log.info("%s/%s %s: %s", job.namespace, job.name, event.reason, event.message)
        now, mono = self.clock(), time.monotonic()
        key = (job.namespace, job.name, job.uid)
        with self._guard:
            verdict = self.events.admit(key, event, mono)
        if verdict.action == "drop":
            metrics.EVENTS_DROPPED.inc()
            return
        try:
            if verdict.action == "count" and verdict.name is not None:
                try:
                    self.core.patch_namespaced_event(
                        verdict.name,
                        job.namespace,
                        {"count": verdict.count, "lastTimestamp": fmt_time(now)},
                        _request_timeout=API_TIMEOUT,
                    )
                    return
                except ApiException as exc:
                    if exc.status != 404:  # gone (expired, deleted): made anew below
                        raise
            name = f"{job.name}.{uuid.uuid4().hex[:12]}"
            self.core.create_namespaced_event(
                job.namespace,
                {
                    "metadata": {"name": name, "namespace": job.namespace},
                    "involvedObject": {
                        "apiVersion": API_VERSION,
                        "kind": KIND,
                        "name": job.name,
                        "namespace": job.namespace,
                        "uid": job.uid,
                    },
                    "type": event.type,
                    "reason": event.reason,
                    "message": event.message[:1024],
                    "firstTimestamp": fmt_time(now),
                    "lastTimestamp": fmt_time(now),
                    "count": 1,
                    "source": {"component": COMPONENT},
                    "reportingComponent": COMPONENT,
                    "reportingInstance": COMPONENT,
                },
                _request_timeout=API_TIMEOUT,
            )
            with self._guard:
                self.events.made(key, event, name, mono)
        except ApiException as exc:  # an event is worth a log line, never a failed reconcile
            log.warning(
                "could not record event %s on %s/%s: %s",
                event.reason,
                job.namespace,
                job.name,
                exc.status,
            )

    def forget_events(self, namespace: str, name: str) -> None:
        with self._guard:
            self.events.forget(namespace, name)


def _invalid_fields(exc: ValueError, what: str = "worker pod") -> str:
    """``spec.containers[0].resources.limitz: unknown field``, one per field the client's
    models refused (the first argument, the namespace, is not part of the path)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"the {what} is invalid: {exc}"
    said = []
    for error in errors():
        path = ""
        for part in error.get("loc", ())[1:]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
        what = "unknown field" if error.get("type") == "extra_forbidden" else error.get("msg")
        said.append(f"{path}: {what}")
    return f"the {what} is invalid: " + "; ".join(said)


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
