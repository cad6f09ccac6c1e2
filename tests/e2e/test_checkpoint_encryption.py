"""Encrypted checkpoints on the real node (spec.checkpoint.encryption): the key is one key of a
Secret, mounted by the kubelet into the trainer container only. A job trains, its checkpoint
files are not plaintext checkpoints (torch.load refuses them; the job's key opens them), and
it resumes from them after its pod is deleted. A second job given another key for the same
checkpoint directory is Failed at once, with the trainer's line and no restart spent."""

from __future__ import annotations

import base64
import io
import os
import time

import pytest
import torch
from joule_trainer import crypt
from kubernetes import client

from tests.conftest import wait_for
from tests.e2e.test_local_loop import apply, events, wait_event
from tests.e2e.test_restart_backoff import watch_until_finished

TRAIN = ["--steps", "100000", "--checkpoint-every-steps", "10", "--log-every", "5"]


def secret(name: str, key: bytes) -> client.V1Secret:
    # As `kubectl create secret generic NAME --from-literal=aes=$(openssl rand -base64 32)`.
    text = base64.b64encode(key) + b"\n"
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=name), data={"aes": base64.b64encode(text).decode()}
    )


def encrypted(secret_name: str) -> dict:
    return {
        "path": "/checkpoints",
        "volume": "ckpt",
        "encryption": {"secretRef": {"name": secret_name, "key": "aes"}},
    }


@pytest.mark.timeout(600)
def test_an_encrypted_job_resumes_with_its_key_and_another_key_fails_at_once(
    kubectl, api, core, namespace, operator, local_node, tmp_path
):
    key, other = os.urandom(32), os.urandom(32)
    core.create_namespaced_secret(namespace, secret("ckpt-key", key))
    core.create_namespaced_secret(namespace, secret("other-key", other))
    ckpt = tmp_path
    apply(kubectl, namespace, "enc", local_node, ckpt, TRAIN, checkpoint=encrypted("ckpt-key"))

    first = wait_event(local_node, namespace, "enc", lambda e: e["event"] == "checkpoint")
    # The pod as the operator built it: the one key, read-only, in the trainer alone.
    pod = core.read_namespaced_pod("enc-worker-0", namespace)
    (volume,) = [v for v in pod.spec.volumes if v.secret is not None]
    assert volume.secret.secret_name == "ckpt-key" and volume.secret.default_mode == 0o400
    assert [(i.key, i.path) for i in volume.secret.items] == [("aes", "key")]
    files = sorted(ckpt.glob("step-*.pt"))
    assert files, list(ckpt.iterdir())
    for path in files:
        data = path.read_bytes()
        assert data.startswith(crypt.MAGIC)
        with pytest.raises(Exception):  # noqa: B017 - whatever torch says: no plaintext checkpoint
            torch.load(path, map_location="cpu", weights_only=True)
        step = int(path.stem.split("-")[1])
        state = torch.load(
            io.BytesIO(crypt.open_sealed(key, step, data)), map_location="cpu", weights_only=True
        )
        assert state["step"] == step and {"model", "optimizer", "rng"} <= set(state)

    # Its pod deleted (not a failure: no restart counted), the new one resumes with the key.
    deleted = time.time()
    kubectl("delete", "pod", "enc-worker-0", "-n", namespace, "--wait=false")
    resumed = wait_event(
        local_node,
        namespace,
        "enc",
        lambda e: e["event"] == "resumed",
        after=deleted,
        timeout=240,
    )
    assert resumed["step"] >= first["step"], resumed
    wait_event(
        local_node,
        namespace,
        "enc",
        lambda e: e["event"] == "step" and e["step"] > resumed["step"],
        after=resumed["ts"],
    )
    job = client.CustomObjectsApi(api).get_namespaced_custom_object(
        "joule.dev", "v1alpha1", namespace, "trainingjobs", "enc"
    )
    assert job["status"].get("restarts", 0) == 0, job["status"]

    # The job goes; its checkpoints stay. Another job, another key, the same directory.
    kubectl("delete", "tj", "enc", "-n", namespace, "--wait=true")
    wait_for(
        lambda: (
            not core.list_namespaced_pod(namespace, label_selector="joule.dev/job-name=enc").items
        ),
        timeout=120,
        what="enc's pods to be gone",
    )
    before = {p.name: p.read_bytes() for p in ckpt.glob("step-*.pt")}
    assert before
    started = time.monotonic()
    apply(
        kubectl, namespace, "thief", local_node, ckpt, TRAIN,
        checkpoint=encrypted("other-key"), backoffLimit=3, restartBackoffSeconds=1,
    )  # fmt: skip
    statuses = watch_until_finished(api, namespace, "thief", timeout=240)
    took = time.monotonic() - started
    final = statuses[-1]
    assert (final["phase"], final["reason"]) == ("Failed", "ConfigError"), final
    assert final.get("restarts", 0) == 0, final  # none of backoffLimit=3 spent
    assert all(s.get("reason") != "BackingOff" for s in statuses), statuses
    names = ", ".join(sorted(before, reverse=True))
    assert final["message"] == (
        "thief-worker-0 failed (Error, exit code 78: a configuration error that a restart "
        f"cannot fix): checkpoint directory /checkpoints: {len(before)} of {len(before)} "
        f"checkpoints refused, none verifies with this job's key ({names}: wrong key, or the "
        "file was changed); not starting over from step 0 beside them"
    ), final["message"]
    assert final["podFailure"]["exitCode"] == 78, final
    run = events(local_node, namespace, "thief")
    assert not [e for e in run if e["event"] in ("start", "resumed", "step")], run[-5:]
    assert {p.name: p.read_bytes() for p in ckpt.glob("step-*.pt")} == before  # untouched
    print(f"\nanother key: Failed (ConfigError, 0 restarts) {took:.0f}s after apply")
