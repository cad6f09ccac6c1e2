"""Command lines of the control-plane processes, and the kubeconfigs they use. Pure.

The API server flags follow controller-runtime's envtest (a minimal set known to work) plus
what the issue asks for: RBAC (and Node) authorization, PodSecurity admission, TLS everywhere,
a service-account issuer and signing key. Each component gets its own identity and, where it
serves, a loopback port whose /healthz tells `joule cluster status` whether it is alive.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joule.cluster.build import Binaries
from joule.cluster.pki import Pki

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # the first address of the range: the `kubernetes` Service
POD_CIDR = "10.244.0.1/16"  # kwok hands pod IPs out of this range
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# kwok manages only nodes carrying this annotation, so that a real node agent can join later.
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    def all(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class Component:
    """One process of the control plane."""

    name: str
    argv: list[str]
    # An https (or http) URL that answers 200 once the component is serving; None: none.
    health_url: str | None


def api_url(ports: Ports) -> str:
    return f"https://127.0.0.1:{ports.apiserver}"


def components(bins: Binaries, pki: Pki, ports: Ports, state: Path) -> list[Component]:
    """The processes to start, in start order (each depends on the ones before it)."""
    kubeconfigs = state / "kubeconfigs"
    etcd = Component(
        "etcd",
        [
            str(bins.etcd),
            "--name=joule",
            f"--data-dir={state / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{ports.etcd_client}",
            f"--advertise-client-urls=http://127.0.0.1:{ports.etcd_client}",
            f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
            f"--initial-cluster=joule=http://127.0.0.1:{ports.etcd_peer}",
            # A throwaway test cluster: durability is not worth the fsync latency.
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=2147483648",
            "--log-level=warn",
        ],
        f"http://127.0.0.1:{ports.etcd_client}/health",
    )
    apiserver = Component(
        "kube-apiserver",
        [
            str(bins.kube_apiserver),
            f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports.apiserver}",
            f"--cert-dir={state / 'pki'}",
            f"--tls-cert-file={pki.serving.cert}",
            f"--tls-private-key-file={pki.serving.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # PodSecurity is on by default; naming it keeps it on if the defaults change.
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            # Privileged pods are allowed cluster-wide so that PodSecurity is what rejects them.
            "--allow-privileged=true",
            "--profiling=false",
            "--v=0",
            *_kubelet_client_flags(pki),
        ],
        f"{api_url(ports)}/readyz",
    )
    controller_manager = Component(
        "kube-controller-manager",
        [
            str(bins.kube_controller_manager),
            f"--kubeconfig={kubeconfigs / 'controller-manager.yaml'}",
            f"--authentication-kubeconfig={kubeconfigs / 'controller-manager.yaml'}",
            f"--authorization-kubeconfig={kubeconfigs / 'controller-manager.yaml'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.controller_manager}",
            f"--cert-dir={state / 'controller-manager'}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # Each controller acts as its own ServiceAccount with the bootstrap RBAC roles; the
            # system:kube-controller-manager user alone may not, for example, untaint nodes.
            "--use-service-account-credentials=true",
            "--profiling=false",
            "--v=0",
        ],
        f"https://127.0.0.1:{ports.controller_manager}/healthz",
    )
    scheduler = Component(
        "kube-scheduler",
        [
            str(bins.kube_scheduler),
            f"--kubeconfig={kubeconfigs / 'scheduler.yaml'}",
            f"--authentication-kubeconfig={kubeconfigs / 'scheduler.yaml'}",
            f"--authorization-kubeconfig={kubeconfigs / 'scheduler.yaml'}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports.scheduler}",
            f"--cert-dir={state / 'scheduler'}",
            "--leader-elect=false",
            # The default client limit (50 requests/s, bursts of 100) binds at most ~25 pods
            # a second, each binding plus its Event: a 1000-job burst waits on it, not on
            # Joule. Clusters that start thousands of pods at once raise it likewise.
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            "--profiling=false",
            "--v=0",
        ],
        f"https://127.0.0.1:{ports.scheduler}/healthz",
    )
    key, value = KWOK_NODE_ANNOTATION
    kwok = Component(
        "kwok",
        [
            str(bins.kwok),
            f"--kubeconfig={kubeconfigs / 'kwok.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
            # Node Leases: the node-lifecycle controller's heartbeat, matching the stage we load.
            "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports.kwok}",
            # kwok's default stages; also keeps a user's ~/.kwok config out of our cluster.
            f"--config={bins.kwok_stages}",
        ],
        f"http://127.0.0.1:{ports.kwok}/healthz",
    )
    return [etcd, apiserver, controller_manager, scheduler, kwok]


def _kubelet_client_flags(pki: Pki) -> list[str]:
    """How the API server reaches a real node's kubelet (logs, exec, port-forward): by its
    InternalIP (it has no DNS name here), with a client certificate, its serving cert
    checked against the cluster CA."""
    client = pki.clients.get("apiserver-kubelet-client")
    if client is None:
        return []
    return [
        f"--kubelet-client-certificate={client.cert}",
        f"--kubelet-client-key={client.key}",
        f"--kubelet-certificate-authority={pki.ca.cert}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
    ]


def kubeconfig(
    server: str, ca: Path, cert: Path, key: Path, user: str, name: str
) -> dict[str, Any]:
    """A self-contained kubeconfig (certificates inlined, so it can be copied anywhere)."""

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority-data": b64(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": user}}],
        "current-context": name,
    }
