"""Cluster DNS for the real node: CoreDNS as a host process, answering only cluster names.

Pods on the real node get ``nameserver <bridge gateway IP>`` from the kubelet
(``clusterDNS``); CoreDNS listens there and answers ``<svc>.<ns>.svc.<domain>`` and, for
headless Services, ``<hostname>.<subdomain>.<ns>.svc.<domain>`` from EndpointSlices (the
names torch.distributed workers use to find each other). Pods have no route off the machine,
so nothing is forwarded to the host's resolvers: every name outside the cluster domain gets
NXDOMAIN at once, and nothing waits on a timeout.

CoreDNS reads the API with its own client certificate (user ``joule:coredns``, see
``COREDNS_CLIENT``) and the read-only role ``coredns_rbac()`` returns; it needs nothing else.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from joule.cluster.build import BuildError, Progress, _find_go, _stderr, go_install
from joule.cluster.components import Component
from joule.cluster.nodeconfig import CLUSTER_DOMAIN
from joule.cluster.pki import ClientIdentity
from joule.cluster.settings import cache_dir

COREDNS_VERSION = "v1.15.0"
COREDNS_MODULE = "github.com/coredns/coredns"
# The identity in CoreDNS's client certificate: no groups, so RBAC grants it only the role below.
COREDNS_USER = "joule:coredns"
COREDNS_CLIENT = ClientIdentity(COREDNS_USER)

_DOMAIN = re.compile(r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\.)*[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def coredns_binary(version: str = COREDNS_VERSION, root: Path | None = None) -> Path:
    """Where CoreDNS of this version lives in the cache (built or not)."""
    return (root or cache_dir()) / "coredns" / version / "bin" / "coredns"


def build_coredns(go: str, version: str, target: Path, say: Progress) -> None:
    """``go install`` CoreDNS (its module has no replace lines) into ``target``'s folder.
    About 3 minutes cold on 2 cores, seconds with a warm Go cache."""
    go_install(go, [[f"{COREDNS_MODULE}@{version}"]], target.parent, f"coredns {version}", say)
    if not target.is_file():
        raise BuildError(f"go install {COREDNS_MODULE}@{version} left no {target}")


def ensure_coredns(
    version: str = COREDNS_VERSION, progress: Progress | None = None, root: Path | None = None
) -> Path:
    """The cached CoreDNS binary, building it first if it is missing."""
    target = coredns_binary(version, root)
    if not target.is_file():
        say = progress or _stderr
        say(f"building CoreDNS {version} once into {target.parent}")
        build_coredns(_find_go(), version, target, say)
    return target


def corefile(
    listen_ip: str,
    kubeconfig: Path | str,
    cluster_domain: str = CLUSTER_DOMAIN,
    *,
    port: int = 53,
    ready_port: int | None = None,
) -> str:
    """A Corefile that answers the cluster's names and refuses the rest, on ``listen_ip:port``.

    - ``<cluster_domain>`` and the reverse zones: the ``kubernetes`` plugin, reading the API
      with ``kubeconfig``. ``pods disabled`` (no ``a-b-c-d.<ns>.pod`` names, so no pod watch);
      headless pod names come from EndpointSlices. Unknown names: NXDOMAIN (no fallthrough).
    - every other name: NXDOMAIN from the ``template`` plugin. There is deliberately no
      ``forward``: pods cannot reach anything outside, and a forward would only hang them.
    - ``ready_port``: ``http://127.0.0.1:<ready_port>/ready`` answers 200 once the
      ``kubernetes`` plugin has synced with the API (``coredns_component``'s health URL).
    """
    ip = ipaddress.ip_address(listen_ip)
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    if not _DOMAIN.match(cluster_domain):
        raise ValueError(f"cluster domain {cluster_domain!r} is not a DNS name")
    config = str(kubeconfig)
    if not config or any(c in config for c in '"{}\n\\') or "$" in config:
        raise ValueError(f"kubeconfig path {config!r} cannot be written into a Corefile")
    ready = f"    ready 127.0.0.1:{ready_port}\n" if ready_port is not None else ""
    zones = f"{cluster_domain} in-addr.arpa ip6.arpa"
    return (
        "# Written by joule: cluster names only; nothing is forwarded off this machine.\n"
        f"{' '.join(f'{z}:{port}' for z in zones.split())} {{\n"
        f"    bind {ip}\n"
        "    errors\n"
        f"{ready}"
        f"    kubernetes {zones} {{\n"
        f'        kubeconfig "{config}"\n'
        "        pods disabled\n"
        "        ttl 5\n"
        "    }\n"
        "    cache 5\n"
        "}\n"
        f".:{port} {{\n"
        f"    bind {ip}\n"
        "    errors\n"
        "    template ANY ANY {\n"
        "        rcode NXDOMAIN\n"
        "    }\n"
        "}\n"
    )


def coredns_component(
    binary: Path, corefile_path: Path, ready_port: int | None = None
) -> Component:
    """CoreDNS as a host process reading ``corefile_path``. Give the same ``ready_port`` as
    to ``corefile()``; then the component is healthy once it has synced with the API."""
    health = f"http://127.0.0.1:{ready_port}/ready" if ready_port is not None else None
    return Component("coredns", [str(binary), "-conf", str(corefile_path)], health)


def coredns_rbac(user: str = COREDNS_USER) -> list[dict[str, Any]]:
    """A ClusterRole and ClusterRoleBinding that let ``user`` read what the ``kubernetes``
    plugin watches with this Corefile: Services, EndpointSlices, Namespaces (list and watch,
    nothing more). ``pods verified`` would also need pods; we use ``pods disabled``."""
    name = user
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "joule"}},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["services", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {
                "apiGroups": ["discovery.k8s.io"],
                "resources": ["endpointslices"],
                "verbs": ["list", "watch"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "joule"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    }
    return [role, binding]
