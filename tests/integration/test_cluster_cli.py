"""`joule cluster up | status | down` as a user runs them, on a cluster of its own."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from joule.cluster import process
from joule.cluster.process import ProcessRecord


def joule(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "joule", *args], capture_output=True, text=True, timeout=300
    )


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_status_down_leaves_nothing_behind(tmp_path):
    name = "pytest-cli"
    joule("cluster", "down", "--name", name)  # a leftover from an aborted run
    up = joule("cluster", "up", "--name", name, "--nodes", "2", "--gpus-per-node", "4")
    assert up.returncode == 0, up.stderr
    assert "is up in" in up.stderr
    assert "export KUBECONFIG=" in up.stdout
    try:
        again = joule("cluster", "up", "--name", name, "--nodes", "2")
        assert again.returncode == 0, again.stderr
        assert "already running" in again.stderr

        st = joule("cluster", "status", "--name", name, "--json")
        assert st.returncode == 0, st.stderr
        data = json.loads(st.stdout)
        assert data["running"] is True
        names = {c["name"] for c in data["components"]}
        assert names == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        }
        assert all(c["healthy"] and c["rss_bytes"] > 0 for c in data["components"])
        human = joule("cluster", "status", "--name", name)
        assert "kube-apiserver" in human.stdout and "MiB" in human.stdout

        nodes = subprocess.run(
            [
                data["kubectl"],
                f"--kubeconfig={data['kubeconfig']}",
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[*].status.allocatable.nvidia\\.com/gpu}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert nodes == ["4", "4"]
        records = [ProcessRecord.from_json(p) for p in data["processes"]]
        ports = list(data["ports"].values())
        assert any(listening(p) for p in ports)
    finally:
        down = joule("cluster", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stderr
    assert not [r.name for r in records if process.alive(r)]
    assert not [p for p in ports if listening(p)]
    assert not __import__("pathlib").Path(data["kubeconfig"]).parent.exists()

    again = joule("cluster", "down", "--name", name)
    assert again.returncode == 0 and "not running" in again.stderr
    assert joule("cluster", "status", "--name", name).returncode == 1


def test_bad_options_fail_before_anything_starts():
    bad = joule("cluster", "up", "--name", "pytest-bad", "--nodes", "-1")
    assert bad.returncode == 2
    assert "must be >= 0" in bad.stderr
    bad = joule("cluster", "up", "--name", "Not_A_Name")
    assert bad.returncode == 2
    assert "cluster name" in bad.stderr
