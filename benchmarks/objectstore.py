"""The object store's cost on this machine: binary size, idle memory, and 100 MiB up and down
over HTTPS on loopback with the MinIO SDK (what the tests use). Prints figures.

    .venv/bin/python benchmarks/objectstore.py [--mib 100] [--rounds 3]

Runs the cached VersityGW (built first if missing) exactly as ``objectstore.start`` does
(same command line, environment and a certificate from a fresh CA), but without a cluster,
in a temporary folder removed at the end. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import urllib3
from minio import Minio

from joule.cluster import pki, process
from joule.cluster.objectstore import (
    HEALTH_PATH,
    VERSITYGW_VERSION,
    ensure_versitygw,
    new_credentials,
    versitygw_argv,
    versitygw_env,
)

CHUNK = 1 << 20


def say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="object size (MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    binary = ensure_versitygw(progress=say)
    print(f"VersityGW {VERSITYGW_VERSION}: {binary.stat().st_size / 2**20:.1f} MiB binary")
    with tempfile.TemporaryDirectory(prefix="joule-s3-bench-") as tmp:
        folder = Path(tmp)
        keys = pki.generate(folder / "pki", "10.96.0.1", {})
        data = folder / "data"
        data.mkdir()
        port = free_port()
        access, secret = new_credentials()
        argv = versitygw_argv(
            binary, [f"127.0.0.1:{port}"], keys.serving.cert, keys.serving.key, data
        )
        began = time.monotonic()
        record = process.start(
            "objectstore",
            argv,
            folder / "objectstore.log",
            env={**os.environ, **versitygw_env(access, secret)},
        )
        try:
            url = f"https://127.0.0.1:{port}{HEALTH_PATH}"
            while not process.healthy(url, ca=keys.ca.cert, timeout=1.0):
                time.sleep(0.05)
            print(f"healthy {time.monotonic() - began:.2f} s after start")
            time.sleep(5)
            print(f"idle RSS {process.rss_bytes(record.pid) / 2**20:.1f} MiB")
            http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(keys.ca.cert))
            s3 = Minio(
                f"127.0.0.1:{port}", access, secret, secure=True, region="us-east-1",
                http_client=http,
            )  # fmt: skip
            s3.make_bucket("bench")
            payload = os.urandom(args.mib * 2**20)
            digest = hashlib.sha256(payload).hexdigest()
            ups, downs = [], []
            for n in range(args.rounds):
                key = f"object-{n}"
                t0 = time.monotonic()
                s3.put_object("bench", key, io.BytesIO(payload), len(payload))
                ups.append(time.monotonic() - t0)
                t0 = time.monotonic()
                response = s3.get_object("bench", key)
                check = hashlib.sha256()
                for chunk in response.stream(CHUNK):
                    check.update(chunk)
                response.close()
                response.release_conn()
                downs.append(time.monotonic() - t0)
                if check.hexdigest() != digest:
                    print("download differs from upload!")
            rss = process.rss_bytes(record.pid) or 0
            for name, times in (("upload", ups), ("download+sha256", downs)):
                rates = [args.mib / t for t in times]
                print(
                    f"{name}: median {statistics.median(rates):.0f} MiB/s "
                    f"({', '.join(f'{r:.0f}' for r in rates)}) for {args.mib} MiB"
                )
            t0 = time.monotonic()
            hashlib.sha256(payload).hexdigest()
            print(f"(sha256 alone: {args.mib / (time.monotonic() - t0):.0f} MiB/s)")
            print(f"RSS after: {rss / 2**20:.1f} MiB")
        finally:
            process.stop([record])
    return 0


if __name__ == "__main__":
    sys.exit(main())
