"""The GPU-slot device plugin's cache key, command line and pinned API version."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from joule.cluster.build import BuildError
from joule.cluster.deviceplugin import (
    SOURCE_DIR,
    device_plugin_binary,
    device_plugin_component,
    pod_resources_argv,
    pod_resources_socket,
    source_files,
    source_hash,
)
from joule.cluster.settings import KUBERNETES_VERSION


def copy_sources(tmp_path: Path) -> Path:
    dest = tmp_path / "src"
    shutil.copytree(SOURCE_DIR, dest)
    return dest


def test_the_binary_is_keyed_by_the_go_sources(tmp_path):
    src = copy_sources(tmp_path)
    before = device_plugin_binary(tmp_path / "cache", src)
    assert before == tmp_path / "cache" / "deviceplugin" / source_hash(src) / "bin" / (
        "joule-device-plugin"
    )
    (src / "main_test.go").write_text("package main\n")  # tests are not part of the binary
    assert device_plugin_binary(tmp_path / "cache", src) == before
    main = src / "main.go"
    main.write_text(main.read_text() + "\n// an edit\n")
    edited = device_plugin_binary(tmp_path / "cache", src)
    assert edited != before
    lister = src / "podresources.go"  # every non-test Go file is part of it
    lister.write_text(lister.read_text() + "\n// an edit\n")
    assert device_plugin_binary(tmp_path / "cache", src) != edited


def test_missing_sources_are_reported(tmp_path):
    src = copy_sources(tmp_path)
    (src / "go.sum").unlink()
    with pytest.raises(BuildError, match=r"go\.sum"):
        source_files(src)


def test_the_component_runs_the_plugin_with_its_slots():
    comp = device_plugin_component(Path("/c/joule-device-plugin"), 4, Path("/dp"))
    assert comp.name == "device-plugin"
    assert comp.argv == [
        "/c/joule-device-plugin",
        "--resource=nvidia.com/gpu",
        "--count=4",
        "--socket-dir=/dp",
    ]
    assert comp.health_url is None
    with pytest.raises(ValueError):
        device_plugin_component(Path("/c/joule-device-plugin"), 0)


def test_the_pod_resources_lister_asks_the_kubelets_root_dir_socket():
    socket = pod_resources_socket(Path("/state/node/kubelet"))
    assert socket == Path("/state/node/kubelet/pod-resources/kubelet.sock")
    assert pod_resources_argv(Path("/c/joule-device-plugin"), socket) == [
        "/c/joule-device-plugin",
        "pod-resources",
        "--socket=/state/node/kubelet/pod-resources/kubelet.sock",
        "--timeout=10s",
    ]
    assert pod_resources_argv(Path("/b"), socket, timeout_s=2.5)[-1] == "--timeout=2.5s"


def test_the_plugin_api_is_the_control_planes_release():
    gomod = (SOURCE_DIR / "go.mod").read_text()
    staging = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    assert re.search(rf"^\tk8s\.io/kubelet {re.escape(staging)}$", gomod, re.MULTILINE), gomod
