"""The throwaway go.mod that builds Kubernetes from its published modules."""

import pytest

from joule.cluster.build import go_directive, render_gomod, render_tools_go, staging_replacements

UPSTREAM = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
	k8s.io/api v0.0.0
	github.com/foo/bar v1.2.3
)

replace (
	k8s.io/api => ./staging/src/k8s.io/api
	k8s.io/client-go => ./staging/src/k8s.io/client-go // comment
	github.com/foo/bar => github.com/fork/bar v1.2.4
)

replace k8s.io/kubectl => ./staging/src/k8s.io/kubectl
"""


def test_each_local_staging_module_maps_to_its_published_v0_release():
    assert staging_replacements(UPSTREAM, "v1.36.3") == [
        ("k8s.io/api", "k8s.io/api v0.36.3"),
        ("k8s.io/client-go", "k8s.io/client-go v0.36.3"),
        ("k8s.io/kubectl", "k8s.io/kubectl v0.36.3"),
    ]


def test_a_version_that_is_not_v1_x_y_is_refused():
    with pytest.raises(ValueError, match=r"v1\.36\.3"):
        staging_replacements(UPSTREAM, "1.36")


def test_a_go_mod_without_local_replacements_is_refused():
    with pytest.raises(ValueError, match="no local replace"):
        staging_replacements("module x\n\ngo 1.22\n", "v1.36.3")


def test_go_directive_is_read_from_the_upstream_module():
    assert go_directive(UPSTREAM) == "1.26.0"
    with pytest.raises(ValueError):
        go_directive("module x\n")


def test_rendered_go_mod_requires_and_replaces():
    text = render_gomod(
        "joule.local/build/kubernetes",
        "1.26.0",
        [("k8s.io/kubernetes", "v1.36.3")],
        [("k8s.io/api", "k8s.io/api v0.36.3")],
    )
    assert text.startswith("module joule.local/build/kubernetes\n")
    assert "\ngo 1.26.0\n" in text
    assert "\tk8s.io/kubernetes v1.36.3\n" in text
    assert "\tk8s.io/api => k8s.io/api v0.36.3\n" in text


def test_tools_file_imports_the_commands_under_a_build_tag():
    text = render_tools_go(["k8s.io/kubernetes/cmd/kube-apiserver"])
    assert text.startswith("//go:build tools\n")
    assert '_ "k8s.io/kubernetes/cmd/kube-apiserver"' in text


def test_binaries_report_the_release_they_were_built_from():
    from joule.cluster.build import version_ldflags

    flags = version_ldflags("v1.36.3")
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.3" in flags
    assert "-X k8s.io/component-base/version.gitMinor=36" in flags
    assert "-X k8s.io/client-go/pkg/version.gitVersion=v1.36.3" in flags
