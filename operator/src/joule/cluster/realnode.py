"""A real node for the local cluster: containerd, runc, the CNI bridge and a kubelet.

Start order: the network (two bridges), a mount namespace of the node's own (so the
kubelet's fixed paths and every mount it and containerd make stay private to this node and
vanish with it), the local image registry, containerd (the sandbox image imported), the
kubelet. ``teardown`` removes what ``start`` made, found by identity rather than by memory:
every process in the node's mount namespace or cgroups, the cgroups, the bridges, the folders.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from joule.cluster import nodeconfig, pauseimage, pki, process
from joule.cluster.components import SERVICE_CIDR, SERVICE_IP
from joule.cluster.nodebuild import NodeBinaries
from joule.cluster.nodeconfig import PRIVATE_HOST_PATHS, NodeLayout
from joule.cluster.process import ProcessRecord

Progress = Callable[[str], None]
Start = Callable[[str, list[str], str | None], ProcessRecord]

CGROUP_MOUNTS = Path("/sys/fs/cgroup")
READY_TIMEOUT_S = 90.0


class NodeUnavailable(RuntimeError):
    """This machine cannot run a real node (not root, not Linux); the message says what to
    do instead."""


class NodeError(RuntimeError):
    """The node did not come up; the message says which part and quotes its log."""


def unavailable_reason() -> str | None:
    """None when a real node can run here; else one line saying why and what to do."""
    instead = (
        "use a kind or minikube cluster of your own: kubectl apply -f crds/, then run "
        "`joule operator` against it (README: Without root, or off Linux)"
    )
    if platform.system() != "Linux":
        return f"a local node needs Linux (this is {platform.system()}); {instead}"
    if os.geteuid() != 0:
        return f"a local node runs containerd and a kubelet, which need root; {instead}"
    if (CGROUP_MOUNTS / "cgroup.controllers").exists():
        # Only cgroup v1 (and hybrid) hosts have been run and tested; a pure v2 host needs
        # the kubelet's root created with its controllers delegated, which is not done yet.
        return f"a local node needs cgroup v1 or hybrid here, not cgroup v2 only; {instead}"
    return None


@dataclass(frozen=True)
class NodeRecord:
    """What ``teardown`` needs to find everything the node made, saved in cluster.json."""

    cluster: str
    index: int
    state: str
    run: str
    mount_ns: str  # e.g. "mnt:[4026532401]": the namespace holder's, matched by identity
    registry: str  # 127.0.0.1:PORT

    def layout(self) -> NodeLayout:
        return NodeLayout(self.cluster, self.index, Path(self.state), Path(self.run))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def taken_indexes() -> set[int]:
    """Indexes whose pod bridge exists already (another cluster's node)."""
    out = _run(["ip", "-o", "link", "show", "type", "bridge"], check=False).stdout
    taken = set()
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("jlpod") and name[5:].isdigit():
            taken.add(int(name[5:]))
    return taken


def layout_for(cluster: str, cluster_state: Path) -> NodeLayout:
    index = nodeconfig.pick_index(cluster, taken_indexes())
    run = Path("/run/joule") / nodeconfig.run_key(cluster, cluster_state)
    return NodeLayout(cluster, index, cluster_state / "node", run)


def prepare(
    layout: NodeLayout,
    bins: NodeBinaries,
    keys: pki.Pki,
    registry: str,
    healthz_port: int,
    taints: list[dict[str, str]],
) -> None:
    """Folders, configuration files, the kubelet's serving certificate, the pause image."""
    too_long = nodeconfig.long_socket_paths(layout)
    if too_long:
        raise NodeError(
            f"socket paths would be too long for unix sockets ({too_long[0]}): use a shorter "
            "cluster name or JOULE_STATE_DIR"
        )
    for path in (layout.state, layout.run, layout.cni_conf_dir, layout.pod_logs):
        path.mkdir(parents=True, exist_ok=True)
    layout.containerd_config.write_text(
        nodeconfig.containerd_config(layout, bins.runc, bins.cni_bin_dir)
    )
    (layout.cni_conf_dir / "10-joule.conflist").write_text(
        nodeconfig.dumps(nodeconfig.cni_config(layout, SERVICE_CIDR))
    )
    for host, text in nodeconfig.registry_hosts(registry).items():
        folder = layout.registry_hosts_dir / host
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts.toml").write_text(text)
    serving = pki.issue_serving(
        layout.state / "kubelet-pki", "kubelet", keys.ca, nodeconfig.NODE_NAME, (layout.node_ip,)
    )
    config = nodeconfig.kubelet_config(
        layout, keys.ca.cert, serving.cert, serving.key, healthz_port, taints
    )
    layout.kubelet_config.write_text(yaml.safe_dump(config, sort_keys=False))
    pauseimage.pack(bins.pause, layout.state / "pause.tar")


def network_up(layout: NodeLayout) -> None:
    """The pod bridge with its gateway address (for probes, port-forward and CoreDNS) and a
    port-less bridge holding the node address. No forwarding, no NAT, no default route.

    Each bridge carries the node's tag as its alias, so that only this node removes it; and
    forwarding is off on it whatever the host's ``ip_forward`` says, so a pod's packets are
    never routed on (not even by a pod that crafts frames for the bridge's address)."""
    for bridge, cidr in (
        (layout.pod_bridge, f"{layout.gateway}/24"),
        (layout.node_bridge, f"{layout.node_ip}/32"),
    ):
        if Path(f"/sys/class/net/{bridge}").exists():
            raise NodeError(f"{bridge} exists already (another cluster's node?); try again")
        _run(["ip", "link", "add", bridge, "type", "bridge"])
        _run(["ip", "link", "set", bridge, "alias", layout.owner_tag])
        Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").write_text("0\n")
        _run(["ip", "addr", "add", cidr, "dev", bridge])
        _run(["ip", "link", "set", bridge, "up"])


def network_down(layout: NodeLayout) -> None:
    for bridge in (layout.pod_bridge, layout.node_bridge):
        try:
            alias = Path(f"/sys/class/net/{bridge}/ifalias").read_text().strip()
        except OSError:
            continue  # gone already
        if alias == layout.owner_tag:
            _run(["ip", "link", "del", bridge], check=False)


def api_route_up(layout: NodeLayout, apiserver_port: int) -> None:
    """Pods reach the API server at the `kubernetes` Service, as in a cluster (the operator's
    pod uses its in-cluster configuration): nodeconfig.api_route_rules."""
    if shutil.which("iptables") is None:
        raise NodeError(
            "iptables is needed for pods to reach the API server (apt install iptables)"
        )
    for argv in nodeconfig.api_route_rules(layout, SERVICE_IP, apiserver_port):
        _run(argv)
    Path(f"/proc/sys/net/ipv4/conf/{layout.pod_bridge}/route_localnet").write_text("1\n")


def api_route_down(layout: NodeLayout) -> None:
    if shutil.which("iptables") is None:
        return
    for argv in nodeconfig.api_route_teardown(layout):
        _run(argv, check=False)


def cgroups_up(layout: NodeLayout) -> None:
    """The kubelet's --cgroup-root must exist in every hierarchy before it starts."""
    for hierarchy in _cgroup_hierarchies():
        (hierarchy / layout.cgroup_root.strip("/")).mkdir(exist_ok=True)


def start_holder(layout: NodeLayout, start: Start) -> tuple[ProcessRecord, str]:
    """A process that owns the node's mount namespace; the kubelet's fixed paths get this
    node's own folders there. Returns the record and the namespace's identity."""
    record = start(
        "node-namespace",
        # slave: the host's unmounts reach the node (it pins no disk the user removes);
        # the node's own mounts stay inside.
        ["unshare", "--mount", "--propagation", "slave", "sleep", "infinity"],
        None,
    )
    ns_link = f"/proc/{record.pid}/ns/mnt"
    deadline = time.monotonic() + 5
    host_ns = os.readlink("/proc/self/ns/mnt")
    while os.readlink(ns_link) == host_ns:  # unshare has not switched yet
        if time.monotonic() > deadline:
            raise NodeError("the node's mount namespace was not created (unshare --mount)")
        time.sleep(0.02)
    for fixed in PRIVATE_HOST_PATHS:
        source = layout.fixed_path_source(fixed)
        source.mkdir(parents=True, exist_ok=True)
        Path(fixed).mkdir(parents=True, exist_ok=True)
        _run(["nsenter", f"--mount={ns_link}", "mount", "--bind", str(source), fixed])
    return record, os.readlink(ns_link)


def in_namespace(holder: ProcessRecord, argv: list[str]) -> list[str]:
    """``argv`` run inside the node's mount namespace (nsenter execs: the pid is argv's)."""
    return ["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "--", *argv]


def ctr_argv(ctr: Path, layout: NodeLayout, *args: str) -> list[str]:
    """``ctr`` against this node's containerd, in the namespace the kubelet's pods use."""
    return [str(ctr), f"--address={layout.containerd_socket}", "-n", "k8s.io", *args]


def import_pause(ctr: Path, layout: NodeLayout) -> None:
    _run(ctr_argv(ctr, layout, "images", "import", str(layout.state / "pause.tar")))


def wait_socket(path: Path, record: ProcessRecord, what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if not process.alive(record):
            tail = process.log_tail(record.log)
            raise NodeError(f"{what} exited. Last lines of {record.log}:\n{tail}")
        if time.monotonic() > deadline:
            raise NodeError(f"{what} did not open {path} within 30 s; see {record.log}")
        time.sleep(0.1)


def teardown(record: NodeRecord) -> list[str]:
    """Remove everything the node made. Safe to repeat, and after a crash; returns what it
    had to kill (processes the normal stop did not reach: containers, shims)."""
    layout = record.layout()
    killed: set[str] = set()
    # Containers first (they live in the node's cgroups), then whatever is left in the
    # node's mount namespace (shims, containerd, the holder).
    for _ in range(50):
        pids = _cgroup_pids(layout) | _namespace_pids(record.mount_ns, layout)
        pids.discard(os.getpid())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                killed.add(_comm(pid))
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    _remove_cgroups(layout)
    api_route_down(layout)
    network_down(layout)
    if not taken_indexes():
        # The kubelet's fixed paths, now empty mount points; never while another node runs:
        # removing a folder detaches the mounts other namespaces hold on it.
        for fixed in (*PRIVATE_HOST_PATHS, "/var/lib/kubelet"):
            with contextlib.suppress(OSError):
                Path(fixed).rmdir()
    shutil.rmtree(layout.run, ignore_errors=True)
    _unmount_under(layout.state)
    shutil.rmtree(layout.state, ignore_errors=True)
    return sorted(killed)


def node_processes(record: NodeRecord) -> tuple[set[int], set[int]]:
    """The node's processes, as teardown finds them: its containers' (in its cgroups), and
    the rest of it (kubelet, containerd, shims, the holder: its mount namespace). A test
    stops them all to make the node lost, as a machine that hangs or loses its network."""
    layout = record.layout()
    containers = _cgroup_pids(layout)
    rest = _namespace_pids(record.mount_ns, layout) - containers
    containers.discard(os.getpid())
    rest.discard(os.getpid())
    return containers, rest


def _cgroup_hierarchies() -> list[Path]:
    return sorted(p for p in CGROUP_MOUNTS.iterdir() if (p / "cgroup.procs").exists())


def _cgroup_pids(layout: NodeLayout) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / layout.cgroup_root.strip("/")
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids |= {int(p) for p in procs.read_text().split()}
    return pids


def _namespace_pids(ns: str, layout: NodeLayout) -> set[int]:
    """Processes in the node's mount namespace. A namespace number is reused once it is
    free (after a reboot, or once the node's last process is gone), so a process counts only
    if its mounts also show this node's own folder over the kubelet's device-plugin path."""
    if not ns:
        return set()
    # The bind mount's source as mountinfo shows it: relative to its filesystem's root,
    # so only the tail (which names the cluster) is compared.
    source = layout.fixed_path_source(PRIVATE_HOST_PATHS[0])
    marker = "/".join(source.parts[-4:]) + f" {PRIVATE_HOST_PATHS[0]} "
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (
                    os.readlink(entry / "ns" / "mnt") == ns
                    and marker in (entry / "mountinfo").read_text()
                ):
                    pids.add(int(entry.name))
    return pids


def _remove_cgroups(layout: NodeLayout) -> None:
    for hierarchy in _cgroup_hierarchies():
        root = hierarchy / layout.cgroup_root.strip("/")
        if not root.is_dir():
            continue
        # Deepest first: a cgroup is removed with rmdir, and only once it has no children.
        for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def _unmount_under(folder: Path) -> None:
    """Mounts under the node's folders in the host namespace (none are made there; a crash
    of an older version may have left some)."""
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(str(folder))), reverse=True):
            _run(["umount", "-l", target], check=False)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return str(pid)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def registry_argv(config: Path) -> list[str]:
    return ["docker-registry", "serve", str(config)]


def write_registry_config(state: Path, address: str, storage: Path) -> Path:
    storage.mkdir(parents=True, exist_ok=True)
    path = state / "registry.yaml"
    path.write_text(yaml.safe_dump(nodeconfig.registry_config(address, storage)))
    return path


def pull_image(ctr: Path, layout: NodeLayout, image: str) -> float:
    """Pull ``image`` into the node as the kubelet would (through the registry mirrors), so
    that the first pod does not wait for it; returns the seconds it took. The trainer image
    is ~3 GiB: about a minute here."""
    started = time.monotonic()
    _run(ctr_argv(ctr, layout, "images", "pull", f"--hosts-dir={layout.registry_hosts_dir}", image))
    return time.monotonic() - started
