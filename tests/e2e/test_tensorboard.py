"""spec.tensorboard on the real node, with the chart's operator: the job's TensorBoard runs
from the trainer image, reads the event files the workers write on the checkpoint volume,
shows the loss as the job trains, is never counted as a worker, and goes when turned off."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from kubernetes import client

from joule.constants import GROUP, PLURAL, VERSION
from tests.conftest import wait_for
from tests.e2e.test_local_loop import apply, running_pods, status

TRAIN = ["--steps", "100000", "--checkpoint-every-steps", "50", "--log-every", "2"]


def tensorboard_pod(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod | None:
    pods = core.list_namespaced_pod(namespace, label_selector=f"joule.dev/tensorboard={job}")
    ready = [
        p for p in pods.items
        if any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]  # fmt: skip
    return ready[0] if ready else None


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.mark.timeout(420)
def test_a_jobs_tensorboard_shows_its_loss_and_goes_when_turned_off(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    apply(kubectl, namespace, "tb", local_node, tmp_path, TRAIN, replicas=1,
          tensorboard={"enabled": True})  # fmt: skip
    url = wait_for(lambda: status(api, namespace, "tb").get("tensorboard", {}).get("url"),
                   timeout=60, what="status.tensorboard.url")  # fmt: skip
    assert url == f"http://tb-tensorboard.{namespace}.svc:6006"

    # Status is written first, then the objects it names (the operator's order).
    def service() -> client.V1Service | None:
        found = core.list_namespaced_service(
            namespace, field_selector="metadata.name=tb-tensorboard"
        )
        return found.items[0] if found.items else None

    service = wait_for(service, timeout=30, what="the TensorBoard Service")
    assert [p.port for p in service.spec.ports] == [6006]

    pod = wait_for(lambda: tensorboard_pod(core, namespace, "tb"), timeout=180, interval=1.0,
                   what="the TensorBoard pod to be ready")  # fmt: skip
    base = f"http://{pod.status.pod_ip}:6006"

    def loss_points() -> list | None:
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        runs = [run for run, found in tags.items() if "loss" in found]
        if not runs:
            return None
        query = urllib.parse.urlencode({"run": runs[0], "tag": "loss"})
        points = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        return points if len(points) >= 2 else None

    points = wait_for(loss_points, timeout=180, interval=3.0,
                      what="TensorBoard to show two loss points")  # fmt: skip
    steps = [p[1] for p in points]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    # One worker, whatever else runs with the job's name in it.
    assert len(running_pods(core, namespace, "tb")) == 1
    assert status(api, namespace, "tb").get("readyReplicas") == 1

    client.CustomObjectsApi(api).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "tb", {"spec": {"tensorboard": {"enabled": False}}}
    )

    def gone() -> bool:
        deployments = client.AppsV1Api(api).list_namespaced_deployment(namespace).items
        services = [s.metadata.name for s in core.list_namespaced_service(namespace).items]
        return not deployments and "tb-tensorboard" not in services

    wait_for(gone, timeout=60, what="the TensorBoard Deployment and Service to go")
    assert "tensorboard" not in status(api, namespace, "tb")
    assert len(running_pods(core, namespace, "tb")) == 1  # training goes on
