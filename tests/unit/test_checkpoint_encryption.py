"""spec.checkpoint.encryption: parsed and checked as the CRD checks it; the worker pod mounts
that one key of that Secret, read-only and owner-only, into the trainer container alone and
names it in JOULE_CHECKPOINT_KEY_FILE; a worker that exits 78 (a configuration error, such as
checkpoints its key cannot open) fails the job at once without spending a restart. (That the
chart's RBAC lets the operator read no Secret: tests/integration/test_chart.py, can-i.)"""

from __future__ import annotations

import datetime as dt

import pytest

from joule.api import JobRef, SpecError, TrainingJobSpec
from joule.api.types import Encryption
from joule.builders import worker_pod
from joule.observe import EXIT_CONFIG, Failure, PodView, restart_cannot_fix, view
from joule.reconcile import plan

JOB = JobRef("llm", "team-a", "uid-123")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
KEY_FILE = "/var/run/secrets/joule/checkpoint-key/key"
VOL = [{"name": "ckpt", "persistentVolumeClaim": {"claimName": "c"}}]


def spec(encryption=None, **kw):
    checkpoint = {"path": "/ckpt", "volume": "ckpt"}
    if encryption is not None:
        checkpoint["encryption"] = encryption
    return TrainingJobSpec.parse(
        {"image": "trainer:1", "volumes": VOL, "checkpoint": checkpoint, **kw}
    )


REF = {"secretRef": {"name": "ckpt-key", "key": "aes.key"}}


def env_of(container):
    return {e["name"]: e.get("value") for e in container["env"]}


def test_the_secret_reference_is_parsed_and_absent_means_no_encryption():
    assert spec(REF).encryption == Encryption("ckpt-key", "aes.key")
    assert spec().encryption is None
    assert TrainingJobSpec.parse({"image": "x"}).encryption is None


@pytest.mark.parametrize(
    ("encryption", "message"),
    [
        ({}, "spec.checkpoint.encryption needs secretRef"),
        ({"secretRef": {"key": "k"}}, "secretRef.name must be a Secret's name"),
        ({"secretRef": {"name": "Key", "key": "k"}}, "secretRef.name must be a Secret's name"),
        ({"secretRef": {"name": "a" * 254, "key": "k"}}, "secretRef.name must be a Secret's"),
        ({"secretRef": {"name": "k"}}, "secretRef.key must be a Secret's key"),
        ({"secretRef": {"name": "k", "key": ""}}, "secretRef.key must be a Secret's key"),
        ({"secretRef": {"name": "k", "key": "a/b"}}, "secretRef.key must be a Secret's key"),
        ({"secretRef": {"name": "k", "key": "."}}, "secretRef.key must be a Secret's key"),
        ({"secretRef": {"name": "k", "key": "..data"}}, "secretRef.key must be a Secret's key"),
    ],
)
def test_a_bad_secret_reference_is_refused_by_the_parser(encryption, message):
    with pytest.raises(SpecError, match=message):
        spec(encryption)


def test_the_key_alone_is_mounted_read_only_and_owner_only_into_the_trainer_alone():
    sidecar = {"name": "logs", "image": "fluent-bit"}
    pod = worker_pod(JOB, spec(REF, template={"spec": {"containers": [sidecar]}}), 0)
    trainer, logs = pod["spec"]["containers"]
    volume = next(v for v in pod["spec"]["volumes"] if "secret" in v)
    assert volume == {
        "name": "joule-checkpoint-key",
        "secret": {
            "secretName": "ckpt-key",
            "items": [{"key": "aes.key", "path": "key"}],  # that key, no other of the Secret
            "defaultMode": 0o400,
        },
    }
    mount = {
        "name": "joule-checkpoint-key",
        "mountPath": "/var/run/secrets/joule/checkpoint-key",
        "readOnly": True,
    }
    assert mount in trainer["volumeMounts"]
    assert env_of(trainer)["JOULE_CHECKPOINT_KEY_FILE"] == KEY_FILE
    assert env_of(trainer)["JOULE_CHECKPOINT_DIR"] == "/ckpt"
    assert logs.get("volumeMounts", []) == [] and "env" not in logs  # the sidecar sees none
    # The kubelet gives the file to root, and group read to the fsGroup: the trainer image's.
    assert pod["spec"]["securityContext"]["fsGroup"] == 1000
    assert pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"


def test_without_encryption_nothing_of_it_is_in_the_pod():
    pod = worker_pod(JOB, spec(), 0)
    (trainer,) = pod["spec"]["containers"]
    assert not [v for v in pod["spec"]["volumes"] if "secret" in v]
    assert "JOULE_CHECKPOINT_KEY_FILE" not in env_of(trainer)
    assert "fsGroup" not in pod["spec"]["securityContext"]


def test_the_key_files_group_is_the_specs_where_it_sets_one():
    given = worker_pod(JOB, spec(REF, podSecurityContext={"fsGroup": 3000}), 0)
    assert given["spec"]["securityContext"] == {
        "seccompProfile": {"type": "RuntimeDefault"},
        "fsGroup": 3000,  # theirs, and no change policy of ours beside it
    }
    pod_group = worker_pod(JOB, spec(REF, podSecurityContext={"runAsGroup": 4000}), 0)
    assert pod_group["spec"]["securityContext"]["fsGroup"] == 4000
    trainer_group = worker_pod(
        JOB,
        spec(REF, podSecurityContext={"runAsGroup": 4000}, securityContext={"runAsGroup": 5}),
        0,
    )
    assert trainer_group["spec"]["securityContext"]["fsGroup"] == 5  # the trainer's own


def failed(index, code, message="boom", uid=None):
    failure = Failure("Error", message, code)
    return PodView(
        name=f"llm-worker-{index}", uid=uid or f"uid-{index}", index=index, phase="Failed",
        ready=False, scheduled=True, terminating=False, failure=failure,
    )  # fmt: skip


def running(index):
    return PodView(
        name=f"llm-worker-{index}", uid=f"uid-{index}", index=index, phase="Running",
        ready=True, scheduled=True, terminating=False, failure=None,
    )  # fmt: skip


def test_exit_code_78_is_the_one_a_restart_cannot_fix():
    assert EXIT_CONFIG == 78
    assert restart_cannot_fix(Failure("Error", "x", 78))
    for code in (1, 74, 137, None):
        assert not restart_cannot_fix(Failure("Error", "x", code))
    assert not restart_cannot_fix(None)


REFUSED = (
    "checkpoint directory /ckpt: 2 of 2 checkpoints refused, none verifies with this job's "
    "key (step-000000020.pt, step-000000010.pt: wrong key, or the file was changed); not "
    "starting over from step 0 beside them"
)


def test_a_worker_that_exits_78_fails_the_job_at_once_without_spending_a_restart():
    s = spec(REF, replicas=2, backoffLimit=3)
    pods = [running(0), failed(1, 78, REFUSED)]
    out = plan(JOB, s, {"phase": "Running", "restarts": 0}, 1, pods, T0)
    st = out.status
    assert (st["phase"], st["reason"]) == ("Failed", "ConfigError")
    assert st["restarts"] == 0  # none of backoffLimit spent on it
    assert st["message"] == (
        "llm-worker-1 failed (Error, exit code 78: a configuration error that a restart "
        f"cannot fix): {REFUSED}"
    )
    assert st["podFailure"] == {
        "pod": "llm-worker-1", "reason": "Error", "message": REFUSED, "exitCode": 78,
    }  # fmt: skip
    assert out.create == [] and set(out.delete) == {"llm-worker-0", "llm-worker-1"}
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "ConfigError")]
    assert next(c for c in st["conditions"] if c["type"] == "Stalled")["status"] == "True"
    # Failed is final: the next look creates nothing and counts nothing.
    again = plan(JOB, s, st, 1, [failed(1, 78, REFUSED)], T0 + dt.timedelta(seconds=5))
    assert again.status["phase"] == "Failed" and again.create == []
    assert again.status["restarts"] == 0


def test_any_other_exit_code_is_a_restart_as_before():
    s = spec(REF, replicas=2, backoffLimit=3, restartBackoffSeconds=0)
    out = plan(JOB, s, {"phase": "Running"}, 1, [running(0), failed(1, 74)], T0)
    assert out.status["phase"] != "Failed" and out.status["restarts"] == 1


def test_the_trainers_line_reaches_the_status_whole():
    """The trainer writes its line to the termination message; the operator quotes 256
    characters of a message, and the refusal's line fits."""
    pod = {
        "metadata": {"name": "llm-worker-0", "uid": "u",
                     "labels": {"joule.dev/replica-index": "0"}},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {"state": {"terminated": {"exitCode": 78, "reason": "Error",
                                          "message": REFUSED + "\n"}}}
            ],
        },
    }  # fmt: skip
    seen = view(pod)
    assert seen is not None and seen.failure == Failure("Error", REFUSED, 78)
    assert restart_cannot_fix(seen.failure)


def test_the_key_volumes_name_is_refused_where_a_user_could_give_it():
    """A volume of the user's by that name would collide with the key's in the pod."""
    from joule.api import template as owned
    from joule.constants import CHECKPOINT_KEY_VOLUME

    assert CHECKPOINT_KEY_VOLUME in owned.JOULE_VOLUMES
    ours = {"spec": {"volumes": [{"name": CHECKPOINT_KEY_VOLUME, "emptyDir": {}}]}}
    assert owned.template_problem(ours) == owned.VOLUMES
