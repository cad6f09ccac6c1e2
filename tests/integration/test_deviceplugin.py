"""The GPU-slot device plugin's Go tests (an in-process fake kubelet: registration,
ListAndWatch, Allocate, re-registration after a kubelet restart; its pod-resources lister
against a fake PodResourcesLister), and the built binary.

The tests with a real kubelet (a pod with nvidia.com/gpu scheduled, its env set) live with the
real node; test_pod_resources.py has the kubelet's pod-resources API listing a pod's slots."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from joule.cluster.deviceplugin import (
    SOURCE_DIR,
    build_device_plugin,
    device_plugin_component,
    pod_resources_argv,
)


def find_go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).is_file():
        raise AssertionError("Go is needed (make binaries builds the device plugin with it)")
    return go


def go_env() -> dict[str, str]:
    # -mod=readonly (Go's default): an untidy go.mod or go.sum fails here instead of being
    # silently rewritten.
    env = {k: v for k, v in os.environ.items() if k != "GOFLAGS"}
    env.setdefault("GOTOOLCHAIN", "auto")
    return env


def run_go(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [find_go(), *args],
        cwd=SOURCE_DIR,
        env=go_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"go {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_go_sources_are_formatted_and_vetted():
    goroot = run_go("env", "GOROOT").stdout.strip()
    gofmt = subprocess.run(
        [str(Path(goroot) / "bin" / "gofmt"), "-l", "."],
        cwd=SOURCE_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    assert gofmt.stdout.strip() == "", f"not gofmt-ed: {gofmt.stdout}"
    run_go("vet", "./...")


def test_go_tests_pass():
    proc = run_go("test", "-count=1", "./...")
    assert "ok" in proc.stdout


def test_the_built_plugin_waits_for_a_kubelet_and_stops_on_sigterm(tmp_path):
    target = tmp_path / "bin" / "joule-device-plugin"
    build_device_plugin(find_go(), target, lambda _m: None)
    assert os.access(target, os.X_OK)

    bad = subprocess.run([str(target), "--count=0"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "--count" in bad.stderr
    # Its pod-resources mode says plainly when there is no kubelet to ask.
    argv = pod_resources_argv(target, tmp_path / "kubelet.sock")
    lister = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert lister.returncode == 1 and "no pod-resources socket" in lister.stderr, lister.stderr

    sockets = tmp_path / "dp"
    comp = device_plugin_component(target, 2, sockets)
    proc = subprocess.Popen(comp.argv, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert sockets.is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    log = proc.stderr.read()
    assert "slots, not GPUs" in log and "waiting for" in log
    assert list(sockets.iterdir()) == []
