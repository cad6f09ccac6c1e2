"""The parser's limits are the CRD's. Both refuse bad input, the API server at `kubectl apply`
and the parser for objects stored before a rule existed; these tests read the CRD, so a limit
changed in one place and not the other fails here instead of in a cluster."""

from pathlib import Path
from typing import Any

import yaml

from joule.api.types import (
    INT_FIELDS,
    MAX_REPLICAS,
)

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "joule.dev_trainingjobs.yaml"


def root_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def spec_schema() -> dict[str, Any]:
    return root_schema()["properties"]["spec"]


def integer_fields(schema: dict[str, Any], path: str = "spec") -> dict[str, dict[str, Any]]:
    """Every integer field of the schema, by path (as INT_FIELDS names them)."""
    if schema.get("type") == "integer":
        return {path: schema}
    found = {}
    for key, sub in schema.get("properties", {}).items():
        found |= integer_fields(sub, f"{path}.{key}")
    return found


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
