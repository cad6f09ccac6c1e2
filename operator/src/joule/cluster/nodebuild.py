"""The real node's binaries: containerd (+ ctr, the runc shim) from the Go module proxy, the
pause program from the Kubernetes module's source, runc and the CNI plugins from Debian.

The kubelet is built with the control plane (same module, same version; see ``build``).
Everything lands in the cache by version, like the control plane, so it is built once.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from joule.cluster.build import (
    BuildError,
    Progress,
    _find_go,
    _fmt_elapsed,
    _go_json,
    _stderr,
    go_install,
)
from joule.cluster.settings import cache_dir

CONTAINERD_VERSION = "v2.4.2"
CONTAINERD_MODULE = "github.com/containerd/containerd/v2"
# Debian's packages: runc 1.1.5 and the CNI plugins 1.1.1 worked as they are.
DEBIAN_PACKAGES = ("runc", "containernetworking-plugins")
RUNC = Path("/usr/sbin/runc")
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")


@dataclass(frozen=True)
class NodeBinaries:
    containerd: Path
    ctr: Path
    shim: Path
    pause: Path  # a static binary; packed into an image at node start (``pauseimage``)
    runc: Path
    cni_bin_dir: Path


def node_binaries_for(kubernetes_version: str, root: Path | None = None) -> NodeBinaries:
    root = root or cache_dir()
    ctd = root / "containerd" / CONTAINERD_VERSION / "bin"
    return NodeBinaries(
        containerd=ctd / "containerd",
        ctr=ctd / "ctr",
        shim=ctd / "containerd-shim-runc-v2",
        pause=root / "pause" / kubernetes_version / "pause",
        runc=RUNC,
        cni_bin_dir=CNI_BIN_DIR,
    )


def missing_host_tools(bins: NodeBinaries) -> list[str]:
    """Debian packages the node needs that are not installed, by package name."""
    missing = []
    if not bins.runc.is_file():
        missing.append("runc")
    if not all((bins.cni_bin_dir / p).is_file() for p in CNI_PLUGINS):
        missing.append("containernetworking-plugins")
    return missing


def ensure_node_binaries(kubernetes_version: str, progress: Progress | None = None) -> NodeBinaries:
    say = progress or _stderr
    bins = node_binaries_for(kubernetes_version)
    missing = missing_host_tools(bins)
    if missing:
        raise BuildError(
            f"the local node needs Debian's {', '.join(missing)}: "
            f"apt-get install {' '.join(missing)} (or run `make host-packages`)"
        )
    started = time.monotonic()
    built = False
    needed = (bins.containerd, bins.ctr, bins.shim, bins.pause)
    go = "" if all(p.is_file() for p in needed) else _find_go()
    if not all(p.is_file() for p in (bins.containerd, bins.ctr, bins.shim)):
        _build_containerd(go, bins.containerd.parent, say)
        built = True
    if not bins.pause.is_file():
        _build_pause(go, kubernetes_version, bins.pause, say)
        built = True
    if built:
        say(f"node binaries built in {_fmt_elapsed(time.monotonic() - started)}")
    return bins


def _build_containerd(go: str, bin_dir: Path, say: Progress) -> None:
    label = f"containerd {CONTAINERD_VERSION}"
    say(f"[{label}] compiling containerd, ctr and containerd-shim-runc-v2")
    pkgs = [f"{CONTAINERD_MODULE}/cmd/{c}@{CONTAINERD_VERSION}" for c in ("containerd", "ctr")]
    shim = f"{CONTAINERD_MODULE}/cmd/containerd-shim-runc-v2@{CONTAINERD_VERSION}"
    # btrfs needs C headers that are not here and that a node on overlayfs never uses; the
    # shim is static (CGO off), as containerd's own release builds it.
    go_install(go, [pkgs], bin_dir, label, say, flags=[["-tags", "no_btrfs"]])
    go_install(go, [[shim]], bin_dir, label, say, extra_env={"CGO_ENABLED": "0"})


def _build_pause(go: str, kubernetes_version: str, target: Path, say: Progress) -> None:
    """Kubernetes' pause.c, compiled static: the sandbox image without pulling one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    info = _go_json(
        go, ["mod", "download", "-json", f"k8s.io/kubernetes@{kubernetes_version}"], target.parent
    )
    source = Path(info["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    if not source.is_file():
        raise BuildError(f"k8s.io/kubernetes@{kubernetes_version} has no {source}")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("a C compiler is needed for the pause program: apt-get install gcc")
    say(f"[pause {kubernetes_version}] compiling {source.name}")
    tmp = target.with_suffix(".tmp")
    proc = subprocess.run(
        [cc, "-Os", "-Wall", "-static", "-DVERSION=joule", "-o", str(tmp), str(source)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BuildError(f"compiling pause failed: {proc.stderr.strip()}")
    subprocess.run(["strip", str(tmp)], check=False)
    tmp.replace(target)
