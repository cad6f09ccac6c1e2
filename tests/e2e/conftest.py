"""The e2e tests run against the operator as users install it: `helm install charts/joule`
with the operator image (built here, pushed to the node's registry), running as a pod on the
real node with the chart's ServiceAccount, probes, leader election and read-only root. It
reaches the API server at the `kubernetes` Service, as any in-cluster client does."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    CHART,
    Helm,
    Kubectl,
    RealNode,
    load_image,
    say,
    shared_operator_paused,
    wait_for,
)

NAMESPACE = "joule-e2e"
RELEASE = "joule"


class InClusterOperator:
    """The chart's operator Deployment; the same face as tests.conftest.OperatorProcess."""

    def __init__(self, kubectl: Kubectl, node: RealNode) -> None:
        self.kubectl = kubectl
        self.node = node
        self.pod_name = ""  # the first pod's, once it runs
        # Container restarts the tests caused on purpose (a kill, or a lost Lease while they
        # kept the API server down); any other would be a fault of the operator's own.
        self.restarts_caused = 0

    def restart_count(self) -> int:
        (container,) = self.pod()["status"]["containerStatuses"]
        return container["restartCount"]

    def kill(self) -> None:
        """SIGKILL the operator's process (no shutdown: a crash) and wait until the kubelet
        has restarted its container and it is ready again."""
        (container,) = self.pod()["status"]["containerStatuses"]
        os.kill(self.node.container_pid(container["containerID"]), signal.SIGKILL)

        def restarted() -> bool:
            (c,) = self.pod()["status"]["containerStatuses"]
            return c["restartCount"] == container["restartCount"] + 1 and c.get("ready", False)

        wait_for(restarted, timeout=120, interval=0.5, what="the operator's container to restart")

    def pod(self, component: str = "operator") -> dict:
        """The release's one live pod of ``component`` (operator, node-agent)."""
        out = self.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={component}",
            "-o", "json",
        ).stdout  # fmt: skip
        pods = [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return pods[0]

    @property
    def metrics_url(self) -> str:
        return f"http://{self.pod()['status']['podIP']}:8080/metrics"

    def wait_agent(self) -> dict:
        def ready() -> dict | None:
            pod = self.pod("node-agent")
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            return pod if conditions.get("Ready") == "True" else None

        return wait_for(ready, timeout=90, what="the node agent to be ready")

    def agent_metrics(self) -> str:
        """The node agent's /metrics, read as Prometheus would."""
        ip = self.wait_agent()["status"]["podIP"]
        with urllib.request.urlopen(f"http://{ip}:9410/metrics", timeout=10) as response:
            return response.read().decode()

    @property
    def log(self) -> Path:
        """The operator pod's log, as the node's log mirror copied it."""
        logs = self.node.pod_logs(NAMESPACE, self.pod_name)
        return logs[-1] if logs else Path("/dev/null")


@pytest.fixture(scope="package")
def operator(
    cluster, crd, helm: Helm, kubectl: Kubectl, real_node: RealNode, tmp_path_factory
) -> Iterator[InClusterOperator]:
    # The process operator of the integration tests, if a run started it first, would
    # reconcile the same jobs: it waits while this one runs.
    with shared_operator_paused():
        yield from _installed(helm, kubectl, real_node, tmp_path_factory)


def _installed(
    helm: Helm, kubectl: Kubectl, real_node: RealNode, tmp_path_factory
) -> Iterator[InClusterOperator]:
    from joule.demo.install import values as demo_values
    from joule.images import ensure_operator

    load_image(real_node, ensure_operator(progress=say), "joule-dev/operator")
    placement = real_node.placement()  # its taint keeps other pods off; these tolerate it
    # As the demo installs it (operator from the local registry, energy from the node
    # agent over its NVML double), on the tainted test node, with quicker timers.
    values = demo_values(real_node.layout)
    values["operator"]["tickSeconds"] = 0.5
    values.update(placement)
    values["nodeAgent"].update(placement)
    path = tmp_path_factory.mktemp("chart") / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    started = time.monotonic()
    op = InClusterOperator(kubectl, real_node)
    try:  # a failed install is uninstalled too, so that the next run can install again
        helm(
            "install", RELEASE, str(CHART), "-n", NAMESPACE, "--create-namespace",
            "-f", str(path), "--wait", "--timeout", "180s",
        )  # fmt: skip
        pod = op.pod_name = op.pod()["metadata"]["name"]

        def leads() -> bool:
            lease = kubectl("get", "lease", RELEASE, "-n", NAMESPACE, "-o", "json", check=False)
            return lease.returncode == 0 and json.loads(lease.stdout)["spec"].get(
                "holderIdentity"
            ) == pod  # fmt: skip

        wait_for(leads, timeout=60, what=f"{pod} to hold the leader Lease")
        op.wait_agent()
        print(f"\noperator installed by helm and leading in {time.monotonic() - started:.1f}s")
        yield op
    finally:
        print(f"\nin-cluster operator log: {op.log}")
        helm("uninstall", RELEASE, "-n", NAMESPACE, "--wait", check=False)
