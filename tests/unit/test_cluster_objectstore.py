"""The object store's command line, environment, credentials and cache path. Pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from joule.cluster.objectstore import (
    HEALTH_PATH,
    VERSITYGW_MODULE,
    VERSITYGW_VERSION,
    ObjectStore,
    new_credentials,
    version_ldflags,
    versitygw_argv,
    versitygw_binary,
    versitygw_env,
)
from joule.cluster.process import ProcessRecord

BIN = Path("/cache/versitygw/v1.8.0/bin/versitygw")
CERT, KEY, DATA = Path("/s/o/pki/objectstore.crt"), Path("/s/o/pki/objectstore.key"), Path("/s/d")


def test_argv_serves_https_on_every_address_from_the_posix_backend():
    argv = versitygw_argv(BIN, ["127.0.0.1:9000", "10.88.3.1:9000"], CERT, KEY, DATA)
    assert argv == [
        str(BIN),
        "--port=127.0.0.1:9000",
        "--port=10.88.3.1:9000",
        f"--cert={CERT}",
        f"--key={KEY}",
        f"--health={HEALTH_PATH}",
        "--quiet",
        "posix",
        str(DATA),
    ]
    # Global flags come before the backend's subcommand, which takes the data folder last.
    assert argv.index("posix") == len(argv) - 2


def test_argv_carries_no_credentials():
    argv = " ".join(versitygw_argv(BIN, ["127.0.0.1:9000"], CERT, KEY, DATA))
    for flag in ("--access", "--secret", "-a ", "-s "):
        assert flag not in argv


@pytest.mark.parametrize("address", ["", "127.0.0.1", ":9000", "127.0.0.1:0", "host:99999", "a:b"])
def test_argv_refuses_an_address_that_is_not_host_port(address):
    with pytest.raises(ValueError, match="host:port"):
        versitygw_argv(BIN, [address], CERT, KEY, DATA)


def test_argv_refuses_no_address_relative_paths_and_a_bad_health_path():
    with pytest.raises(ValueError, match="at least one"):
        versitygw_argv(BIN, [], CERT, KEY, DATA)
    with pytest.raises(ValueError, match="absolute"):
        versitygw_argv(BIN, ["127.0.0.1:1"], Path("c.pem"), KEY, DATA)
    with pytest.raises(ValueError, match="absolute"):
        versitygw_argv(BIN, ["127.0.0.1:1"], CERT, KEY, Path("data"))
    with pytest.raises(ValueError, match="start with '/'"):
        versitygw_argv(BIN, ["127.0.0.1:1"], CERT, KEY, DATA, health_path="health")


def test_credentials_and_region_go_through_the_environment():
    assert versitygw_env("AK", "SK", "eu-west-1") == {
        "ROOT_ACCESS_KEY": "AK",
        "ROOT_SECRET_KEY": "SK",
        "VGW_REGION": "eu-west-1",
    }
    with pytest.raises(ValueError):
        versitygw_env("", "SK")
    with pytest.raises(ValueError):
        versitygw_env("AK", "")


def test_fresh_credentials_are_aws_shaped_and_differ_each_time():
    pairs = {new_credentials() for _ in range(20)}
    assert len(pairs) == 20
    for access, secret in pairs:
        assert len(access) == 20 and access.isalnum() and access.isupper()
        assert len(secret) == 40


def test_binary_is_cached_per_version_and_the_build_stamps_the_release():
    assert versitygw_binary("v1.8.0", Path("/c")) == Path("/c/versitygw/v1.8.0/bin/versitygw")
    flags = version_ldflags("v1.8.0")
    assert flags.startswith("-ldflags=-s -w ")
    assert "-X=main.Version=v1.8.0" in flags
    assert f"-X=main.Build={VERSITYGW_MODULE}@v1.8.0" in flags
    assert "BuildTime" not in flags  # a timestamp would make every build differ
    assert VERSITYGW_VERSION.startswith("v")


def test_store_record_round_trips_and_names_object_files(tmp_path):
    store = ObjectStore(
        endpoint="https://127.0.0.1:9000",
        pod_endpoint="https://10.88.3.1:9000",
        access_key="AK",
        secret_key="SK",
        region="us-east-1",
        ca_bundle=tmp_path / "ca.crt",
        data_dir=tmp_path / "data",
        process=ProcessRecord("objectstore", 42, 7, "/l", "https://127.0.0.1:9000/health"),
    )
    assert ObjectStore.from_json(store.to_json()) == store
    assert store.object_path("b", "p/x.bin") == tmp_path / "data" / "b" / "p" / "x.bin"


def test_an_adopted_process_is_recorded_apart_and_does_not_decide_running():
    from joule.cluster.lifecycle import ClusterInfo, ComponentStatus

    store = ProcessRecord("objectstore", 42, 7, "/l", "https://127.0.0.1:9000/health")
    info = ClusterInfo(
        name="c",
        kubeconfig=Path("/k"),
        server="https://127.0.0.1:6443",
        kubectl=Path("/kubectl"),
        ports={},
        processes=[ProcessRecord("etcd", 1, 1, "/e")],
        versions={},
        nodes=0,
        gpus_per_node=0,
        adopted=[store],
    )
    again = ClusterInfo.from_json(info.to_json())
    assert again.adopted == [store] and again.processes == info.processes
    # cluster.json written before adoption existed reads as having none.
    legacy = {k: v for k, v in info.to_json().items() if k != "adopted"}
    assert ClusterInfo.from_json(legacy).adopted == []

    info.components = [
        ComponentStatus("etcd", 1, True, True, 1, "/e"),
        ComponentStatus("objectstore", 42, False, False, None, "/l", adopted=True),
    ]
    assert info.running  # a dead object store leaves the cluster itself running
    info.components[0] = ComponentStatus("etcd", 1, False, False, None, "/e")
    assert not info.running
    info.components = [ComponentStatus("objectstore", 42, True, True, 1, "/l", adopted=True)]
    assert not info.running  # nothing of the cluster's own
