"""Shared fixtures. The control plane comes up once per test run, on first use, and goes down
at the end; each test that needs it gets its own namespace."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config

from joule.cluster import ClusterInfo, ClusterSettings, down, up

# JOULE_TEST_CLUSTER lets two test runs on one machine use separate control planes.
TEST_CLUSTER = os.environ.get("JOULE_TEST_CLUSTER", "pytest")


@dataclass
class Kubectl:
    binary: Path
    kubeconfig: Path

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterInfo]:
    settings = ClusterSettings(name=TEST_CLUSTER)
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
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()

    def start(self) -> None:
        import os
        import sys

        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "JOULE_TICK_SECONDS": "0.5",
            "JOULE_RESYNC_SECONDS": "10",
            "JOULE_METRICS_PORT": str(self.metrics_port),
            "JOULE_LOG_FORMAT": "plain",
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
    kubectl("wait", "--for=condition=Established", "crd/trainingjobs.joule.dev", "--timeout=60s")


@pytest.fixture(scope="session")
def operator(cluster: ClusterInfo, crd: None, tmp_path_factory) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, log)
    op.start()
    yield op
    op.stop()
    print(f"\noperator log: {log}")


class LocalNode:
    """`joule node-agent` joined to the test cluster: pods that select it run as processes."""

    name = "local"
    # Tainted, so that the other tests' pods stay on the kwok nodes.
    taint = "joule.dev/local-node=true:NoSchedule"

    def __init__(self, kubeconfig: Path, state: Path) -> None:
        import os
        import sys

        self.state = state
        self.log = state / "node-agent.log"
        state.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "JOULE_ENERGY_SOURCE": "estimated"}
        argv = [sys.executable, "-m", "joule", "node-agent", "--name", self.name]
        argv += ["--gpus", "4", "--state-dir", str(state), "--taint", self.taint]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    @staticmethod
    def placement() -> dict:
        """TrainingJob spec fields that put its workers on this node."""
        return {
            "nodeSelector": {"joule.dev/local-node": "true"},
            "tolerations": [{"key": "joule.dev/local-node", "operator": "Exists"}],
        }

    def pod_log(self, namespace: str, pod: str, uid: str) -> Path:
        return self.state / "pods" / f"{namespace}_{pod}_{uid}" / "trainer.log"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def local_node(
    cluster: ClusterInfo, core: client.CoreV1Api, tmp_path_factory
) -> Iterator[LocalNode]:
    node = LocalNode(cluster.kubeconfig, tmp_path_factory.mktemp("node-agent"))

    def ready() -> bool:
        try:
            conditions = core.read_node(node.name).status.conditions or []
        except client.ApiException:
            return False
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    wait_for(ready, timeout=60, what="the local node to be Ready")
    yield node
    node.stop()
    print(f"\nnode agent log: {node.log}")
