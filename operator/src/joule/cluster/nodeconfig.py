"""The real node's layout and configuration files: containerd, CNI, kubelet, registry. Pure.

Every setting here was needed on these machines; ``shared/notes/real-node.md`` says why.
The short version: nothing lands in system-wide paths (so two clusters can run side by side
and ``down`` can remove all of it), pod traffic never leaves the machine (no gateway, no
masquerade, no default route, ``ip_forward`` untouched), and the kubelet serves only
authenticated clients.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joule.cluster.pauseimage import PAUSE_IMAGE

NODE_NAME = "local"
CLUSTER_DOMAIN = "cluster.local"
# Pod subnets are 10.88.<n>.0/24 and node addresses 10.87.<n>.1/32, n chosen per cluster.
POD_NETWORKS = ipaddress.ip_network("10.88.0.0/16")
NODE_NETWORKS = ipaddress.ip_network("10.87.0.0/16")
# Images whose published names the node resolves from the local registry (a pull-through
# mirror, as kind and minikube set one up), so manifests keep their real image names.
MIRRORED_REGISTRIES = ("ghcr.io",)
# Host paths the node would otherwise write to whatever it is told: the kubelet's constants
# (device-plugin sockets, container log links) and libcni's result cache, which containerd
# does not move. Each cluster's node gets its own folder mounted over them, in a mount
# namespace of its own, so nothing lands on the host's copies.
PRIVATE_HOST_PATHS = (
    "/var/lib/kubelet/device-plugins",
    "/var/log/containers",
    "/var/lib/cni",
)
# Unix socket paths must fit in 108 bytes with their NUL; the kubelet's own sockets live
# under its root dir (pod-resources/kubelet.sock plus a temporary suffix while it starts).
SOCKET_PATH_LIMIT = 100


@dataclass(frozen=True)
class NodeLayout:
    """Where one cluster's node keeps things, and its addresses."""

    cluster: str
    index: int  # 1..254: picks the subnet and the bridge names
    state: Path  # <cluster state>/node
    # Short paths for unix sockets (108-byte limit): /run/joule/<key>, the key a digest of the
    # cluster's state folder, so two checkouts' clusters of one name never share it.
    run: Path

    @property
    def pod_subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.88.{self.index}.0/24")

    @property
    def gateway(self) -> str:
        """The pod bridge's own address: probes, port-forward and CoreDNS use it."""
        return f"10.88.{self.index}.1"

    @property
    def node_ip(self) -> str:
        """The node's InternalIP, on a bridge with no ports: pods have no route to it."""
        return f"10.87.{self.index}.1"

    @property
    def pod_bridge(self) -> str:
        return f"jlpod{self.index}"

    @property
    def node_bridge(self) -> str:
        return f"jlnode{self.index}"

    @property
    def cgroup_root(self) -> str:
        return f"/joule-{self.run.name}"

    @property
    def owner_tag(self) -> str:
        """Written as the bridges' alias: only the node that made a bridge removes it."""
        return f"joule:{self.run.name}"

    @property
    def api_chain(self) -> str:
        """The node's own iptables chain (nat table), named by its run key: <= 28 characters."""
        return f"JOULE-{self.run.name.rsplit('-', 1)[-1][:20]}"

    @property
    def pod_resources_socket(self) -> Path:
        return self.kubelet_dir / "pod-resources" / "kubelet.sock"

    @property
    def containerd_socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.state / "containerd.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def registry_hosts_dir(self) -> Path:
        return self.state / "certs.d"

    @property
    def kubelet_dir(self) -> Path:
        return self.state / "kubelet"

    @property
    def kubelet_config(self) -> Path:
        return self.state / "kubelet.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.state / "pod-logs"

    def fixed_path_source(self, fixed: str) -> Path:
        """This node's own folder for one of the kubelet's fixed paths."""
        return self.state / "fixed" / fixed.strip("/").replace("/", "_")


def run_key(cluster: str, cluster_state: Path) -> str:
    """``<cluster>-<digest of its state folder>``, short enough for socket paths."""
    digest = hashlib.sha256(str(cluster_state.resolve()).encode()).hexdigest()[:8]
    return f"{cluster[:12]}-{digest}"


def long_socket_paths(layout: NodeLayout) -> list[str]:
    """Socket paths of this layout that would not fit (the shim's are <run>/s/<64 hex>)."""
    candidates = [
        str(layout.containerd_socket) + ".ttrpc",
        str(layout.run / "s" / ("0" * 64)),
        str(layout.pod_resources_socket) + ".12345678",
    ]
    return [p for p in candidates if len(p) > SOCKET_PATH_LIMIT]


def pick_index(cluster: str, taken: set[int]) -> int:
    """A stable index for a cluster name (so its addresses stay the same across restarts),
    moved on past indexes another cluster's bridges already hold."""
    start = int(hashlib.sha256(cluster.encode()).hexdigest(), 16) % 254
    for step in range(254):
        index = (start + step) % 254 + 1
        if index not in taken:
            return index
    raise ValueError("no free pod subnet left in 10.88.0.0/16")


def containerd_config(layout: NodeLayout, runc: Path, cni_bin_dir: Path) -> str:
    """containerd 2.4's config (version 4: addresses live under the server plugins; the
    top-level [grpc] of older versions is silently ignored there)."""
    root, state = layout.state / "containerd", layout.run / "state"
    lines = [
        "version = 4",
        f"root = '{root}'",
        f"state = '{state}'",
        "imports = []",  # no /etc/containerd/conf.d from the machine
        "",
        "[plugins.'io.containerd.server.v1.grpc']",
        f"  address = '{layout.containerd_socket}'",
        "[plugins.'io.containerd.server.v1.ttrpc']",
        f"  address = '{layout.containerd_socket}.ttrpc'",
        "[plugins.'io.containerd.server.v1.debug']",
        "  address = ''",
        "[plugins.'io.containerd.shim.v1.manager']",
        f"  socket_dir = '{layout.run / 's'}'",
        "[plugins.'io.containerd.nri.v1.nri']",
        "  disable = true",
        "[plugins.'io.containerd.internal.v1.opt']",
        f"  path = '{layout.state / 'opt'}'",
        "[plugins.'io.containerd.cri.v1.images']",
        "  snapshotter = 'overlayfs'",
        "  [plugins.'io.containerd.cri.v1.images'.pinned_images]",
        f"    sandbox = '{PAUSE_IMAGE}'",
        "  [plugins.'io.containerd.cri.v1.images'.registry]",
        f"    config_path = '{layout.registry_hosts_dir}'",
        "[plugins.'io.containerd.cri.v1.runtime']",
        # The kubelet asks runc for oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE,
        # which this machine does not give, and runc then fails every sandbox.
        "  restrict_oom_score_adj = true",
        "  netns_mounts_under_state_dir = true",
        "  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]",
        "    runtime_type = 'io.containerd.runc.v2'",
        "    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]",
        f"      BinaryName = '{runc}'",
        f"      Root = '{layout.run / 'runc'}'",
        "      SystemdCgroup = false",
        "  [plugins.'io.containerd.cri.v1.runtime'.cni]",
        f"    bin_dirs = ['{cni_bin_dir}']",
        f"    conf_dir = '{layout.cni_conf_dir}'",
        "[plugins.'io.containerd.grpc.v1.cri']",
        "  stream_server_address = '127.0.0.1'",
        "  stream_server_port = '0'",
        "",
    ]
    return "\n".join(lines)


def cni_config(layout: NodeLayout, service_cidr: str) -> dict[str, Any]:
    """A bridge network that stays on this machine: the bridge is made beforehand with the
    gateway address (isGateway would turn on ip_forward host-wide), no masquerade, and no
    routes beyond the pod subnet itself, so any outside address is unreachable from a pod."""
    return {
        "cniVersion": "1.0.0",
        "name": f"joule-{layout.cluster}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": layout.pod_bridge,
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(layout.pod_subnet)}]],
                    # Only the Service range, through the bridge's own address: a pod reaches
                    # the API server at the `kubernetes` Service (api_route_rules), nothing else.
                    "routes": [{"dst": service_cidr, "gw": layout.gateway}],
                    "dataDir": str(layout.state / "cni" / "ipam"),
                },
            },
            {"type": "loopback"},
        ],
    }


def api_route_rules(layout: NodeLayout, service_ip: str, apiserver_port: int) -> list[list[str]]:
    """iptables commands by which a pod on this node reaches the API server at the
    `kubernetes` Service (``service_ip``:443), as kube-proxy would route it: a DNAT to the API
    server on 127.0.0.1, in a chain of this node's own, entered only from its pod bridge (two
    clusters' nodes each send their pods to their own API server). The bridge's
    ``route_localnet`` lets the DNAT to a loopback address through. No other Service is
    routed: the tests reach workers through headless Services (DNS to pod addresses)."""
    chain, nat = layout.api_chain, ["iptables", "-w", "-t", "nat"]
    return [
        [*nat, "-N", chain],
        [*nat, "-A", chain, "-p", "tcp", "-d", f"{service_ip}/32", "--dport", "443",
         "-j", "DNAT", "--to-destination", f"127.0.0.1:{apiserver_port}"],
        [*nat, "-I", "PREROUTING", *_api_jump(layout)],
    ]  # fmt: skip


def api_route_teardown(layout: NodeLayout) -> list[list[str]]:
    """What removes api_route_rules' work (each may fail if it is gone already)."""
    nat = ["iptables", "-w", "-t", "nat"]
    chain = layout.api_chain
    return [
        [*nat, "-D", "PREROUTING", *_api_jump(layout)],
        [*nat, "-F", chain],
        [*nat, "-X", chain],
    ]


def _api_jump(layout: NodeLayout) -> list[str]:
    return ["-i", layout.pod_bridge, "-m", "comment", "--comment", layout.owner_tag,
            "-j", layout.api_chain]  # fmt: skip


def registry_hosts(registry: str) -> dict[str, str]:
    """containerd ``hosts.toml`` files (by registry host): the mirrored registries and the
    local one itself are served by the plain-HTTP registry on ``registry`` (host:port)."""
    files = {}
    for host in MIRRORED_REGISTRIES:
        files[host] = (
            f'server = "https://{host}"\n\n'
            f'[host."http://{registry}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
    files[registry] = f'server = "http://{registry}"\n'
    return files


def kubelet_config(
    layout: NodeLayout,
    ca: Path,
    serving_cert: Path,
    serving_key: Path,
    healthz_port: int,
    taints: list[dict[str, str]],
) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Serves on the node address only: two clusters' kubelets do not share a port.
        "address": layout.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(serving_cert),
        "tlsPrivateKeyFile": str(serving_key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [layout.gateway],
        # These machines run cgroup v1 (hybrid); 1.36 refuses it unless told otherwise.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": layout.cgroup_root,
        "failSwapOn": False,
        "podLogsDir": str(layout.pod_logs),
        # Downward-API files (Joule's power-limit annotation) refresh at this period.
        "syncFrequency": "5s",
        "serializeImagePulls": False,
        "registerWithTaints": taints,
        # A shared development disk: evict nothing for disk pressure, collect images late.
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "shutdownGracePeriod": "0s",
    }


def kubelet_argv(
    kubelet: Path, layout: NodeLayout, kubeconfig: Path, labels: dict[str, str]
) -> list[str]:
    return [
        str(kubelet),
        f"--config={layout.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={layout.kubelet_dir}",
        f"--cert-dir={layout.state / 'kubelet-pki'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={layout.node_ip}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "--v=0",
    ]


def registry_config(address: str, storage: Path) -> dict[str, Any]:
    """Debian's docker-registry (distribution 2.8): plain HTTP on loopback only."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
        "http": {"addr": address},
    }


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2)
