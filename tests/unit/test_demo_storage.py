"""The demo's ReadWriteMany checkpoint volumes: one per claim of its class, on a folder named
after the job that mounts it, bound to that claim only and writable by the trainer's uid."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from joule.demo import storage
from joule.demo.run import manifests

ROOT = Path(__file__).resolve().parents[2]


def job(name: str, claim: str, namespace: str | None = None) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    volumes = [{"name": "c", "persistentVolumeClaim": {"claimName": claim}}]
    return {"kind": "TrainingJob", "metadata": meta, "spec": {"volumes": volumes}}


def claim(name: str, cls: str = storage.STORAGE_CLASS, **meta: str) -> dict:
    return {
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, **meta},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": cls,
            "resources": {"requests": {"storage": "2Gi"}},
        },
    }


def test_each_claim_of_the_class_gets_the_folder_of_the_job_that_mounts_it():
    docs = [
        claim("a-ckpt"),
        job("a", "a-ckpt"),
        claim("shared"),
        job("b", "shared"),
        job("c", "shared"),
        claim("other", cls="nfs"),
        job("d", "other"),
        claim("x", namespace="team"),
        job("e", "x", namespace="team"),
        None,
    ]
    found = storage.claims(docs)
    assert [(c.namespace, c.name, c.folder) for c in found] == [
        ("default", "a-ckpt", "a"),
        ("default", "shared", "shared"),  # two jobs: named after the claim
        ("team", "x", "team/e"),
    ]
    assert found[0].size == "2Gi"


def test_the_volume_is_read_write_many_on_this_machine_and_bound_to_its_claim(tmp_path):
    (found,) = storage.claims([claim("a-ckpt"), job("a", "a-ckpt")])
    pv = storage.persistent_volume(found, tmp_path)
    spec = pv["spec"]
    assert spec["accessModes"] == ["ReadWriteMany"]
    assert spec["storageClassName"] == storage.STORAGE_CLASS
    assert spec["claimRef"] == {"namespace": "default", "name": "a-ckpt"}
    assert spec["hostPath"]["path"] == str(tmp_path / "a")
    assert spec["capacity"] == {"storage": "2Gi"}
    assert spec["persistentVolumeReclaimPolicy"] == "Retain"
    assert storage.storage_class()["metadata"]["name"] == storage.STORAGE_CLASS


def test_folders_are_writable_by_every_uid_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        (folder,) = storage.make_folders(storage.claims([claim("a-ckpt")]), tmp_path / "ck")
    finally:
        os.umask(old)
    assert folder == tmp_path / "ck" / "a-ckpt"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777


def test_every_demo_example_claims_its_checkpoints_from_the_demo_class():
    docs = manifests(ROOT / "examples" / "demo")
    jobs = [d for d in docs if d["kind"] == "TrainingJob"]
    found = {c.name: c for c in storage.claims(docs)}
    assert jobs
    for j in jobs:
        spec = j["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == spec["checkpoint"]["volume"])
        name = volume["persistentVolumeClaim"]["claimName"]
        assert found[name].folder == j["metadata"]["name"]


def test_a_folder_of_manifests_is_read_as_kubectl_apply_reads_it(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([claim("x"), job("a", "x")]))
    (tmp_path / "notes.txt").write_text("not a manifest")
    (tmp_path / "b.yml").write_text("---\n" + yaml.safe_dump(job("b", "x")))
    assert [d["metadata"]["name"] for d in manifests(tmp_path)] == ["x", "a", "b"]
    assert [d["metadata"]["name"] for d in manifests(tmp_path / "b.yml")] == ["b"]


def test_the_demo_refuses_a_data_folder_that_is_a_link(tmp_path):
    from joule.demo.run import fresh_data_folder

    target = tmp_path / "etc"
    target.mkdir()
    link = tmp_path / "joule-demo"
    link.symlink_to(target)
    with pytest.raises(RuntimeError, match="symbolic link"):
        fresh_data_folder(link)
    assert oct(target.stat().st_mode & 0o777) == "0o755"

    folder = tmp_path / "data"
    (folder / "old").mkdir(parents=True)
    fresh_data_folder(folder)
    assert folder.is_dir() and not any(folder.iterdir())
