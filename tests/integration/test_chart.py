"""charts/joule with the real Helm (built from its Go module) against the real API server:
lint, render, schema refusals, least-privilege RBAC, install, upgrade, rollback, uninstall."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import yaml

from tests.conftest import CHART, OPERATOR_NAMESPACE, OPERATOR_RELEASE, Helm, Kubectl, wait_for
from tests.integration.test_operator import manifest

pytestmark = pytest.mark.cluster

# Every option on: the values a demanding install would set.
EVERYTHING = {
    "replicas": 2,
    "leaderElection": {"enabled": True},
    "watchNamespaces": [],  # filled per test with namespaces that exist
    "serviceAccount": {"annotations": {"example.com/owner": "ml-platform"}},
    "operator": {"logFormat": "plain", "resyncSeconds": 20, "workers": 8},
    "metrics": {
        "port": 9100,
        "service": {"annotations": {"example.com/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}},
    },
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
    "dashboard": {"enabled": True},
    "health": {"port": 9101},
    "podDisruptionBudget": {"minAvailable": 1},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"team": "ml"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
    "priorityClassName": "system-cluster-critical",
    "imagePullSecrets": [{"name": "registry"}],
}


def values_file(tmp_path, values: dict) -> str:
    path = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def monitoring_crds(kubectl: Kubectl) -> None:
    """The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs, from its Go module, so
    that the API server can judge the chart's objects of those kinds."""
    from joule.cluster.helm import monitoring_crds as crd_files

    for path in crd_files():
        kubectl("apply", "--server-side", "-f", str(path))
    for name in ("servicemonitors", "prometheusrules"):
        kubectl("wait", "--for=condition=Established", f"crd/{name}.monitoring.coreos.com")


def test_helm_lint_strict_passes_with_defaults_and_with_everything_on(helm: Helm, tmp_path):
    helm("lint", "--strict", str(CHART))
    values = {**EVERYTHING, "watchNamespaces": ["team-a", "team-b"]}
    helm("lint", "--strict", str(CHART), "-f", values_file(tmp_path, values))


def test_the_api_server_accepts_every_rendered_object(
    helm: Helm, kubectl: Kubectl, namespace: str, monitoring_crds: None, core, tmp_path
):
    from tests.conftest import make_namespace

    watched = [make_namespace(core), make_namespace(core)]
    try:
        default = helm("template", "dry", str(CHART), "-n", namespace).stdout
        values = {**EVERYTHING, "watchNamespaces": watched}
        everything = helm(
            "template", "dry", str(CHART), "-n", namespace, "-f", values_file(tmp_path, values)
        ).stdout
        kinds = {d["kind"] for d in docs(everything)}
        assert {
            "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
            "RoleBinding", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap",
            "PodDisruptionBudget", "NetworkPolicy",
        } <= kinds  # fmt: skip
        for rendered in (default, everything):
            out = kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered).stdout
            assert out.count("(server dry run)") == len(docs(rendered)), out
    finally:
        for ns in watched:
            core.delete_namespace(ns)


def test_the_deployment_runs_restricted_and_probed(helm: Helm, namespace: str):
    objects = docs(helm("template", "joule", str(CHART), "-n", namespace).stdout)
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JOULE_LEADER_ELECT"] == "true"
    assert env["JOULE_LEASE_NAMESPACE"] == namespace


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ({"replica": 2}, "additional properties 'replica' not allowed"),
        ({"replicas": "two"}, "/replicas': got string, want integer"),
        ({"replicas": 0}, "/replicas': minimum: got 0, want 1"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy': value must be one of"),
        ({"operator": {"logFormat": "xml"}}, "/operator/logFormat': value must be one of"),
        ({"operator": {"workers": 1.5}}, "/operator/workers': got number, want integer"),
        ({"operator": {"tickSeconds": 0}}, "/operator/tickSeconds': minimum: got 0, want 0.1"),
        ({"metrics": {"port": 70000}}, "/metrics/port': maximum: got 70,000, want 65,535"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/interval': 'often' does not"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0': 'Team_A' does not match"),
        ({"leaderElection": {"enabled": "yes"}}, "/leaderElection/enabled': got string, want"),
        ({"replicas": 2, "leaderElection": {"enabled": False}}, "value must be true"),
        ({"dashboard": {"labels": {"grafana_dashboard": 1}}}, "got number, want string"),
        ({"energy": {"source": "dcgm"}}, "/energy/source': value must be one of"),
        ({"nodeAgent": {"gpus": "fake"}}, "/nodeAgent/gpus': value must be one of"),
        ({"nodeAgent": {"kubeletRootDir": "var/lib/kubelet"}}, "/kubeletRootDir': 'var/lib"),
        ({"nodeAgent": {"intervalSeconds": 0}}, "/nodeAgent/intervalSeconds': minimum: got 0"),
        (
            {"jobNetworkPolicy": {"metricsFrom": [{"ports": [9090]}]}},
            "additional properties 'ports' not allowed",
        ),
    ],
)
def test_the_schema_refuses_bad_values_at_install(helm: Helm, tmp_path, values, refusal):
    proc = helm("template", "joule", str(CHART), "-f", values_file(tmp_path, values), check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert refusal in proc.stderr, proc.stderr


def test_job_network_policies_admit_this_operator_and_the_named_scrapers(
    helm: Helm, tmp_path, namespace: str
):
    from joule.config import OperatorConfig

    def setting(values: dict) -> str | None:
        rendered = helm("template", "joule", str(CHART), "-n", namespace,
                        "-f", values_file(tmp_path, values)).stdout  # fmt: skip
        (deploy,) = [o for o in docs(rendered) if o["kind"] == "Deployment"]
        env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        return {e["name"]: e.get("value") for e in env}.get("JOULE_JOB_NETWORK_POLICY")

    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    value = setting({"jobNetworkPolicy": {"metricsFrom": [prometheus]}})
    operator, scraper = OperatorConfig.from_env(
        {"JOULE_JOB_NETWORK_POLICY": value}
    ).job_network_policy
    assert operator["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": namespace
    }
    assert operator["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"
    assert scraper == prometheus
    assert setting({"jobNetworkPolicy": {"enabled": False}}) is None


def test_the_node_source_without_node_agents_is_refused(helm: Helm, tmp_path):
    values = {"nodeAgent": {"enabled": False}}
    proc = helm("template", "joule", str(CHART), "-f", values_file(tmp_path, values), check=False)
    assert proc.returncode != 0
    assert "energy.source node needs nodeAgent.enabled" in proc.stderr, proc.stderr
    ok = {**values, "energy": {"source": "trainer"}}
    objects = docs(helm("template", "joule", str(CHART), "-f", values_file(tmp_path, ok)).stdout)
    assert not [o for o in objects if o["kind"] == "DaemonSet"]


def test_the_node_agent_is_the_only_privileged_piece_and_finds_the_kubelet(
    helm: Helm, tmp_path, namespace: str
):
    values = {"nodeAgent": {"kubeletRootDir": "/data/kubelet/", "gpus": "simulated"}}
    rendered = helm(
        "template", "joule", str(CHART), "-n", namespace, "-f", values_file(tmp_path, values)
    ).stdout  # fmt: skip
    objects = docs(rendered)
    privileged = [
        (o["kind"], c["name"])
        for o in objects
        if o["kind"] in ("Deployment", "DaemonSet", "Pod")
        for c in o["spec"].get("template", o)["spec"]["containers"]
        if (c.get("securityContext") or {}).get("privileged")
    ]
    assert privileged == [("DaemonSet", "node-agent")]
    (ds,) = [o for o in objects if o["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert paths["pod-resources"] == "/data/kubelet/pod-resources"
    (container,) = pod["containers"]
    assert "--gpus=simulated" in container["args"] and "--simulated-watts=30" in container["args"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # The operator finds this release's agents, and only them.
    (deploy,) = [o for o in objects if o["kind"] == "Deployment"]
    env = {
        e["name"]: e.get("value")
        for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["JOULE_JOB_ENERGY_SOURCE"] == "node"
    assert env["JOULE_NODE_AGENT_NAMESPACE"] == namespace
    selector = dict(kv.split("=") for kv in env["JOULE_NODE_AGENT_SELECTOR"].split(","))
    assert selector == ds["spec"]["selector"]["matchLabels"]


def test_the_node_agents_service_account_reads_pods_and_nothing_more(
    helm: Helm, kubectl: Kubectl, operator_kubeconfig, namespace: str
):
    rendered = helm(
        "template", OPERATOR_RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE,
        "--show-only", "templates/node-agent.yaml",
    ).stdout  # fmt: skip
    rbac = [o for o in docs(rendered) if o["kind"] != "DaemonSet"]
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    sa = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_RELEASE}-node-agent"
    must = [("watch", "pods", "--all-namespaces"), ("get", "pods", "-n", namespace)]
    must_not = [
        ("patch", "pods", "-n", namespace),
        ("delete", "pods", "-n", namespace),
        ("create", "pods", "--subresource=exec", "-n", namespace),
        ("get", "secrets", "-n", namespace),
        ("list", "nodes"),
        ("get", "trainingjobs.joule.dev", "-n", namespace),
        ("update", "trainingjobs.joule.dev", "--subresource=status", "-n", namespace),
    ]
    assert [a for a in must if not can_i(kubectl, sa, *a)] == []
    assert [a for a in must_not if can_i(kubectl, sa, *a)] == []


def rules_of(rendered: str) -> list[dict]:
    return [
        rule
        for obj in docs(rendered)
        if obj["kind"] in ("ClusterRole", "Role")
        for rule in obj.get("rules", [])
    ]


def test_no_rbac_rule_has_a_wildcard(helm: Helm, tmp_path):
    for values in ({}, {**EVERYTHING, "watchNamespaces": ["a", "b"]}):
        rendered = helm("template", "joule", str(CHART), "-f", values_file(tmp_path, values))
        rules = rules_of(rendered.stdout)
        assert rules
        for rule in rules:
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(key, []), rule
        # The operator only names Secrets in pod specs (spec.checkpoint.encryption too).
        assert not any("secrets" in r["resources"] for r in rules)


def can_i(kubectl: Kubectl, who: str, *args: str) -> bool:
    proc = kubectl("auth", "can-i", f"--as={who}", *args, check=False)
    return proc.stdout.strip() == "yes"


def test_the_operators_service_account_can_do_its_job_and_nothing_more(
    kubectl: Kubectl, operator_kubeconfig, namespace: str
):
    sa = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_RELEASE}"
    must = [
        ("create", "pods", "-n", namespace),
        ("delete", "pods", "-n", namespace),
        ("create", "services", "-n", namespace),
        # spec.tensorboard: a Deployment and a Service, deleted when it is turned off.
        ("create", "deployments.apps", "-n", namespace),
        ("delete", "deployments.apps", "-n", namespace),
        ("delete", "services", "-n", namespace),
        ("create", "networkpolicies.networking.k8s.io", "-n", namespace),
        ("list", "trainingjobs.joule.dev", "--all-namespaces"),
        ("update", "trainingjobs.joule.dev", "--subresource=status", "-n", namespace),
        ("list", "nodes"),
        ("create", "events", "-n", namespace),
        ("patch", "events", "-n", namespace),  # the same Event again: its count
        ("watch", "pods", "--all-namespaces"),  # the pod cache's own watch
    ]
    must_not = [
        ("get", "secrets", "-n", namespace),
        ("list", "secrets", "--all-namespaces"),
        ("get", "secrets", "-n", OPERATOR_NAMESPACE),
        ("create", "clusterrolebindings"),
        ("create", "rolebindings", "-n", namespace),
        ("escalate", "clusterroles"),
        ("bind", "clusterroles"),
        ("delete", "nodes"),
        ("patch", "nodes"),
        ("delete", "namespaces"),
        ("update", "deployments.apps", "-n", namespace),
        ("create", "pods", "--subresource=exec", "-n", namespace),
        ("update", "trainingjobs.joule.dev", "-n", namespace),  # spec is the user's
        ("create", "trainingjobs.joule.dev", "-n", namespace),
        ("delete", "customresourcedefinitions"),
        ("create", "serviceaccounts", "--subresource=token", "-n", namespace),
        ("update", "services", "-n", namespace),
        ("delete", "networkpolicies.networking.k8s.io", "-n", namespace),
        ("update", "leases.coordination.k8s.io", "-n", "kube-system"),
    ]
    assert [a for a in must if not can_i(kubectl, sa, *a)] == []
    assert [a for a in must_not if can_i(kubectl, sa, *a)] == []


def test_watch_namespaces_grants_only_those_namespaces(
    helm: Helm, kubectl: Kubectl, core, namespace: str
):
    from tests.conftest import make_namespace

    watched, other = make_namespace(core), make_namespace(core)
    release = f"ns{uuid.uuid4().hex[:6]}"
    try:
        helm(
            "install", release, str(CHART), "-n", namespace,
            "--set", f"watchNamespaces={{{watched}}}",
            "--set", "image.repository=localhost/not-pulled",
        )  # fmt: skip
        sa = f"system:serviceaccount:{namespace}:{release}-joule"
        assert can_i(kubectl, sa, "create", "pods", "-n", watched)
        assert can_i(kubectl, sa, "update", "trainingjobs.joule.dev", "--subresource=status",
                     "-n", watched)  # fmt: skip
        assert not can_i(kubectl, sa, "create", "pods", "-n", other)
        assert not can_i(kubectl, sa, "update", "trainingjobs.joule.dev",
                         "--subresource=status", "-n", other)  # fmt: skip
        assert not can_i(kubectl, sa, "create", "configmaps", "-n", other)
        # The cluster-wide reads the policy needs: nodes, and pods' GPU requests.
        assert can_i(kubectl, sa, "list", "nodes")
        assert can_i(kubectl, sa, "list", "pods", "--all-namespaces")
        assert not can_i(kubectl, sa, "list", "trainingjobs.joule.dev", "--all-namespaces")
    finally:
        helm("uninstall", release, "-n", namespace, "--wait", check=False)
        core.delete_namespace(watched)
        core.delete_namespace(other)


def deployment(kubectl: Kubectl, namespace: str, name: str) -> dict:
    return json.loads(kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout)


def env_of(deploy: dict) -> dict[str, str | None]:
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_install_upgrade_rollback_uninstall(helm: Helm, kubectl: Kubectl, namespace: str):
    """Helm's release cycle on the real API server. The operator's image is not pulled here
    (its pods sit on kwok nodes); the in-cluster test runs it for real."""
    release = f"cy{uuid.uuid4().hex[:6]}"
    name = f"{release}-joule"
    base = ["-n", namespace, "--set", "image.repository=localhost/not-pulled"]
    started = time.monotonic()
    helm("install", release, str(CHART), *base)
    first = deployment(kubectl, namespace, name)
    assert first["spec"]["template"]["spec"]["serviceAccountName"] == name
    # A TrainingJob made while installed survives the uninstall with the CRD.
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest("keep-me", replicas=1))

    helm("upgrade", release, str(CHART), *base, "--set", "operator.workers=4")
    second = deployment(kubectl, namespace, name)
    assert second["metadata"]["generation"] > first["metadata"]["generation"]
    env = env_of(second)
    assert env["JOULE_WORKERS"] == "4"  # the pod template changed: the Deployment rolls

    helm("rollback", release, "1", "-n", namespace)
    third = deployment(kubectl, namespace, name)
    env = env_of(third)
    assert env["JOULE_WORKERS"] == "16"
    history = json.loads(helm("history", release, "-n", namespace, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2, 3]
    assert history[-1]["description"] == "Rollback to 1"

    release_manifest = helm("get", "manifest", release, "-n", namespace).stdout
    assert "CustomResourceDefinition" not in release_manifest  # crds/ is installed, never owned

    helm("uninstall", release, "-n", namespace, "--wait")
    gone = kubectl("get", "deployment", name, "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    kubectl("get", "crd", "trainingjobs.joule.dev")
    kubectl("get", "trainingjob", "keep-me", "-n", namespace)
    assert (
        kubectl("get", "clusterrole", name, check=False).returncode != 0
    )  # cluster-scoped objects go too
    print(
        f"\nchart cycle (install, upgrade, rollback, uninstall): {time.monotonic() - started:.1f}s"
    )


def test_a_job_the_operator_runs_as_the_charts_service_account(
    operator, kubectl: Kubectl, namespace: str
):
    """The operator fixture authenticates with the chart's ServiceAccount token: a job goes
    Running with its pods and status, so the chart grants what the operator uses."""
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest("rbac", replicas=2))

    def phase() -> str | None:
        out = kubectl("get", "trainingjob", "rbac", "-n", namespace, "-o", "json").stdout
        return json.loads(out).get("status", {}).get("phase") == "Running"

    wait_for(phase, timeout=60, what="the job Running under the chart's RBAC")
    # An RBAC refusal names the user; quota or terminating-namespace refusals do not.
    assert f'User "system:serviceaccount:{OPERATOR_NAMESPACE}' not in operator.log.read_text()
