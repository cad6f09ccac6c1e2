"""The prometheus energy source, end to end with real parts: a node agent (`joule node-agent`,
over its NVML double) on the real node's kubelet, a real Prometheus scraping it, and an
operator whose jobs' energy comes from one PromQL query (the `joule` preset). A plain torchrun
script is suspended at its budget, and status says where the joules came from."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest

from joule.cluster.deviceplugin import pod_resources_socket
from tests.conftest import OperatorProcess, free_port, plain_script_job, wait_for
from tests.e2e.test_local_loop import running_pods, status

pytestmark = pytest.mark.cluster


@pytest.fixture
def node_agent(cluster, local_node, tmp_path) -> Iterator[str]:
    """The agent as a host process on the real node's kubelet; its host:port."""
    port = free_port()
    socket = pod_resources_socket(local_node.layout.kubelet_dir)
    argv = [
        sys.executable, "-m", "joule", "node-agent", "--node", local_node.name,
        "--gpus", "simulated", "--pod-resources-socket", str(socket),
        "--state-dir", str(tmp_path / "agent"), "--port", str(port), "--interval", "2",
    ]  # fmt: skip
    log = tmp_path / "agent.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return b"joule_node_agent_info" in r.read()
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, what="the node agent to serve /metrics")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print(f"\nnode agent log: {log}")


@pytest.mark.timeout(400)
def test_a_jobs_energy_comes_from_a_promql_query_and_its_budget_holds(
    kubectl, api, core, namespace, operator_kubeconfig, no_shared_operator, node_agent,
    prometheus_server, local_node, tmp_path,
):  # fmt: skip
    prom = prometheus_server({"joule-node-agent": [node_agent]})
    op = OperatorProcess(operator_kubeconfig, tmp_path / "operator.log")
    op.extra_env = {
        "JOULE_JOB_ENERGY_SOURCE": "prometheus",
        "JOULE_PROMETHEUS_URL": prom.url,
        "JOULE_PROMETHEUS_PRESET": "joule",
        "JOULE_NODE_AGENTS": "false",
    }
    op.start()
    try:
        plain_script_job(
            kubectl, namespace, "promq", local_node.placement(),
            scaling={"evaluationIntervalSeconds": 5},
            energy={"budget": "300J", "onBudgetExhausted": "Suspend", "windowSeconds": 10},
        )  # fmt: skip
        wait_for(lambda: running_pods(core, namespace, "promq"), timeout=120,
                 what="the worker to run")  # fmt: skip
        # Prometheus has the worker's series, as the operator's query will see it.
        prom.wait_for_series(
            f'joule_node_pod_gpu_energy_joules_total{{namespace="{namespace}"}}', timeout=60
        )

        def suspended():
            st = status(api, namespace, "promq")
            return st if st.get("phase") == "Suspended" else None

        st = wait_for(suspended, timeout=240, interval=1.0, what="the budget to suspend the job")
        energy = st["energy"]
        assert st["reason"] == "BudgetExhausted"
        assert (energy["source"], energy["meter"]) == ("prometheus", "prometheus/joule")
        assert energy["consumedJoules"] >= 300
        with urllib.request.urlopen(op.metrics_url, timeout=10) as response:
            exposition = response.read().decode()
        assert 'joule_operator_energy_source_info{source="prometheus"} 1.0' in exposition
    finally:
        op.stop()
        print(f"\noperator log: {op.log}")
