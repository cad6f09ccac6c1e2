"""The whole loop for real: the operator, the control plane, and a real node (kubelet +
containerd) whose pods run the trainer image: torchrun training on this machine's CPU."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import wait_for

GROUP, VERSION, PLURAL = "joule.dev", "v1alpha1", "trainingjobs"
IMAGE = "ghcr.io/joule-dev/trainer:0.1.0"


def apply(
    kubectl, namespace: str, name: str, local_node, ckpt: Path, train: list[str], **spec
) -> str:
    """Apply a trainer job on the real node; returns the manifest, as a user keeps it."""
    # The shared checkpoint folder: the trainer runs as uid 1000 in its container.
    ckpt.chmod(0o777)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": IMAGE,
            "args": ["--model", "gpt", "--global-batch", "16", "--micro-batch", "8", *train],
            "env": [
                {"name": "OMP_NUM_THREADS", "value": "1"},
                # No GPU here: the trainer's meter is the labelled CPU estimate.
                {"name": "JOULE_ENERGY_SOURCE", "value": "estimated"},
            ],
            "gpusPerReplica": 1,
            # A CPU request, as a real job has: a BestEffort pod gets the kernel's smallest CPU
            # weight, and on a busy machine its torchrun agent then misses the rendezvous
            # heartbeats and a newcomer forms a second group (seen in CI).
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "sharedMemory": "64Mi",
            "checkpoint": {"path": "/checkpoints", "volume": "ckpt"},
            "volumes": [{"name": "ckpt", "hostPath": {"path": str(ckpt)}}],
            **local_node.placement(),
            **spec,
        },
    }
    manifest = yaml.safe_dump(body)
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest)
    return manifest


def assert_no_drift(kubectl, namespace: str, manifest: str) -> None:
    """What a GitOps tool compares: the user's manifest against the live object. The operator
    writes only status, so its resizes and power limits are no drift (a client-side diff, as
    apply() applies client-side; test_gitops does the server-side pair).

    kubectl's own record of the last apply differs in one way of its own making: made by a
    create, it holds `"annotations": {}`, which the diff's new record lacks. That is kubectl's
    bookkeeping, not the object; every other changed line is drift."""
    diff = kubectl("diff", "-n", namespace, "-f", "-", stdin=manifest, check=False)
    assert diff.returncode in (0, 1), diff.stderr
    changed = [
        line for line in diff.stdout.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]  # fmt: skip
    records = [json.loads(line[1:]) for line in changed if line[1:].lstrip().startswith("{")]
    for record in records:
        if record["metadata"].get("annotations") == {}:
            del record["metadata"]["annotations"]
    assert len(changed) == len(records) and all(r == records[0] for r in records), diff.stdout


def status(api, namespace: str, name: str) -> dict:
    job = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return job.get("status", {})


def events(local_node, namespace: str, job: str) -> list[dict]:
    """Rank 0's JSON log lines, from whichever pods held rank 0, in time order."""
    out = []
    for log in local_node.pod_logs(namespace, f"{job}-worker-"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith('{"ts"'):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return sorted(out, key=lambda e: e["ts"])


def wait_event(local_node, namespace, job, pred, timeout=180.0, after: float = 0.0) -> dict:
    def hit():
        found = [e for e in events(local_node, namespace, job) if e["ts"] > after and pred(e)]
        return found[0] if found else None

    try:
        return wait_for(hit, timeout=timeout, interval=0.5, what=f"a trainer event of {job}")
    except AssertionError:
        tail = events(local_node, namespace, job)[-5:]
        raise AssertionError(f"no matching event of {job}; last: {tail}") from None


def wait_phase(api, namespace, name, phase, timeout=300.0) -> dict:
    def check():
        s = status(api, namespace, name)
        if s.get("phase") == "Failed" and phase != "Failed":
            raise AssertionError(f"{name} failed: {s}")
        return s if s.get("phase") == phase else None

    return wait_for(check, timeout=timeout, interval=1.0, what=f"{name} to be {phase}")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def running_pods(core, namespace, job) -> list[client.V1Pod]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"joule.dev/job-name={job}").items
    return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]


def test_two_workers_train_to_completion_and_every_metrics_endpoint_answers(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    train = ["--steps", "200", "--checkpoint-every-steps", "50", "--log-every", "10"]
    apply(kubectl, namespace, "gpt", local_node, tmp_path, train, replicas=2)
    wait_event(local_node, namespace, "gpt", lambda e: e["event"] == "step" and e["world"] == 2)

    # Scraped during the run: each worker at its own pod address, and the operator.
    pods = running_pods(core, namespace, "gpt")
    assert len(pods) == 2 and len({p.status.pod_ip for p in pods}) == 2
    ranks = set()
    for pod in pods:
        assert ipaddress.ip_address(pod.status.pod_ip) in local_node.layout.pod_subnet
        text = scrape(f"http://{pod.status.pod_ip}:9090/metrics")
        steps = next(line for line in text.splitlines() if line.startswith("joule_trainer_steps_"))
        assert 'job="gpt"' in steps
        ranks.add(steps.split('rank="')[1].split('"')[0])
        assert "joule_trainer_energy_joules_total{" in text and 'source="estimated"' in text
    assert ranks == {"0", "1"}
    operator_text = scrape(operator.metrics_url)
    assert "joule_operator_reconcile_duration_seconds" in operator_text

    done = wait_phase(api, namespace, "gpt", "Succeeded")
    assert done.get("completionTime")
    steps = [e for e in events(local_node, namespace, "gpt") if e["event"] == "step"]
    assert steps[-1]["step"] == 200
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, (steps[0], steps[-1])
    assert events(local_node, namespace, "gpt")[-1]["event"] == "done"


@pytest.mark.timeout(600)
def test_scale_2_to_1_to_2_reforms_the_group_and_continues_from_the_checkpoint(
    kubectl, api, namespace, operator, local_node, tmp_path
):
    train = ["--steps", "100000", "--checkpoint-every-steps", "10", "--log-every", "5"]
    elastic = {"minReplicas": 1, "maxReplicas": 2}
    apply(kubectl, namespace, "el", local_node, tmp_path, train, replicas=2, elastic=elastic)
    two = wait_event(
        local_node, namespace, "el", lambda e: e["event"] == "step" and e["world"] == 2
    )
    latencies = {}
    for size, previous in ((1, 2), (2, 1)):
        sent, sent_wall = time.monotonic(), time.time()
        kubectl("scale", "-n", namespace, "tj/el", f"--replicas={size}")
        resumed = wait_event(
            local_node,
            namespace,
            "el",
            lambda e, size=size: e["event"] == "resumed" and e["world"] == size,
            after=sent_wall,
        )
        assert resumed["previous_world"] == previous
        assert resumed["step"] >= two["step"]  # from the checkpoint, not from 0
        wait_event(  # and trains at the new size
            local_node,
            namespace,
            "el",
            lambda e, size=size: e["event"] == "step" and e["world"] == size,
            after=resumed["ts"],
        )
        latencies[f"{previous}->{size}"] = time.monotonic() - sent
        two = resumed
    print(f"\nresize latency (scale command to training at the new size): {latencies}")
    import torch

    saved = wait_event(
        local_node, namespace, "el", lambda e: e["event"] == "checkpoint", after=two["ts"]
    )  # the first checkpoint written at the new size
    for _ in range(10):  # the trainer keeps only its newest checkpoints: read the newest
        newest = sorted(tmp_path.glob("step-*.pt"))[-1]
        with contextlib.suppress(FileNotFoundError):
            state = torch.load(newest, weights_only=False)
            break
    assert state["step"] >= saved["step"]  # written at the new size
    assert state["global_batch"] == 16 and state["world"] == 2


def worker_processes(core, local_node, namespace: str, pod: str) -> tuple[int, list[int]]:
    """The container's main process (joule-launch, which execs torchrun) and its training
    processes, as host pids from containerd."""
    status = core.read_namespaced_pod(pod, namespace).status
    pid = local_node.container_pid(status.container_statuses[0].container_id)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return pid, [int(c) for c in children]


@pytest.mark.timeout(600)
def test_killed_worker_processes_are_recovered_and_the_job_still_succeeds(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    train = ["--steps", "300", "--checkpoint-every-steps", "10", "--log-every", "5"]
    apply(kubectl, namespace, "kill", local_node, tmp_path, train, replicas=2, backoffLimit=3)
    wait_event(local_node, namespace, "kill", lambda e: e["event"] == "step" and e["step"] >= 30)

    # 1. A training process dies: torchrun restarts the group inside the pods.
    _, trainers = worker_processes(core, local_node, namespace, "kill-worker-1")
    assert trainers, "torchrun has no training process"
    killed_at = time.time()
    os.kill(trainers[0], signal.SIGKILL)
    resumed = wait_event(
        local_node, namespace, "kill", lambda e: e["event"] == "resumed", after=killed_at
    )
    assert resumed["step"] >= 30

    # 2. A whole worker dies (its torchrun too): the operator replaces the pod.
    wait_event(
        local_node, namespace, "kill",
        lambda e: e["event"] == "step" and e["step"] > resumed["step"], after=resumed["ts"],
    )  # fmt: skip
    agent_pid, _ = worker_processes(core, local_node, namespace, "kill-worker-1")
    old_uid = core.read_namespaced_pod("kill-worker-1", namespace).metadata.uid
    os.kill(agent_pid, signal.SIGKILL)

    def replaced():
        with contextlib.suppress(client.ApiException):
            pod = core.read_namespaced_pod("kill-worker-1", namespace)
            return pod.metadata.uid != old_uid and pod.status.phase == "Running"
        return False

    wait_for(replaced, timeout=120, interval=0.5, what="the operator to replace the worker")
    done = wait_phase(api, namespace, "kill", "Succeeded", timeout=400)
    assert done["restarts"] >= 1  # the operator counted the replaced worker
    assert events(local_node, namespace, "kill")[-1]["event"] == "done"
