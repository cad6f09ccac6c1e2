"""spec.tensorboard: what the parser accepts, what the workers are told, and the TensorBoard
Deployment and Service the operator makes (never taken for a worker)."""

from __future__ import annotations

import pytest

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.builders import worker_pod
from joule.builders.labels import selector
from joule.builders.tensorboard import (
    tensorboard_deployment,
    tensorboard_service,
    tensorboard_status,
    tensorboard_url,
)
from joule.constants import TENSORBOARD_ENV

JOB = JobRef("gpt", "ml", "uid-1")
PLACEMENT = {
    "nodeSelector": {"pool": "a100"},
    "tolerations": [{"key": "gpu", "operator": "Exists"}],
}


def spec(**extra) -> TrainingJobSpec:
    body = {
        "image": "trainer:1",
        "checkpoint": {"path": "/ckpt/", "volume": "c"},
        "volumes": [{"name": "c", "persistentVolumeClaim": {"claimName": "gpt-ckpt"}},
                    {"name": "data", "emptyDir": {}}],
        "tensorboard": {"enabled": True},
        **PLACEMENT,
        **extra,
    }  # fmt: skip
    return TrainingJobSpec.parse(body)


def env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_it_needs_the_checkpoint_volume_it_reads_from():
    with pytest.raises(SpecError, match=r"spec\.tensorboard needs spec\.checkpoint\.volume"):
        TrainingJobSpec.parse({"image": "x", "tensorboard": {"enabled": True}})
    with pytest.raises(SpecError, match=r"needs spec\.checkpoint\.volume"):
        TrainingJobSpec.parse(
            {"image": "x", "checkpoint": {"path": "/c"}, "tensorboard": {"enabled": True}}
        )
    off = TrainingJobSpec.parse({"image": "x", "tensorboard": {"enabled": False}})
    assert not off.tensorboard.enabled


def test_workers_are_told_where_to_write_event_files_only_when_it_is_on():
    on = spec()
    assert on.tensorboard.log_dir == "/ckpt/tensorboard"
    assert env(worker_pod(JOB, on, 0))[TENSORBOARD_ENV] == "/ckpt/tensorboard"
    off = spec(tensorboard={"enabled": False})
    assert TENSORBOARD_ENV not in env(worker_pod(JOB, off, 0))


def test_the_deployment_reads_the_checkpoint_volume_where_the_workers_may_run():
    d = tensorboard_deployment(JOB, spec())
    pod = d["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "trainer:1"
    assert container["command"][:3] == ["tensorboard", "--logdir", "/ckpt/tensorboard"]
    assert container["volumeMounts"] == [{"name": "c", "mountPath": "/ckpt/", "readOnly": True}]
    assert pod["volumes"] == [{"name": "c", "persistentVolumeClaim": {"claimName": "gpt-ckpt"}}]
    assert pod["nodeSelector"] == PLACEMENT["nodeSelector"]
    assert pod["tolerations"] == PLACEMENT["tolerations"]
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert d["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # Not a worker: the workers' selector (Service, scale subresource, the operator's list)
    # does not match it.
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert not selector(JOB).items() <= labels.items()
    assert tensorboard_service(JOB)["spec"]["selector"] == labels


def test_its_own_image_where_the_job_names_one():
    d = tensorboard_deployment(JOB, spec(tensorboard={"enabled": True, "image": "tb:2"}))
    assert d["spec"]["template"]["spec"]["containers"][0]["image"] == "tb:2"


def test_status_has_the_url_once_the_job_started_and_loses_it_when_turned_off():
    assert "tensorboard" not in tensorboard_status(JOB, spec(), {"phase": "Pending"})
    started = tensorboard_status(JOB, spec(), {"startTime": "2026-11-30T08:00:00Z"})
    assert started["tensorboard"] == {
        "url": "http://gpt-tensorboard.ml.svc:6006", "logDir": "/ckpt/tensorboard"
    }  # fmt: skip
    assert tensorboard_url(JOB) == started["tensorboard"]["url"]
    off = spec(tensorboard={"enabled": False})
    assert "tensorboard" not in tensorboard_status(JOB, off, started)
