"""`joule.cluster.lifecycle.restart`, which the fault benchmark uses: etcd and kube-apiserver
killed and started again with the same command line, on a cluster of their own; what was
stored before is there after."""

from __future__ import annotations

from kubernetes import client, config

from joule.cluster import ClusterSettings, down, status, up
from joule.cluster.lifecycle import restart
from tests.conftest import wait_for


def test_etcd_and_the_api_server_come_back_with_what_was_stored():
    settings = ClusterSettings(name="pytest-restart", nodes=1, real_node=False)
    down(settings)  # a leftover from an aborted run
    info = up(settings)
    try:
        core = client.CoreV1Api(config.new_client_from_config(config_file=str(info.kubeconfig)))
        core.create_namespaced_config_map(
            "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="kept"))
        )
        pids = {r.name: r.pid for r in info.processes}
        for name in ("etcd", "kube-apiserver"):
            took = restart(settings, name, down_seconds=1.0)
            assert took >= 1.0
        after = status(settings)
        assert after is not None and after.running
        again = {r.name: r.pid for r in after.processes}
        assert again["etcd"] != pids["etcd"] and again["kube-apiserver"] != pids["kube-apiserver"]
        assert again["kube-scheduler"] == pids["kube-scheduler"]  # the rest were left alone
        wait_for(lambda: core.read_namespaced_config_map("kept", "default"), timeout=30,
                 what="the ConfigMap stored before the restarts")  # fmt: skip
    finally:
        down(settings)
