"""The demo's shared checkpoint volumes: what a ReadWriteMany storage class (NFS, CephFS, ...)
gives a real cluster, made by hand on one machine.

The examples claim their checkpoints with a PersistentVolumeClaim of the class
``joule-local-rwx`` (ReadWriteMany: every worker of a job mounts the same folder, so a job
that is resized or restarted resumes from its last checkpoint). No provisioner serves that
class; the demo makes one PersistentVolume per such claim before applying the examples: a
folder on this machine, ``<root>/<job>``, pre-bound to the claim (``claimRef``). The trainer
runs as uid 1000, so the folder is made writable by everyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORAGE_CLASS = "joule-local-rwx"
LABEL = "joule.dev/demo-volume"
DEFAULT_SIZE = "1Gi"


@dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    size: str
    folder: str  # under the root: the job that mounts it, else the claim's name


def claims(docs: Iterable[dict[str, Any] | None], namespace: str = "default") -> list[Claim]:
    """The claims of class ``joule-local-rwx`` among ``docs`` (parsed manifests), each with
    the folder it gets: named after the one TrainingJob that mounts it, else after itself."""
    docs = [d for d in docs if isinstance(d, dict)]
    users: dict[tuple[str, str], list[str]] = {}
    for doc in docs:
        if doc.get("kind") != "TrainingJob":
            continue
        ns = doc.get("metadata", {}).get("namespace") or namespace
        for volume in doc.get("spec", {}).get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim:
                users.setdefault((ns, claim), []).append(doc["metadata"]["name"])
    found = []
    for doc in docs:
        spec = doc.get("spec") or {}
        if doc.get("kind") != "PersistentVolumeClaim" or spec.get("storageClassName") != (
            STORAGE_CLASS
        ):
            continue
        ns = doc.get("metadata", {}).get("namespace") or namespace
        name = doc["metadata"]["name"]
        jobs = users.get((ns, name), [])
        size = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
        folder = jobs[0] if len(jobs) == 1 else name
        if ns != namespace:
            folder = f"{ns}/{folder}"
        found.append(Claim(ns, name, str(size or DEFAULT_SIZE), folder))
    return found


def storage_class() -> dict[str, Any]:
    """The class itself: no provisioner (the volumes are made by hand), bound at once."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Retain",
    }


def persistent_volume(claim: Claim, root: Path) -> dict[str, Any]:
    """A ReadWriteMany volume on this machine's ``root/<folder>``, for ``claim`` only."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": f"demo-{claim.namespace}-{claim.name}",
            "labels": {LABEL: "true"},
        },
        "spec": {
            "capacity": {"storage": claim.size},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": claim.namespace, "name": claim.name},
            "hostPath": {"path": str(root / claim.folder), "type": "Directory"},
        },
    }


def make_folders(found: Iterable[Claim], root: Path) -> list[Path]:
    """Each claim's folder, writable by the trainer's uid 1000 (mode 0777, whatever the
    umask)."""
    made = []
    for claim in found:
        folder = root / claim.folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        made.append(folder)
    return made
