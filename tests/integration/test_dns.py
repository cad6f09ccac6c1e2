"""CoreDNS against the real control plane: headless-Service pod names resolve to the pod IPs
kwok gives, with CoreDNS reading the API as `joule:coredns` under the role `coredns_rbac()`
returns; anything outside the cluster gets NXDOMAIN at once (nothing is forwarded)."""

from __future__ import annotations

import datetime as dt
import random
import socket
import struct
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client

from joule.cluster import process
from joule.cluster.components import kubeconfig
from joule.cluster.dns import (
    COREDNS_CLIENT,
    coredns_component,
    coredns_rbac,
    corefile,
    ensure_coredns,
)
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.cluster

NXDOMAIN = 3


def issue_client_cert(ca_dir: Path, out: Path, user: str) -> tuple[Path, Path]:
    """A client certificate for ``user`` signed by the running cluster's CA (what pki.generate
    does for the components when the cluster starts)."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "coredns.crt", out / "coredns.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def query_a(server: tuple[str, int], name: str, timeout: float = 2.0) -> tuple[int, list[str]]:
    """One raw DNS query over UDP for ``name``'s A records: (rcode, addresses)."""
    qid = random.randrange(1 << 16)
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split("."))
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + b"\0" + b"\0\1\0\1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, server)
        data, _ = sock.recvfrom(4096)
    rid, flags, qdcount, ancount, _, _ = struct.unpack(">HHHHHH", data[:12])
    assert rid == qid

    def skip_name(pos: int) -> int:
        while data[pos]:
            if data[pos] & 0xC0 == 0xC0:  # a compression pointer ends the name
                return pos + 2
            pos += data[pos] + 1
        return pos + 1

    pos = 12
    for _ in range(qdcount):
        pos = skip_name(pos) + 4
    addresses = []
    for _ in range(ancount):
        pos = skip_name(pos)
        rtype, _cls, _ttl, length = struct.unpack(">HHIH", data[pos : pos + 10])
        pos += 10
        if rtype == 1:
            addresses.append(socket.inet_ntoa(data[pos : pos + length]))
        pos += length
    return flags & 0xF, sorted(addresses)


@pytest.fixture
def coredns(cluster, kubectl, tmp_path):
    """CoreDNS on 127.0.0.1:<free port>, as the lead's node will run it (on the bridge IP)."""
    state = cluster.kubeconfig.parent
    cert, key = issue_client_cert(state / "pki", tmp_path, COREDNS_CLIENT.user)
    config = kubeconfig(
        cluster.server, state / "pki" / "ca.crt", cert, key, COREDNS_CLIENT.user, "joule"
    )
    config_path = tmp_path / "coredns-kubeconfig.yaml"
    config_path.write_text(yaml.safe_dump(config))
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(coredns_rbac()))

    port, ready_port = free_port(), free_port()
    corefile_path = tmp_path / "Corefile"
    corefile_path.write_text(corefile("127.0.0.1", config_path, port=port, ready_port=ready_port))
    comp = coredns_component(ensure_coredns(progress=print), corefile_path, ready_port)
    log = tmp_path / "coredns.log"
    record = process.start(comp.name, comp.argv, log, comp.health_url)
    try:
        assert comp.health_url is not None
        wait_for(
            lambda: process.healthy(comp.health_url, timeout=1.0) or not process.alive(record),
            timeout=60,
            what="CoreDNS to sync with the API",
        )
        assert process.alive(record), process.log_tail(log)
        yield ("127.0.0.1", port), log
    finally:
        process.stop([record])


def worker_pod(name: str, subdomain: str) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"app": subdomain}),
        spec=client.V1PodSpec(
            hostname=name,
            subdomain=subdomain,
            containers=[client.V1Container(name="worker", image="ghcr.io/joule-dev/trainer:test")],
        ),
    )


def test_headless_service_pod_names_resolve_to_pod_ips(coredns, core, namespace):
    server, log = coredns
    core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="workers"),
            spec=client.V1ServiceSpec(
                cluster_ip="None",
                selector={"app": "workers"},
                # As the operator's worker Service (builders/service.py): names resolve
                # before the workers are Ready.
                publish_not_ready_addresses=True,
                ports=[client.V1ServicePort(name="c10d", port=29500)],
            ),
        ),
    )
    names = ["workers-0", "workers-1"]
    for name in names:
        core.create_namespaced_pod(namespace, worker_pod(name, "workers"))

    def pod_ips() -> dict[str, str] | None:
        pods = {p.metadata.name: p.status.pod_ip for p in core.list_namespaced_pod(namespace).items}
        return pods if all(pods.get(n) for n in names) else None

    ips = wait_for(pod_ips, timeout=60, what="kwok to give the pods IPs")
    domain = f"{namespace}.svc.cluster.local"

    def resolves(name: str, want: list[str]) -> bool:
        return query_a(server, name) == (0, want)

    for name in names:
        fqdn = f"{name}.workers.{domain}"
        wait_for(lambda fqdn=fqdn, name=name: resolves(fqdn, [ips[name]]), what=fqdn)
    want = sorted(ips.values())
    wait_for(lambda: resolves(f"workers.{domain}", want), what=f"workers.{domain}")

    # Inside the zone but unknown: NXDOMAIN from the kubernetes plugin (no fallthrough).
    assert query_a(server, f"workers-9.workers.{domain}")[0] == NXDOMAIN
    assert query_a(server, f"nothing.{domain}")[0] == NXDOMAIN
    assert "forbidden" not in log.read_text().lower(), process.log_tail(log)


@pytest.mark.parametrize("name", ["example.com", "pypi.org", "localhost", "kubernetes.default"])
def test_names_outside_the_cluster_fail_fast(coredns, name):
    server, _ = coredns
    started = time.monotonic()
    rcode, addresses = query_a(server, name, timeout=2.0)
    elapsed = time.monotonic() - started
    assert (rcode, addresses) == (NXDOMAIN, [])
    assert elapsed < 2.0
