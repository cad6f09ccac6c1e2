"""Bad input fails at `kubectl apply`: the real API server, with the CRD's schema and CEL rules,
refuses it with a message that names the field, and accepts what the operator can run.

Only the control plane is needed (no operator): what is tested is the API server's answer.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from joule.api.types import MAX_NAME_LENGTH, MAX_REPLICAS, parse_quantity
from tests.conftest import ROOT, Kubectl, wait_for

CRD = ROOT / "crds" / "joule.dev_trainingjobs.yaml"
API_VERSION = "joule.dev/v1alpha1"


def manifest(name: str, **spec: Any) -> str:
    # JSON, not YAML: kubectl reads an unquoted 1e9 or 1E-3 in YAML as a number.
    body = {
        "apiVersion": API_VERSION,
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"image": "trainer:test", **spec},
    }
    return json.dumps(body)


def apply(kubectl: Kubectl, namespace: str, name: str, *flags: str, **spec: Any):
    return kubectl(
        "apply", "-n", namespace, *flags, "-f", "-", stdin=manifest(name, **spec), check=False
    )


def refused(proc) -> str:
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    return proc.stderr


NAME_TOO_LONG = f"metadata.name must be at most {MAX_NAME_LENGTH} characters"
NOT_DNS_1035 = "metadata.name must be a DNS-1035 label"
QUANTITY = "must be a non-negative quantity"


@pytest.mark.parametrize(
    ("name", "spec", "field", "message"),
    [
        ("a" * 70, {}, "metadata.name", NAME_TOO_LONG),
        ("a" * (MAX_NAME_LENGTH + 1), {}, "metadata.name", NAME_TOO_LONG),
        ("7b-llm", {}, "metadata.name", NOT_DNS_1035),
        # Valid names for a custom object (DNS-1123 subdomains), but not for a Service.
        ("llm.7b", {}, "metadata.name", NOT_DNS_1035),
        ("llm-", {}, "metadata.name", NOT_DNS_1035),
        ("ok", {"sharedMemory": "lots"}, "spec.sharedMemory", "positive quantity of bytes"),
        ("ok", {"sharedMemory": 0}, "spec.sharedMemory", "positive quantity of bytes"),
        ("ok", {"resources": {"requests": {"cpu": "abc"}}}, "spec.resources.requests[cpu]",
         QUANTITY),
        ("ok", {"resources": {"limits": {"cpu": "abc"}}}, "spec.resources.limits[cpu]", QUANTITY),
        ("ok", {"resources": {"requests": {"memory": "12 gigs"}}},
         "spec.resources.requests[memory]", QUANTITY),
        ("ok", {"resources": {"limits": {"memory": "12GB"}}}, "spec.resources.limits[memory]",
         QUANTITY),
        ("ok", {"resources": {"requests": {"example.com/foo": -1}}},
         "spec.resources.requests[example.com/foo]", QUANTITY),
        ("ok", {"resources": {"limits": {"cpu": "-500m"}}}, "spec.resources.limits[cpu]",
         QUANTITY),
        ("ok", {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}},
         "spec.resources.requests", "must not be more than its resources.limits"),
        ("ok", {"resources": {"requests": {f"example.com/r{i}": 1 for i in range(17)}}},
         "spec.resources.requests", "must have at most 16 items"),
        # The API server names map entries two ways: this for schema errors, [memory] for CEL's.
        ("ok", {"resources": {"limits": {"memory": "1" * 65}}}, "spec.resources.limits.memory",
         "Too long"),
        ("ok", {"replicas": MAX_REPLICAS + 1}, "spec.replicas",
         f"less than or equal to {MAX_REPLICAS}"),
        ("ok", {"replicas": 2, "elastic": {"minReplicas": MAX_REPLICAS + 1, "maxReplicas": 1}},
         "spec.elastic.minReplicas", f"less than or equal to {MAX_REPLICAS}"),
        ("ok", {"tensorboard": {"enabled": True}}, "spec.tensorboard",
         "tensorboard needs checkpoint.volume"),
        ("ok", {"tensorboard": {"enabled": True}, "checkpoint": {"path": "/c"}},
         "spec.tensorboard", "tensorboard needs checkpoint.volume"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)  # fmt: skip
def test_bad_input_is_refused_at_apply_with_the_field_named(
    kubectl, crd, namespace, name, spec, field, message
):
    stderr = refused(apply(kubectl, namespace, name, **spec))
    assert field in stderr and message in stderr, stderr


GOOD_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "12Gi", "example.com/foo": 1},
    "limits": {"cpu": "1.5", "memory": "12Gi", "ephemeral-storage": "1e9"},
}


@pytest.mark.parametrize("length", [50, MAX_NAME_LENGTH])
def test_good_quantities_and_a_long_name_are_accepted_and_stored_as_written(
    kubectl, crd, namespace, length
):
    name = "j" + "0" * (length - 1)
    # Suspended: where an operator runs in the same test session, it makes no 1024 pods.
    proc = apply(kubectl, namespace, name, resources=GOOD_RESOURCES, sharedMemory="16Gi",
                 replicas=MAX_REPLICAS, suspend=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(kubectl("get", "-n", namespace, f"tj/{name}", "-o", "json").stdout)
    assert stored["spec"]["resources"] == GOOD_RESOURCES
    assert stored["spec"]["sharedMemory"] == "16Gi"


def test_defaults_pass_the_rules(kubectl, crd, namespace):
    # The default sharedMemory (2Gi) goes through the same rule as a written one.
    proc = apply(kubectl, namespace, "plain")
    assert proc.returncode == 0, proc.stderr


def test_kubectl_scale_past_the_replica_bound_is_refused(kubectl, crd, namespace):
    assert apply(kubectl, namespace, "scaled").returncode == 0
    proc = kubectl(
        "scale", "-n", namespace, "tj/scaled", f"--replicas={MAX_REPLICAS + 1}", check=False
    )
    assert "spec.replicas" in refused(proc)


QUANTITIES = [
    "500m", "1.5", "12Gi", "4", "0", "1e3", "1E-3", ".5", "5.", "+1", "100u", "3n", "2E", "1Ei",
    "abc", "12 gigs", "12GB", "1K", "1ki", "1e", "1e1.5", " 1", "--1", ".", "1.2.3", "1Gi1",
    "0x10", "-1", "-1Gi",
    # Kubernetes' parser lets the digits go missing (these are 0), mostly:
    "Gi", "-", ".5Gi", "1.G", "1e-20", "Ei", "-.e-20", "1e99999999999999999999",
]  # fmt: skip


def test_the_parser_and_the_api_server_agree_on_what_a_quantity_is(kubectl, crd, namespace):
    """The parser's own grammar (for objects stored before the rules) against CEL's
    isQuantity, which is Kubernetes' own parser."""
    disagree = []
    for text in QUANTITIES:
        proc = apply(kubectl, namespace, "q", "--dry-run=server",
                     resources={"requests": {"cpu": text}})  # fmt: skip
        parsed = parse_quantity(text)
        ours = parsed is not None and parsed >= 0
        if (proc.returncode == 0) != ours:
            disagree.append((text, proc.returncode == 0, ours, proc.stderr.strip()))
    assert not disagree, disagree


def test_the_crd_keeps_its_rules_once_applied(kubectl, crd):
    """The API server accepted the CRD with its rules (a rule over its cost budget would have
    refused the whole CRD) and kept them (nothing was pruned)."""
    served = json.loads(kubectl("get", "crd", "trainingjobs.joule.dev", "-o", "json").stdout)
    ours = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema = served["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["x-kubernetes-validations"] == ours["x-kubernetes-validations"]
    requests = schema["properties"]["spec"]["properties"]["resources"]["properties"]["requests"]
    assert requests["additionalProperties"]["x-kubernetes-validations"]


def without_name_rules(crd: dict[str, Any]) -> dict[str, Any]:
    old = copy.deepcopy(crd)
    schema = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema["x-kubernetes-validations"] = [
        r for r in schema["x-kubernetes-validations"] if "metadata.name" not in r["rule"]
    ]
    return old


@pytest.fixture
def restore_crd(kubectl, crd, namespace) -> Iterator[Callable[[], None]]:
    """Puts the CRD as it was before the name rules in place, and yields what brings the real
    one back (done again on teardown, whatever the test did). Tests run one at a time, so
    no other test sees the swap."""
    current = yaml.safe_load(CRD.read_text())

    def accepted(name: str) -> bool:
        return apply(kubectl, namespace, name, "--dry-run=server").returncode == 0

    def restore() -> None:
        kubectl("apply", "-f", "-", stdin=yaml.safe_dump(current))
        wait_for(lambda: not accepted("7b-probe"), what="the CRD with its name rules again")

    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(without_name_rules(current)))
    try:
        wait_for(lambda: accepted("7b-probe"), what="the CRD without its name rules")
        yield restore
    finally:
        restore()


def test_a_job_named_before_the_rules_can_still_be_updated_and_deleted(
    kubectl, restore_crd, namespace
):
    """The name rules run on create only: a job stored before them must still take the
    operator's status (InvalidSpec), labels, finalizers and its deletion."""
    name = "7b-" + "x" * 60
    # Suspended: an operator running in the same session would try to make its pods.
    assert apply(kubectl, namespace, name, suspend=True).returncode == 0
    restore_crd()
    ref = ["-n", namespace, f"tj/{name}"]
    status = {"status": {"phase": "Failed", "reason": "InvalidSpec", "message": "bad name"}}
    kubectl("patch", *ref, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    kubectl("label", *ref, "team=a")
    kubectl("patch", *ref, "--type=merge", "-p", '{"metadata":{"finalizers":["example.com/x"]}}')
    kubectl("patch", *ref, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    kubectl("delete", *ref, "--wait=true", "--timeout=30s")
