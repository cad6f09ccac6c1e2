"""Shared fixtures. The control plane comes up once per test run, on first use, and goes down
at the end; each test that needs it gets its own namespace."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from joule.cluster import ClusterInfo, ClusterSettings, down, up

# JOULE_TEST_CLUSTER lets two test runs on one machine use separate control planes.
TEST_CLUSTER = os.environ.get("JOULE_TEST_CLUSTER", "pytest")


@dataclass
class Kubectl:
    """A command line tool against the test cluster's kubeconfig."""

    binary: Path
    kubeconfig: Path
    timeout: float = 120

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=self.timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.binary.name} {' '.join(args)} failed: {proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterInfo]:
    # A real node too (root on Linux, as CI runs), tainted so that only the tests that ask
    # for it (the `local_node` fixture's placement) run pods there; the rest use kwok nodes.
    settings = ClusterSettings(name=TEST_CLUSTER, node_taints=(RealNode.taint,))
    info = up(settings, progress=lambda m: print(f"joule: {m}", flush=True))
    print(f"\nlocal control plane up in {info.started_in_s or 0:.1f}s at {info.server}")
    yield info
    down(settings)


@pytest.fixture(scope="session")
def api(cluster: ClusterInfo) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def kubectl(cluster: ClusterInfo) -> Kubectl:
    return Kubectl(cluster.kubectl, cluster.kubeconfig)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll until ``predicate()`` returns something truthy; return it, or fail saying what."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def make_namespace(core: client.CoreV1Api, labels: dict[str, str] | None = None) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
    )

    def has_default_sa() -> bool:
        return any(
            sa.metadata.name == "default" for sa in core.list_namespaced_service_account(name).items
        )

    # Pods are refused until kube-controller-manager has created the default ServiceAccount.
    wait_for(has_default_sa, what=f"the default ServiceAccount in {name}")
    return name


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    name = make_namespace(core)
    yield name
    core.delete_namespace(name)


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """`joule operator` as a user runs it: a separate process, killable and restartable."""

    def __init__(self, kubeconfig: Path, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.extra_env: dict[str, str] = {}  # more JOULE_* settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()  # two test runs on one machine must not share one

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        import os
        import sys

        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "JOULE_TICK_SECONDS": "0.5",
            "JOULE_RESYNC_SECONDS": "10",
            "JOULE_METRICS_PORT": str(self.metrics_port),
            "JOULE_HEALTH_PORT": str(self.health_port),
            "JOULE_LOG_FORMAT": "plain",
            # The host-process operator's tests run their workers on kwok nodes (no node
            # agent there) or read the trainer's own figures; the e2e suite installs the
            # chart, node agent included, and reads the node.
            "JOULE_JOB_ENERGY_SOURCE": "trainer",
            **self.extra_env,
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "joule", "operator"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def crd(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", str(ROOT / "crds"))

    def established() -> bool:
        # Not `kubectl wait`: asked before the API server has written the CRD's first
        # conditions, it fails at once ("<nil> is of the type <nil>") instead of waiting.
        proc = kubectl("get", "crd/trainingjobs.joule.dev", "-o",
                       "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                       check=False)  # fmt: skip
        return proc.stdout.strip() == "True"

    wait_for(established, timeout=60, what="the TrainingJob CRD to be Established")


CHART = ROOT / "charts" / "joule"
# Where the operator's identity lives in the tests: the chart's ServiceAccount and RBAC, as
# `helm install joule-tests charts/joule -n joule-system` makes them. Not the release name
# the e2e suite installs the chart under ("joule"): the ClusterRole and its binding are
# cluster-wide, and applying these over them took the in-cluster operator's rights away.
OPERATOR_NAMESPACE = "joule-system"
OPERATOR_RELEASE = "joule-tests"


class Helm(Kubectl):
    """helm, with time for an install or an uninstall to finish."""


@pytest.fixture(scope="session")
def helm(cluster: ClusterInfo) -> Helm:
    from joule.cluster.helm import ensure_helm  # built by `make binaries`; cached

    return Helm(ensure_helm(), cluster.kubeconfig, timeout=300)


def token_kubeconfig(admin: Path, token: str, target: Path) -> Path:
    """A kubeconfig for the same API server that authenticates with a bearer token."""
    import yaml

    conf = yaml.safe_load(admin.read_text())
    cluster = conf["clusters"][0]["cluster"]
    target.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "local", "cluster": cluster}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
                "current-context": "sa",
            }
        )
    )
    target.chmod(0o600)
    return target


@pytest.fixture(scope="session")
def operator_kubeconfig(
    cluster: ClusterInfo, crd: None, kubectl: Kubectl, helm: Helm, tmp_path_factory
) -> Path:
    """The operator authenticates as the chart's ServiceAccount, with only the chart's RBAC:
    a permission the chart lacks fails the operator's tests. The token comes from the
    TokenRequest API, as a projected token does in a pod."""
    kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    rendered = helm(
        "template", OPERATOR_RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE,
        "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml",
    ).stdout  # fmt: skip
    kubectl("apply", "-f", "-", stdin=rendered)
    token = kubectl(
        "create", "token", OPERATOR_RELEASE, "-n", OPERATOR_NAMESPACE, "--duration=24h"
    ).stdout.strip()
    folder = tmp_path_factory.mktemp("operator-identity")
    return token_kubeconfig(cluster.kubeconfig, token, folder / "kubeconfig")


# The session's operator, once started: tests that run operators of their own stop it while
# they do (it watches every namespace and would reconcile their jobs too).
SHARED_OPERATORS: list[OperatorProcess] = []


@pytest.fixture(scope="session")
def operator(operator_kubeconfig: Path, tmp_path_factory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(operator_kubeconfig, log)
    op.start()
    SHARED_OPERATORS.append(op)
    yield op
    SHARED_OPERATORS.remove(op)
    op.stop()
    print(f"\noperator log: {log}")


@contextlib.contextmanager
def shared_operator_paused() -> Iterator[None]:
    """Stop the session's operator while the block runs, and start it again after."""
    running = [op for op in SHARED_OPERATORS if op.proc and op.proc.poll() is None]
    for op in running:
        op.stop()
    try:
        yield
    finally:
        for op in running:
            op.start()


@pytest.fixture
def no_shared_operator() -> Iterator[None]:
    """Stop the session's operator for this test, and start it again after."""
    with shared_operator_paused():
        yield


TRAINER_IMAGE = "ghcr.io/joule-dev/trainer:0.1.0"


class PodLogMirror:
    """Copies the kubelet's pod log files (CRI format) as they grow, the way a log shipper
    tails /var/log/pods, so that lines of pods deleted since are still there to read. Each
    file stays open once found: the kubelet may delete it a moment after the container
    exits, and the last lines (a final checkpoint's) are still read through the open file."""

    def __init__(self, source: Path, target: Path) -> None:
        import threading

        self.source, self.target = source, target
        self.target.mkdir(parents=True, exist_ok=True)
        self._open: dict[tuple[int, int], tuple[str, object]] = {}  # (dev, inode) -> file
        self._tail: dict[tuple[int, int], str] = {}  # bytes read past the last newline
        self._partial: dict[tuple[int, int], str] = {}  # a CRI line split into parts
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.sync()

    def sync(self) -> None:
        import contextlib
        import os

        with self._lock:
            for log in self.source.glob("*/*/*.log"):
                with contextlib.suppress(OSError):
                    info = os.stat(log)
                    key = (info.st_dev, info.st_ino)
                    if key not in self._open:  # new, or rotated: a new file at that name
                        pod_dir = log.parent.parent.name  # <namespace>_<pod>_<uid>
                        self._open[key] = (pod_dir, open(log, "rb"))  # noqa: SIM115
            for key, (pod_dir, f) in list(self._open.items()):
                with contextlib.suppress(OSError, ValueError):
                    self._copy(key, pod_dir, f)

    def _copy(self, key: tuple[int, int], pod_dir: str, f) -> None:
        data = f.read()
        if not data:
            return
        lines = (self._tail.pop(key, "") + data.decode(errors="replace")).split("\n")
        self._tail[key] = lines.pop()  # an unfinished last line waits for its end
        out = []
        for raw in lines:
            # <time> <stream> <P|F> <text>: P is a part of a longer line, F its end.
            parts = raw.split(" ", 3)
            if len(parts) < 4:
                continue
            text = self._partial.pop(key, "") + parts[3]
            if parts[2] == "P":
                self._partial[key] = text
            else:
                out.append(text + "\n")
        with open(self.target / f"{pod_dir}.log", "a") as dst:
            dst.write("".join(out))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sync()
        for _, f in self._open.values():
            f.close()


class RealNode:
    """The test cluster's real node (kubelet + containerd): pods that select it run in
    containers from the trainer image, pulled from the cluster's local registry."""

    name = "local"
    # Tainted, so that the other tests' pods stay on the kwok nodes.
    taint = "joule.dev/local-node=true:NoSchedule"

    def __init__(self, info: ClusterInfo, logs: Path) -> None:
        from joule.cluster.realnode import NodeRecord

        if info.node is None:
            raise AssertionError(
                "the test cluster has no real node: tests run as root on Linux (see README)"
            )
        self.record = NodeRecord.from_json(info.node)
        self.layout = self.record.layout()
        self.logs = PodLogMirror(self.layout.pod_logs, logs)

    @staticmethod
    def placement() -> dict:
        """TrainingJob spec fields that put its workers on this node."""
        return {
            "nodeSelector": {"joule.dev/local-node": "true"},
            "tolerations": [{"key": "joule.dev/local-node", "operator": "Exists"}],
        }

    def pod_logs(self, namespace: str, pod_prefix: str) -> list[Path]:
        """The mirrored logs of pods named ``<pod_prefix>...`` (every incarnation)."""
        self.logs.sync()
        return sorted(self.logs.target.glob(f"{namespace}_{pod_prefix}*.log"))

    def container_pid(self, container_id: str) -> int:
        """The host pid of a container's first process, from containerd."""
        from joule.cluster.nodebuild import node_binaries_for
        from joule.cluster.realnode import ctr_argv
        from joule.cluster.settings import KUBERNETES_VERSION

        ctr = node_binaries_for(KUBERNETES_VERSION).ctr
        cid = container_id.removeprefix("containerd://")
        argv = ctr_argv(ctr, self.layout, "task", "ls")
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0] == cid:
                return int(fields[1])
        raise AssertionError(f"containerd has no task {cid}:\n{out}")


def load_image(node: RealNode, image, name: str, pull: str | None = None) -> None:
    """Push a built image to the cluster's registry as ghcr.io/<name>:0.1.0 (containerd
    mirrors ghcr.io to it), and pull it into the node's containerd first when ``pull`` names
    it (a large image, so that the first pod does not wait)."""
    from joule.cluster.nodebuild import node_binaries_for
    from joule.cluster.realnode import pull_image
    from joule.cluster.settings import KUBERNETES_VERSION
    from joule.images import push

    pushed = push(image, registry=node.record.registry, name=name, progress=say)
    took = f"{image.ref} pushed as {pushed.ref} in {pushed.seconds:.1f}s"
    if pull:
        ctr = node_binaries_for(KUBERNETES_VERSION).ctr
        took += f", pulled in {pull_image(ctr, node.layout, pull):.0f}s"
    say(took)


def plain_script_job(kubectl: Kubectl, namespace: str, name: str, placement: dict, **spec) -> dict:
    """Apply a TrainingJob that runs an unmodified DDP script (examples/scripts/plain_ddp.py,
    torch only, from a ConfigMap) under joule-launch on the real node: a user's own script,
    as Joule sees it. ``spec`` adds to (or replaces) the job's spec. Returns the body."""
    script = (ROOT / "examples" / "scripts" / "plain_ddp.py").read_text()
    kubectl("create", "configmap", f"{name}-script", "-n", namespace,
            f"--from-literal=plain_ddp.py={script}")  # fmt: skip
    body = {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": TRAINER_IMAGE,
            "command": ["joule-launch", "/scripts/plain_ddp.py"],
            "args": ["--steps", "100000000", "--log-every", "500"],
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "gpusPerReplica": 1,
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "sharedMemory": "64Mi",
            "volumes": [{"name": "scripts", "configMap": {"name": f"{name}-script"}}],
            "volumeMounts": [{"name": "scripts", "mountPath": "/scripts", "readOnly": True}],
            **placement,
            **spec,
        },
    }
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body))
    return body


def say(message: str) -> None:
    print(f"joule: {message}", flush=True)


def load_trainer_image(node: RealNode) -> None:
    """The trainer image (built once per content), where pods find it as TRAINER_IMAGE."""
    from joule.images import ensure_trainer

    load_image(node, ensure_trainer(progress=say), "joule-dev/trainer", pull=TRAINER_IMAGE)


@pytest.fixture(scope="session")
def real_node(cluster: ClusterInfo, tmp_path_factory) -> Iterator[RealNode]:
    """The real node, its pods' logs mirrored; no image loaded yet."""
    node = RealNode(cluster, tmp_path_factory.mktemp("pod-logs"))
    yield node
    node.logs.stop()
    print(f"\npod logs: {node.logs.target}")


@pytest.fixture(scope="session")
def local_node(real_node: RealNode) -> RealNode:
    """The real node with the trainer image in its containerd, for workers to run."""
    load_trainer_image(real_node)
    return real_node


# --- Prometheus: the real server, scraping what a test serves -----------------------------


@dataclass
class PrometheusServer:
    """A Prometheus on 127.0.0.1 (``prometheus_server`` starts it), asked over its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    folder: Path  # its prometheus.yml, data/ and prometheus.log

    @property
    def log(self) -> Path:
        return self.folder / "prometheus.log"

    def query(self, promql: str, timeout: float = 10.0) -> list[dict]:
        """``data.result`` of an instant query (for a vector: one dict per series, with
        ``metric`` labels and ``value`` as ``[time, "text"]``)."""
        return self._get("/api/v1/query", {"query": promql}, timeout)["result"]

    def targets(self) -> list[dict]:
        """The active scrape targets, with their ``health`` and ``lastError``."""
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def wait_for_series(self, promql: str, timeout: float = 30.0) -> list[dict]:
        """Poll ``promql`` until it returns at least one series; fail with the targets'
        health and the log's tail if it does not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if result:
                return result
            if self.process.poll() is not None:
                raise AssertionError(f"Prometheus exited {self.process.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
                raise AssertionError(
                    f"{promql!r} returned no series in {timeout:.0f}s; targets: {health}\n"
                    f"{self.tail()}"
                )
            time.sleep(0.5)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"Prometheus exited {self.process.returncode} before it was ready "
                    f"(log {self.log}):\n{self.tail()}"
                )
            # Refused, reset, or 503 while it replays its WAL: try again.
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Prometheus at {self.url} not ready in {timeout:.0f}s:\n{self.tail()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def _get(self, path: str, params: dict[str, str], timeout: float = 10.0) -> dict:
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        address = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(address, timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:  # a bad query: the reason is in the body
            detail = err.read().decode(errors="replace")
            raise AssertionError(f"GET {path} {params} -> {err.code}: {detail}") from None
        if body.get("status") != "success":
            raise AssertionError(f"GET {path} {params} -> {body}")
        return body["data"]


@pytest.fixture(scope="session")
def prometheus_tools() -> tuple[Path, Path]:
    """The prometheus and promtool binaries (built once per version, see `make binaries`)."""
    from joule.cluster.prometheus import ensure_prometheus

    return ensure_prometheus(progress=say)


@pytest.fixture
def prometheus_server(prometheus_tools: tuple[Path, Path], tmp_path: Path):
    """``start(targets, interval_s=2.0)`` runs a real Prometheus scraping ``targets`` (job ->
    ``["host:port", ...]``) on a free port and returns once ``/-/ready`` answers 200; every
    server started is stopped (SIGTERM, then SIGKILL) when the test ends."""
    from joule.cluster.prometheus import prometheus_argv, scrape_config

    servers: list[PrometheusServer] = []

    def start(
        targets: dict[str, list[str]] | None = None, interval_s: float = 2.0, config_text: str = ""
    ) -> PrometheusServer:
        """``config_text``: a whole prometheus.yml instead (e.g. Kubernetes discovery)."""
        folder = tmp_path / f"prometheus-{len(servers)}"
        folder.mkdir()
        config = folder / "prometheus.yml"
        config.write_text(config_text or scrape_config(targets or {}, interval_s))
        port = free_port()
        argv = prometheus_argv(prometheus_tools[0], config, folder / "data", port)
        with open(folder / "prometheus.log", "wb") as log:
            process = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, folder)
        servers.append(server)
        server.wait_ready(timeout=60)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def object_store(cluster: ClusterInfo):
    """The test cluster's S3 object store (VersityGW, objects as files under the cluster's
    state; built once, see `make binaries`): endpoint, pod_endpoint, credentials and the CA
    bundle that verifies it. Stopped, its data removed, at the end of the run."""
    from joule.cluster import objectstore

    settings = ClusterSettings(name=TEST_CLUSTER)
    store = objectstore.start(settings, progress=say)
    yield store
    objectstore.stop(settings)
