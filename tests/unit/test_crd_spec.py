"""The parser's limits are the CRD's. Both refuse bad input, the API server at `kubectl apply`
and the parser for objects stored before a rule existed; these tests read the CRD, so a limit
changed in one place and not the other fails here instead of in a cluster."""

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.api.types import (
    INT_FIELDS,
    MAX_NAME_LENGTH,
    MAX_QUANTITY_LENGTH,
    MAX_REPLICAS,
    MAX_RESOURCES,
    NAME_PATTERN,
)
from joule.builders.pod import pod_name
from joule.builders.service import service_name
from joule.builders.tensorboard import tensorboard_name

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "joule.dev_trainingjobs.yaml"
DNS_LABEL = 63


def root_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_schema() -> dict[str, Any]:
    return root_schema()["properties"]["spec"]


def integer_fields(schema: dict[str, Any], path: str = "spec") -> dict[str, dict[str, Any]]:
    """Every integer field of the schema, by path (as INT_FIELDS names them)."""
    if path == "spec.template":
        return {}  # the pod's own fields: its validation bounds them, and the parser reads none
    if schema.get("type") == "integer":
        return {path: schema}
    found = {}
    for key, sub in schema.get("properties", {}).items():
        found |= integer_fields(sub, f"{path}.{key}")
    return found


def name_rules() -> list[dict[str, Any]]:
    return [
        r for r in root_schema()["x-kubernetes-validations"] if "self.metadata.name" in r["rule"]
    ]


def test_every_integer_field_has_the_crds_bounds_and_default():
    crd = {
        path: (s.get("minimum"), s.get("maximum"), s.get("default"))
        for path, s in integer_fields(spec_schema()).items()
    }
    ours = {path: (f.minimum, f.maximum, f.default) for path, f in INT_FIELDS.items()}
    assert ours == crd


def test_the_replica_bound_is_the_crds():
    elastic = spec_schema()["properties"]["elastic"]["properties"]
    assert spec_schema()["properties"]["replicas"]["maximum"] == MAX_REPLICAS
    assert elastic["maxReplicas"]["maximum"] == MAX_REPLICAS


def test_the_longest_name_makes_a_worker_name_that_just_fits_a_dns_label():
    """MAX_NAME_LENGTH is derived from the builders: the longest name any child of a job gets
    is its highest-index worker pod's (also its hostname), and it must fit 63 characters."""
    longest = JobRef("a" * MAX_NAME_LENGTH, "ns", "uid")
    names = [pod_name(longest, MAX_REPLICAS - 1), service_name(longest), tensorboard_name(longest)]
    assert max(len(n) for n in names) == DNS_LABEL  # fits, and no character to spare
    longer = JobRef("a" * (MAX_NAME_LENGTH + 1), "ns", "uid")
    assert len(pod_name(longer, MAX_REPLICAS - 1)) > DNS_LABEL


def test_the_crds_name_rules_are_the_parsers():
    rules = name_rules()
    sizes = [int(m) for r in rules for m in re.findall(r"name\.size\(\) <= (\d+)", r["rule"])]
    patterns = [m for r in rules for m in re.findall(r"\.matches\('([^']+)'\)", r["rule"])]
    assert sizes == [MAX_NAME_LENGTH] and patterns == [NAME_PATTERN]
    for rule in rules:
        # Names never change, so checking them on create is enough; checking them on every
        # update would block status writes and finalizer removal on an older, longer-named job.
        assert rule["optionalOldSelf"] is True and rule["rule"].startswith("oldSelf.hasValue() ||")
        assert rule["fieldPath"] == ".metadata.name"
    assert str(MAX_NAME_LENGTH) in rules[0]["message"]
    # Declared so that the rules' cost is bounded; the API server's own limit is 253.
    assert root_schema()["properties"]["metadata"]["properties"]["name"]["maxLength"] == 253


def test_quantity_bounds_are_the_parsers():
    resources = spec_schema()["properties"]["resources"]["properties"]
    for kind in ("requests", "limits"):
        assert resources[kind]["maxProperties"] == MAX_RESOURCES
        assert resources[kind]["additionalProperties"]["maxLength"] == MAX_QUANTITY_LENGTH
        rules = resources[kind]["additionalProperties"]["x-kubernetes-validations"]
        assert any("isQuantity(" in r["rule"] for r in rules)
    shm = spec_schema()["properties"]["sharedMemory"]
    assert shm["maxLength"] == MAX_QUANTITY_LENGTH
    assert any("isQuantity(" in r["rule"] for r in shm["x-kubernetes-validations"])


def test_the_shared_memory_default_is_a_valid_quantity():
    default = spec_schema()["properties"]["sharedMemory"]["default"]
    TrainingJobSpec.parse({"image": "x", "sharedMemory": default})


@pytest.mark.parametrize(
    "path", sorted(p for p in (ROOT / "examples").rglob("*.yaml")), ids=lambda p: p.name
)
def test_every_example_passes_the_parser_name_included(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "TrainingJob":
            try:
                TrainingJobSpec.parse(doc["spec"], name=doc["metadata"]["name"])
            except SpecError as exc:
                pytest.fail(f"{path}: {exc}")
