"""The real node's device plugin: ``nvidia.com/gpu`` *slots*, not GPUs.

A small Go program (``deviceplugin/main.go``, shipped with this package) that registers with
the kubelet and advertises ``--count`` devices named ``slot-0..slot-N-1``. A pod given slots
gets ``NVIDIA_VISIBLE_DEVICES`` and ``JOULE_GPU_SLOTS`` set to their IDs, and the kubelet's
pod-resources API lists them (``pod_resources_argv``: the same binary asks it, as a GPU node's
monitoring agent would); nothing touches any hardware. See deviceplugin/README.md.

The binary is cached under ``<cache>/deviceplugin/<hash of the Go sources>/bin/``, so editing
the sources builds a new one and an unchanged tree never rebuilds.
"""

from __future__ import annotations

from pathlib import Path

from joule.cluster.build import (
    Progress,
    _find_go,
    _stderr,
    build_go_program,
    go_program_hash,
    go_program_sources,
)
from joule.cluster.components import Component
from joule.cluster.settings import cache_dir

SOURCE_DIR = Path(__file__).with_name("deviceplugin")
BINARY_NAME = "joule-device-plugin"
LABEL = "device plugin"
DEFAULT_RESOURCE = "nvidia.com/gpu"
# The kubelet's device-plugin folder; a constant in k8s.io/kubelet that --root-dir does not move.
DEFAULT_SOCKET_DIR = Path("/var/lib/kubelet/device-plugins")
# The kubelet's pod-resources API socket, relative to its --root-dir (which does move it:
# the kubelet builds it from getRootDir(), unlike the device-plugin folder).
POD_RESOURCES_SOCKET = Path("pod-resources/kubelet.sock")


def source_files(source: Path = SOURCE_DIR) -> list[Path]:
    """What the binary is built from: go.mod, go.sum and the non-test Go files."""
    return go_program_sources(source, LABEL)


def source_hash(source: Path = SOURCE_DIR) -> str:
    """A short digest of the sources' names and contents: the cache key."""
    return go_program_hash(source, LABEL)


def device_plugin_binary(root: Path | None = None, source: Path = SOURCE_DIR) -> Path:
    """Where the binary built from these sources lives (built or not)."""
    return (root or cache_dir()) / "deviceplugin" / source_hash(source) / "bin" / BINARY_NAME


def build_device_plugin(go: str, target: Path, say: Progress, source: Path = SOURCE_DIR) -> None:
    """Build the plugin into ``target`` (a binary path, e.g. ``device_plugin_binary()``)."""
    build_go_program(go, source, target, LABEL, say)


def ensure_device_plugin(progress: Progress | None = None, root: Path | None = None) -> Path:
    """The cached binary for the current sources, building it first if needed (~40 s cold on
    2 cores, ~15 s with a warm Go build cache)."""
    target = device_plugin_binary(root)
    if not target.is_file():
        build_device_plugin(_find_go(), target, progress or _stderr)
    return target


def device_plugin_component(
    binary: Path,
    count: int,
    socket_dir: Path = DEFAULT_SOCKET_DIR,
    resource: str = DEFAULT_RESOURCE,
) -> Component:
    """The plugin as a host process. It waits for ``<socket_dir>/kubelet.sock``, so it may
    start before or after the kubelet; it has no health endpoint (the node's allocatable
    ``resource`` reaching ``count`` is the sign it works)."""
    if count < 1:
        raise ValueError(f"the device plugin needs at least 1 slot, got {count}")
    return Component(
        "device-plugin",
        [str(binary), f"--resource={resource}", f"--count={count}", f"--socket-dir={socket_dir}"],
        None,
    )


def pod_resources_socket(kubelet_root_dir: Path) -> Path:
    """The pod-resources socket of the kubelet run with ``--root-dir=kubelet_root_dir``."""
    return kubelet_root_dir / POD_RESOURCES_SOCKET


def pod_resources_argv(binary: Path, socket: Path, timeout_s: float = 10.0) -> list[str]:
    """The plugin binary's ``pod-resources`` mode: asks the kubelet on ``socket`` what each
    pod's containers hold (``List``) and what the node can allocate
    (``GetAllocatableResources``), and prints JSON::

        {"socket": "...",
         "pods": [{"namespace": "ns", "name": "p",
                   "containers": [{"name": "c", "devices": {"nvidia.com/gpu": ["slot-0"]}}]}],
         "allocatable": {"nvidia.com/gpu": ["slot-0", "slot-1"]}}

    Exit status 1 when the kubelet could not be asked, 2 for bad arguments."""
    return [str(binary), "pod-resources", f"--socket={socket}", f"--timeout={timeout_s:g}s"]
