"""An S3-compatible object store beside the local cluster: VersityGW with its POSIX backend.

Every object is a plain file under ``<cluster state>/objectstore/data/<bucket>/<key>``; its
metadata (ETag, the checksum computed at upload, content type) are extended attributes of
that file. VersityGW is built once from its published Go module
(``github.com/versity/versitygw``, no ``replace`` lines, so ``go install pkg@version``
works) and cached like Helm and Prometheus.

The server speaks HTTPS with a certificate from the cluster's CA, on ``127.0.0.1`` (tests
and tools on this machine) and, when the cluster has a real node, on the pod bridge's
address, where pods already reach CoreDNS: pods verify it with the cluster CA bundle
(the ``ca.crt`` every ServiceAccount token volume carries). One access key and secret are
generated per start and written, mode 0600, to ``<cluster state>/objectstore/store.json``;
they reach the server through its environment, not its command line, which every local user
can read in /proc.

It starts on demand (``start``), not with every ``joule cluster up``: only the tests that
stage data need it. ``start`` records the process in the cluster's state, so ``joule cluster
down`` stops it even after a test that never reached its own ``stop``.

What it does not do: verify what it serves. A file changed on disk is served as it is now,
with the ETag and checksum recorded at upload; whoever reads must check digests itself.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from joule.cluster import lifecycle, pki, process, realnode
from joule.cluster.build import BuildError, Progress, _find_go, _fmt_elapsed, _stderr, go_install
from joule.cluster.process import ProcessRecord
from joule.cluster.settings import ClusterSettings, cache_dir

VERSITYGW_VERSION = "v1.8.0"
VERSITYGW_MODULE = "github.com/versity/versitygw"
PROCESS_NAME = "objectstore"
HEALTH_PATH = "/health"
REGION = "us-east-1"
STORE_FILE = "store.json"
START_TIMEOUT_S = 30.0


class ObjectStoreError(RuntimeError):
    """The object store could not be started or found; the message says why."""


@dataclass(frozen=True)
class ObjectStore:
    """How to reach a running store: what a test (or a pod's Secret) needs to use it."""

    endpoint: str  # https://127.0.0.1:PORT, from this machine
    pod_endpoint: str | None  # https://<pod bridge address>:PORT; None without a real node
    access_key: str
    secret_key: str
    region: str
    ca_bundle: Path  # the cluster CA, which signed the server's certificate
    data_dir: Path  # one folder per bucket, one file per object
    process: ProcessRecord

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            ca_bundle=str(self.ca_bundle),
            data_dir=str(self.data_dir),
            process=self.process.to_json(),
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectStore:
        return cls(
            endpoint=str(data["endpoint"]),
            pod_endpoint=data.get("pod_endpoint"),
            access_key=str(data["access_key"]),
            secret_key=str(data["secret_key"]),
            region=str(data["region"]),
            ca_bundle=Path(data["ca_bundle"]),
            data_dir=Path(data["data_dir"]),
            process=ProcessRecord.from_json(data["process"]),
        )

    def object_path(self, bucket: str, key: str) -> Path:
        """The file holding ``bucket/key`` in the POSIX backend."""
        return self.data_dir / bucket / key


def versitygw_binary(version: str = VERSITYGW_VERSION, root: Path | None = None) -> Path:
    """Where VersityGW of this version lives in the cache (built or not)."""
    return (root or cache_dir()) / "versitygw" / version / "bin" / "versitygw"


def version_ldflags(version: str = VERSITYGW_VERSION) -> str:
    """What the release build stamps in (its Makefile's LDFLAGS, less the build time, which
    would make every build differ); ``versitygw --version`` prints it."""
    return f"-ldflags=-s -w -X=main.Version={version} -X=main.Build={VERSITYGW_MODULE}@{version}"


def ensure_versitygw(
    version: str = VERSITYGW_VERSION, progress: Progress | None = None, root: Path | None = None
) -> Path:
    """The cached versitygw binary, building it first if it is missing (about 1 minute with
    a warm Go build cache, several cold, on 2 cores; ~60 MB)."""
    target = versitygw_binary(version, root)
    if not target.is_file():
        say = progress or _stderr
        say(f"building VersityGW {version} ({VERSITYGW_MODULE}) once into {target.parent}")
        started = time.monotonic()
        go_install(
            _find_go(),
            [[f"{VERSITYGW_MODULE}/cmd/versitygw@{version}"]],
            target.parent,
            f"versitygw {version}",
            say,
            flags=[[version_ldflags(version)]],
        )
        if not target.is_file():
            raise BuildError(f"go install {VERSITYGW_MODULE}@{version} left no {target}")
        say(f"VersityGW {version} built in {_fmt_elapsed(time.monotonic() - started)}")
    return target


def versitygw_argv(
    binary: Path,
    listen: Sequence[str],
    cert: Path,
    key: Path,
    data: Path,
    health_path: str = HEALTH_PATH,
) -> list[str]:
    """The server's command line: S3 over HTTPS on each ``host:port`` in ``listen``, an
    unauthenticated ``GET <health_path>`` answering 200, objects as files under ``data``
    (the POSIX backend). Paths must be absolute: the POSIX backend works from ``data``."""
    if not listen:
        raise ValueError("the object store needs at least one address to listen on")
    for address in listen:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"listen address {address!r} is not host:port")
    for path in (cert, key, data):
        if not path.is_absolute():
            raise ValueError(f"{path} must be an absolute path")
    if not health_path.startswith("/"):
        raise ValueError(f"health path {health_path!r} must start with '/'")
    ports = [f"--port={address}" for address in listen]
    return [
        str(binary),
        *ports,
        f"--cert={cert}",
        f"--key={key}",
        f"--health={health_path}",
        "--quiet",  # no per-request log lines; errors still go to the log
        "posix",
        str(data),
    ]


def versitygw_env(access_key: str, secret_key: str, region: str = REGION) -> dict[str, str]:
    """The root credentials and region, as VersityGW reads them from its environment."""
    if not access_key or not secret_key:
        raise ValueError("the object store needs an access key and a secret key")
    return {"ROOT_ACCESS_KEY": access_key, "ROOT_SECRET_KEY": secret_key, "VGW_REGION": region}


def new_credentials() -> tuple[str, str]:
    """A fresh access key (20 characters, as AWS's) and secret (40)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    access = "JOULE" + "".join(secrets.choice(alphabet) for _ in range(15))
    return access, secrets.token_urlsafe(30)[:40]


def store_dir(settings: ClusterSettings) -> Path:
    return settings.state_dir / "objectstore"


def load(settings: ClusterSettings) -> ObjectStore | None:
    """The store this cluster runs, or None if none runs."""
    store = _read(settings)
    return store if store is not None and process.alive(store.process) else None


def _read(settings: ClusterSettings) -> ObjectStore | None:
    try:
        text = (store_dir(settings) / STORE_FILE).read_text()
    except FileNotFoundError:
        return None
    return ObjectStore.from_json(json.loads(text))


def start(
    settings: ClusterSettings, progress: Progress | None = None, binary: Path | None = None
) -> ObjectStore:
    """Start the cluster's object store (or return the one running). The cluster must be up;
    its CA signs the server's certificate, and its real node, if any, gives the address
    pods use. Data persist across restarts of the store, not across ``cluster down``."""
    say = progress or _stderr
    recorded = _read(settings)
    if recorded is not None:
        if process.alive(recorded.process):
            return recorded
        # It died (or the machine restarted): forget it, so that the cluster counts as
        # running again, and start afresh with the data left in its folder.
        lifecycle.release(settings, PROCESS_NAME)
        (store_dir(settings) / STORE_FILE).unlink()
    info = lifecycle.status(settings)
    if info is None or not info.running:
        raise ObjectStoreError(f"cluster {settings.name!r} is not running; `joule cluster up`")
    binary = binary or ensure_versitygw(progress=say)
    folder = store_dir(settings)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    hosts = ["127.0.0.1"]
    if info.node is not None:
        hosts.append(realnode.NodeRecord.from_json(info.node).layout().gateway)
    port = _free_port(hosts)
    ca = pki.KeyPair(settings.state_dir / "pki" / "ca.crt", settings.state_dir / "pki" / "ca.key")
    serving = pki.issue_serving(folder / "pki", "objectstore", ca, "localhost", tuple(hosts))
    access, secret = new_credentials()
    argv = versitygw_argv(binary, [f"{h}:{port}" for h in hosts], serving.cert, serving.key, data)
    health = f"https://127.0.0.1:{port}{HEALTH_PATH}"
    record = process.start(
        PROCESS_NAME,
        argv,
        folder / "objectstore.log",
        health,
        env={**os.environ, **versitygw_env(access, secret)},
    )
    lifecycle.adopt(settings, record)  # from here on, `cluster down` stops it
    store = ObjectStore(
        endpoint=f"https://127.0.0.1:{port}",
        pod_endpoint=f"https://{hosts[1]}:{port}" if len(hosts) > 1 else None,
        access_key=access,
        secret_key=secret,
        region=REGION,
        ca_bundle=ca.cert,
        data_dir=data,
        process=record,
    )
    path = folder / STORE_FILE
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(json.dumps(store.to_json(), indent=2) + "\n")
    _wait_healthy(store)
    say(f"object store (VersityGW {VERSITYGW_VERSION}) at {store.endpoint}, data in {data}")
    return store


def stop(settings: ClusterSettings, keep_data: bool = False) -> None:
    """Stop the cluster's object store and forget it; its data go too unless ``keep_data``."""
    folder = store_dir(settings)
    store = _read(settings)
    if store is None:
        return
    process.stop([store.process])
    if process.alive(store.process):
        raise ObjectStoreError(f"could not stop the object store (pid {store.process.pid})")
    lifecycle.release(settings, PROCESS_NAME)
    (folder / STORE_FILE).unlink()
    if not keep_data:
        shutil.rmtree(folder, ignore_errors=True)


def healthy(store: ObjectStore, timeout: float = 2.0) -> bool:
    """Whether the store answers its health check over TLS verified against the cluster CA."""
    url = f"{store.endpoint}{HEALTH_PATH}"
    return process.alive(store.process) and process.healthy(
        url, ca=store.ca_bundle, timeout=timeout
    )


def _wait_healthy(store: ObjectStore) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not healthy(store, timeout=1.0):
        log = store.process.log
        if not process.alive(store.process):
            raise ObjectStoreError(
                f"the object store exited at start. Last lines of {log}:\n{process.log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ObjectStoreError(
                f"the object store did not answer {HEALTH_PATH} within {START_TIMEOUT_S:.0f}s. "
                f"Last lines of {log}:\n{process.log_tail(log)}"
            )
        time.sleep(0.1)


def _free_port(hosts: Sequence[str]) -> int:
    """A port free on every one of ``hosts`` (the server listens on all of them)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        if all(_bindable(host, port) for host in hosts[1:]):
            return port
    raise ObjectStoreError(f"no port free on all of {', '.join(hosts)}")


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
