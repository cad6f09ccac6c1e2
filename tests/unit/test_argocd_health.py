"""The Argo CD health check for TrainingJobs (examples/gitops/argocd/health.lua), run by a
real Lua 5.1 interpreter (lupa), as Argo CD's gopher-lua runs it: the object as the global
``obj``, the script's returned table read as ``hs.status`` and ``hs.message``.

tests/integration/test_gitops.py runs the same function on the objects the operator writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa.lua51 as lua51  # Argo CD runs Lua 5.1 (gopher-lua)
import pytest
import yaml

GITOPS = Path(__file__).resolve().parents[2] / "examples" / "gitops"
HEALTH_LUA = GITOPS / "argocd" / "health.lua"
ARGOCD_CM = GITOPS / "argocd" / "argocd-cm.yaml"
HEALTH_KEY = "resource.customizations.health.joule.dev_TrainingJob"


def _to_lua(lua: Any, value: Any) -> Any:
    """Python (JSON) -> Lua as Argo CD converts an object: maps and lists become tables
    (lists 1-based), null becomes nil, i.e. the key is absent."""
    if isinstance(value, dict):
        table = lua.table()
        for k, v in value.items():
            if v is not None:
                table[k] = _to_lua(lua, v)
        return table
    if isinstance(value, list):
        table = lua.table()
        for i, v in enumerate(value, start=1):
            if v is not None:
                table[i] = _to_lua(lua, v)
        return table
    return value


def argocd_health(obj: dict[str, Any], script: str | None = None) -> tuple[str, str | None]:
    """(hs.status, hs.message) of the health check on ``obj``."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=False)
    lua.globals().obj = _to_lua(lua, obj)
    hs = lua.execute(script if script is not None else HEALTH_LUA.read_text())
    return hs["status"], hs["message"]


def job(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "j", "namespace": "ns", "generation": generation},
        "spec": {"image": "trainer:test", "replicas": 2},
    }
    if status is not None:
        body["status"] = status
    return body


def status(phase: str, reason: str = "", message: str = "", observed: int = 1) -> dict:
    st: dict[str, Any] = {"phase": phase, "observedGeneration": observed, "replicas": 2}
    if reason:
        st["reason"] = reason
    if message:
        st["message"] = message
    st["conditions"] = [{"type": "Ready", "status": "False", "reason": reason or phase}]
    return st


@pytest.mark.parametrize(
    ("phase", "reason", "message", "health"),
    [
        ("Pending", "WaitingForScheduling", "0/2 workers scheduled", "Progressing"),
        ("Pending", "Unschedulable", "0/1 nodes are available", "Progressing"),
        ("Starting", "WaitingForWorkers", "1/2 workers running, 2 scheduled", "Progressing"),
        ("Resizing", "ScaleUp", "2 -> 4 workers", "Progressing"),
        ("Running", "AllWorkersRunning", "2 workers running", "Healthy"),
        ("Succeeded", "Completed", "all workers exited 0", "Healthy"),
        ("Failed", "BackoffLimitExceeded", "j-worker-0 failed (Error, exit code 1)", "Degraded"),
        ("Suspended", "Suspended", "spec.suspend is true; workers deleted", "Suspended"),
    ],
)
def test_each_phase_has_its_health_and_says_why(phase, reason, message, health):
    assert argocd_health(job(status(phase, reason, message))) == (
        health,
        f"{reason}: {message}",
    )


def test_the_message_falls_back_to_what_status_has():
    assert argocd_health(job(status("Running", reason="AllWorkersRunning"))) == (
        "Healthy",
        "AllWorkersRunning",
    )
    assert argocd_health(job(status("Failed", message="it broke"))) == ("Degraded", "it broke")
    assert argocd_health(job(status("Suspended"))) == ("Suspended", "Suspended")


def test_no_status_yet_is_progressing_waiting_for_the_operator():
    assert argocd_health(job(None)) == ("Progressing", "Waiting for the operator")
    # A status without a phase (written by something else, or half-way) is no verdict either.
    assert argocd_health(job({"conditions": []})) == ("Progressing", "Waiting for the operator")


@pytest.mark.parametrize("phase", ["Running", "Succeeded", "Failed", "Suspended", "Pending"])
def test_a_status_older_than_the_spec_is_progressing_whatever_its_phase(phase):
    health, message = argocd_health(job(status(phase, "R", "m", observed=3), generation=4))
    assert health == "Progressing"
    assert message == (
        "Waiting for the operator to observe generation 4 (status is of generation 3)"
    )


def test_a_current_status_is_judged_by_its_phase():
    assert argocd_health(job(status("Failed", "R", "m", observed=4), generation=4))[0] == (
        "Degraded"
    )
    # Without observedGeneration (kstatus skips the check then too) the phase decides.
    st = status("Running", "R", "m")
    del st["observedGeneration"]
    assert argocd_health(job(st, generation=7))[0] == "Healthy"


def test_an_unknown_phase_is_unknown():
    assert argocd_health(job(status("Exploded", "R", "m"))) == (
        "Unknown",
        "Unknown phase Exploded",
    )


def test_every_phase_the_operator_has_is_mapped():
    from joule.api.types import Phase

    for phase in Phase:
        assert argocd_health(job(status(phase.value, "R", "m")))[0] != "Unknown", phase


def test_the_argocd_cm_snippet_holds_health_lua_verbatim():
    docs = [d for d in yaml.safe_load_all(ARGOCD_CM.read_text()) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [("ConfigMap", "argocd-cm")]
    assert docs[0]["data"][HEALTH_KEY] == HEALTH_LUA.read_text()
    # And it is that text, run from the ConfigMap, that Argo CD would run.
    assert argocd_health(job(status("Running", "R", "m")), docs[0]["data"][HEALTH_KEY]) == (
        "Healthy",
        "R: m",
    )
