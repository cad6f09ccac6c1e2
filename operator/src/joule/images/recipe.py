"""What Joule's images are made of, and the hashes that name them. Pure: no I/O here.

An image is identified by the hash of everything that goes into it (its recipe), so an
unchanged tree is never rebuilt and a changed byte always is. The walls of the build (which
files the builder sees) are written once here and rendered into `.dockerignore`, so the hash
and the builder agree on the build context.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

# Bump when the way an image is made changes in a way its inputs do not show (a builder flag,
# the import steps), so that every cached image built the old way is rebuilt.
BASE_REVISION = 1
TRAINER_REVISION = 1
OPERATOR_REVISION = 1

BASE_REF = "localhost/joule-base:bookworm"
TRAINER_REPO = "localhost/joule-trainer"
OPERATOR_REPO = "localhost/joule-operator"


@dataclass(frozen=True)
class BaseRecipe:
    """A minimal Debian with Python, made by mmdebstrap from the machine's own mirror."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = ("python3", "python3-venv", "python3-pip", "ca-certificates")
    # dpkg drops these paths as it unpacks (docs, man pages, translations: ~30 % of the tar);
    # licences stay.
    path_excludes: tuple[str, ...] = (
        "/usr/share/doc/*",
        "/usr/share/man/*",
        "/usr/share/info/*",
        "/usr/share/locale/*",
        "/usr/share/lintian/*",
    )
    path_includes: tuple[str, ...] = ("/usr/share/doc/*/copyright",)
    revision: int = BASE_REVISION
    ref: str = BASE_REF

    def key(self) -> str:
        """The base's identity. Mirrors are left out: the same suite from another mirror is
        the same base."""
        return _digest(
            {
                "suite": self.suite,
                "packages": sorted(self.packages),
                "excludes": list(self.path_excludes),
                "includes": list(self.path_includes),
                "revision": self.revision,
            }
        )


# torch from PyPI (its CUDA build) for the local base; pinned, so the image's hash names the
# torch it holds. The published CUDA PyTorch base brings its own, and the Dockerfile skips it.
TORCH_SPEC = "torch==2.15.0"


@dataclass(frozen=True)
class TrainerRecipe:
    """`trainer_image/` built on a base, with these build arguments."""

    base_ref: str = BASE_REF
    torch_spec: str = TORCH_SPEC
    revision: int = TRAINER_REVISION
    extra_args: Mapping[str, str] = field(default_factory=dict)

    def build_args(self) -> dict[str, str]:
        return {"BASE": self.base_ref, "TORCH_SPEC": self.torch_spec, **self.extra_args}


@dataclass(frozen=True)
class OperatorRecipe:
    """`operator/Dockerfile` built from the repository's root on a base."""

    base_ref: str = BASE_REF
    revision: int = OPERATOR_REVISION

    def build_args(self) -> dict[str, str]:
        return {"BASE": self.base_ref}


def image_key(
    recipe: TrainerRecipe | OperatorRecipe,
    base_id: str,
    dockerfile: bytes,
    files: Mapping[str, bytes],
) -> str:
    """An image's identity: Dockerfile, every file of the build context (path and content),
    the base's image id and the build arguments."""
    return _digest(
        {
            "revision": recipe.revision,
            "base_id": base_id,
            "build_args": dict(sorted(recipe.build_args().items())),
            "dockerfile": _sha(dockerfile),
            "files": {path: _sha(data) for path, data in sorted(files.items())},
        }
    )


# The build context's exclusions, as .dockerignore patterns: bytecode and packaging leftovers
# of a development install, which the builder does not need and which change by themselves.
CONTEXT_EXCLUDES: tuple[str, ...] = (
    "**/__pycache__",
    "**/*.pyc",
    "**/*.egg-info",
    "build",
    "dist",
)


def excluded(relpath: str) -> bool:
    """Whether `relpath` (relative to the context, '/'-separated) is outside the context, by
    CONTEXT_EXCLUDES: a `**/x` pattern matches x at any depth, others from the top only."""
    parts = PurePosixPath(relpath).parts
    for pattern in CONTEXT_EXCLUDES:
        if pattern.startswith("**/"):
            tail = pattern[3:]
            if any(PurePosixPath(part).match(tail) for part in parts):
                return True
        elif parts and PurePosixPath(parts[0]).match(pattern):
            return True
    return False


# The operator image's context is the repository's root cut down to the package's metadata and
# the operator's own modules: the development tooling stays out of the image.
OPERATOR_CONTEXT_INCLUDES: tuple[str, ...] = (
    "pyproject.toml",
    "README.md",
    "operator/Dockerfile",
    "operator/src/joule",
)
OPERATOR_CONTEXT_EXCLUDES: tuple[str, ...] = (
    "operator/src/joule/cluster",
    "operator/src/joule/images",
    "operator/src/joule/demo",
    "operator/src/joule/sim",
)


def in_operator_context(relpath: str) -> bool:
    """Whether `relpath` (from the repository's root) is in the operator image's context."""

    def under(prefix: str) -> bool:
        return relpath == prefix or relpath.startswith(prefix + "/")

    return (
        any(under(p) for p in OPERATOR_CONTEXT_INCLUDES)
        and not any(under(p) for p in OPERATOR_CONTEXT_EXCLUDES)
        and not excluded(relpath)
    )


def operator_dockerignore_text() -> str:
    """`operator/Dockerfile.dockerignore`: everything out, then the includes back in, then the
    tooling and CONTEXT_EXCLUDES out again (later lines win)."""
    header = (
        "# Generated from joule.images.recipe.OPERATOR_CONTEXT_*; the image hash uses the same.\n"
    )
    lines = ["*", *(f"!{p}" for p in OPERATOR_CONTEXT_INCLUDES), *OPERATOR_CONTEXT_EXCLUDES]
    lines += CONTEXT_EXCLUDES
    return header + "".join(f"{line}\n" for line in lines)


def dockerignore_text() -> str:
    """The `.dockerignore` that makes the builder see what the hash covers."""
    header = (
        "# Generated from joule.images.recipe.CONTEXT_EXCLUDES; the image hash uses the same.\n"
    )
    return header + "".join(f"{p}\n" for p in CONTEXT_EXCLUDES)


def mirror_lines(sources: Iterable[str], suite: str) -> list[str]:
    """One-line `deb URI SUITE COMPONENTS` entries for `suite` and its companions
    (`-updates`, `-security`) from apt source files, deb822 (`.sources`) or one-line (`.list`).

    So the base comes from the same mirror the machine already uses (a local or proxied mirror
    where there is one), with security updates.
    """
    lines: list[str] = []
    for text in sources:
        for entry in _deb822_stanzas(text) + _one_line_entries(text):
            uri, entry_suite, components = entry
            if entry_suite == suite or entry_suite.startswith(f"{suite}-"):
                line = f"deb {uri} {entry_suite} {' '.join(components)}"
                if line not in lines:
                    lines.append(line)
    return lines


def _deb822_stanzas(text: str) -> list[tuple[str, str, list[str]]]:
    entries: list[tuple[str, str, list[str]]] = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for raw in stanza.splitlines():
            if raw.startswith("#") or ":" not in raw or raw[:1].isspace():
                continue
            name, _, value = raw.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        entries.extend(
            (uri, entry_suite, fields.get("components", "main").split())
            for uri in fields.get("uris", "").split()
            for entry_suite in fields.get("suites", "").split()
        )
    return entries


def _one_line_entries(text: str) -> list[tuple[str, str, list[str]]]:
    entries: list[tuple[str, str, list[str]]] = []
    for raw in text.splitlines():
        # Options in brackets ([arch=amd64 signed-by=...]) do not concern the suite.
        words = re.sub(r"\[[^\]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(words) >= 4 and words[0] == "deb":
            entries.append((words[1], words[2], words[3:]))
    return entries


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(inputs: object) -> str:
    return _sha(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode())
