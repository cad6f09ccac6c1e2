"""The node agent's I/O: the Node and its Lease, pods bound to it, their processes.

Level-triggered like a kubelet: every ``tick`` it lists the pods bound to its node and makes
the processes match (start, notice exits, restart by restartPolicy, terminate on deletion),
then writes a pod's status when it changed. Decisions about one pod's process live in
``podproc`` and ``status``; this module only runs them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from joule.nodeagent import network, podproc
from joule.nodeagent.node import NodeSpec, conditions, lease_object, node_object
from joule.nodeagent.status import ContainerState, pod_status

log = logging.getLogger("joule.nodeagent")
AGENT_VERSION = "joule-node-agent"
# A pod whose environment names a sibling that is not bound yet waits this long for it,
# as its process would wait for DNS in a cluster; then it starts and fails on its own.
RESOLVE_WAIT_SECONDS = 30.0


def now() -> datetime:
    return datetime.now(UTC)


def pick_port(used: Iterable[int]) -> int:
    taken = set(used)
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own, so a
    process group does not reach them)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += [int(child), *descendants(int(child))]
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


@dataclass
class LocalContainer:
    state: ContainerState
    proc: subprocess.Popen | None = None
    plan: podproc.ProcessPlan | None = None
    not_before: float = 0.0


@dataclass
class LocalPod:
    uid: str
    namespace: str
    name: str
    address: str
    started: datetime
    first_seen: float
    containers: list[LocalContainer] = field(default_factory=list)
    kill_at: float | None = None  # SIGKILL deadline once terminating
    reported: dict[str, Any] | None = None
    downward: dict[Path, str] = field(default_factory=dict)  # downwardAPI files as written


@dataclass(frozen=True)
class AgentConfig:
    node: NodeSpec
    state_dir: Path
    images: podproc.LocalImages = field(default_factory=podproc.LocalImages)
    tick_seconds: float = 0.5
    heartbeat_seconds: float = 10.0
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)


class NodeAgent:
    def __init__(self, api_client: client.ApiClient, config: AgentConfig) -> None:
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self.config = config
        self.pods: dict[str, LocalPod] = {}
        self.addresses = network.AddressPool()
        self.ports = network.PortMap(pick_port)
        self.stop = threading.Event()

    # -- the node ---------------------------------------------------------------------------

    def register(self) -> None:
        body = node_object(self.config.node, now(), AGENT_VERSION)
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.config.node.name, {"metadata": body["metadata"]})
        self.core.patch_node_status(self.config.node.name, {"status": body["status"]})
        self._renew_lease()
        log.info("registered node %s", self.config.node.name)

    def _renew_lease(self) -> None:
        body = lease_object(self.config.node.name, now())
        try:
            self.coordination.patch_namespaced_lease(
                self.config.node.name, "kube-node-lease", {"spec": body["spec"]}
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self, ready: bool = True) -> None:
        self.core.patch_node_status(
            self.config.node.name, {"status": {"conditions": conditions(now(), ready)}}
        )
        if ready:
            self._renew_lease()

    def _heartbeats(self) -> None:
        while not self.stop.wait(self.config.heartbeat_seconds):
            try:
                self._heartbeat()
            except Exception:  # a missed beat is retried; the lease outlives a few
                log.exception("node heartbeat failed")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        self.register()
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        try:
            while not self.stop.is_set():
                try:
                    self.sync()
                except Exception:
                    log.exception("sync failed; retrying")
                self.stop.wait(self.config.tick_seconds)
        finally:
            self.shutdown()

    def sync(self) -> None:
        response = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.config.node.name}", _preload_content=False
        )
        pods: list[dict[str, Any]] = json.loads(response.data)["items"]
        seen = set()
        for pod in pods:  # addresses first, so that siblings resolve each other
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            if uid not in self.pods:
                self.pods[uid] = LocalPod(
                    uid=uid,
                    namespace=pod["metadata"]["namespace"],
                    name=pod["metadata"]["name"],
                    address=self.addresses.address(uid),
                    started=now(),
                    first_seen=time.monotonic(),
                )
        names = {
            n: self.pods[p["metadata"]["uid"]].address for p in pods for n in network.dns_names(p)
        }
        for pod in pods:
            self._sync_pod(pod, self.pods[pod["metadata"]["uid"]], names)
        for uid in [u for u in self.pods if u not in seen]:  # force-deleted: nothing to report
            self._kill(self.pods[uid], signal.SIGKILL)
            self._forget(uid)

    def _sync_pod(self, pod: dict[str, Any], local: LocalPod, names: dict[str, str]) -> None:
        spec = pod["spec"]
        if not local.containers:
            local.containers = [
                LocalContainer(ContainerState(name=c["name"], image=c.get("image", "")))
                for c in spec["containers"]
            ]
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(pod, local)
            return
        self._write_downward(pod, local, names)
        for container, local_c in zip(spec["containers"], local.containers, strict=True):
            self._sync_container(pod, local, container, local_c, names)
        self._report(pod, local)

    def _sync_container(
        self,
        pod: dict[str, Any],
        local: LocalPod,
        container: dict[str, Any],
        c: LocalContainer,
        names: dict[str, str],
    ) -> None:
        if c.proc is not None:
            code = c.proc.poll()
            if code is None:
                return
            c.proc = None
            c.state = replace(
                c.state,
                kind="terminated",
                exit_code=code if code >= 0 else 128 - code,
                finished=now(),
            )
            log.info("%s/%s %s exited %s", local.namespace, local.name, c.state.name, code)
            policy = pod["spec"].get("restartPolicy", "Always")
            if policy == "Always" or (policy == "OnFailure" and c.state.exit_code != 0):
                c.state = replace(c.state, restarts=c.state.restarts + 1)
                c.not_before = time.monotonic() + min(10.0, 2.0**c.state.restarts)
            else:
                return
        if c.state.kind == "terminated" and c.not_before == 0:
            return
        if time.monotonic() < c.not_before:
            return
        self._start(pod, local, container, c, names)

    def _context(self, local: LocalPod, names: dict[str, str]) -> podproc.PodContext:
        return podproc.PodContext(
            address=local.address,
            node_name=self.config.node.name,
            node_address=self.config.node.address,
            pod_dir=self.config.state_dir / "pods" / f"{local.namespace}_{local.name}_{local.uid}",
            claims_dir=self.config.state_dir / "claims",
            bin_dir=self.config.bin_dir,
            names=names,
            host_port=self.ports,
        )

    def _write_downward(self, pod: dict[str, Any], local: LocalPod, names: dict[str, str]) -> None:
        """Keep downwardAPI volume files current (written whole, then renamed into place)."""
        try:
            files = podproc.downward_files(pod, self._context(local, names))
        except ValueError:
            return  # the container's plan refuses it, with the reason
        for path, value in files.items():
            if local.downward.get(path) == value:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(value)
            os.replace(tmp, path)
            local.downward[path] = value

    def _start(
        self,
        pod: dict[str, Any],
        local: LocalPod,
        container: dict[str, Any],
        c: LocalContainer,
        names: dict[str, str],
    ) -> None:
        ctx = self._context(local, names)
        pod_dir = ctx.pod_dir
        plan = podproc.plan(pod, container, ctx, self.config.images, os.environ)
        if isinstance(plan, podproc.Refusal):
            c.state = replace(c.state, kind="waiting", reason=plan.reason, message=plan.message)
            return
        waiting_for = self._unresolved(pod, plan)
        if waiting_for and time.monotonic() - local.first_seen < RESOLVE_WAIT_SECONDS:
            c.state = replace(c.state, message=f"waiting for {waiting_for} to resolve")
            return
        pod_dir.mkdir(parents=True, exist_ok=True)
        for directory in plan.volumes.values():
            directory.mkdir(parents=True, exist_ok=True)
        plan.cwd.mkdir(parents=True, exist_ok=True)
        logfile = open(pod_dir / f"{c.state.name}.log", "ab")  # noqa: SIM115 - the child's
        try:
            c.proc = subprocess.Popen(
                plan.argv,
                env=plan.env,
                cwd=plan.cwd,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            c.state = replace(
                c.state,
                kind="terminated",
                exit_code=128,
                reason="StartError",
                message=f"{plan.argv[0]}: {exc.strerror}",
                started=now(),
                finished=now(),
            )
            return
        finally:
            logfile.close()
        c.plan, c.not_before = plan, 0.0
        c.state = replace(
            c.state, kind="running", started=now(), pid=c.proc.pid, message="", exit_code=None
        )
        log.info(
            "%s/%s %s started: pid %d at %s, log %s",
            local.namespace, local.name, c.state.name, c.proc.pid, local.address,
            pod_dir / f"{c.state.name}.log",
        )  # fmt: skip

    @staticmethod
    def _unresolved(pod: dict[str, Any], plan: podproc.ProcessPlan) -> str | None:
        sub = pod["spec"].get("subdomain")
        if not sub:
            return None
        for value in [*plan.env.values(), *plan.argv]:
            for token in value.replace("=", " ").replace(",", " ").split():
                host = token.rsplit(":", 1)[0]
                if host.endswith(f".{sub}") or f".{sub}." in host:
                    return host
        return None

    def _terminate(self, pod: dict[str, Any], local: LocalPod) -> None:
        if local.kill_at is None:
            grace = pod["metadata"].get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            local.kill_at = time.monotonic() + float(grace)
            log.info("%s/%s deleted: SIGTERM, %ss grace", local.namespace, local.name, grace)
            self._kill(local, signal.SIGTERM)
        elif time.monotonic() >= local.kill_at:
            self._kill(local, signal.SIGKILL)
        if any(c.proc is not None and c.proc.poll() is None for c in local.containers):
            return
        try:  # the kubelet's last word: grace 0, and the object is gone
            self.core.delete_namespaced_pod(
                local.name,
                local.namespace,
                # In the body: a body's unset grace period would override the query's 0.
                body=client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=local.uid)
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # 409: a new pod of that name; ours is gone
                log.warning("%s/%s: final delete failed: %s", local.namespace, local.name, exc)
                return
        self._forget(local.uid)

    def _kill(self, local: LocalPod, sig: int) -> None:
        for c in local.containers:
            if c.proc is not None and c.proc.poll() is None:
                if sig == signal.SIGKILL:
                    signal_tree(c.proc.pid, sig)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(c.proc.pid, sig)

    def _forget(self, uid: str) -> None:
        local = self.pods.pop(uid)
        for c in local.containers:
            if c.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(1)
        self.ports.release(local.address)
        self.addresses.release(uid)

    def _report(self, pod: dict[str, Any], local: LocalPod) -> None:
        status = pod_status(
            [c.state for c in local.containers],
            local.address,
            self.config.node.address,
            local.started,
        )
        if status == local.reported:
            return
        try:
            self.core.patch_namespaced_pod_status(local.name, local.namespace, {"status": status})
            local.reported = status
        except ApiException as exc:
            if exc.status != 404:
                raise

    def shutdown(self, grace_seconds: float = 10.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL after ``grace_seconds``); mark the node
        NotReady. Pods keep their objects: the control plane decides what happens to them."""
        self.stop.set()
        for local in self.pods.values():
            self._kill(local, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for local in self.pods.values():
            for c in local.containers:
                if c.proc is not None:
                    try:
                        c.proc.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        signal_tree(c.proc.pid, signal.SIGKILL)
                        c.proc.wait(5)
        with contextlib.suppress(Exception):
            self._heartbeat(ready=False)
