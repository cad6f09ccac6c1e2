"""spec.data against the real control plane: the staging pod comes first and alone, the
workers once it has finished, and its exit decides the job.

kwok runs the pods; the test writes the staging container's exit (code and termination
message) the way a kubelet would. What `joule-data stage` itself does is tested where it
runs: tests/integration/test_stage_s3.py (against the object store) and tests/trainer.
"""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.integration.test_operator import apply_job, events_of, job, pods_of, wait_phase


@pytest.fixture
def jobs(api, operator):
    return client.CustomObjectsApi(api)


CACHE = [{"name": "cache", "emptyDir": {}}]
S3 = {
    "s3": {
        "endpoint": "https://objects.example:9000",
        "bucket": "datasets",
        "prefix": "tiny/",
        "accessKeyId": {"secretKeyRef": {"name": "s3-creds", "key": "id"}},
        "secretAccessKey": {"secretKeyRef": {"name": "s3-creds", "key": "secret"}},
        "caBundle": {"configMapKeyRef": {"name": "s3-ca", "key": "ca.crt"}},
    }
}


def stage_job(kubectl, namespace: str, name: str, **spec) -> None:
    apply_job(kubectl, namespace, name, replicas=2, volumes=CACHE,
              data={"volume": "cache", "source": S3}, **spec)  # fmt: skip


def stage_exits(core, namespace: str, pod: str, code: int, message: str) -> None:
    """The staging container's end, as the kubelet writes it."""
    core.patch_namespaced_pod_status(pod, namespace, {"status": {
        "phase": "Succeeded" if code == 0 else "Failed",
        "containerStatuses": [{
            "name": "stage", "image": "trainer:test", "imageID": "", "ready": False,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "message": message,
                                     "reason": "Completed" if code == 0 else "Error"}},
        }],
    }})  # fmt: skip


def stage_pod(core, namespace: str, name: str) -> client.V1Pod | None:
    try:
        return core.read_namespaced_pod(f"{name}-stage", namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_workers_wait_for_the_staged_dataset_and_read_it(kubectl, jobs, core, namespace):
    stage_job(kubectl, namespace, "ds")
    pod = wait_for(lambda: stage_pod(core, namespace, "ds"), what="the staging pod")
    st = wait_for(
        lambda: (job(jobs, namespace, "ds").get("status") or {}).get("data"),
        what="status.data",
    )
    assert st["phase"] == "Staging", st
    assert st["source"] == "s3://datasets/tiny at https://objects.example:9000", st
    status = job(jobs, namespace, "ds")["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "StagingData"), status
    # No GPU while staging, and no worker.
    c = pod.spec.containers[0]
    assert not (c.resources.limits or {}).get("nvidia.com/gpu")
    assert [p.metadata.name for p in pods_of(core, namespace, "ds")] == ["ds-stage"]
    assert c.command[:4] == ["joule-data", "stage", "--s3", "datasets/tiny"], c.command
    assert "--into" in c.command and c.command[c.command.index("--into") + 1] == "/data/ds"
    # The credentials reach this pod only by reference: the operator never read the Secret
    # (it does not exist; its rights could not read it either).
    env = {e.name: e.value_from.secret_key_ref for e in c.env}
    assert (env["AWS_ACCESS_KEY_ID"].name, env["AWS_ACCESS_KEY_ID"].key) == ("s3-creds", "id")
    assert env["AWS_SECRET_ACCESS_KEY"].key == "secret"

    summary = {"files": 5, "bytes": 123456, "skipped": 0, "seconds": 1.5,
               "manifestDigest": "sha256:ab", "version": "v-abc"}  # fmt: skip
    stage_exits(core, namespace, "ds-stage", 0, json.dumps(summary))
    body = wait_phase(jobs, namespace, "ds", "Running")
    data = body["status"]["data"]
    assert data["phase"] == "Staged" and data["files"] == 5 and data["version"] == "v-abc"
    assert data["bytes"] == 123456 and data["manifestDigest"] == "sha256:ab"
    wait_for(lambda: stage_pod(core, namespace, "ds") is None, what="the staging pod to go")
    workers = pods_of(core, namespace, "ds")
    assert [p.metadata.name for p in workers] == ["ds-worker-0", "ds-worker-1"]
    trainer = workers[0].spec.containers[0]
    assert {e.name: e.value for e in trainer.env}["JOULE_DATASET_DIR"] == "/data/ds"
    mount = next(m for m in trainer.volume_mounts if m.mount_path == "/data")
    assert mount.name == "cache" and mount.read_only
    # The workers never see the source's credentials.
    assert not any(e.name.startswith("AWS_") for e in trainer.env)
    assert "DataStaged" in events_of(core, namespace, "ds")


def test_a_corrupt_file_fails_the_job_naming_it(kubectl, jobs, core, namespace):
    stage_job(kubectl, namespace, "bad")
    wait_for(lambda: stage_pod(core, namespace, "bad"), what="the staging pod")
    line = "shard-00003.npy: sha256 1f2e does not match the manifest's 9a8b"
    stage_exits(core, namespace, "bad-stage", 65, line)
    body = wait_phase(jobs, namespace, "bad", "Failed")
    st = body["status"]
    assert st["reason"] == "DataCorrupt", st
    assert "shard-00003.npy" in st["message"] and "s3://datasets/tiny" in st["message"], st
    assert st["data"]["phase"] == "Failed"
    assert [p.metadata.name for p in pods_of(core, namespace, "bad")] == ["bad-stage"]


def test_refused_credentials_say_so(kubectl, jobs, core, namespace):
    stage_job(kubectl, namespace, "denied")
    wait_for(lambda: stage_pod(core, namespace, "denied"), what="the staging pod")
    stage_exits(core, namespace, "denied-stage", 77,
                "access to s3://datasets/tiny was refused: SignatureDoesNotMatch")  # fmt: skip
    st = wait_phase(jobs, namespace, "denied", "Failed")["status"]
    assert st["reason"] == "DataAccessDenied" and "SignatureDoesNotMatch" in st["message"], st


def test_bad_data_specs_are_refused_at_apply(kubectl, namespace):
    for data, said in (
        ({"volume": "nope", "source": S3}, "data.volume must name one of spec.volumes"),
        ({"volume": "cache", "source": {}}, "exactly one of s3, https or persistentVolumeClaim"),
        ({"volume": "cache", "source": {**S3, "https": {"url": "https://x/y"}}},
         "exactly one of s3, https or persistentVolumeClaim"),
        ({"volume": "cache", "source": {"persistentVolumeClaim": {
            "claimName": "c", "path": "a/../../etc"}}}, "must stay inside the claim"),
    ):  # fmt: skip
        out = kubectl(
            "apply", "-n", namespace, "-f", "-", check=False,
            stdin=json.dumps({"apiVersion": "joule.dev/v1alpha1", "kind": "TrainingJob",
                              "metadata": {"name": "x"},
                              "spec": {"image": "t", "volumes": CACHE, "data": data}}),
        )  # fmt: skip
        assert out.returncode != 0 and said in out.stderr, (data, out.stderr)
