"""Joule's images built for real with buildah (root, buildah, mmdebstrap and docker-registry
installed: `.ci/debian-packages`). The first run builds the base and the trainer with torch
(minutes, a few GB downloaded once); later runs find both in the cache (~/.cache/joule)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from joule.images import (
    Image,
    TrainerRecipe,
    ensure_operator,
    ensure_trainer,
    push,
    trainer_inputs,
)
from joule.images.argv import buildah
from joule.images.build import TRAINER_CONTEXT
from joule.images.registry import MANIFEST_TYPES
from joule.images.tools import run

# The cold build downloads torch (~3 GB) and commits ~5 GB of layers.
pytestmark = pytest.mark.timeout(3600)


def say(message: str) -> None:
    print(f"joule: {message}", flush=True)


@pytest.fixture(scope="module")
def trainer() -> Image:
    return ensure_trainer(progress=say)


def test_an_unchanged_tree_is_not_rebuilt(trainer: Image, tmp_path: Path):
    started = time.monotonic()
    again = ensure_trainer(progress=say)
    elapsed = time.monotonic() - started
    assert not again.built
    assert (again.id, again.key, again.ref) == (trainer.id, trainer.key, trainer.ref)
    assert elapsed < 3, f"a cached ensure took {elapsed:.1f}s"

    # One changed byte in the build context, or one changed build argument, is another image.
    base_id = run(
        trainer.storage,
        buildah(
            trainer.storage,
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.FromImageID}}",
            "localhost/joule-base:bookworm",
        ),
    ).strip()
    assert trainer_inputs(TrainerRecipe(), base_id) == trainer.key
    copy = tmp_path / "trainer_image"
    shutil.copytree(TRAINER_CONTEXT, copy)
    train = copy / "src" / "joule_trainer" / "train.py"
    train.write_text(train.read_text() + "\n")
    assert trainer_inputs(TrainerRecipe(), base_id, copy) != trainer.key
    assert trainer_inputs(TrainerRecipe(torch_spec="torch==2.14.0"), base_id) != trainer.key
    # Bytecode and egg-info are not inputs.
    (copy / "src" / "joule_trainer" / "__pycache__").mkdir(exist_ok=True)
    (copy / "src" / "joule_trainer" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    train.write_text(train.read_text()[:-1])
    assert trainer_inputs(TrainerRecipe(), base_id, copy) == trainer.key


def run_in(store, container: str, user: str, *argv: str) -> str:
    """A command in a working container of the image, as `user`."""
    flags = ["--isolation", "chroot", "--network", "host", "--user", user]
    return run(store, buildah(store, "run", *flags, container, "--", *argv), timeout=300)


def test_the_image_runs_its_trainer_as_uid_1000(trainer: Image):
    store = trainer.storage
    config = json.loads(run(store, buildah(store, "inspect", "--type", "image", trainer.id)))
    oci = config["OCIv1"]["config"]
    assert oci["Entrypoint"] == ["joule-launch"]
    assert oci["User"] == "1000"
    assert "PYTHONUNBUFFERED=1" in oci["Env"]
    assert "JOULE_CHECKPOINT_DIR=/checkpoints" in oci["Env"]

    container = run(store, buildah(store, "from", "--pull=never", trainer.id)).strip()
    try:

        def in_image(*argv: str) -> str:
            return run_in(store, container, "1000:1000", *argv)

        out = in_image(
            "python",
            "-c",
            "import os, torch, joule_trainer.train, joule_trainer.launch; "
            "print(os.getuid(), torch.__version__, torch.tensor([2.0]).pow(2).item())",
        )
        uid, version, four = out.split()
        assert (uid, four) == ("1000", "4.0")
        assert version.startswith(TrainerRecipe().torch_spec.split("==")[1])
        assert in_image("sh", "-c", "touch /checkpoints/probe && ls /checkpoints") == "probe\n"
        # The entrypoint on the PATH: torchrun starts the built-in trainer, which prints help.
        assert "--model" in in_image("joule-launch", "--help")
        # What a job's staging pod runs, with its S3 client (the MinIO SDK).
        assert "--s3 BUCKET/PREFIX" in in_image("joule-data", "stage", "--help")
        assert in_image("python", "-c", "import minio; print('ok')") == "ok\n"
    finally:
        run(store, buildah(store, "rm", container))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A throwaway docker-registry (plain HTTP, storage in tmp_path) on a free port."""
    address = f"127.0.0.1:{free_port()}"
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
        f"http: {{addr: {address}}}\n"
        "log: {level: warn}\n"
    )
    log = (tmp_path / "registry.log").open("w")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "docker-registry did not start: " + (tmp_path / "registry.log").read_text()
                    ) from None
                time.sleep(0.1)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_push_to_a_local_registry_and_read_the_manifest_back(trainer: Image, registry: str):
    pushed = push(trainer, registry, progress=say)
    assert pushed.pushed
    assert pushed.ref == f"{registry}/joule-dev/trainer:0.1.0"

    request = urllib.request.Request(
        f"http://{registry}/v2/joule-dev/trainer/manifests/0.1.0",
        headers={"Accept": ", ".join(MANIFEST_TYPES)},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Docker-Content-Digest"] == pushed.digest
        manifest = json.loads(response.read())
    # The image's own config, and every layer, are in the registry.
    assert manifest["config"]["digest"] == f"sha256:{trainer.id}"
    assert len(manifest["layers"]) >= 5
    layer = manifest["layers"][-1]["digest"]
    head = urllib.request.Request(
        f"http://{registry}/v2/joule-dev/trainer/blobs/{layer}", method="HEAD"
    )
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200

    started = time.monotonic()
    again = push(trainer, registry, progress=say)
    assert not again.pushed and again.digest == pushed.digest
    assert time.monotonic() - started < 3


@pytest.fixture(scope="module")
def operator_image() -> Image:
    return ensure_operator(progress=say)


def test_the_operator_image_holds_the_operator_only_and_runs_it_unprivileged(
    operator_image: Image,
):
    store = operator_image.storage
    inspected = json.loads(
        run(store, buildah(store, "inspect", "--type", "image", operator_image.id))
    )
    oci = inspected["OCIv1"]["config"]
    assert (oci["Entrypoint"], oci["Cmd"], oci["User"]) == (["joule"], ["operator"], "65532:65532")
    # The root filesystem is read-only in the chart: Python must not try to write bytecode.
    assert "PYTHONDONTWRITEBYTECODE=1" in oci["Env"]
    size = sum(layer["size"] for layer in json.loads(inspected["Manifest"])["layers"])
    print(f"\noperator image: {size / 2**20:.0f} MiB of layers, built in "
          f"{operator_image.seconds:.0f}s")  # fmt: skip

    container = run(store, buildah(store, "from", "--pull=never", operator_image.id)).strip()
    try:
        probe = (
            "import importlib.util as u, os, joule.runner, joule.handlers, kopf, kubernetes;"
            "absent = ['joule.cluster', 'joule.images', 'joule.demo', 'joule.sim',"
            " 'cryptography', 'torch', 'matplotlib', 'pytest'];"
            "print(os.getuid(), [m for m in absent if u.find_spec(m) is not None])"
        )
        assert run_in(store, container, "65532:65532", "python", "-c", probe).split(maxsplit=1) == [
            "65532", "[]\n"
        ]  # fmt: skip
        assert "usage: joule operator" in run_in(
            store, container, "65532:65532", "joule", "operator", "--help"
        )
    finally:
        run(store, buildah(store, "rm", container))
