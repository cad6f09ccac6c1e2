"""Every job's worker pods, kept from one watch: what a reconcile reads instead of a LIST.

One watch per watched namespace (or one for the cluster), with the label selector that every
worker carries, so the API server sends only Joule's pods. Each change calls ``on_change``
with the pod's namespace and job, and a reconcile of that job reads its pods from here.

A cache lags the API server by a watch event, and a reconcile must not act on a past it
wrote itself: so what the operator's own calls return (a created pod, a deleted one) is put
in the cache at once, and a pod whose deletion the watch has reported is never brought back
by an older answer arriving late. Stale in the other direction (a pod the watch has not yet
reported) is safe: creating it again is answered 409, deleting it again 404, and a failure
is counted once by its pod's UID.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from joule import metrics
from joule.api.types import JobRef
from joule.constants import LABEL_JOB
from joule.observe import PodView, view

log = logging.getLogger("joule.podcache")
JobKey = tuple[str, str]
# How long a deleted pod's UID is remembered, so a late answer cannot resurrect it.
TOMBSTONE_SECONDS = 300.0
WATCH_SECONDS = 300  # the server ends each watch after this; it is resumed where it left off
RETRY_SECONDS = 1.0


class PodCache:
    """Worker pods by job, for the namespaces watched (all when ``namespaces`` is empty)."""

    def __init__(
        self,
        core: Any,
        namespaces: Iterable[str] = (),
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.core = core
        self.namespaces = tuple(namespaces)
        self.on_change = on_change or (lambda _ns, _job: None)
        self._lock = threading.Lock()
        self._jobs: dict[JobKey, dict[str, PodView]] = {}
        self._where: dict[str, JobKey] = {}  # pod UID -> its job
        self._versions: dict[str, int] = {}  # pod UID -> the resourceVersion held
        self._gone: dict[str, float] = {}  # deleted pod UID -> when (monotonic)
        self._deletions = 0
        self.events = 0  # watch events received (bookmarks aside): what the selector let by
        self._synced: set[str] = set()  # scopes ("" for the cluster) listed at least once
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        metrics.POD_CACHE_PODS.set_function(self.__len__)

    # --- what reconciles read -------------------------------------------------------------

    def synced(self, namespace: str) -> bool:
        scope = namespace if self.namespaces else ""
        with self._lock:
            return scope in self._synced

    def pods(self, job: JobRef) -> list[PodView] | None:
        """The job's pods (only those it owns), or None while the cache has not listed the
        job's namespace yet (the caller lists them itself)."""
        if not self.synced(job.namespace):
            return None
        with self._lock:
            held = self._jobs.get((job.namespace, job.name), {})
            return [v for v in held.values() if v.owner == job.uid]

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)

    # --- what the operator's own calls return ---------------------------------------------

    def observe(self, pod: dict[str, Any], deleted: bool = False) -> None:
        """A pod as an API call returned it (created, patched, or marked for deletion);
        ``deleted``: the call removed it (a delete with grace period 0). Its watch event then
        changes nothing and triggers no reconcile: the caller requeues the job itself."""
        self._put(pod, deleted=deleted)

    # --- the watch --------------------------------------------------------------------------

    def start(self) -> None:
        for scope in self.namespaces or ("",):
            thread = threading.Thread(
                target=self._run, args=(scope,), name=f"joule-pods-{scope or 'all'}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _run(self, scope: str) -> None:
        version: str | None = None
        while not self.stop.is_set():
            try:
                if version is None:
                    version = self._relist(scope)
                version = self._watch(scope, version)
            except ApiException as exc:
                if exc.status == 410:  # our version is too old: list afresh
                    version = None
                    continue
                log.warning("watching pods (%s): %s %s", scope or "all", exc.status, exc.reason)
                version = None
                self.stop.wait(RETRY_SECONDS)
            except Exception as exc:  # a dropped connection, a timeout: list afresh
                log.warning("watching pods (%s): %s", scope or "all", exc)
                version = None
                self.stop.wait(RETRY_SECONDS)

    def _list_call(self, scope: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
        if scope:
            return self.core.list_namespaced_pod, (scope,)
        return self.core.list_pod_for_all_namespaces, ()

    def _relist(self, scope: str) -> str:
        call, args = self._list_call(scope)
        # Plain JSON: the client's models cost more than the listing for thousands of pods.
        answer = call(
            *args, label_selector=LABEL_JOB, _preload_content=False, _request_timeout=(5.0, 60.0)
        )
        body = json.loads(answer.data)
        pods = body.get("items") or []
        changed = self._replace(scope, pods)
        with self._lock:
            first = scope not in self._synced
            self._synced.add(scope)
        if first:
            log.info("pod cache (%s): %d pods", scope or "all namespaces", len(pods))
        else:  # after a gap: what changed meanwhile is news to those jobs
            for key in changed:
                self.on_change(*key)
        return str(body["metadata"]["resourceVersion"])

    def _watch(self, scope: str, version: str) -> str:
        """Follows the scope from ``version`` until the server ends the watch; returns the
        version to resume from. Raises ApiException(410) when that version is too old."""
        call, args = self._list_call(scope)
        answer = call(
            *args,
            label_selector=LABEL_JOB,
            resource_version=version,
            watch=True,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(5.0, WATCH_SECONDS + 30),
        )
        try:
            for line in iter_resp_lines(answer):
                if self.stop.is_set():
                    break
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                self.events += 1
                key = self._put(obj, deleted=kind == "DELETED")
                if key is not None:
                    self.on_change(*key)
        finally:
            answer.close()
            answer.release_conn()
        return version

    # --- the table ------------------------------------------------------------------------

    def _put(self, pod: dict[str, Any], deleted: bool) -> JobKey | None:
        """Take one pod's newer state; returns its job when the cache changed."""
        meta = pod.get("metadata") or {}
        uid, job = meta.get("uid"), (meta.get("labels") or {}).get(LABEL_JOB)
        if not uid or not job:
            return None
        version = version_number(meta.get("resourceVersion"))
        key = (meta.get("namespace", ""), job)
        now = time.monotonic()
        with self._lock:
            if uid in self._gone:
                return None  # deleted: an older answer arriving late
            held = self._versions.get(uid)
            if held is not None and version is not None and version < held:
                return None  # older than what is held
            if deleted:
                self._drop(uid)
                self._gone[uid] = now
                self._expire(now)
                return key
            seen = view(pod)
            if seen is None:
                return None
            self._hold(uid, key, seen, version)
            return key

    def _replace(self, scope: str, pods: list[dict[str, Any]]) -> set[JobKey]:
        """A listing: it replaces what the scope held. Returns the jobs whose pods changed."""
        fresh: dict[str, tuple[JobKey, PodView, int | None]] = {}
        for pod in pods:
            meta = pod.get("metadata") or {}
            job = (meta.get("labels") or {}).get(LABEL_JOB)
            seen = view(pod)
            if meta.get("uid") and job and seen is not None:
                key = (meta.get("namespace", ""), job)
                fresh[meta["uid"]] = (key, seen, version_number(meta.get("resourceVersion")))
        changed: set[JobKey] = set()
        with self._lock:
            for uid, key in list(self._where.items()):
                if (not scope or key[0] == scope) and uid not in fresh:
                    self._drop(uid)
                    changed.add(key)
            for uid, (key, seen, version) in fresh.items():
                if self._jobs.get(key, {}).get(uid) != seen:
                    changed.add(key)
                self._hold(uid, key, seen, version)
        return changed

    def _hold(self, uid: str, key: JobKey, seen: PodView, version: int | None) -> None:
        """Called with the lock held."""
        self._drop(uid)
        self._jobs.setdefault(key, {})[uid] = seen
        self._where[uid] = key
        if version is not None:
            self._versions[uid] = version

    def _drop(self, uid: str) -> None:
        """Called with the lock held."""
        key = self._where.pop(uid, None)
        self._versions.pop(uid, None)
        if key is not None:
            held = self._jobs.get(key, {})
            held.pop(uid, None)
            if not held:
                self._jobs.pop(key, None)

    def _expire(self, now: float) -> None:
        """Called with the lock held."""
        self._deletions += 1
        if self._deletions % 64 == 0:  # now and then: the table stays small
            for uid, at in list(self._gone.items()):
                if now - at > TOMBSTONE_SECONDS:
                    del self._gone[uid]


def version_number(text: Any) -> int | None:
    """resourceVersion is opaque to clients, but etcd's are integers that only grow: used to
    keep an older answer from replacing a newer state, and ignored when not a number."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None
