"""What process a pod's container becomes on this machine. Pure: the agent does the I/O.

There is no container runtime here, so an image is run only where we know what it holds:
Joule's trainer image is the ``joule_trainer`` package installed next to this one (its
entrypoint ``joule-launch`` is on our PATH). Any other image is refused with a reason the
pod's status shows, unless the user names it runnable (``--local-image``), and then its
command runs as is on this machine.

Kubernetes semantics kept: ``command`` replaces the image's entrypoint, ``args`` follow it,
``$(VAR)`` expands from the container's environment, downward-API fields resolve, and the
pod sees its own address (``network``). Volume mounts become local directories, and a path
under a mount in the environment or arguments is rewritten to that directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from joule.nodeagent.network import rewrite

TRAINER_IMAGE = "ghcr.io/joule-dev/trainer"
NOT_RUNNABLE = "ImageNotRunnableLocally"


@dataclass(frozen=True)
class ProcessPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    volumes: dict[str, Path]  # mountPath -> local directory, to create before starting


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


@dataclass(frozen=True)
class LocalImages:
    """Images this machine can run: image prefix -> the image's entrypoint."""

    entrypoints: Mapping[str, Sequence[str]] = field(
        default_factory=lambda: {TRAINER_IMAGE: ["joule-launch"]}
    )

    def entrypoint(self, image: str) -> Sequence[str] | None:
        for prefix, entry in self.entrypoints.items():
            if image == prefix or image.startswith((prefix + ":", prefix + "@")):
                return entry
        return None


@dataclass(frozen=True)
class PodContext:
    """What the agent knows about the pod beyond its manifest."""

    address: str
    node_name: str
    node_address: str
    pod_dir: Path  # logs, emptyDirs
    claims_dir: Path  # persistentVolumeClaims, shared by the pods of this machine
    bin_dir: Path  # where joule-launch and python live
    names: Mapping[str, str]  # pod DNS names -> addresses (``network.dns_names``)
    host_port: Callable[[str, int], int]


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)``: replaced when defined, left as written otherwise."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def field_ref(pod: Mapping[str, Any], path: str, ctx: PodContext) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": ctx.node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": ctx.address,
        "status.podIPs": ctx.address,
        "status.hostIP": ctx.node_address,
        "status.hostIPs": ctx.node_address,
    }
    if path in simple:
        return simple[path]
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return meta.get(m.group(1), {}).get(m.group(2), "")
    raise ValueError(f"unsupported fieldRef {path!r}")


def volume_dirs(pod: Mapping[str, Any], container: Mapping[str, Any], ctx: PodContext) -> dict:
    """mountPath -> local directory for every mount we can map; /dev/shm stays the host's."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    ns = pod["metadata"].get("namespace", "default")
    out: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == "/dev/shm":
            continue
        vol = volumes.get(mount["name"], {})
        if "hostPath" in vol:
            local = Path(vol["hostPath"]["path"])
        elif "persistentVolumeClaim" in vol:
            local = ctx.claims_dir / ns / vol["persistentVolumeClaim"]["claimName"]
        else:  # emptyDir and anything we cannot source: a directory of the pod's own
            local = ctx.pod_dir / "volumes" / mount["name"]
        out[mount["mountPath"].rstrip("/") or "/"] = local / mount.get("subPath", "")
    return out


def downward_files(pod: Mapping[str, Any], ctx: PodContext) -> dict[Path, str]:
    """The files of the pod's downwardAPI volumes and what they hold now. The agent rewrites
    them when the pod changes, as the kubelet does: a running process sees new annotations
    (Joule's power limit) without a restart. ValueError for an item we cannot source."""
    out: dict[Path, str] = {}
    for vol in pod["spec"].get("volumes", []):
        for item in (vol.get("downwardAPI") or {}).get("items", []):
            if "fieldRef" not in item:
                raise ValueError(
                    f"volume {vol['name']}: only fieldRef items are supported on the local node"
                )
            value = field_ref(pod, item["fieldRef"]["fieldPath"], ctx)
            out[ctx.pod_dir / "volumes" / vol["name"] / item["path"]] = value
    return out


def map_paths(value: str, mounts: Mapping[str, Path]) -> str:
    for mount_path in sorted(mounts, key=len, reverse=True):
        pattern = rf"(?<![\w/.-]){re.escape(mount_path)}(?=/|$|[\s,:;=\"'])"
        value = re.sub(pattern, str(mounts[mount_path]).replace("\\", "\\\\"), value)
    return value


def plan(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    ctx: PodContext,
    images: LocalImages,
    host_env: Mapping[str, str],
) -> ProcessPlan | Refusal:
    """The process for ``container`` of ``pod``, or why it cannot run here."""
    image = container.get("image", "")
    entrypoint = images.entrypoint(image)
    if entrypoint is None:
        return Refusal(
            NOT_RUNNABLE,
            f"image {image!r} cannot run on this local node: there is no container runtime; "
            f"runnable here: {', '.join(images.entrypoints) or 'none'} "
            "(joule node-agent --local-image IMAGE to run a command as is)",
        )
    mounts = volume_dirs(pod, container, ctx)
    try:
        downward_files(pod, ctx)
    except ValueError as exc:
        return Refusal("CreateContainerConfigError", str(exc))
    env: dict[str, str] = {
        "PATH": f"{ctx.bin_dir}{os.pathsep}{host_env.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(ctx.pod_dir),
        "HOSTNAME": pod["spec"].get("hostname") or pod["metadata"]["name"],
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("LANG", "TMPDIR", "JOULE_ENERGY_SOURCE", "JOULE_ESTIMATED_WATTS_PER_CORE"):
        if key in host_env:
            env[key] = host_env[key]
    if image.startswith(TRAINER_IMAGE):
        # Every pod listens on its own address, as it would in its own network namespace.
        env["JOULE_METRICS_ADDR"] = ctx.address
    for item in container.get("env", []):
        if "value" in item:
            raw = expand(str(item["value"]), env)
        elif "fieldRef" in item.get("valueFrom", {}):
            try:
                raw = field_ref(pod, item["valueFrom"]["fieldRef"]["fieldPath"], ctx)
            except ValueError as exc:
                return Refusal("CreateContainerConfigError", str(exc))
        else:
            return Refusal(
                "CreateContainerConfigError",
                f"env {item['name']}: only value and fieldRef are supported on the local node",
            )
        env[item["name"]] = map_paths(rewrite(raw, ctx.names, ctx.host_port), mounts)

    def arg(a: str) -> str:
        return map_paths(rewrite(expand(str(a), env), ctx.names, ctx.host_port), mounts)

    argv = [arg(a) for a in (container.get("command") or entrypoint)]
    argv += [arg(a) for a in container.get("args", [])]
    if not argv:
        return Refusal("CreateContainerConfigError", "the container has no command")
    if argv[0] in ("python", "python3"):
        argv[0] = str(ctx.bin_dir / "python")
    elif "/" not in argv[0] and (ctx.bin_dir / argv[0]).exists():
        argv[0] = str(ctx.bin_dir / argv[0])
    working = container.get("workingDir")
    cwd = Path(map_paths(working, mounts)) if working else ctx.pod_dir
    return ProcessPlan(argv=argv, env=env, cwd=cwd, volumes=mounts)
