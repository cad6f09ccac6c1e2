"""The flags the control plane starts with: security on, everything on loopback."""

from pathlib import Path

from joule.cluster import pki
from joule.cluster.build import binaries_for
from joule.cluster.components import Ports, components, kubeconfig
from joule.cluster.settings import ClusterSettings

PORTS = Ports(2379, 2380, 6443, 10257, 10259, 10247)


def _comps(tmp_path):
    keys = pki.generate(tmp_path / "pki", "10.96.0.1", {})
    bins = binaries_for(ClusterSettings(), root=tmp_path / "cache")
    return {c.name: c for c in components(bins, keys, PORTS, tmp_path)}


def _flags(argv):
    return dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)


def test_start_order_puts_storage_and_api_first(tmp_path):
    assert list(_comps(tmp_path)) == [
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    ]


def test_api_server_has_rbac_podsecurity_tls_and_a_service_account_issuer(tmp_path):
    flags = _flags(_comps(tmp_path)["kube-apiserver"].argv)
    assert "RBAC" in flags["authorization-mode"].split(",")
    assert "PodSecurity" in flags["enable-admission-plugins"].split(",")
    assert flags["bind-address"] == "127.0.0.1"
    assert flags["secure-port"] == "6443"
    assert flags["etcd-servers"] == "http://127.0.0.1:2379"
    for key in (
        "tls-cert-file",
        "tls-private-key-file",
        "client-ca-file",
        "service-account-signing-key-file",
        "service-account-key-file",
    ):
        assert Path(flags[key]).is_file(), key
    assert flags["service-account-issuer"].startswith("https://")


def test_every_component_listens_on_loopback_only(tmp_path):
    for comp in _comps(tmp_path).values():
        for value in _flags(comp.argv).values():
            assert "0.0.0.0" not in value, (comp.name, value)
        assert comp.health_url and "127.0.0.1" in comp.health_url


def test_kwok_manages_only_annotated_nodes_with_its_default_stages(tmp_path):
    flags = _flags(_comps(tmp_path)["kwok"].argv)
    assert flags["manage-all-nodes"] == "false"
    assert flags["manage-nodes-with-annotation-selector"] == "kwok.x-k8s.io/node=fake"
    assert flags["config"].endswith("stages.yaml")


def test_kubeconfig_inlines_credentials(tmp_path):
    keys = pki.generate(tmp_path, "10.96.0.1", {"admin": pki.ADMIN})
    doc = kubeconfig(
        "https://127.0.0.1:6443",
        keys.ca.cert,
        keys.clients["admin"].cert,
        keys.clients["admin"].key,
        "joule-admin",
        "joule",
    )
    assert doc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert doc["users"][0]["user"]["client-key-data"]
    assert doc["current-context"] == "joule"
