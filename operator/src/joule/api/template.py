"""What spec.template may not say: the parts of a worker pod that are Joule's.

spec.template is a PodTemplateSpec fragment merged under the pod Joule builds
(joule.builders.template). The CRD's CEL rules refuse a template that sets what Joule owns, with
these messages; ``template_problem`` checks the same again for objects stored before a rule
existed, as the rest of the parser does.
"""

from __future__ import annotations

from typing import Any

from joule.constants import WORKER_CONTAINER

GPU_RESOURCE = "nvidia.com/gpu"
# Label and annotation keys under this prefix are Joule's: its selector, replica index and the
# GPU power limit the node agents apply.
JOULE_PREFIX = "joule.dev/"
# The trainer's mounts that are Joule's (sharedMemory and the power limit file).
JOULE_MOUNTS = ("/dev/shm", "/dev/shm/", "/etc/joule", "/etc/joule/")
JOULE_VOLUMES = ("joule-dshm", "joule-power", "joule-checkpoint-key")

_IDENTITY = (
    "is Joule's: workers are named <job>-worker-<index>, in the job's namespace, owned by the job"
)
_DNS = (
    "is Joule's: each worker's DNS name, <job>-worker-<index>.<job>, is how torchrun finds worker 0"
)
# Pod fields Joule sets and the template may not, with why (the CRD's messages).
OWNED_METADATA: dict[str, str] = {key: f"template.metadata.{key} {_IDENTITY}" for key in
                                  ("name", "namespace", "ownerReferences")}  # fmt: skip
OWNED_SPEC: dict[str, str] = {
    "restartPolicy": (
        "template.spec.restartPolicy is Joule's (Never): the operator replaces failed "
        "workers itself and counts them against backoffLimit"
    ),
    "hostname": f"template.spec.hostname {_DNS}",
    "subdomain": f"template.spec.subdomain {_DNS}",
    "hostnameOverride": f"template.spec.hostnameOverride {_DNS}",
    "activeDeadlineSeconds": (
        "template.spec.activeDeadlineSeconds would fail each worker on its own: set the job's "
        "spec.activeDeadlineSeconds"
    ),
}
LABELS = "joule.dev/ labels are Joule's: its workers are selected and indexed by them"
ANNOTATIONS = "joule.dev/ annotations are Joule's: the GPU power limit the node agents apply"
TRAINER_IMAGE = "the trainer container's image is spec.image"
SIDECAR_IMAGE = "each container other than trainer needs an image"
TRAINER_GPUS = "the trainer's GPUs are spec.gpusPerReplica, not its template resources"
TRAINER_RESTARTS = (
    "the trainer's restarts are Joule's (it replaces failed workers): no restartPolicy or "
    "restartPolicyRules on the trainer container"
)
TRAINER_MOUNTS = (
    "/dev/shm and /etc/joule are Joule's own mounts in the trainer (sharedMemory and the GPU "
    "power limit file)"
)
INIT_NAME = "trainer is the name of Joule's training container; an init container needs another"
VOLUMES = (
    "joule-dshm, joule-power and joule-checkpoint-key are the names of Joule's own volumes "
    "(/dev/shm, the GPU power limit file and the checkpoint key) in the worker pods"
)


def template_problem(template: Any) -> str | None:
    """Why the template sets something Joule owns, or None. Shapes are the API server's to
    judge (the schema, then the pod's own validation when a worker is created)."""
    if template is None:
        return None
    if not isinstance(template, dict):
        return "spec.template must be an object (a PodTemplateSpec)"
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    for key, message in OWNED_METADATA.items():
        if key in meta:
            return message
    if any(k.startswith(JOULE_PREFIX) for k in meta.get("labels") or {}):
        return LABELS
    if any(k.startswith(JOULE_PREFIX) for k in meta.get("annotations") or {}):
        return ANNOTATIONS
    for key, message in OWNED_SPEC.items():
        if key in spec:
            return message
    for c in spec.get("containers") or []:
        if not c.get("name"):
            return "template.spec.containers[].name is required"
        if c["name"] != WORKER_CONTAINER:
            if not c.get("image"):
                return SIDECAR_IMAGE
            continue
        if "image" in c:
            return TRAINER_IMAGE
        resources = c.get("resources") or {}
        if any(GPU_RESOURCE in (resources.get(kind) or {}) for kind in ("limits", "requests")):
            return TRAINER_GPUS
        if "restartPolicy" in c or "restartPolicyRules" in c:
            return TRAINER_RESTARTS
        if any(m.get("mountPath") in JOULE_MOUNTS for m in c.get("volumeMounts") or []):
            return TRAINER_MOUNTS
    for c in spec.get("initContainers") or []:
        if c.get("name") == WORKER_CONTAINER:
            return INIT_NAME
    if any(v.get("name") in JOULE_VOLUMES for v in spec.get("volumes") or []):
        return VOLUMES
    return None
