"""``joule-data stage --s3`` against the cluster's object store (VersityGW over HTTPS, verified
with the cluster CA), run as the staging pod runs it: a dataset made by ``joule-data
prepare`` and uploaded with the MinIO SDK is staged and verified; an object changed in the
bucket, wrong credentials, a missing prefix and an unreachable or untrusted server each end
with their own exit code and one line; a second run fetches only what is missing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import urllib3
from minio import Minio

from joule.cluster.objectstore import ObjectStore
from tests.integration.test_objectstore import pod_netns  # noqa: F401 - a fixture used below

pytestmark = pytest.mark.cluster

JOULE_DATA = str(Path(sys.executable).parent / "joule-data")


def client(store: ObjectStore) -> Minio:
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(store.ca_bundle))
    return Minio(
        store.endpoint.removeprefix("https://"),
        access_key=store.access_key,
        secret_key=store.secret_key,
        secure=True,
        region=store.region,
        http_client=http,
    )


def prepare(root: Path, text_bytes: int, shard_tokens: int) -> Path:
    """A dataset made by the real `joule-data prepare` (bytes tokenizer: 2 bytes a token)."""
    text = root / "in.txt"
    text.write_bytes(os.urandom(text_bytes))
    out = root / "ds"
    run = subprocess.run(
        [JOULE_DATA, "prepare", str(text), "--out", str(out), "--tokenizer", "bytes",
         "--shard-tokens", str(shard_tokens)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return out


def upload(store: ObjectStore, dataset: Path, bucket: str, prefix: str) -> None:
    s3 = client(store)
    for path in sorted(dataset.iterdir()):
        s3.fput_object(bucket, f"{prefix}/{path.name}", str(path))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """5 shards, ~3.6 MiB."""
    out = prepare(tmp_path_factory.mktemp("stage-s3"), 1_900_000, 400_000)
    assert len(json.loads((out / "manifest.json").read_text())["shards"]) == 5
    return out


@pytest.fixture
def bucket(object_store: ObjectStore) -> str:
    name = f"stage-{uuid.uuid4().hex[:12]}"
    client(object_store).make_bucket(name)
    return name


def stage(
    store: ObjectStore,
    location: str,
    into: Path,
    term: Path,
    *,
    secret: str | None = None,
    access: str | None = None,
    endpoint: str | None = None,
    ca: bool = True,
    netns: str | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.CompletedProcess[str], str]:
    env = dict(os.environ)
    env["AWS_ACCESS_KEY_ID"] = access or store.access_key
    env["AWS_SECRET_ACCESS_KEY"] = secret or store.secret_key
    argv = [JOULE_DATA, "stage", "--s3", location, "--endpoint", endpoint or store.endpoint]
    argv += ["--region", store.region, "--into", str(into), "--termination-log", str(term)]
    argv += ["--metrics-port", "0", *extra]
    if ca:
        argv += ["--ca-bundle", str(store.ca_bundle)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    term.unlink(missing_ok=True)
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    return run, term.read_text() if term.exists() else ""


def expected(dataset: Path, skipped: int) -> dict:
    raw = (dataset / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    return {
        "files": len(manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "manifestDigest": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "version": manifest["version"],
        "skipped": skipped,
    }


def assert_staged(cache: Path, dataset: Path, message: str, skipped: int) -> dict:
    result = json.loads(message)
    seconds = result.pop("seconds")
    assert seconds > 0
    assert result == expected(dataset, skipped)
    names = {p.name for p in cache.iterdir()} - {".joule-stage.lock"}
    assert sorted(names) == sorted(p.name for p in dataset.iterdir())
    for path in dataset.iterdir():
        assert (cache / path.name).read_bytes() == path.read_bytes(), path.name
    verify = subprocess.run([JOULE_DATA, "verify", str(cache)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    return {**result, "seconds": seconds}


def test_a_dataset_is_staged_from_the_bucket_and_a_second_run_fetches_nothing(
    object_store, bucket, small, tmp_path
):
    upload(object_store, small, bucket, "datasets/small")
    cache, term = tmp_path / "cache", tmp_path / "term"
    run, message = stage(object_store, f"{bucket}/datasets/small", cache, term)
    assert run.returncode == 0, run.stderr
    assert_staged(cache, small, message, skipped=0)
    assert run.stdout.startswith(f"joule-data: staged s3://{bucket}/datasets/small/ into {cache}")
    run, message = stage(object_store, f"{bucket}/datasets/small/", cache, term)
    assert run.returncode == 0, run.stderr
    assert_staged(cache, small, message, skipped=5)
    assert ", 0.0 MiB fetched in " in run.stdout


def test_an_object_changed_in_the_bucket_is_refused_by_name(object_store, bucket, small, tmp_path):
    upload(object_store, small, bucket, "ds")
    manifest = json.loads((small / "manifest.json").read_text())
    entry = manifest["shards"][2]
    data = bytearray((small / entry["file"]).read_bytes())
    data[len(data) // 2] ^= 0x40
    client(object_store).put_object(bucket, f"ds/{entry['file']}", io.BytesIO(data), len(data))
    cache, term = tmp_path / "cache", tmp_path / "term"
    run, message = stage(object_store, f"{bucket}/ds", cache, term)
    line = (
        f"{entry['file']}: sha256 {hashlib.sha256(data).hexdigest()} does not match the "
        f"manifest's {entry['sha256']} (from s3://{bucket}/ds/{entry['file']})"
    )
    assert (run.returncode, message) == (65, line)
    assert run.stderr.endswith(f"joule-data: {line}\n")
    assert not (cache / "manifest.json").exists()
    assert not (cache / f"{entry['file']}.part").exists()


def test_wrong_credentials_are_exit_77_with_the_servers_error_code(
    object_store, bucket, small, tmp_path
):
    upload(object_store, small, bucket, "ds")
    cache, term = tmp_path / "cache", tmp_path / "term"
    run, message = stage(object_store, f"{bucket}/ds", cache, term, secret="wrong-" * 7)
    assert run.returncode == 77, run.stderr
    assert message.startswith(
        f"s3://{bucket}/ds/: {object_store.endpoint} refused access to ds/manifest.json: "
        "SignatureDoesNotMatch"
    )
    assert run.stderr.endswith(f"joule-data: {message}\n")
    # An access key the server does not know (VersityGW's word for AWS's InvalidAccessKeyId).
    run, message = stage(object_store, f"{bucket}/ds", cache, term, access="AKIAUNKNOWN0000000")
    assert run.returncode == 77, run.stderr
    assert message.startswith(f"s3://{bucket}/ds/: {object_store.endpoint} refused access")
    assert "XAdminUserNotFound" in message
    assert not cache.exists()  # refused before anything was made


def test_a_missing_prefix_or_bucket_is_exit_66_naming_it(object_store, bucket, tmp_path):
    cache, term = tmp_path / "cache", tmp_path / "term"
    run, message = stage(object_store, f"{bucket}/nothing/here", cache, term)
    assert run.returncode == 66, run.stderr
    assert message.startswith(
        f"manifest.json: no object nothing/here/manifest.json in bucket {bucket} at "
        f"{object_store.endpoint}: NoSuchKey"
    )
    run, message = stage(object_store, "no-such-bucket-joule/ds", cache, term)
    assert run.returncode == 66, run.stderr
    assert message.startswith(
        f"s3://no-such-bucket-joule/ds/: no bucket no-such-bucket-joule at "
        f"{object_store.endpoint}: NoSuchBucket"
    )


def test_an_unreachable_or_untrusted_server_is_exit_69_saying_which(object_store, tmp_path):
    cache, term = tmp_path / "cache", tmp_path / "term"
    # Without --ca-bundle the system's CAs are used, and they do not know the cluster CA.
    run, message = stage(object_store, "any/ds", cache, term, ca=False)
    assert run.returncode == 69, run.stderr
    assert message.startswith(
        f"s3://any/ds/: {object_store.endpoint} cannot be reached: TLS verification failed: "
        "unable to get local issuer certificate"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"https://127.0.0.1:{s.getsockname()[1]}"
    run, message = stage(object_store, "any/ds", cache, term, endpoint=closed)
    assert (run.returncode, message) == (
        69,
        f"s3://any/ds/: {closed} cannot be reached: connection refused",
    )


def test_a_second_run_fetches_only_what_is_missing_or_cut_short(
    object_store, bucket, small, tmp_path
):
    upload(object_store, small, bucket, "ds")
    cache, term = tmp_path / "cache", tmp_path / "term"
    run, message = stage(object_store, f"{bucket}/ds", cache, term)
    assert run.returncode == 0, run.stderr
    (cache / "shard-00001.npy").unlink()
    data = (cache / "shard-00003.npy").read_bytes()
    (cache / "shard-00003.npy").rename(cache / "shard-00003.npy.part")
    os.truncate(cache / "shard-00003.npy.part", len(data) // 3)
    (cache / "manifest.json").unlink()

    run, message = stage(object_store, f"{bucket}/ds", cache, term)
    assert run.returncode == 0, run.stderr
    assert_staged(cache, small, message, skipped=3)
    # The .part was continued (the server answered the range request with 206), not restarted.
    assert f"continuing shard-00003.npy from byte {len(data) // 3} of {len(data)}" in run.stderr
    assert "fetching shard-00003.npy afresh" not in run.stderr
    assert "joule-data: staging 2 of 5 files " in run.stderr


def test_staging_rate_for_a_50_mib_dataset(object_store, bucket, tmp_path):
    """The figures for the README (printed, not asserted): ~50 MiB in 2 MiB shards, over
    HTTPS on loopback, each file hashed as it is written and fsynced; 4 files at a time (the
    default) and 1."""
    data = prepare(tmp_path, 26_000_000, 1_048_576)
    upload(object_store, data, bucket, "big")
    for parallel in ("4", "1"):
        cache, term = tmp_path / f"cache-{parallel}", tmp_path / "term"
        run, message = stage(
            object_store, f"{bucket}/big", cache, term, extra=("--parallel", parallel)
        )
        assert run.returncode == 0, run.stderr
        result = assert_staged(cache, data, message, skipped=0)
        assert result["bytes"] > 49 * 2**20
        rate = result["bytes"] / 2**20 / result["seconds"]
        print(
            f"\nstaged {result['bytes'] / 2**20:.1f} MiB in {result['files']} files from the "
            f"object store, --parallel {parallel}, in {result['seconds']:.2f} s: {rate:.0f} MiB/s"
        )
    run, message = stage(object_store, f"{bucket}/big", cache, term)
    assert run.returncode == 0, run.stderr
    again = json.loads(message)
    assert again["skipped"] == result["files"]
    print(f"re-run over the complete cache (every file rehashed): {again['seconds']:.2f} s")


def test_a_pods_network_stages_from_the_pod_endpoint(
    object_store, bucket, small, request, tmp_path
):
    """As the staging pod will: from a pod's network (a namespace on the real node's pod
    bridge), at the store's pod address, verified with the cluster CA (in a pod, the
    ServiceAccount volume's ca.crt)."""
    netns = request.getfixturevalue("pod_netns")
    assert object_store.pod_endpoint is not None
    upload(object_store, small, bucket, "ds")
    cache, term = tmp_path / "cache", tmp_path / "term"
    where = f"{bucket}/ds"
    run, message = stage(
        object_store, where, cache, term, endpoint=object_store.pod_endpoint, netns=netns
    )
    assert run.returncode == 0, run.stderr
    assert_staged(cache, small, message, skipped=0)
