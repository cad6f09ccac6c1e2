"""Secrets reach a job's workers the ways pods take them: an env var from a secretKeyRef,
envFrom a whole Secret, and a projected volume; on the real node, with the chart's operator,
which never reads a Secret itself (its RBAC has no Secret verbs: test_chart). The job also
gets the chart's NetworkPolicy (on by default), which selects its worker and nothing else;
the local node's bridge CNI does not enforce policies, so what is checked is the object the
API server holds and what its selectors select."""

from __future__ import annotations

import base64

import pytest
import yaml
from kubernetes import client

from tests.conftest import TRAINER_IMAGE, wait_for

# The worker prints what it was given, then waits to be deleted.
SHOW = (
    'echo "token=$API_TOKEN"; echo "user=$DB_USER"; '
    'echo "file=$(cat /var/run/creds/bucket-key)"; sleep 3600'
)


def secret(name: str, data: dict[str, str]) -> client.V1Secret:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return client.V1Secret(metadata=client.V1ObjectMeta(name=name), data=encoded)


@pytest.mark.timeout(300)
def test_a_worker_gets_secrets_by_key_by_envfrom_and_in_a_projected_volume(
    kubectl, core, namespace, operator, local_node
):
    core.create_namespaced_secret(namespace, secret("api", {"token": "t0ken-42"}))
    core.create_namespaced_secret(namespace, secret("db", {"DB_USER": "trainer-ro"}))
    core.create_namespaced_secret(namespace, secret("bucket", {"key": "s3-secret-7"}))
    body = {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "sec"},
        "spec": {
            "image": TRAINER_IMAGE,
            "command": ["sh", "-c", SHOW],
            "gpusPerReplica": 1,
            "env": [{"name": "API_TOKEN",
                     "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}}],
            "envFrom": [{"secretRef": {"name": "db"}}],
            "volumes": [{"name": "creds", "projected": {"sources": [
                {"secret": {"name": "bucket", "items": [{"key": "key", "path": "bucket-key"}]}},
            ]}}],
            "volumeMounts": [{"name": "creds", "mountPath": "/var/run/creds", "readOnly": True}],
            **local_node.placement(),
        },
    }  # fmt: skip
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body))

    def shown() -> str | None:
        logs = local_node.pod_logs(namespace, "sec-worker-0")
        text = logs[-1].read_text(errors="replace") if logs else ""
        return text if "file=" in text else None

    text = wait_for(shown, timeout=180, interval=1.0, what="the worker to print its secrets")
    assert "token=t0ken-42" in text
    assert "user=trainer-ro" in text
    assert "file=s3-secret-7" in text

    # Its NetworkPolicy, as the API server holds it: the selector finds this job's worker
    # only, and the metrics rule admits the chart's operator.
    policy = client.NetworkingV1Api(core.api_client).read_namespaced_network_policy(
        "sec-workers", namespace
    )
    labels = ",".join(f"{k}={v}" for k, v in policy.spec.pod_selector.match_labels.items())
    selected = core.list_namespaced_pod(namespace, label_selector=labels).items
    assert [p.metadata.name for p in selected] == ["sec-worker-0"]
    peers, metrics = policy.spec.ingress
    assert peers.ports is None and peers._from[0].pod_selector == policy.spec.pod_selector
    (operator,) = metrics._from
    assert operator.pod_selector.match_labels["app.kubernetes.io/component"] == "operator"
    assert [(p.port, p.protocol) for p in metrics.ports] == [(9090, "TCP")]
