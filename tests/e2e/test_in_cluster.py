"""The operator installed by the chart runs as users run it: a pod on the real node, ready by
its probe, leading through its Lease, answering `helm test`."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import NAMESPACE, RELEASE, InClusterOperator
from tests.e2e.test_local_loop import scrape

pytestmark = pytest.mark.cluster


def test_the_charts_operator_runs_restricted_on_the_node_and_passes_helm_test(
    operator: InClusterOperator, helm, kubectl
):
    pod = operator.pod()
    assert pod["spec"]["nodeName"] == "local"
    assert pod["spec"]["serviceAccountName"] == RELEASE
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"  # its readiness probe answered
    (state,) = pod["status"]["containerStatuses"]
    # Never restarted but by the faults a test caused (tests/e2e/test_energy.py): no crash,
    # and its liveness probe never failed.
    assert state["restartCount"] == operator.restarts_caused

    text = scrape(operator.metrics_url)
    assert "joule_operator_leader 1.0" in text

    out = helm("test", RELEASE, "-n", NAMESPACE, "--logs").stdout
    assert "Phase:          Succeeded" in out and ": ok" in out, out

    # The operator's own pod: uid 65532 and nothing but its code, as the image test says.
    uid = kubectl("exec", "-n", NAMESPACE, pod["metadata"]["name"], "--", "id", "-u").stdout
    assert uid.strip() == "65532"
    events = json.loads(
        kubectl("get", "events", "-n", NAMESPACE, "-o", "json").stdout
    )["items"]  # fmt: skip
    # A readiness probe may fail while it starts; a liveness probe may fail once when a test
    # kills the process mid-probe (then it is restarted as the kill's, counted above). Never
    # a restart for failed liveness probes, or a crash loop's back-off.
    failed = [e["message"] for e in events if e["reason"] in ("Unhealthy", "BackOff", "Killing")]
    killed_mid_probe = operator.restarts_caused > 0
    assert not [
        m for m in failed
        if "failed liveness probe" in m or "Back-off" in m
        or ("Liveness" in m and not killed_mid_probe)
    ], failed  # fmt: skip
