"""A worker pod: the user's container, GPUs, /dev/shm, and the torchrun elastic contract.

The environment follows the Kubeflow Training Operator's PyTorchJob (PET_* variables that
torchrun reads as its own flags, plus MASTER_ADDR/MASTER_PORT), so an unchanged torchrun
script runs under Joule. Joule's variables win over the user's on name clashes, because a
wrong rendezvous endpoint would silently split the group.
"""

from __future__ import annotations

import copy
from typing import Any

from joule.api.types import JobRef, TrainingJobSpec
from joule.builders.labels import common_labels, owner_reference
from joule.builders.service import service_name
from joule.builders.template import (
    merge_env,
    merge_template,
    template_annotations,
    template_spec,
    trainer_template,
)
from joule.constants import (
    CHECKPOINT_ENV,
    CHECKPOINT_KEY_DIR,
    CHECKPOINT_KEY_ENV,
    CHECKPOINT_KEY_FILE,
    CHECKPOINT_KEY_MODE,
    CHECKPOINT_KEY_VOLUME,
    DATASET_ENV,
    LABEL_INDEX,
    MASTER_PORT,
    METRICS_PORT,
    POWER_DIR,
    POWER_LIMIT_ANNOTATION,
    POWER_LIMIT_ENV,
    POWER_LIMIT_FILE,
    POWER_VOLUME,
    RDZV_PORT,
    SHM_VOLUME,
    TENSORBOARD_ENV,
    TERMINATION_GRACE_SECONDS,
    TORCHRUN_MAX_RESTARTS,
    TRAINER_GID,
    WORKER_CONTAINER,
)

GPU_RESOURCE = "nvidia.com/gpu"


# The restricted Pod Security Standard's container and pod rules, but runAsNonRoot, which an
# image running as root (many PyTorch images) would fail: a spec that sets it passes all.
WORKER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}
WORKER_POD_SECURITY: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}


def pod_name(job: JobRef, index: int) -> str:
    """Deterministic, so that creating a pod twice fails with AlreadyExists instead of
    starting a duplicate: the operator can restart at any moment."""
    return f"{job.name}-worker-{index}"


def worker_address(job: JobRef, index: int) -> str:
    """DNS name of a worker through the headless service (resolves within the namespace)."""
    return f"{pod_name(job, index)}.{service_name(job)}"


def torchrun_env(
    job: JobRef, spec: TrainingJobSpec, index: int, trainer_limits: bool = True
) -> list[dict[str, Any]]:
    """``trainer_limits``: the trainer applies the power-limit annotation itself (the
    ``trainer`` energy source); with node agents they do, and the worker needs no right to."""
    low, high = spec.bounds
    master = worker_address(job, 0)
    env: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": f"{low}:{high}"},
        {"name": "PET_NPROC_PER_NODE", "value": str(spec.nproc_per_node)},
        {"name": "PET_RDZV_BACKEND", "value": "c10d"},
        {"name": "PET_RDZV_ENDPOINT", "value": f"{master}:{RDZV_PORT}"},
        {"name": "PET_RDZV_ID", "value": job.uid},
        # Only worker 0 hosts the rendezvous store. torchrun otherwise guesses from the
        # endpoint's address, and on a machine where every pod is on loopback (the local
        # node) each would claim it; the group would then die with whichever won.
        {"name": "PET_RDZV_CONF", "value": f"is_host={'true' if index == 0 else 'false'}"},
        # torchrun's in-place restarts of a crashed process, inside one pod: a different
        # level from backoffLimit (failed pods, counted by the operator). Tying the two
        # together multiplied them. A user's PET_MAX_RESTARTS in spec.env wins.
        {"name": "PET_MAX_RESTARTS", "value": str(TORCHRUN_MAX_RESTARTS)},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "JOULE_JOB_NAME", "value": job.name},
        {"name": "JOULE_JOB_NAMESPACE", "value": job.namespace},
        {"name": "JOULE_REPLICA_INDEX", "value": str(index)},
        {"name": "JOULE_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    if trainer_limits:
        env.append({"name": POWER_LIMIT_ENV, "value": f"{POWER_DIR}/{POWER_LIMIT_FILE}"})
    if not spec.elastic:
        # A fixed-size group: node ranks and the world size mean something and never change.
        env += [
            {"name": "PET_NODE_RANK", "value": str(index)},
            {"name": "WORLD_SIZE", "value": str(spec.replicas * spec.nproc_per_node)},
            {"name": "NODE_RANK", "value": str(index)},
        ]
    checkpoint = spec.pod.get("checkpoint")
    if checkpoint:
        env.append({"name": CHECKPOINT_ENV, "value": checkpoint["path"]})
    if spec.encryption is not None:
        env.append(
            {"name": CHECKPOINT_KEY_ENV, "value": f"{CHECKPOINT_KEY_DIR}/{CHECKPOINT_KEY_FILE}"}
        )
    if spec.tensorboard.enabled:
        env.append({"name": TENSORBOARD_ENV, "value": spec.tensorboard.log_dir})
    return env


# The taints Kubernetes' node lifecycle controller puts on a node that stops reporting
# (unreachable) or reports NotReady. The DefaultTolerationSeconds admission plugin gives a pod
# that does not tolerate them 300 s there before it is evicted.
NODE_LOST_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


def node_lost_tolerations(spec: TrainingJobSpec) -> list[dict[str, Any]]:
    """NoExecute tolerations of the node-lost taints for spec.nodeLostTimeoutSeconds (60 s by
    default), so that a worker on a lost node is evicted, and replaced, sooner than the
    cluster's 300 s: a group that waits for a lost member trains nothing meanwhile. A key
    the user's tolerations already cover (by name, or a key-less Exists) is left to them:
    where several tolerations match a taint, the shortest tolerationSeconds wins, so ours
    would override theirs."""
    template = (spec.pod.get("template") or {}).get("spec") or {}
    theirs = [*(spec.pod.get("tolerations") or []), *(template.get("tolerations") or [])]

    def covered(key: str) -> bool:
        return any(
            (t.get("key") == key or (not t.get("key") and t.get("operator") == "Exists"))
            and t.get("effect") in (None, "", "NoExecute")
            for t in theirs
        )

    seconds = spec.node_lost_timeout_seconds
    return [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
        for key in NODE_LOST_TAINTS
        if not covered(key)
    ]


def key_file_group(pod_security: dict[str, Any], trainer_security: dict[str, Any]) -> None:
    """Give the pod an fsGroup where it has none, so that a non-root trainer can read the
    owner-only key file: the kubelet makes a secret volume's files root's, and the fsGroup's
    with group read (0440) where there is one. The group is the trainer's runAsGroup (the
    container's, else the pod's), else that of Joule's trainer image's user. Only the
    ownership of volumes that support it changes, once (OnRootMismatch), where the spec does
    not say otherwise."""
    if "fsGroup" in pod_security:
        return
    group = trainer_security.get("runAsGroup", pod_security.get("runAsGroup", TRAINER_GID))
    pod_security["fsGroup"] = group
    pod_security.setdefault("fsGroupChangePolicy", "OnRootMismatch")


def worker_pod(
    job: JobRef,
    spec: TrainingJobSpec,
    index: int,
    power_limit_watts: float | None = None,
    trainer_limits: bool = True,
) -> dict[str, Any]:
    """``power_limit_watts``: the per-GPU limit the policy has set (else the spec's)."""
    p = copy.deepcopy(spec.pod)
    # spec.template: its values go under the flat spec's, and over Joule's defaults only.
    tpl, trainer_tpl = template_spec(p.get("template")), trainer_template(p.get("template"))
    ours = torchrun_env(job, spec, index, trainer_limits)
    user_env = merge_env(trainer_tpl.get("env", []), p.get("env", []))
    user_conf = next((e.get("value", "") for e in user_env if e["name"] == "PET_RDZV_CONF"), "")
    if user_conf:  # the user tunes the rendezvous; who hosts it stays ours (last key wins)
        for e in ours:
            if e["name"] == "PET_RDZV_CONF":
                e["value"] = f"{user_conf},{e['value']}"
    if any(e["name"] == "PET_MAX_RESTARTS" for e in user_env):
        ours = [e for e in ours if e["name"] != "PET_MAX_RESTARTS"]
    if spec.data is not None:  # the staged copy: the staging pod filled it before any worker
        ours.append({"name": DATASET_ENV, "value": spec.data.staged_dir(job.name)})
    if spec.privacy is not None:  # Joule's trainer trains with DP-SGD (Opacus)
        ours += spec.privacy.env()
    env = merge_env(user_env, ours)

    # Quantities as strings: the schema allows 8 or "8", Kubernetes clients want "8".
    resources = {
        kind: {name: str(q) for name, q in values.items()}
        for kind, values in p.get("resources", {}).items()
    }
    if spec.gpus_per_replica > 0:
        resources.setdefault("limits", {})[GPU_RESOURCE] = str(spec.gpus_per_replica)

    volumes = list(p.get("volumes", []))
    mounts = list(p.get("volumeMounts", []))
    volumes.append(
        {
            "name": SHM_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": str(p.get("sharedMemory", "2Gi"))},
        }
    )
    mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    volumes.append(
        {
            "name": POWER_VOLUME,
            "downwardAPI": {
                "items": [
                    {
                        "path": POWER_LIMIT_FILE,
                        "fieldRef": {
                            "fieldPath": f"metadata.annotations['{POWER_LIMIT_ANNOTATION}']"
                        },
                    }
                ]
            },
        }
    )
    mounts.append({"name": POWER_VOLUME, "mountPath": POWER_DIR, "readOnly": True})
    checkpoint = p.get("checkpoint")
    if (
        checkpoint
        and checkpoint.get("volume")
        and not any(m["mountPath"] == checkpoint["path"] for m in mounts)
    ):
        mounts.append({"name": checkpoint["volume"], "mountPath": checkpoint["path"]})
    if spec.data is not None and not any(m["mountPath"] == spec.data.path for m in mounts):
        # Read-only: the workers read the verified copy, and none of them can change it.
        mounts.append({"name": spec.data.volume, "mountPath": spec.data.path, "readOnly": True})
    if spec.encryption is not None:
        # That one key of that Secret, read-only, in the trainer container only (a sidecar of
        # the template does not see it). The operator names the Secret; the kubelet reads it.
        volumes.append(
            {
                "name": CHECKPOINT_KEY_VOLUME,
                "secret": {
                    "secretName": spec.encryption.secret_name,
                    "items": [{"key": spec.encryption.key, "path": CHECKPOINT_KEY_FILE}],
                    "defaultMode": CHECKPOINT_KEY_MODE,
                },
            }
        )
        mounts.append(
            {"name": CHECKPOINT_KEY_VOLUME, "mountPath": CHECKPOINT_KEY_DIR, "readOnly": True}
        )

    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": spec.image,
        "env": env,
        "resources": resources,
        "volumeMounts": mounts,
        "ports": [
            {"name": "rdzv", "containerPort": RDZV_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        # A worker that fails without writing /dev/termination-log leaves its log's tail as
        # the termination message, which the job's status then quotes (its last line).
        "terminationMessagePolicy": trainer_tpl.get(
            "terminationMessagePolicy", "FallbackToLogsOnError"
        ),
    }
    for key in ("command", "args", "envFrom", "workingDir", "imagePullPolicy"):
        if key in p:
            container[key] = p[key]
    # Workers need no privilege (the node agent sets GPU power limits): none unless the spec
    # asks. What the spec sets wins, key by key.
    container["securityContext"] = {
        **WORKER_SECURITY,
        **trainer_tpl.get("securityContext", {}),
        **p.get("securityContext", {}),
    }

    name = pod_name(job, index)
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # The operator replaces failed workers itself and counts them against backoffLimit.
        "restartPolicy": "Never",
        "hostname": name,
        "subdomain": service_name(job),
        "enableServiceLinks": tpl.get("enableServiceLinks", False),
        "terminationGracePeriodSeconds": tpl.get(
            "terminationGracePeriodSeconds", TERMINATION_GRACE_SECONDS
        ),
        "securityContext": {
            **WORKER_POD_SECURITY,
            **tpl.get("securityContext", {}),
            **p.get("podSecurityContext", {}),
        },
    }
    if spec.encryption is not None:
        key_file_group(pod_spec["securityContext"], container["securityContext"])
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName",
                "schedulerName", "serviceAccountName", "imagePullSecrets"):  # fmt: skip
        if key in p:
            pod_spec[key] = p[key]
    if lost := node_lost_tolerations(spec):
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *lost]

    labels = {**p.get("podLabels", {}), **common_labels(job), LABEL_INDEX: str(index)}
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(job)],
    }
    # Prometheus' pod discovery finds the workers' own series (throughput, loss) by these, as
    # it finds the operator's and the node agents'; podAnnotations may say otherwise.
    progress = spec.progress
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(progress.port or METRICS_PORT),
        "prometheus.io/path": "/metrics",
        **template_annotations(p.get("template")),
        **(p.get("podAnnotations") or {}),
    }
    limit = power_limit_watts or spec.energy.gpu_power_limit_watts
    if limit is not None:
        annotations[POWER_LIMIT_ANNOTATION] = f"{limit:g}"
    metadata["annotations"] = annotations
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
    return merge_template(pod, p.get("template"))
