"""A dataset from a bucket to trained steps, on the real node, as a user runs it: prepare it
with joule-data, upload it to the S3 object store (VersityGW, beside the cluster), and apply
a job with spec.data, encrypted checkpoints and differential privacy. The in-cluster
operator (the chart's, which has no Secret rights) starts the staging pod alone, without
GPU; it stages into a hostPath cache over TLS verified against the CA from a ConfigMap,
with credentials from a Secret; the workers then train on the staged copy, resize 2 -> 1
and resume at the exact next sample, the privacy accountant going on from the encrypted
checkpoint. A corrupt object and refused credentials fail their jobs with the object's or
the error's name."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from joule_trainer.data import bundled_corpus

from tests.conftest import wait_for
from tests.e2e.test_local_loop import IMAGE, events, status, wait_event, wait_phase
from tests.integration.test_objectstore import client as s3_client

BUCKET = "datasets"
TRAIN = ["--model", "gpt", "--global-batch", "16", "--micro-batch", "8",
         "--checkpoint-every-steps", "10", "--log-every", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    """The bundled corpus prepared as a user would: 4 shards and their manifest."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "corpus.txt").write_text(bundled_corpus())
    joule_data = Path(sys.executable).parent / "joule-data"
    out = root / "prepared"
    subprocess.run(
        [str(joule_data), "prepare", str(root / "corpus.txt"), "--out", str(out),
         "--shard-tokens", "40000"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out, json.loads((out / "manifest.json").read_text())


def upload(store, folder: Path, prefix: str) -> None:
    s3 = s3_client(store)
    if not s3.bucket_exists(BUCKET):
        s3.make_bucket(BUCKET)
    for f in sorted(folder.iterdir()):
        s3.fput_object(BUCKET, f"{prefix}/{f.name}", str(f))


def credentials(kubectl, namespace: str, store, secret: str | None = None) -> None:
    kubectl("create", "secret", "generic", "s3-creds", "-n", namespace,
            f"--from-literal=id={store.access_key}",
            f"--from-literal=secret={secret or store.secret_key}")  # fmt: skip
    kubectl("create", "configmap", "s3-ca", "-n", namespace,
            f"--from-file=ca.crt={store.ca_bundle}")  # fmt: skip


def apply_data_job(kubectl, namespace, name, local_node, store, prefix, work: Path, **spec):
    """A trainer job reading its dataset from ``prefix`` in the bucket; checkpoints and the
    cache are hostPath folders on the node (the trainer runs as uid 1000)."""
    for sub in ("ckpt", "cache"):
        (work / sub).mkdir(parents=True, exist_ok=True)
        (work / sub).chmod(0o777)
    body = {
        "apiVersion": "joule.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": IMAGE,
            "gpusPerReplica": 1,
            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            "sharedMemory": "64Mi",
            "env": [
                {"name": "OMP_NUM_THREADS", "value": "1"},
                {"name": "JOULE_ENERGY_SOURCE", "value": "estimated"},
                {"name": "JOULE_SAMPLE_LOG", "value": "/checkpoints/samples.jsonl"},
            ],
            "checkpoint": {"path": "/checkpoints", "volume": "ckpt"},
            "volumes": [
                {"name": "ckpt", "hostPath": {"path": str(work / "ckpt")}},
                {"name": "cache", "hostPath": {"path": str(work / "cache")}},
            ],
            "data": {
                "volume": "cache",
                "source": {
                    "s3": {
                        "endpoint": store.pod_endpoint,
                        "bucket": BUCKET,
                        "prefix": prefix,
                        "accessKeyId": {"secretKeyRef": {"name": "s3-creds", "key": "id"}},
                        "secretAccessKey": {"secretKeyRef": {"name": "s3-creds", "key": "secret"}},
                        "caBundle": {"configMapKeyRef": {"name": "s3-ca", "key": "ca.crt"}},
                    }
                },
            },
            **local_node.placement(),
            **spec,
        },
    }
    kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(body))


def pod_names(core, namespace: str, job: str) -> set[str]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"joule.dev/job-name={job}")
    return {p.metadata.name for p in pods.items}


@pytest.mark.timeout(900)
def test_a_job_stages_its_dataset_from_a_bucket_trains_resizes_and_resumes_on_it(
    kubectl, api, core, namespace, operator, local_node, object_store, dataset, tmp_path
):
    folder, manifest = dataset
    upload(object_store, folder, "tiny")
    credentials(kubectl, namespace, object_store)
    # All of issue 17 in one job: the bucket, encrypted checkpoints and a privacy budget.
    kubectl("create", "secret", "generic", "ckpt-key", "-n", namespace,
            f"--from-literal=aes={base64.b64encode(os.urandom(32)).decode()}")  # fmt: skip
    apply_data_job(kubectl, namespace, "ds", local_node, object_store, "tiny", tmp_path,
                   replicas=2, elastic={"minReplicas": 1, "maxReplicas": 2},
                   args=[*TRAIN, "--steps", "100000"],
                   checkpoint={"path": "/checkpoints", "volume": "ckpt",
                               "encryption": {"secretRef": {"name": "ckpt-key", "key": "aes"}}},
                   privacy={"noiseMultiplier": 1.0})  # fmt: skip

    # The staging pod first, alone, and without a GPU.
    stage = wait_for(
        lambda: "ds-stage" in pod_names(core, namespace, "ds")
        and core.read_namespaced_pod("ds-stage", namespace),
        timeout=120, what="the staging pod",
    )  # fmt: skip
    assert pod_names(core, namespace, "ds") == {"ds-stage"}
    assert "nvidia.com/gpu" not in (stage.spec.containers[0].resources.limits or {})
    staged = wait_for(
        lambda: (status(api, namespace, "ds").get("data") or {}).get("phase") == "Staged"
        and status(api, namespace, "ds")["data"],
        timeout=180, what="the dataset to be staged",
    )  # fmt: skip
    files = len(manifest["shards"]) + 1  # the shards and the manifest
    assert staged["version"] == manifest["version"], staged
    assert staged["files"] >= len(manifest["shards"]) and staged["bytes"] > 0, staged
    print(f"\nstaged: {staged} ({files} objects)")
    cache = tmp_path / "cache" / "ds"
    assert json.loads((cache / "manifest.json").read_text())["version"] == manifest["version"]

    # Training on the staged copy, then 2 -> 1.
    two = wait_event(local_node, namespace, "ds", lambda e: e["event"] == "step"
                     and e["world"] == 2, timeout=300)  # fmt: skip
    seen = [e for e in events(local_node, namespace, "ds") if e["event"] == "dataset"]
    assert seen and seen[0]["version"] == manifest["version"], seen
    kubectl("scale", "-n", namespace, "tj/ds", "--replicas=1")
    resumed = wait_event(local_node, namespace, "ds", lambda e: e["event"] == "resumed"
                         and e["world"] == 1, after=two["ts"], timeout=300)  # fmt: skip
    # At exactly the next sample: the checkpoint's cursor is its step's global batches.
    assert resumed["samples"] == resumed["step"] * 16 and resumed["step"] >= two["step"]
    after = wait_event(local_node, namespace, "ds", lambda e: e["event"] == "step"
                       and e["world"] == 1, after=resumed["ts"], timeout=300)  # fmt: skip
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "samples.jsonl").read_text()
           .splitlines()]  # fmt: skip
    first_at_one = min(e["samples"][0][0] for e in log if e["world"] == 1)
    assert first_at_one == resumed["samples"], (first_at_one, resumed)
    assert after["step"] > resumed["step"]
    # The privacy accountant went on across the resize (it is in the checkpoint), and the
    # checkpoints it came from are encrypted.
    assert after["epsilon"] >= two["epsilon"] > 0, (two, after)
    newest = sorted((tmp_path / "ckpt").glob("step-*.pt"))[-1]
    assert newest.read_bytes()[:8] == b"JOULEENC", newest
    assert pod_names(core, namespace, "ds") == {"ds-worker-0"}  # the staging pod is gone
    assert status(api, namespace, "ds")["data"]["phase"] == "Staged"  # not staged again


@pytest.mark.timeout(300)
def test_a_corrupt_object_and_refused_credentials_fail_their_jobs_naming_them(
    kubectl, api, core, namespace, operator, local_node, object_store, dataset, tmp_path
):
    folder, manifest = dataset
    upload(object_store, folder, "bad")
    shard = manifest["shards"][1]["file"]
    raw = bytearray((folder / shard).read_bytes())
    raw[-1] ^= 0xFF  # the same size, another digest
    changed = tmp_path / shard
    changed.write_bytes(bytes(raw))
    s3_client(object_store).fput_object(BUCKET, f"bad/{shard}", str(changed))
    credentials(kubectl, namespace, object_store)
    apply_data_job(kubectl, namespace, "bad", local_node, object_store, "bad",
                   tmp_path / "bad", args=[*TRAIN, "--steps", "10"])  # fmt: skip
    st = wait_phase(api, namespace, "bad", "Failed", timeout=240)
    assert st["reason"] == "DataCorrupt", st
    assert shard in st["message"] and f"s3://{BUCKET}/bad" in st["message"], st
    assert pod_names(core, namespace, "bad") == {"bad-stage"}  # no worker was created

    kubectl("delete", "secret", "s3-creds", "-n", namespace)
    wrong = ["--from-literal=secret=wrong", f"--from-literal=id={object_store.access_key}"]
    kubectl("create", "secret", "generic", "s3-creds", "-n", namespace, *wrong)
    apply_data_job(kubectl, namespace, "denied", local_node, object_store, "tiny",
                   tmp_path / "denied", args=[*TRAIN, "--steps", "10"])  # fmt: skip
    st = wait_phase(api, namespace, "denied", "Failed", timeout=240)
    assert st["reason"] == "DataAccessDenied", st
    assert "SignatureDoesNotMatch" in st["message"], st
