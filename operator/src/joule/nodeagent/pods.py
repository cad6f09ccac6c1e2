"""The pods on this node, as the agent needs them: kept by a watch filtered by
``spec.nodeName``, so a node's agent asks the API server about its own pods only, once,
and then hears of changes (a list every few seconds from every node would not scale)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from joule.constants import LABEL_JOB, POWER_LIMIT_ANNOTATION

log = logging.getLogger("joule.nodeagent.pods")
WATCH_SECONDS = 300


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    phase: str
    job: str  # its TrainingJob's name; "" for other pods
    limit: str | None  # the power-limit annotation, as set

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def pod_info(pod: Any) -> PodInfo:
    meta, status = pod.metadata, pod.status
    return PodInfo(
        uid=meta.uid,
        namespace=meta.namespace,
        name=meta.name,
        phase=(status.phase if status else None) or "Pending",
        job=(meta.labels or {}).get(LABEL_JOB, ""),
        limit=(meta.annotations or {}).get(POWER_LIMIT_ANNOTATION),
    )


class PodCache:
    """This node's pods by (namespace, name), kept current by a watch in a thread."""

    def __init__(self, core: client.CoreV1Api, node: str) -> None:
        self.core = core
        self.selector = f"spec.nodeName={node}"
        self.synced = threading.Event()
        self._pods: dict[tuple[str, str], PodInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def get(self, namespace: str, name: str) -> PodInfo | None:
        with self._lock:
            return self._pods.get((namespace, name))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._relist()
                self._watch(version)
            except Exception as exc:  # the API server restarted, a network blip: start over
                log.warning("pod watch: %s; listing again in 2 s", _why(exc))
                self._stop.wait(2.0)

    def _relist(self) -> str:
        listed = self.core.list_pod_for_all_namespaces(
            field_selector=self.selector, _request_timeout=(10, 60)
        )
        pods = {(p.metadata.namespace, p.metadata.name): pod_info(p) for p in listed.items}
        with self._lock:
            self._pods = pods
        self.synced.set()
        return listed.metadata.resource_version

    def _watch(self, version: str) -> None:
        stream = watch.Watch().stream(
            self.core.list_pod_for_all_namespaces,
            field_selector=self.selector,
            resource_version=version,
            timeout_seconds=WATCH_SECONDS,
            # The server ends the watch after WATCH_SECONDS; a connection that dies without
            # a word must not hold the cache stale for ever.
            _request_timeout=(10, WATCH_SECONDS + 30),
        )
        for event in stream:
            if self._stop.is_set():
                return
            pod = event["object"]
            if event["type"] == "ERROR" or not hasattr(pod, "metadata"):
                return  # "too old resource version" and the like: list afresh
            key = (pod.metadata.namespace, pod.metadata.name)
            with self._lock:
                if event["type"] == "DELETED":
                    self._pods.pop(key, None)
                else:
                    self._pods[key] = pod_info(pod)


def _why(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc) or type(exc).__name__
