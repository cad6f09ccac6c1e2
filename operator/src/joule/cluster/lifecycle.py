"""`joule cluster up | status | down`: the local control plane as one unit.

State lives in ``<state root>/<name>/``: ``cluster.json`` (ports, pids), ``kubeconfig``
(cluster-admin), the PKI, component logs and etcd's data. ``up`` records each process as soon
as it starts, so a failed or interrupted ``up`` can always be cleaned by ``down``; ``down``
removes the whole folder.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from joule.cluster import nodeconfig, pki, process, realnode
from joule.cluster.build import Binaries, ensure_binaries
from joule.cluster.components import (
    SERVICE_IP,
    Component,
    Ports,
    api_url,
    components,
    kubeconfig,
)
from joule.cluster.deviceplugin import device_plugin_component, ensure_device_plugin
from joule.cluster.dns import (
    COREDNS_CLIENT,
    coredns_component,
    coredns_rbac,
    corefile,
    ensure_coredns,
)
from joule.cluster.nodebuild import NodeBinaries, ensure_node_binaries
from joule.cluster.nodeconfig import NODE_NAME
from joule.cluster.nodes import (
    GPU_COUNT_LABEL,
    GPU_PRESENT_LABEL,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    gpu_nodes,
)
from joule.cluster.process import ProcessRecord
from joule.cluster.settings import ClusterSettings, cache_dir

Progress = Callable[[str], None]

STATE_FILE = "cluster.json"
COMPONENT_CLIENTS = {
    "controller-manager": pki.CONTROLLER_MANAGER,
    "scheduler": pki.SCHEDULER,
    "kwok": pki.KWOK,
    "kubelet": pki.KUBELET,
    "apiserver-kubelet-client": pki.APISERVER_KUBELET_CLIENT,
    "coredns": COREDNS_CLIENT,
    "admin": pki.ADMIN,
}
STARTUP_TIMEOUT_S = 90.0
NOT_READY_TAINT = "node.kubernetes.io/not-ready"


class ClusterError(RuntimeError):
    """The cluster could not be brought up or inspected; the message says what and why."""


@dataclass
class ComponentStatus:
    name: str
    pid: int
    alive: bool
    healthy: bool
    rss_bytes: int | None
    log: str
    # Started beside the cluster (see `adopt`): reported, but not part of `running`.
    adopted: bool = False


@dataclass
class ClusterInfo:
    name: str
    kubeconfig: Path
    server: str
    kubectl: Path
    ports: dict[str, int]
    processes: list[ProcessRecord]
    versions: dict[str, str]
    nodes: int
    gpus_per_node: int
    # The real node's record (realnode.NodeRecord as JSON); None when there is none.
    node: dict[str, Any] | None = None
    # Processes started beside the cluster on demand (the object store), see `adopt`.
    adopted: list[ProcessRecord] = field(default_factory=list)
    started_in_s: float | None = None
    already_running: bool = False
    components: list[ComponentStatus] = field(default_factory=list)

    @property
    def running(self) -> bool:
        own = [c for c in self.components if not c.adopted]
        return bool(own) and all(c.alive and c.healthy for c in own)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "kubectl": str(self.kubectl),
            "ports": self.ports,
            "processes": [p.to_json() for p in self.processes],
            "versions": self.versions,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "node": self.node,
            "adopted": [p.to_json() for p in self.adopted],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterInfo:
        return cls(
            name=data["name"],
            kubeconfig=Path(data["kubeconfig"]),
            server=data["server"],
            kubectl=Path(data["kubectl"]),
            ports=dict(data["ports"]),
            processes=[ProcessRecord.from_json(p) for p in data["processes"]],
            versions=dict(data["versions"]),
            nodes=int(data["nodes"]),
            gpus_per_node=int(data["gpus_per_node"]),
            node=data.get("node"),
            adopted=[ProcessRecord.from_json(p) for p in data.get("adopted", [])],
        )


def up(settings: ClusterSettings, progress: Progress | None = None) -> ClusterInfo:
    """Start the cluster (building the binaries first if they are not cached).

    Idempotent: a healthy cluster of this name is returned as it is; a dead or half-started
    one is cleaned away and started afresh.
    """
    say = progress or (lambda _m: None)
    existing = _load(settings)
    if existing is not None:
        current = status(settings)
        if current is not None and current.running:
            current.already_running = True
            return current
        say(f"cluster {settings.name!r} left state behind but is not healthy; cleaning it up")
        down(settings)

    with_node = wants_real_node(settings)
    bins = ensure_binaries(settings, say)
    node_bins = ensure_node_binaries(settings.kubernetes_version, say) if with_node else None
    plugin = ensure_device_plugin(say) if with_node and settings.node_gpus else None
    coredns = ensure_coredns(progress=say) if with_node else None
    started = time.monotonic()
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    ports = Ports(*_free_ports(6))
    keys = pki.generate(state / "pki", SERVICE_IP, COMPONENT_CLIENTS)
    server = api_url(ports)
    _write_kubeconfigs(state, server, keys)
    info = ClusterInfo(
        name=settings.name,
        kubeconfig=settings.kubeconfig,
        server=server,
        kubectl=bins.kubectl,
        ports=ports.all(),
        processes=[],
        versions={
            "kubernetes": settings.kubernetes_version,
            "etcd": settings.etcd_version,
            "kwok": settings.kwok_version,
        },
        nodes=settings.nodes,
        gpus_per_node=settings.shape.gpus,
    )
    try:
        _start_components(components(bins, keys, ports, state), info, state, keys, say)
        if settings.nodes:
            say(f"registering {settings.nodes} GPU nodes x {settings.shape.gpus} nvidia.com/gpu")
        _register_nodes(settings, bins)
        if node_bins is not None and coredns is not None:
            _start_real_node(settings, bins, node_bins, plugin, coredns, keys, info, say)
        _wait_ready(settings, bins, info, say)
    except BaseException:
        # Leave nothing half-started behind, whatever went wrong (Ctrl-C included).
        _save(state, info)
        down(settings)
        raise
    info.started_in_s = time.monotonic() - started
    result = status(settings)
    assert result is not None
    result.started_in_s = info.started_in_s
    return result


def status(settings: ClusterSettings) -> ClusterInfo | None:
    """The recorded cluster with each process's liveness, health and memory; None if none."""
    info = _load(settings)
    if info is None:
        return None
    ca = settings.state_dir / "pki" / "ca.crt"
    for record in info.processes + info.adopted:
        alive = process.alive(record)
        url = record.health_url
        use_ca = ca if record.name == "kube-apiserver" else None
        healthy = alive and (url is None or process.healthy(url, ca=use_ca))
        rss = process.rss_bytes(record.pid) if alive else None
        adopted = record in info.adopted
        info.components.append(
            ComponentStatus(record.name, record.pid, alive, healthy, rss, record.log, adopted)
        )
    return info


def down(settings: ClusterSettings) -> list[str]:
    """Stop every process this cluster started and remove its state. Safe to repeat."""
    info = _load(settings)
    stopped: list[str] = []
    if info is not None:
        live = [r for r in info.processes + info.adopted if process.alive(r)]
        # Reverse start order: clients first, etcd last, so nothing logs storage errors.
        process.stop(list(reversed(live)))
        stopped = [r.name for r in live]
        if info.node is not None:
            # Containers, shims and the node's mounts, cgroups and bridges.
            realnode.teardown(realnode.NodeRecord.from_json(info.node))
        still = [r.name for r in live if process.alive(r)]
        if still:
            raise ClusterError(
                f"could not stop {', '.join(still)}; state kept in {settings.state_dir}"
            )
    shutil.rmtree(settings.state_dir, ignore_errors=True)
    return stopped


def adopt(settings: ClusterSettings, record: ProcessRecord) -> None:
    """Record a process started beside the running cluster (the object store), replacing any
    adopted record of that name: `status` reports it and `down` stops it (first) with the
    cluster's own. It does not count towards `running`: its death does not make `up` start
    the cluster afresh."""
    info = _load(settings)
    if info is None:
        raise ClusterError(f"no cluster {settings.name!r}")
    info.adopted = [r for r in info.adopted if r.name != record.name] + [record]
    _save(settings.state_dir, info)


def release(settings: ClusterSettings, name: str) -> None:
    """Forget an adopted process (stopped by whoever started it, or found dead)."""
    info = _load(settings)
    if info is None:
        return
    info.adopted = [r for r in info.adopted if r.name != name]
    _save(settings.state_dir, info)


def restart(
    settings: ClusterSettings, name: str, down_seconds: float = 0.0, kill: bool = True
) -> float:
    """Stop one component (SIGKILL by default: a crash, not a shutdown), leave it down for
    ``down_seconds``, start it again with the same command line and log, and wait until it is
    healthy. Returns the seconds it was unavailable. For fault tests (etcd, kube-apiserver)."""
    info = _load(settings)
    if info is None:
        raise ClusterError(f"no cluster {settings.name!r}")
    record = next((r for r in info.processes if r.name == name), None)
    if record is None or not process.alive(record):
        raise ClusterError(f"{name} is not running in cluster {settings.name!r}")
    argv = Path(f"/proc/{record.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    began = time.monotonic()
    if kill:
        process.kill(record)
    else:
        process.stop([record])
    time.sleep(down_seconds)
    fresh = process.start(name, [a.decode() for a in argv], Path(record.log), record.health_url)
    info.processes = [fresh if r is record else r for r in info.processes]
    _save(settings.state_dir, info)
    ca = settings.state_dir / "pki" / "ca.crt" if name == "kube-apiserver" else None
    comp = Component(name, [], fresh.health_url)
    _wait_healthy(comp, fresh, ca)
    return time.monotonic() - began


def _start_components(
    comps: list[Component], info: ClusterInfo, state: Path, keys: pki.Pki, say: Progress
) -> None:
    etcd, apiserver, *rest = comps
    for group in ([etcd], [apiserver], rest):
        for comp in group:
            log = state / "logs" / f"{comp.name}.log"
            record = process.start(comp.name, comp.argv, log, comp.health_url)
            info.processes.append(record)
            _save(state, info)
        names = ", ".join(c.name for c in group)
        say(f"starting {names}")
        for comp in group:
            record = next(r for r in info.processes if r.name == comp.name)
            ca = keys.ca.cert if comp.name == "kube-apiserver" else None
            _wait_healthy(comp, record, ca)


def _wait_healthy(comp: Component, record: ProcessRecord, ca: Path | None) -> None:
    if comp.health_url is None:
        return
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not process.alive(record):
            raise ClusterError(
                f"{comp.name} exited during start-up. Last lines of {record.log}:\n"
                f"{process.log_tail(record.log)}"
            )
        if process.healthy(comp.health_url, ca=ca, timeout=1.0):
            return
        time.sleep(0.2)
    raise ClusterError(
        f"{comp.name} did not become healthy at {comp.health_url} within "
        f"{STARTUP_TIMEOUT_S:.0f}s. Last lines of {record.log}:\n{process.log_tail(record.log)}"
    )


def wants_real_node(settings: ClusterSettings) -> bool:
    """Whether ``up`` starts a real node: where the machine can, unless told not to."""
    reason = realnode.unavailable_reason()
    if settings.real_node is True and reason is not None:
        raise ClusterError(reason)
    return settings.real_node is not False and reason is None


def parse_taint(text: str) -> dict[str, str]:
    """``key=value:Effect`` (or ``key:Effect``) as the kubelet's registerWithTaints wants it."""
    spec, _, effect = text.rpartition(":")
    key, _, value = spec.partition("=")
    if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"taint {text!r} must look like key=value:NoSchedule")
    taint = {"key": key, "effect": effect}
    return {**taint, "value": value} if value else taint


def _start_real_node(
    settings: ClusterSettings,
    bins: Binaries,
    node_bins: NodeBinaries,
    device_plugin: Path | None,
    coredns: Path,
    keys: pki.Pki,
    info: ClusterInfo,
    say: Progress,
) -> None:
    state = settings.state_dir
    layout = realnode.layout_for(settings.name, state)
    registry_port, healthz_port, dns_ready_port = _free_ports(3)
    registry = f"127.0.0.1:{registry_port}"
    record = realnode.NodeRecord(
        settings.name, layout.index, str(layout.state), str(layout.run), "", registry
    )
    info.node = record.to_json()
    _save(state, info)  # from here on, `down` can find and remove whatever is made

    def start(name: str, argv: list[str], health: str | None) -> ProcessRecord:
        proc = process.start(name, argv, state / "logs" / f"{name}.log", health)
        info.processes.append(proc)
        _save(state, info)
        return proc

    say(f"starting a real node {NODE_NAME!r}: containerd, kubelet, registry at {registry}")
    taints = [parse_taint(t) for t in settings.node_taints]
    realnode.prepare(layout, node_bins, keys, registry, healthz_port, taints)
    realnode.network_up(layout)
    realnode.api_route_up(layout, info.ports["apiserver"])
    realnode.cgroups_up(layout)
    holder, mount_ns = realnode.start_holder(layout, start)
    info.node = {**record.to_json(), "mount_ns": mount_ns}
    _save(state, info)
    config = realnode.write_registry_config(layout.state, registry, cache_dir() / "registry")
    reg = start("registry", realnode.registry_argv(config), f"http://{registry}/v2/")
    ctd_argv = [str(node_bins.containerd), f"--config={layout.containerd_config}"]
    ctd = start("containerd", realnode.in_namespace(holder, ctd_argv), None)
    realnode.wait_socket(layout.containerd_socket, ctd, "containerd")
    realnode.import_pause(node_bins.ctr, layout)
    _kubectl(bins, settings, ["apply", "-f", "-"], stdin=yaml.safe_dump(_kubelet_api_binding()))
    labels = {
        "joule.dev/local-node": "true",
        GPU_PRODUCT_LABEL: "joule-gpu-slot",  # slots, not GPUs: see the device plugin
        GPU_COUNT_LABEL: str(settings.node_gpus),
        # As on a GPU node, so that the chart's node agent lands here (not on kwok's
        # nodes, which run no containers).
        GPU_PRESENT_LABEL: "true",
    }
    kubeconfig_path = state / "kubeconfigs" / "kubelet.yaml"
    kubelet_argv = nodeconfig.kubelet_argv(bins.kubelet, layout, kubeconfig_path, labels)
    kubelet = start(
        "kubelet",
        realnode.in_namespace(holder, kubelet_argv),
        f"http://127.0.0.1:{healthz_port}/healthz",
    )
    if device_plugin is not None:
        comp = device_plugin_component(device_plugin, settings.node_gpus)
        start(comp.name, realnode.in_namespace(holder, comp.argv), None)
    # Pod DNS: a host process on the pod bridge's address, the kubelet's clusterDNS.
    _kubectl(bins, settings, ["apply", "-f", "-"], stdin=yaml.safe_dump_all(coredns_rbac()))
    corefile_path = layout.state / "Corefile"
    corefile_path.write_text(
        corefile(layout.gateway, state / "kubeconfigs" / "coredns.yaml", ready_port=dns_ready_port)
    )
    dns = coredns_component(coredns, corefile_path, dns_ready_port)
    dns_rec = start(dns.name, dns.argv, dns.health_url)
    for rec in (reg, kubelet, dns_rec):
        _wait_healthy(Component(rec.name, [], rec.health_url), rec, None)


def _kubelet_api_binding() -> dict[str, Any]:
    """The API server's kubelet client may use the kubelet API (logs, exec), nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "joule:apiserver-kubelet-client"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "system:kubelet-api-admin",
        },
        "subjects": [
            {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "User",
                "name": pki.APISERVER_KUBELET_CLIENT.user,
            }
        ],
    }


def _register_nodes(settings: ClusterSettings, bins: Binaries) -> None:
    manifests = gpu_nodes(settings.nodes, settings.shape)
    if not manifests:
        return
    _kubectl(bins, settings, ["apply", "-f", "-"], stdin=yaml.safe_dump_all(manifests))


def _wait_ready(
    settings: ClusterSettings, bins: Binaries, info: ClusterInfo, say: Progress
) -> None:
    """Ready means: every node Ready (kwok runs) and the default ServiceAccount exists
    (kube-controller-manager runs), so the first pod a test creates is admitted."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    want_nodes = settings.nodes + (1 if info.node is not None else 0)
    while time.monotonic() < deadline:
        nodes = json.loads(_kubectl(bins, settings, ["get", "nodes", "-o", "json"]))["items"]
        ready = schedulable_nodes(nodes)
        has_sa = (
            _kubectl(
                bins,
                settings,
                [
                    "get",
                    "serviceaccount",
                    "default",
                    "-n",
                    "default",
                    "--ignore-not-found",
                    "-o",
                    "name",
                ],
            ).strip()
            != ""
        )
        slots = real_node_slots(nodes) if info.node is not None and settings.node_gpus else None
        if ready >= want_nodes and has_sa and slots in (None, settings.node_gpus):
            return
        for record in info.processes:
            if not process.alive(record):
                raise ClusterError(
                    f"{record.name} exited. Last lines of {record.log}:\n"
                    f"{process.log_tail(record.log)}"
                )
        time.sleep(0.3)
    raise ClusterError(
        f"the cluster did not become ready within {STARTUP_TIMEOUT_S:.0f}s "
        f"(schedulable nodes: {ready}/{want_nodes}, default ServiceAccount: {has_sa}"
        + (f", GPU slots: {slots}/{settings.node_gpus})" if slots is not None else ")")
    )


def real_node_slots(nodes: list[dict[str, Any]]) -> int:
    """The real node's allocatable nvidia.com/gpu: the device plugin has registered once it
    equals the slots asked for."""
    for node in nodes:
        if node["metadata"]["name"] == NODE_NAME:
            return int(node.get("status", {}).get("allocatable", {}).get(GPU_RESOURCE, 0))
    return 0


def schedulable_nodes(nodes: list[dict[str, Any]]) -> int:
    """Nodes that are Ready and no longer carry the not-ready taint (which the node-lifecycle
    controller removes a moment after Ready): only then will the scheduler use them."""
    count = 0
    for node in nodes:
        conditions = node.get("status", {}).get("conditions", [])
        is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        taints = node.get("spec", {}).get("taints") or []
        if is_ready and not any(t["key"] == NOT_READY_TAINT for t in taints):
            count += 1
    return count


def _kubectl(
    bins: Binaries, settings: ClusterSettings, args: list[str], stdin: str | None = None
) -> str:
    return kubectl(bins.kubectl, settings.kubeconfig, args, stdin)


def kubectl(
    binary: Path, kubeconfig: Path, args: list[str], stdin: str | None = None, timeout: float = 120
) -> str:
    """Run the cluster's kubectl; its stdout, or a ClusterError with kubectl's message."""
    proc = subprocess.run(
        [str(binary), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise ClusterError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _write_kubeconfigs(state: Path, server: str, keys: pki.Pki) -> None:
    folder = state / "kubeconfigs"
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, who in COMPONENT_CLIENTS.items():
        pair = keys.clients[file_name]
        doc = kubeconfig(server, keys.ca.cert, pair.cert, pair.key, who.user, "joule")
        path = state / "kubeconfig" if file_name == "admin" else folder / f"{file_name}.yaml"
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _free_ports(count: int) -> list[int]:
    """Ports the kernel says are free now; all held open together so none repeats."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _save(state: Path, info: ClusterInfo) -> None:
    tmp = state / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2))
    tmp.replace(state / STATE_FILE)


def _load(settings: ClusterSettings) -> ClusterInfo | None:
    path = settings.state_dir / STATE_FILE
    try:
        return ClusterInfo.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"{path} is unreadable ({exc}); remove {settings.state_dir}") from exc
