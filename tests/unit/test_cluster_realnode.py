"""The real node's configuration: what keeps it private to this machine and to its cluster."""

import hashlib
import json
import tarfile
import tomllib
from pathlib import Path

import pytest

from joule.cluster import nodeconfig, pauseimage
from joule.cluster.lifecycle import parse_taint
from joule.cluster.nodeconfig import NodeLayout


def layout(tmp_path: Path, index: int = 7) -> NodeLayout:
    return NodeLayout("demo", index, tmp_path / "node", Path("/run/joule/demo"))


def test_an_index_is_stable_per_cluster_and_skips_ones_in_use():
    first = nodeconfig.pick_index("pytest", set())
    assert nodeconfig.pick_index("pytest", set()) == first
    assert 1 <= first <= 254
    assert nodeconfig.pick_index("pytest", {first}) != first
    with pytest.raises(ValueError, match="no free pod subnet"):
        nodeconfig.pick_index("pytest", set(range(1, 255)))


def test_pods_get_no_gateway_no_masquerade_and_no_route_out(tmp_path):
    conf = nodeconfig.cni_config(layout(tmp_path), "10.96.0.0/16")
    bridge = conf["plugins"][0]
    assert bridge["isGateway"] is False  # it would turn ip_forward on host-wide
    assert bridge["ipMasq"] is False
    # Only the Service range, through the bridge: the API server's Service, nothing outside.
    assert bridge["ipam"]["routes"] == [{"dst": "10.96.0.0/16", "gw": "10.88.7.1"}]
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.88.7.0/24"}]]
    assert bridge["bridge"] == "jlpod7" and len(bridge["bridge"]) <= 15


def test_pods_reach_the_api_server_only_through_the_nodes_own_chain(tmp_path):
    node = layout(tmp_path)
    rules = nodeconfig.api_route_rules(node, "10.96.0.1", 6443)
    chain = node.api_chain
    assert len(chain) <= 28 and chain.startswith("JOULE-")
    assert rules[0][-2:] == ["-N", chain]
    dnat = rules[1]
    assert dnat[dnat.index("-d") + 1] == "10.96.0.1/32" and dnat[-1] == "127.0.0.1:6443"
    jump = rules[2]
    # Entered only from this node's pod bridge, and tagged so that only this node removes it.
    assert jump[jump.index("-i") + 1] == "jlpod7"
    assert jump[jump.index("--comment") + 1] == node.owner_tag
    undo = nodeconfig.api_route_teardown(node)
    assert undo[0][undo[0].index("-D") + 2 :] == jump[jump.index("PREROUTING") + 1 :]
    assert undo[-1][-2:] == ["-X", chain]


def test_containerd_config_keeps_everything_in_the_nodes_own_paths(tmp_path):
    text = nodeconfig.containerd_config(layout(tmp_path), Path("/usr/sbin/runc"), Path("/cni"))
    conf = tomllib.loads(text)
    assert conf["version"] == 4 and conf["imports"] == []
    plugins = conf["plugins"]
    assert plugins["io.containerd.server.v1.grpc"]["address"] == "/run/joule/demo/containerd.sock"
    assert plugins["io.containerd.shim.v1.manager"]["socket_dir"] == "/run/joule/demo/s"
    runtime = plugins["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert runtime["cni"]["conf_dir"].startswith(str(tmp_path))
    assert plugins["io.containerd.nri.v1.nri"]["disable"] is True
    images = plugins["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == pauseimage.PAUSE_IMAGE
    for path in (conf["root"], images["registry"]["config_path"]):
        assert path.startswith(str(tmp_path))


def test_the_kubelet_serves_only_authenticated_clients_on_the_node_address(tmp_path):
    conf = nodeconfig.kubelet_config(
        layout(tmp_path), Path("ca.crt"), Path("k.crt"), Path("k.key"), 12345, []
    )
    assert conf["authentication"]["anonymous"]["enabled"] is False
    assert conf["authentication"]["webhook"]["enabled"] is True
    assert conf["authorization"]["mode"] == "Webhook"
    assert conf["readOnlyPort"] == 0
    assert conf["address"] == "10.87.7.1"
    assert conf["clusterDNS"] == ["10.88.7.1"]
    assert conf["cgroupRoot"] == "/joule-demo"


def test_published_image_names_resolve_from_the_local_registry():
    hosts = nodeconfig.registry_hosts("127.0.0.1:5999")
    ghcr = tomllib.loads(hosts["ghcr.io"])
    assert ghcr["host"] == {"http://127.0.0.1:5999": {"capabilities": ["pull", "resolve"]}}
    assert tomllib.loads(hosts["127.0.0.1:5999"])["server"] == "http://127.0.0.1:5999"


def test_taints_parse_as_the_kubelet_wants_them():
    assert parse_taint("joule.dev/local-node=true:NoSchedule") == {
        "key": "joule.dev/local-node",
        "value": "true",
        "effect": "NoSchedule",
    }
    assert parse_taint("gpu:NoExecute") == {"key": "gpu", "effect": "NoExecute"}
    with pytest.raises(ValueError, match="key=value:NoSchedule"):
        parse_taint("gpu=yes")


def test_the_pause_image_archive_is_a_valid_oci_layout(tmp_path):
    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF not really")
    archive = pauseimage.pack(binary, tmp_path / "pause.tar")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        index = json.loads(tar.extractfile("index.json").read())
        entry = index["manifests"][0]
        assert entry["annotations"]["io.containerd.image.name"] == pauseimage.PAUSE_IMAGE
        manifest_name = "blobs/sha256/" + entry["digest"].split(":")[1]
        manifest_bytes = tar.extractfile(manifest_name).read()
        assert hashlib.sha256(manifest_bytes).hexdigest() == entry["digest"].split(":")[1]
        manifest = json.loads(manifest_bytes)
        layer_name = "blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]
        assert {"oci-layout", layer_name} <= names
        with tarfile.open(fileobj=tar.extractfile(layer_name)) as layer:
            assert layer.getmember("pause").mode == 0o755
    assert pauseimage.pack(binary, tmp_path / "again.tar").read_bytes() == archive.read_bytes()


def test_without_root_or_off_linux_the_reason_is_one_line_with_what_to_do(monkeypatch):
    from joule.cluster import realnode

    monkeypatch.setattr(realnode.platform, "system", lambda: "Linux")
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 1000)
    reason = realnode.unavailable_reason()
    assert reason and "\n" not in reason and "need root" in reason and "kind" in reason
    monkeypatch.setattr(realnode.platform, "system", lambda: "Darwin")
    assert "needs Linux (this is Darwin)" in realnode.unavailable_reason()
    monkeypatch.setattr(realnode.platform, "system", lambda: "Linux")
    monkeypatch.setattr(realnode.os, "geteuid", lambda: 0)
    assert realnode.unavailable_reason() is None


def test_two_checkouts_clusters_of_one_name_get_their_own_sockets_and_cgroups(tmp_path):
    one = nodeconfig.run_key("pytest", tmp_path / "a")
    assert one == nodeconfig.run_key("pytest", tmp_path / "a")
    assert one != nodeconfig.run_key("pytest", tmp_path / "b")
    assert one.startswith("pytest-") and len(one) <= 21
    node = NodeLayout("pytest", 3, tmp_path / "node", Path("/run/joule") / one)
    assert node.cgroup_root == f"/joule-{one}" and node.owner_tag == f"joule:{one}"


def test_socket_paths_that_would_not_fit_are_named(tmp_path):
    short = NodeLayout("a", 1, Path("/root/.local/state/joule/clusters/a/node"), Path("/run/j/a"))
    assert nodeconfig.long_socket_paths(short) == []
    deep = NodeLayout("a", 1, Path("/x" * 40) / "node", Path("/run/j/a"))
    assert [p for p in nodeconfig.long_socket_paths(deep) if "pod-resources" in p]


def test_the_node_keeps_libcni_and_the_kubelets_fixed_paths_private():
    assert set(nodeconfig.PRIVATE_HOST_PATHS) == {
        "/var/lib/kubelet/device-plugins",
        "/var/log/containers",
        "/var/lib/cni",
    }
