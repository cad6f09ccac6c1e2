"""`joule cluster up | status | down` as a user runs them, on a cluster of its own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from joule.cluster import process
from joule.cluster.process import ProcessRecord
from joule.cluster.realnode import NodeRecord


def _in_ns(proc: Path, node: NodeRecord) -> bool:
    try:
        return os.readlink(proc / "ns" / "mnt") == node.mount_ns
    except OSError:
        return False


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
    cni_before = set(Path("/var/lib/cni").glob(f"**/*joule-{name}-*"))
    up = joule(
        "cluster", "up", "--name", name, "--nodes", "2", "--gpus-per-node", "4",
        "--node-gpus", "2",
    )  # fmt: skip
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
        # As root on Linux (CI), the real node's processes too.
        assert names == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            *("node-namespace", "registry", "containerd", "kubelet", "device-plugin", "coredns"),
        }
        node = NodeRecord.from_json(data["node"])
        layout = node.layout()
        assert Path(f"/sys/class/net/{layout.pod_bridge}").exists()
        assert Path(f"/sys/fs/cgroup/memory{layout.cgroup_root}").is_dir()
        assert f"-N {layout.api_chain}" in nat_rules()  # pods' route to the API server
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
        assert nodes == ["4", "4", "2"]  # two kwok nodes, then the real node's 2 slots
        # A container on the real node, so that down has shims and containers to remove.
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "pause", "namespace": "default"},
            "spec": {
                "nodeName": "local",
                "containers": [
                    {"name": "c", "image": "registry.k8s.io/pause:3.10.2",
                     "imagePullPolicy": "Never"}
                ],
            },
        }  # fmt: skip
        kubectl = [data["kubectl"], f"--kubeconfig={data['kubeconfig']}"]
        subprocess.run([*kubectl, "apply", "-f", "-"], input=json.dumps(pod), check=True, text=True)
        subprocess.run(
            [*kubectl, "wait", "--for=condition=Ready", "pod/pause", "--timeout=60s"], check=True
        )
        records = [ProcessRecord.from_json(p) for p in data["processes"]]
        ports = list(data["ports"].values())
        assert any(listening(p) for p in ports)
    finally:
        down = joule("cluster", "down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stderr
    assert not [r.name for r in records if process.alive(r)]
    assert not [p for p in ports if listening(p)]
    assert not Path(data["kubeconfig"]).parent.exists()
    # The real node's bridges, cgroups, sockets and every process of its mount namespace
    # (containerd's shims included) are gone too.
    assert not Path(f"/sys/class/net/{layout.pod_bridge}").exists()
    assert not Path(f"/sys/class/net/{layout.node_bridge}").exists()
    assert layout.api_chain not in nat_rules() and layout.owner_tag not in nat_rules()
    assert not [
        h for h in Path("/sys/fs/cgroup").iterdir() if (h / layout.cgroup_root[1:]).exists()
    ]
    assert not layout.run.exists()
    # libcni's cache on the host was not written: the node had its own /var/lib/cni.
    assert set(Path("/var/lib/cni").glob(f"**/*joule-{name}-*")) <= cni_before
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _in_ns(p, node)]

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


def nat_rules() -> str:
    return subprocess.run(
        ["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True, check=True
    ).stdout
