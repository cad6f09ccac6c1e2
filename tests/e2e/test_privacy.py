"""Differential privacy end to end on the real node: spec.privacy reaches Joule's trainer in
two workers (DP-SGD with Opacus under DDP), epsilon grows step by step, and the trainer stops,
checkpointed, before a step would pass the target; the operator ends the job Succeeded with
reason PrivacyBudgetReached and what was spent in status.privacy. A restart finds the
accountant at its target in the checkpoint and trains no further step."""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.e2e.test_local_loop import apply, events, status, wait_phase

TRAIN = ["--steps", "1000", "--checkpoint-every-steps", "10", "--log-every", "1"]
# On the bundled corpus with the trainer's defaults, sigma 0.6 spends epsilon 3 by step 20.
PRIVACY = {"noiseMultiplier": 0.6, "targetEpsilon": 3}


@pytest.mark.timeout(600)
def test_training_stops_at_its_privacy_budget_and_the_job_says_what_it_spent(
    kubectl, api, namespace, operator, local_node, tmp_path
):
    apply(kubectl, namespace, "dp", local_node, tmp_path, TRAIN, replicas=2, privacy=PRIVACY,
          scaling={"evaluationIntervalSeconds": 5})  # fmt: skip
    # While it trains, status.privacy follows the epsilon rank 0 says it has spent.
    live = wait_for(
        lambda: (status(api, namespace, "dp").get("privacy") or {}).get("epsilon")
        and status(api, namespace, "dp"),
        timeout=300, interval=1.0, what="the epsilon spent in status",
    )  # fmt: skip
    assert live["phase"] in ("Running", "Resizing", "Succeeded"), live
    st = wait_phase(api, namespace, "dp", "Succeeded", timeout=420)
    assert live["privacy"]["epsilon"] <= st["privacy"]["epsilon"], (live, st)
    assert st["reason"] == "PrivacyBudgetReached", st
    spent = st["privacy"]
    assert spent["targetEpsilon"] == 3 and 0 < spent["epsilon"] <= 3, spent
    assert 5 <= spent["step"] < 1000, spent  # stopped early, at the budget
    assert f"at step {spent['step']}" in st["message"], st
    steps = [e for e in events(local_node, namespace, "dp") if e["event"] == "step"]
    eps = [e["epsilon"] for e in steps]
    assert eps == sorted(eps) and eps[0] < eps[-1] <= 3, eps  # grows, never past the target
    assert {e["world"] for e in steps} == {2}
    assert steps[-1]["step"] == spent["step"], (steps[-1], spent)
    print(f"\nprivacy: {st['message']}; epsilon by step: {[round(x, 3) for x in eps]}")
