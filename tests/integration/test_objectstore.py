"""The cluster's S3 object store (VersityGW, POSIX backend) with a real S3 client (the MinIO
SDK, which signs with SigV4 as boto3 does): buckets, uploads, listings and reads over TLS
verified against the cluster CA; wrong credentials refused with their S3 error codes; and
what a file changed on disk does (it is served changed: readers must verify digests)."""

from __future__ import annotations

import hashlib
import io
import os
import ssl
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import urllib3
from cryptography import x509
from minio import Minio
from minio.error import S3Error

from joule.cluster import lifecycle, objectstore, realnode
from joule.cluster.objectstore import HEALTH_PATH, ObjectStore
from joule.cluster.settings import ClusterSettings
from tests.conftest import TEST_CLUSTER

pytestmark = pytest.mark.cluster

OBJECTS = {
    "shards/train-00000.bin": os.urandom(300_000),
    "shards/train-00001.bin": os.urandom(70_000),
    "shards/sub/index.json": b'{"shards": 2}\n',
    "other/readme.txt": b"not under the prefix\n",
}


def client(store: ObjectStore, access: str = "", secret: str = "", ca: str = "") -> Minio:
    """An S3 client that verifies the server against ``ca`` (the store's CA bundle unless
    told otherwise), retrying nothing, so that each test sees the first answer."""
    http = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca or str(store.ca_bundle),
        retries=urllib3.Retry(total=0),
        timeout=urllib3.Timeout(connect=5, read=60),
    )
    return Minio(
        store.endpoint.removeprefix("https://"),
        access_key=access or store.access_key,
        secret_key=secret or store.secret_key,
        secure=True,
        region=store.region,
        http_client=http,
    )


def read(s3: Minio, bucket: str, key: str, **kwargs) -> tuple[bytes, dict[str, str]]:
    response = s3.get_object(bucket, key, **kwargs)
    try:
        return response.read(), dict(response.headers)
    finally:
        response.close()
        response.release_conn()


@pytest.fixture
def bucket(object_store: ObjectStore) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    client(object_store).make_bucket(name)
    return name


def test_buckets_objects_and_listings_over_verified_tls(object_store, bucket):
    s3 = client(object_store)
    assert bucket in {b.name for b in s3.list_buckets()}
    for key, data in OBJECTS.items():
        s3.put_object(bucket, key, io.BytesIO(data), len(data))

    listed = {o.object_name: o.size for o in s3.list_objects(bucket, "shards/", recursive=True)}
    assert listed == {k: len(v) for k, v in OBJECTS.items() if k.startswith("shards/")}
    top = sorted(o.object_name for o in s3.list_objects(bucket, "shards/"))
    assert top == ["shards/sub/", "shards/train-00000.bin", "shards/train-00001.bin"]

    for key, data in OBJECTS.items():
        body, headers = read(s3, bucket, key)
        assert body == data, key
        # A single-part upload's ETag is the MD5 of its bytes.
        assert headers["ETag"].strip('"') == hashlib.md5(data).hexdigest()
        # The POSIX backend: each object is a plain file with those bytes.
        assert object_store.object_path(bucket, key).read_bytes() == data


def test_the_certificate_is_the_cluster_cas_and_nothing_else_trusts_it(object_store, tmp_path):
    cert = ssl.get_server_certificate(("127.0.0.1", int(object_store.endpoint.rsplit(":", 1)[1])))
    issuer = x509.load_pem_x509_certificate(cert.encode()).issuer.rfc4514_string()
    ca = x509.load_pem_x509_certificate(object_store.ca_bundle.read_bytes())
    assert issuer == ca.subject.rfc4514_string() == "CN=joule-local-ca"
    # A client with the system's trust store (not the cluster CA) refuses the server.
    system_ca = ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().capath
    assert system_ca, "no system CA bundle to compare with"
    with pytest.raises(urllib3.exceptions.MaxRetryError) as failure:
        client(object_store, ca=system_ca).list_buckets()
    assert isinstance(failure.value.reason, urllib3.exceptions.SSLError)


def test_a_wrong_secret_gets_signature_does_not_match(object_store, bucket):
    with pytest.raises(S3Error) as refused:
        client(object_store, secret="not-the-secret-" * 3).list_objects(bucket).__next__()
    assert refused.value.code == "SignatureDoesNotMatch"
    assert refused.value.response.status == 403


def test_an_unknown_access_key_is_refused(object_store, bucket):
    # AWS says InvalidAccessKeyId; VersityGW in single-account mode says the user is unknown.
    with pytest.raises(S3Error) as refused:
        client(object_store, access="AKIAUNKNOWNUSER00000").list_objects(bucket).__next__()
    assert refused.value.code == "XAdminUserNotFound"
    assert 400 <= refused.value.response.status < 500


def test_a_file_changed_on_disk_is_served_changed_with_its_old_digests(object_store, bucket):
    """VersityGW keeps the ETag (MD5) and the CRC64NVME checksum computed at upload as
    extended attributes, and does not check them on reads: a flipped byte on disk is served
    as it is, under the old digests. The data-staging step must verify digests itself."""
    s3 = client(object_store)
    data = os.urandom(256 * 1024)
    s3.put_object(bucket, "shard.bin", io.BytesIO(data), len(data))
    checksum_mode = {"request_headers": {"x-amz-checksum-mode": "ENABLED"}}
    _, before = read(s3, bucket, "shard.bin", **checksum_mode)
    assert before["x-amz-checksum-crc64nvme"]

    path = object_store.object_path(bucket, "shard.bin")
    with open(path, "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0x01]))

    body, after = read(s3, bucket, "shard.bin", **checksum_mode)
    assert len(body) == len(data) and body != data
    assert body[12345] == data[12345] ^ 0x01
    assert body[:12345] == data[:12345] and body[12346:] == data[12346:]
    # The digests served are the ones recorded at upload: they no longer match the bytes.
    assert after["ETag"] == before["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    assert after["ETag"].strip('"') != hashlib.md5(body).hexdigest()
    assert after["x-amz-checksum-crc64nvme"] == before["x-amz-checksum-crc64nvme"]


def test_pods_address_health_and_cluster_records(object_store, cluster):
    context = ssl.create_default_context(cafile=str(object_store.ca_bundle))
    urls = [object_store.endpoint]
    # CI runs as root on Linux: there the cluster has a real node, and pods must reach it.
    assert (cluster.node is not None) == (realnode.unavailable_reason() is None)
    if cluster.node is not None:
        # Where pods reach it: the pod bridge's address, as CoreDNS; the certificate names it.
        assert object_store.pod_endpoint is not None
        urls.append(object_store.pod_endpoint)
    for url in urls:
        with urllib.request.urlopen(f"{url}{HEALTH_PATH}", context=context, timeout=5) as r:
            assert r.status == 200, url

    settings = ClusterSettings(name=TEST_CLUSTER)
    info = lifecycle.status(settings)
    assert info is not None and info.running
    [component] = [c for c in info.components if c.name == objectstore.PROCESS_NAME]
    assert component.alive and component.healthy and component.adopted
    assert objectstore.PROCESS_NAME not in {r.name for r in info.processes}
    assert component.rss_bytes is not None and component.rss_bytes < 200 * 2**20
    # A second start finds the running store instead of starting another.
    assert objectstore.start(settings) == object_store
    # The credentials sit in the cluster's state, readable by its owner only.
    saved = objectstore.store_dir(settings) / objectstore.STORE_FILE
    assert saved.stat().st_mode & 0o077 == 0
    cmdline = Path(f"/proc/{object_store.process.pid}/cmdline").read_bytes()
    assert object_store.secret_key.encode() not in cmdline


POD_SCRIPT = """
import io, os, ssl, sys, urllib.request, urllib3
from minio import Minio
endpoint, ca, access, secret, bucket = sys.argv[1:]
with urllib.request.urlopen(endpoint + "/health", context=ssl.create_default_context(cafile=ca),
                            timeout=5) as r:
    assert r.status == 200
http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca, retries=urllib3.Retry(0))
s3 = Minio(endpoint.removeprefix("https://"), access, secret, secure=True, http_client=http)
s3.put_object(bucket, "from-the-pod-network", io.BytesIO(b"hello"), 5)
print(s3.get_object(bucket, "from-the-pod-network").read().decode())
"""


@pytest.fixture
def pod_netns(cluster):
    """A network namespace wired to the real node's pod bridge as the CNI bridge plugin wires
    a pod (a veth, an address of the pod subnet, no default route): what a pod's network
    sees, without a container image. Removed afterwards."""
    if cluster.node is None:
        pytest.fail("the test cluster has no real node: tests run as root on Linux (README)")
    layout = realnode.NodeRecord.from_json(cluster.node).layout()
    name = f"jls3-{uuid.uuid4().hex[:6]}"
    host_end = f"{name}h"
    address = f"{layout.pod_subnet.network_address + 250}/{layout.pod_subnet.prefixlen}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("link", "set", host_end, "master", layout.pod_bridge, "up")
        ip("-n", name, "addr", "add", address, "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_a_pod_on_the_real_node_uses_it_over_verified_tls(object_store, bucket, pod_netns):
    assert object_store.pod_endpoint is not None
    argv = [object_store.pod_endpoint, str(object_store.ca_bundle), object_store.access_key]
    argv += [object_store.secret_key, bucket]
    run = subprocess.run(
        ["ip", "netns", "exec", pod_netns, sys.executable, "-c", POD_SCRIPT, *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "hello"
    # From the pod network the loopback endpoint is another machine's loopback: unreachable.
    local = subprocess.run(
        ["ip", "netns", "exec", pod_netns, sys.executable, "-c",
         "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)",
         object_store.endpoint.rsplit(":", 1)[1]],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert local.returncode != 0 and "ConnectionRefusedError" in local.stderr
