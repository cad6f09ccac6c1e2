"""The command lines of the builders, rendered from values. Pure: nothing here runs them.

Every buildah call carries the same private storage (under Joule's cache, never the system's
/var/lib/containers), and every build the same walls: chroot isolation, the host's network
(buildah's default network sets up netavark, which edits iptables and may turn on ip_forward
host-wide), the host's CA bundle mounted read-only for the build only (outbound HTTPS here is
re-signed by a CA the host trusts and a clean image does not), and no container left behind by
a failed step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from joule.images.recipe import BaseRecipe

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class Storage:
    """buildah's storage for Joule: a root per driver (a root made by one driver cannot be
    opened by another), and a temp dir (buildah's TMPDIR) for big intermediate files and the
    Dockerfile's `RUN --mount=type=cache` directories, pip's cache among them."""

    cache: Path
    driver: str = "overlay"

    @property
    def root(self) -> Path:
        return self.cache / f"storage-{self.driver}"

    @property
    def runroot(self) -> Path:
        return self.cache / f"run-{self.driver}"

    @property
    def tmpdir(self) -> Path:
        return self.cache / "tmp"

    @property
    def index(self) -> Path:
        """hash -> image id, and what was pushed where (images.json)."""
        return self.cache / f"images-{self.driver}.json"


def buildah(storage: Storage, *args: str) -> list[str]:
    return [
        "buildah",
        "--root",
        str(storage.root),
        "--runroot",
        str(storage.runroot),
        "--storage-driver",
        storage.driver,
        *args,
    ]


def mmdebstrap(recipe: BaseRecipe, target: Path, mirrors: Sequence[str]) -> list[str]:
    """A minbase tar of `recipe` (root mode: real ownership, no user namespaces needed)."""
    dpkg = [f"--dpkgopt=path-exclude={p}" for p in recipe.path_excludes]
    dpkg += [f"--dpkgopt=path-include={p}" for p in recipe.path_includes]
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=tar",
        f"--include={','.join(recipe.packages)}",
        *dpkg,
        recipe.suite,
        str(target),
        *mirrors,
    ]


def bud(
    storage: Storage,
    context: Path,
    tags: Sequence[str],
    build_args: Mapping[str, str],
    iidfile: Path,
    dockerfile: Path | None = None,
    ignorefile: Path | None = None,
) -> list[str]:
    """`buildah build` of `context/Dockerfile` with cached layers, so a source change reuses
    the torch layer. (pip's cache is the Dockerfile's cache mount, kept under storage.tmpdir,
    so torch is downloaded once; a `--volume` would do for buildah, but Docker's published
    build would then write the cache into a layer.)"""
    argv = buildah(
        storage,
        "build",
        "--layers",
        "--force-rm",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--pull=never",
        "--volume",
        f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
        "--iidfile",
        str(iidfile),
        "--file",
        str(dockerfile or context / "Dockerfile"),
    )
    if ignorefile is not None:  # otherwise <context>/.dockerignore, as Docker reads it
        argv += ["--ignorefile", str(ignorefile)]
    for key, value in sorted(build_args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    for tag in tags:
        argv += ["--tag", tag]
    return [*argv, str(context)]


def push(storage: Storage, image: str, destination: str, digestfile: Path) -> list[str]:
    """`buildah push` to a plain-HTTP registry. Layers are gzipped (~80 s for torch's 5.6 GB
    layer on 2 cores, once per registry: later pushes skip the blobs it has). buildah 1.28's
    `--disable-compression` does not apply to registries, and zstd level 1 saved only ~15 %."""
    return [
        *buildah(storage, "push", "--tls-verify=false", "--digestfile", str(digestfile)),
        image,
        f"docker://{destination}",
    ]
