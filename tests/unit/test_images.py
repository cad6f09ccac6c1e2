"""The pure parts of joule.images: input hashes, the build context, apt sources, argv."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

from joule.images import argv
from joule.images.build import TRAINER_CONTEXT, context_files
from joule.images.recipe import (
    BaseRecipe,
    TrainerRecipe,
    dockerignore_text,
    excluded,
    image_key,
    mirror_lines,
)

FILES = {"pyproject.toml": b"[project]\n", "src/joule_trainer/train.py": b"print(1)\n"}
DOCKERFILE = b"FROM ${BASE}\n"


def key(**changes) -> str:
    inputs = {"recipe": TrainerRecipe(), "base_id": "b" * 64, "dockerfile": DOCKERFILE}
    inputs["files"] = dict(FILES)
    inputs.update(changes)
    return image_key(inputs["recipe"], inputs["base_id"], inputs["dockerfile"], inputs["files"])


def test_trainer_key_is_stable_and_order_free():
    assert key() == key(files=dict(reversed(FILES.items())))
    assert len(key()) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"base_id": "c" * 64},
        {"dockerfile": b"FROM ${BASE}\nUSER 1000\n"},
        {"files": {**FILES, "src/joule_trainer/train.py": b"print(2)\n"}},
        {"files": {**FILES, "src/joule_trainer/new.py": b""}},
        {"files": {"pyproject.toml": FILES["pyproject.toml"]}},
        # The same content under another name is another tree.
        {"files": {"pyproject.toml": b"[project]\n", "src/joule_trainer/x.py": b"print(1)\n"}},
        {"recipe": TrainerRecipe(torch_spec="torch==2.14.0")},
        {"recipe": TrainerRecipe(base_ref="localhost/other:1")},
        {"recipe": TrainerRecipe(extra_args={"X": "1"})},
        {"recipe": TrainerRecipe(revision=99)},
    ],
)
def test_any_changed_input_changes_the_image_key(change):
    assert key(**change) != key()


def test_base_key_follows_its_recipe_not_its_mirror():
    base = BaseRecipe()
    assert base.key() == BaseRecipe().key()
    assert replace(base, packages=(*base.packages, "curl")).key() != base.key()
    assert replace(base, suite="trixie").key() != base.key()
    assert replace(base, revision=base.revision + 1).key() != base.key()
    # Package order is not an input.
    assert replace(base, packages=tuple(reversed(base.packages))).key() == base.key()


@pytest.mark.parametrize(
    ("path", "out"),
    [
        ("src/joule_trainer/__pycache__/train.cpython-311.pyc", True),
        ("__pycache__/x", True),
        ("src/joule_trainer.egg-info/PKG-INFO", True),
        ("src/joule_trainer/x.pyc", True),
        ("build/lib/joule_trainer/train.py", True),
        ("dist/joule_trainer-0.1.0.whl", True),
        ("src/joule_trainer/train.py", False),
        ("src/joule_trainer/build/x.py", False),  # only the top-level build/ is a leftover
        ("Dockerfile", False),
        (".dockerignore", False),
    ],
)
def test_context_exclusions(path, out):
    assert excluded(path) is out


def test_dockerignore_says_what_the_hash_covers():
    """The builder's context and the hash's files are the same set: the committed
    .dockerignore is rendered from the same patterns."""
    assert (TRAINER_CONTEXT / ".dockerignore").read_text() == dockerignore_text()


def test_context_files_skip_leftovers(tmp_path: Path):
    (tmp_path / "src" / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"x")
    (tmp_path / "src" / "pkg.egg-info").mkdir()
    (tmp_path / "src" / "pkg.egg-info" / "PKG-INFO").write_text("x")
    (tmp_path / "src" / "pkg" / "a.py").write_text("a")
    (tmp_path / "Dockerfile").write_text("FROM x")
    assert context_files(tmp_path) == {"Dockerfile": b"FROM x", "src/pkg/a.py": b"a"}


DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main contrib
"""

ONE_LINE = """\
# a comment
deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://mirror.local/debian bookworm main
deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main
deb http://deb.debian.org/debian trixie main
"""


def test_mirror_lines_from_deb822_and_one_line_sources():
    assert mirror_lines([DEB822, ONE_LINE], "bookworm") == [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main contrib",
        "deb http://mirror.local/debian bookworm main",
    ]
    assert mirror_lines([DEB822], "trixie") == []


def test_mmdebstrap_argv():
    recipe = BaseRecipe()
    line = "deb http://deb.debian.org/debian bookworm main"
    cmd = argv.mmdebstrap(recipe, Path("/c/base.tar"), [line])
    assert cmd[:4] == ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar"]
    assert "--include=python3,python3-venv,python3-pip,ca-certificates" in cmd
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in cmd
    assert "--dpkgopt=path-include=/usr/share/doc/*/copyright" in cmd
    assert cmd[-3:] == ["bookworm", "/c/base.tar", line]


def test_bud_argv_keeps_the_build_walled_in():
    store = argv.Storage(Path("/c/buildah"))
    cmd = argv.bud(
        store,
        Path("/src/trainer_image"),
        ["localhost/joule-trainer:abc"],
        {"BASE": "localhost/joule-base:bookworm", "TORCH_SPEC": "torch==2.15.0"},
        Path("/c/iid"),
    )
    assert cmd[:7] == [
        "buildah",
        "--root",
        "/c/buildah/storage-overlay",
        "--runroot",
        "/c/buildah/run-overlay",
        "--storage-driver",
        "overlay",
    ]
    assert cmd[7] == "build"
    pairs = list(itertools.pairwise(cmd))
    assert ("--isolation", "chroot") in pairs
    assert ("--network", "host") in pairs  # never netavark: iptables and ip_forward
    assert "--force-rm" in cmd and "--layers" in cmd
    ca = "/etc/ssl/certs/ca-certificates.crt"
    assert ("--volume", f"{ca}:{ca}:ro") in pairs
    assert ("--build-arg", "BASE=localhost/joule-base:bookworm") in pairs
    assert ("--build-arg", "TORCH_SPEC=torch==2.15.0") in pairs
    assert ("--tag", "localhost/joule-trainer:abc") in pairs
    assert ("--file", "/src/trainer_image/Dockerfile") in pairs
    assert cmd[-1] == "/src/trainer_image"


def test_storage_is_per_driver():
    vfs = argv.Storage(Path("/c"), "vfs")
    assert vfs.root == Path("/c/storage-vfs")
    assert vfs.index != argv.Storage(Path("/c")).index
    assert argv.buildah(vfs, "images")[-3:] == ["--storage-driver", "vfs", "images"]


def test_push_argv():
    store = argv.Storage(Path("/c"))
    cmd = argv.push(store, "abc123", "127.0.0.1:5000/joule-dev/trainer:0.1.0", Path("/d"))
    assert "--tls-verify=false" in cmd
    assert cmd[-2:] == ["abc123", "docker://127.0.0.1:5000/joule-dev/trainer:0.1.0"]


def test_missing_builders_and_missing_root_are_one_line_errors(monkeypatch, capsys):
    from joule import cli
    from joule.images import tools

    monkeypatch.setattr(tools.shutil, "which", lambda name, path=None: None)
    assert cli.main(["image", "build"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "joule: error: buildah not found: apt-get install buildah mmdebstrap"

    monkeypatch.setattr(tools.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    monkeypatch.setattr(tools.os, "geteuid", lambda: 1000)
    assert cli.main(["image", "build", "base", "--push", "127.0.0.1:5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("joule: error: building images needs root") and "\n" not in err


def test_image_build_arguments():
    from joule.cli import build_parser

    args = build_parser().parse_args(["image", "build", "--push", "127.0.0.1:5000"])
    assert (args.target, args.push, args.tag) == ("trainer", "127.0.0.1:5000", "0.1.0")


@pytest.mark.parametrize(
    ("path", "out"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("operator/Dockerfile", True),
        ("operator/src/joule/runner.py", True),
        ("operator/src/joule/policy/decide.py", True),
        ("operator/src/joule/cluster/lifecycle.py", False),  # development tooling stays out
        ("operator/src/joule/images/build.py", False),
        ("operator/src/joule/demo/run.py", False),
        ("operator/src/joule/sim/engine.py", False),
        ("operator/src/joule/clusterwide.py", True),  # a prefix of a name is not the folder
        ("operator/src/joule/__pycache__/cli.cpython-311.pyc", False),
        ("trainer_image/Dockerfile", False),
        ("tests/conftest.py", False),
        ("charts/joule/Chart.yaml", False),
    ],
)
def test_the_operator_images_context(path, out):
    from joule.images.recipe import in_operator_context

    assert in_operator_context(path) is out


def test_the_operator_images_ignore_file_says_what_the_hash_covers():
    from joule.images.build import OPERATOR_DOCKERFILE, REPO_ROOT
    from joule.images.recipe import operator_dockerignore_text

    ignore = (REPO_ROOT / OPERATOR_DOCKERFILE).with_name("Dockerfile.dockerignore")
    assert ignore.read_text() == operator_dockerignore_text()
