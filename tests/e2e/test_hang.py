"""A hung worker, on the real node: workers that stop training (their /metrics still answer,
their samples counter stands still) are found by spec.progress.hangTimeoutSeconds, restarted
as a group and counted, and the new group trains on to the end.

The workers run a script of the user's own in the trainer image, reporting progress with
``joule_trainer.report`` (the series Joule's trainer serves too): a few steps, then, on its
first run only, a wait for ever, as a stuck data loader or a lost collective would. A marker
on the job's hostPath volume stands for the checkpoint that tells a rerun where it was.
"""

from __future__ import annotations

import time

import pytest
import yaml
from kubernetes import client

from tests.conftest import TRAINER_IMAGE, wait_for
from tests.e2e.test_local_loop import status
from tests.e2e.test_restart_backoff import job_events

TIMEOUT = 60  # the CRD's least hangTimeoutSeconds
STALL_ONCE = """
import os, sys, time
import joule_trainer
marker = f"/state/{os.environ['JOULE_REPLICA_INDEX']}-stalled"
rerun = os.path.exists(marker)
for step in range(1, 6):
    joule_trainer.report(samples=8)
    print(f"step {step}", flush=True)
    time.sleep(1)
if not rerun:
    open(marker, "w").write("stalled")
    print("stalling", flush=True)
    while True:  # /metrics still answers; no sample is trained
        time.sleep(3600)
print("done", flush=True)
"""


def worker_uids(core: client.CoreV1Api, namespace: str) -> dict[str, str]:
    pods = core.list_namespaced_pod(namespace, label_selector="joule.dev/job-name=stall").items
    return {p.metadata.name: p.metadata.uid for p in pods if not p.metadata.deletion_timestamp}


@pytest.mark.timeout(300)
def test_workers_that_stop_training_are_restarted_as_a_group_and_train_on(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    tmp_path.chmod(0o777)  # the workers run as uid 1000
    body = {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "stall"},
        "spec": {
            "image": TRAINER_IMAGE,
            "command": ["python", "-c", STALL_ONCE],
            "replicas": 2,
            "gpusPerReplica": 1,
            "backoffLimit": 1,
            "progress": {"hangTimeoutSeconds": TIMEOUT},
            "scaling": {"evaluationIntervalSeconds": 5},
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            "volumes": [{"name": "state", "hostPath": {"path": str(tmp_path)}}],
            "volumeMounts": [{"name": "state", "mountPath": "/state"}],
            **local_node.placement(),
        },
    }
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body))

    seen: list[dict] = []
    first: dict[str, str] = {}

    def finished() -> bool:
        st = status(api, namespace, "stall")
        if st and (not seen or st != seen[-1]):
            seen.append(st)
        if st.get("phase") == "Running" and not first and st.get("restarts") == 0:
            first.update(worker_uids(core, namespace))
        return st.get("phase") in ("Failed", "Succeeded")

    started = time.monotonic()
    try:
        wait_for(finished, timeout=240, interval=0.5, what="stall to finish")
    except AssertionError:
        raise AssertionError(f"stall did not finish; statuses: {seen[-3:]}") from None
    took = time.monotonic() - started
    final = seen[-1]
    assert (final["phase"], final["restarts"]) == ("Succeeded", 1), final

    # While the new group started, the job said why, in its reason and a condition.
    hung = [s for s in seen if s.get("reason") == "Hung"]
    assert hung, [(s.get("phase"), s.get("reason")) for s in seen]
    # The clock ran while the first group stood still, from the last new sample it saw.
    before = seen[: seen.index(hung[0])]
    clocked = [s["progress"] for s in before if "lastProgressTime" in s.get("progress", {})]
    assert clocked, [(s.get("phase"), s.get("reason")) for s in before]
    last_step = clocked[-1]["lastProgressTime"]
    assert f"hangTimeoutSeconds={TIMEOUT}" in hung[0]["message"], hung[0]
    assert last_step in hung[0]["message"], (last_step, hung[0]["message"])
    reconciling = {c["type"]: c for c in hung[0]["conditions"]}["Reconciling"]
    assert (reconciling["status"], reconciling["reason"]) == ("True", "Hung"), reconciling

    [event] = [e for e in job_events(core, namespace, "stall") if e.reason == "WorkerHung"]
    assert event.type == "Warning" and f"hangTimeoutSeconds={TIMEOUT}" in event.message
    assert last_step in event.message and "restart 1 of 1" in event.message, event.message

    # Both workers were recreated (new pods of the same names), and the new ones trained on.
    assert sorted(first) == ["stall-worker-0", "stall-worker-1"], first
    after = worker_uids(core, namespace)
    assert sorted(after) == sorted(first) and not set(after.values()) & set(first.values())
    print(f"\nhung, restarted and finished in {took:.0f}s (hangTimeoutSeconds={TIMEOUT})")
