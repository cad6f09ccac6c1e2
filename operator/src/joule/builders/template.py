"""spec.template under the worker pod Joule builds, merged as a strategic merge patch would.

The pod Joule builds (from the flat spec, and what Joule owns) is laid over the template:

- maps (labels, annotations, nodeSelector, affinity, securityContext, a container's resources'
  requests and limits) merge key by key, Joule's pod winning;
- lists of named things merge by their key, as Kubernetes' strategic merge keys them:
  containers, initContainers, volumes, imagePullSecrets and env by name, volumeMounts by
  mountPath, ports by containerPort; Joule's entry wins, the template's others are kept (after
  Joule's, so that the trainer stays the first container);
- tolerations add up (every one applies);
- any other field is Joule's where its pod has one, the template's otherwise.

Where Joule only has a default (the security contexts, terminationGracePeriodSeconds,
enableServiceLinks, the trainer's terminationMessagePolicy, the prometheus.io annotations),
worker_pod puts the template's value over the default before this merge, and the flat spec's
over both. What Joule owns the CRD refuses in a template (joule.api.template).
"""

from __future__ import annotations

import copy
from typing import Any

from joule.constants import WORKER_CONTAINER

# The key that identifies an entry of each list that merges (Kubernetes' patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "imagePullSecrets": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
# Which container kubectl logs and exec pick when a pod has more than one.
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"

Obj = dict[str, Any]


def template_spec(template: Obj | None) -> Obj:
    return (template or {}).get("spec") or {}


def template_annotations(template: Obj | None) -> dict[str, str]:
    return ((template or {}).get("metadata") or {}).get("annotations") or {}


def trainer_template(template: Obj | None) -> Obj:
    """The template's container named like Joule's trainer (its fields go under Joule's)."""
    containers = template_spec(template).get("containers") or []
    return next((c for c in containers if c.get("name") == WORKER_CONTAINER), {})


def merge_by(key: str, base: list[Obj], ours: list[Obj]) -> list[Obj]:
    """Ours, then the entries of base whose key none of ours has."""
    taken = {e.get(key) for e in ours}
    return [*ours, *(e for e in base if e.get(key) not in taken)]


def merge_env(base: list[Obj], ours: list[Obj]) -> list[Obj]:
    """By name, ours winning, but the template's variables first: a later variable may refer
    to an earlier one ($(VAR)), and the flat spec's and Joule's come later."""
    taken = {e.get("name") for e in ours}
    return [*(e for e in base if e.get("name") not in taken), *ours]


def _merge_ports(base: list[Obj], ours: list[Obj]) -> list[Obj]:
    # A port name must be unique in its container too: the template's port that reuses the
    # name of one of Joule's (rdzv, metrics) goes with the clash.
    names = {p.get("name") for p in ours if p.get("name")}
    return merge_by("containerPort", [p for p in base if p.get("name") not in names], ours)


def _merge_resources(base: Obj, ours: Obj) -> Obj:
    merged = {**base, **ours}
    for kind in ("requests", "limits"):
        if kind in base and kind in ours:
            merged[kind] = {**base[kind], **ours[kind]}
    return {k: v for k, v in merged.items() if v}


def merge_container(base: Obj, ours: Obj) -> Obj:
    """Joule's trainer over the template's container of the same name."""
    merged = {**base, **ours}
    for key in base.keys() & ours.keys():
        if key == "env":
            merged[key] = merge_env(base[key], ours[key])
        elif key == "ports":
            merged[key] = _merge_ports(base[key], ours[key])
        elif key in MERGE_KEYS:
            merged[key] = merge_by(MERGE_KEYS[key], base[key], ours[key])
        elif key == "resources":
            merged[key] = _merge_resources(base[key], ours[key])
        elif key == "securityContext":
            merged[key] = {**base[key], **ours[key]}
    return merged


def _merge_containers(base: list[Obj], ours: list[Obj]) -> list[Obj]:
    by_name = {c.get("name"): c for c in base}
    mine = [merge_container(by_name[c["name"]], c) if c["name"] in by_name else c for c in ours]
    return merge_by("name", base, mine)


def _merge_tolerations(base: list[Obj], ours: list[Obj]) -> list[Obj]:
    return [*ours, *(t for t in base if t not in ours)]


def merge_pod_spec(base: Obj, ours: Obj) -> Obj:
    merged = {**base, **ours}
    for key in base.keys() & ours.keys():
        if key == "containers":
            merged[key] = _merge_containers(base[key], ours[key])
        elif key in MERGE_KEYS:
            merged[key] = merge_by(MERGE_KEYS[key], base[key], ours[key])
        elif key == "tolerations":
            merged[key] = _merge_tolerations(base[key], ours[key])
        elif isinstance(base[key], dict) and isinstance(ours[key], dict):
            # nodeSelector, securityContext; affinity by kind (node, pod, anti-pod affinity).
            merged[key] = {**base[key], **ours[key]}
    return merged


def placement(pod: Obj) -> tuple[dict[str, str], list[Obj]]:
    """Where a worker may run, as the scheduler will see it: the nodeSelector and the
    tolerations of the flat spec (``spec.pod``) merged with its template's as
    ``merge_template`` merges them. The room per node (capacity) is counted with these."""
    tpl = template_spec(pod.get("template"))
    selector = {**(tpl.get("nodeSelector") or {}), **(pod.get("nodeSelector") or {})}
    tolerations = _merge_tolerations(tpl.get("tolerations") or [], pod.get("tolerations") or [])
    return selector, tolerations


def merge_template(pod: Obj, template: Obj | None) -> Obj:
    """The worker ``pod`` laid over ``template`` (spec.template); a new object."""
    if not template:
        return pod
    template = copy.deepcopy(template)
    meta = dict(pod["metadata"])
    base_meta = template.get("metadata") or {}
    for key in ("labels", "annotations"):
        if base_meta.get(key):
            meta[key] = {**base_meta[key], **meta.get(key, {})}
    spec = merge_pod_spec(template_spec(template), pod["spec"])
    if len(spec["containers"]) > 1:
        # kubectl logs and exec then pick the trainer, unless the template says otherwise.
        meta["annotations"] = {DEFAULT_CONTAINER_ANNOTATION: WORKER_CONTAINER,
                               **meta.get("annotations", {})}  # fmt: skip
    return {**pod, "metadata": meta, "spec": spec}
