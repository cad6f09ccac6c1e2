"""Pod networking on one machine, without network namespaces. Pure.

Every pod gets an address of its own in 127.0.0.0/8 (Linux routes the whole block to the
loopback device, so any of them can be bound). What a cluster gives through DNS and separate
network namespaces is emulated in the pod's environment: a pod's DNS name
(``<hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]]``) becomes its address, and a
``name:port`` becomes ``address:host-port``, where the host port is unique on the machine,
because a server that binds every interface (torch's TCPStore does) would otherwise collide
with the same port of another pod.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# 127.0.0.1 is the machine's own; pods start above it.
FIRST_POD_ADDRESS = int(ipaddress.IPv4Address("127.0.1.1"))
LAST_POD_ADDRESS = int(ipaddress.IPv4Address("127.255.255.254"))


class AddressPool:
    """Hands out loopback addresses, one per pod UID; freed addresses are reused last."""

    def __init__(self) -> None:
        self._by_uid: dict[str, str] = {}
        self._next = FIRST_POD_ADDRESS

    def address(self, uid: str) -> str:
        if uid not in self._by_uid:
            used = set(self._by_uid.values())
            while True:
                candidate = str(ipaddress.IPv4Address(self._next))
                self._next = self._next + 1 if self._next < LAST_POD_ADDRESS else FIRST_POD_ADDRESS
                if candidate not in used:
                    break
            self._by_uid[uid] = candidate
        return self._by_uid[uid]

    def release(self, uid: str) -> None:
        self._by_uid.pop(uid, None)


def dns_names(pod: Mapping[str, Any]) -> list[str]:
    """The names cluster DNS would give ``pod`` (only pods with hostname and subdomain have
    them), longest first so that a longer name is matched before its prefix."""
    spec, meta = pod.get("spec", {}), pod.get("metadata", {})
    host, sub = spec.get("hostname"), spec.get("subdomain")
    if not (host and sub):
        return []
    ns = meta.get("namespace", "default")
    base = f"{host}.{sub}"
    return [f"{base}.{ns}.svc.cluster.local", f"{base}.{ns}.svc", f"{base}.{ns}", base]


def rewrite(
    value: str,
    names: Mapping[str, str],
    host_port: Callable[[str, int], int],
) -> str:
    """``value`` with every pod name replaced by its address, and a port after a name by
    that pod's host port. Names must be whole: ``a.b`` does not match inside ``xa.b.c``."""
    if not names or not value:
        return value
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({alternatives})(?::(\d+))?(?![\w.-])")

    def sub(match: re.Match[str]) -> str:
        address = names[match.group(1)]
        if match.group(2) is None:
            return address
        return f"{address}:{host_port(address, int(match.group(2)))}"

    return pattern.sub(sub, value)


class PortMap:
    """(pod address, container port) -> a port of this machine, stable while the pod lives.
    ``pick`` chooses a free port (I/O, injected) and is never asked twice for one pair."""

    def __init__(self, pick: Callable[[Iterable[int]], int]) -> None:
        self._pick = pick
        self._ports: dict[tuple[str, int], int] = {}

    def __call__(self, address: str, port: int) -> int:
        key = (address, port)
        if key not in self._ports:
            self._ports[key] = self._pick(self._ports.values())
        return self._ports[key]

    def release(self, address: str) -> None:
        for key in [k for k in self._ports if k[0] == address]:
            del self._ports[key]
