"""The Corefile, the CoreDNS component and its read-only role. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from joule.cluster.dns import (
    COREDNS_CLIENT,
    coredns_binary,
    coredns_component,
    coredns_rbac,
    corefile,
)


def test_corefile_serves_the_cluster_zone_from_the_api_and_forwards_nothing():
    text = corefile("10.244.0.1", Path("/s/kubeconfigs/coredns.yaml"), ready_port=8181)
    assert "cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {" in text
    assert ".:53 {" in text
    assert text.count("bind 10.244.0.1") == 2
    assert 'kubeconfig "/s/kubeconfigs/coredns.yaml"' in text
    assert "kubernetes cluster.local in-addr.arpa ip6.arpa {" in text
    assert "pods disabled" in text
    assert "ready 127.0.0.1:8181" in text
    assert "rcode NXDOMAIN" in text
    directives = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for word in ("forward", "proxy", "fallthrough", "/etc/resolv.conf"):
        assert word not in directives
    assert text.count("{") == text.count("}")


def test_corefile_port_domain_and_no_ready_endpoint():
    text = corefile("127.0.0.1", "/k.yaml", "example.internal", port=5353)
    assert "example.internal:5353 in-addr.arpa:5353 ip6.arpa:5353 {" in text
    assert ".:5353 {" in text
    assert "ready" not in text


@pytest.mark.parametrize(
    ("ip", "config", "domain", "port"),
    [
        ("not-an-ip", "/k", "cluster.local", 53),
        ("10.0.0.1", "/k", "Cluster_Local", 53),
        ("10.0.0.1", "/k", "cluster.local", 0),
        ("10.0.0.1", '/a"b', "cluster.local", 53),
        ("10.0.0.1", "/{$HOME}", "cluster.local", 53),
        ("10.0.0.1", "", "cluster.local", 53),
    ],
)
def test_corefile_refuses_what_it_cannot_write(ip, config, domain, port):
    with pytest.raises(ValueError):
        corefile(ip, config, domain, port=port)


def test_component_runs_coredns_with_the_corefile_and_its_ready_endpoint():
    comp = coredns_component(Path("/c/coredns"), Path("/s/Corefile"), 8181)
    assert comp.name == "coredns"
    assert comp.argv == ["/c/coredns", "-conf", "/s/Corefile"]
    assert comp.health_url == "http://127.0.0.1:8181/ready"
    assert coredns_component(Path("/c/coredns"), Path("/s/Corefile")).health_url is None


def test_the_role_reads_services_endpointslices_and_namespaces_only():
    role, binding = coredns_rbac()
    assert role["kind"] == "ClusterRole" and binding["kind"] == "ClusterRoleBinding"
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        ("", "services", "list"),
        ("", "services", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    }
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_CLIENT.user}
    ]
    assert COREDNS_CLIENT.user == "joule:coredns" and COREDNS_CLIENT.groups == ()


def test_the_binary_is_cached_by_version(tmp_path):
    assert coredns_binary("v1.15.0", tmp_path) == tmp_path / "coredns/v1.15.0/bin/coredns"
