"""Building the base, trainer and operator images, each once per distinct set of inputs."""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from joule.cluster.settings import cache_dir
from joule.images import index, tools
from joule.images.argv import Storage, bud, buildah, mmdebstrap
from joule.images.recipe import (
    OPERATOR_REPO,
    TRAINER_REPO,
    BaseRecipe,
    OperatorRecipe,
    TrainerRecipe,
    image_key,
    in_operator_context,
    mirror_lines,
)
from joule.images.tools import ImageError, Progress

REPO_ROOT = Path(__file__).resolve().parents[4]
TRAINER_CONTEXT = REPO_ROOT / "trainer_image"
OPERATOR_DOCKERFILE = Path("operator") / "Dockerfile"
APT_SOURCES = (
    "/etc/apt/sources.list",
    "/etc/apt/sources.list.d/*.list",
    "/etc/apt/sources.list.d/*.sources",
)


@dataclass(frozen=True)
class Image:
    """A built image in Joule's buildah storage."""

    ref: str  # a name buildah resolves, e.g. localhost/joule-trainer:<hash12>
    id: str  # buildah's image id (sha256 hex of its config)
    key: str  # the hash of its inputs
    built: bool  # False: it was already there (a cache hit)
    seconds: float
    storage: Storage


def storage(progress: Progress = lambda _: None) -> Storage:
    """Joule's private buildah storage (`<cache>/buildah`), overlay where it works."""
    return tools.choose_driver(cache_dir() / "buildah", progress)


def ensure_base(recipe: BaseRecipe | None = None, progress: Progress = lambda _: None) -> Image:
    """The Debian base, made with mmdebstrap and imported with buildah unless an image of the
    same recipe is in storage already."""
    recipe = recipe or BaseRecipe()
    tools.require("buildah", "mmdebstrap")
    started = time.monotonic()
    store = storage(progress)
    with tools.locked(store, "base", progress):
        return _ensure_base(recipe, store, started, progress)


def _ensure_base(recipe: BaseRecipe, store: Storage, started: float, progress: Progress) -> Image:
    def elapsed() -> str:
        return f"[{time.monotonic() - started:.0f}s]"

    key = recipe.key()
    cached = _cached(store, f"base:{key}")
    if cached and tools.image_id(store, recipe.ref) == cached:
        return Image(recipe.ref, cached, key, False, time.monotonic() - started, store)

    mirrors = mirror_lines(_apt_sources(), recipe.suite)
    if not mirrors:
        raise ImageError(f"no apt source for {recipe.suite} in {', '.join(APT_SOURCES)}")
    store.tmpdir.mkdir(parents=True, exist_ok=True)
    tar = store.tmpdir / f"base-{key[:12]}.tar"
    try:
        progress(f"base: mmdebstrap {recipe.suite} from {mirrors[0].split()[1]} {elapsed()}")
        tools.stream(
            store,
            mmdebstrap(recipe, tar, mirrors),
            "mmdebstrap",
            progress,
            show=lambda line: line.startswith("I: ") and "..." in line,
        )
        progress(f"base: importing {tar.stat().st_size / 2**20:.0f} MiB into buildah {elapsed()}")
        container = tools.run(store, buildah(store, "from", "scratch")).strip()
        try:
            tools.run(store, buildah(store, "add", container, str(tar), "/"), timeout=600)
            tools.run(
                store,
                buildah(
                    store,
                    "config",
                    "--env",
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--env",
                    "LANG=C.UTF-8",
                    "--cmd",
                    "/bin/bash",
                    "--label",
                    f"dev.joule.inputs={key}",
                    container,
                ),
            )
            tools.run(store, buildah(store, "commit", "--rm", container, recipe.ref), timeout=600)
        except BaseException:
            tools.run(store, buildah(store, "rm", container))
            raise
    finally:
        tar.unlink(missing_ok=True)
    image = tools.image_id(store, recipe.ref)
    if image is None:
        raise ImageError(f"{recipe.ref} was committed but is not in storage")
    index.update(store.index, f"base:{key}", image)
    seconds = time.monotonic() - started
    progress(f"base: {recipe.ref} built in {seconds:.0f}s")
    return Image(recipe.ref, image, key, True, seconds, store)


def context_files(context: Path, keep: Callable[[str], bool] | None = None) -> dict[str, bytes]:
    """The build context as the builder sees it (after its ignore file): path -> content."""
    from joule.images.recipe import excluded

    def kept(rel: str) -> bool:
        return keep(rel) if keep else not excluded(rel)

    files: dict[str, bytes] = {}
    for path in sorted(context.rglob("*")):
        rel = path.relative_to(context).as_posix()
        if path.is_file() and kept(rel):
            files[rel] = path.read_bytes()
    return files


def trainer_inputs(recipe: TrainerRecipe, base_id: str, context: Path = TRAINER_CONTEXT) -> str:
    """The trainer image's hash for the tree as it is now."""
    return image_key(recipe, base_id, (context / "Dockerfile").read_bytes(), context_files(context))


def operator_inputs(recipe: OperatorRecipe, base_id: str, root: Path = REPO_ROOT) -> str:
    """The operator image's hash for the tree as it is now."""
    return image_key(
        recipe,
        base_id,
        (root / OPERATOR_DOCKERFILE).read_bytes(),
        context_files(root, in_operator_context),
    )


@dataclass(frozen=True)
class _Build:
    """One image to make: its name in storage, and how buildah makes it."""

    kind: str  # trainer | operator: the lock and index key
    repo: str
    key: str
    context: Path
    dockerfile: Path
    ignorefile: Path | None
    build_args: dict[str, str]


def ensure_trainer(
    recipe: TrainerRecipe | None = None,
    progress: Progress = lambda _: None,
    context: Path = TRAINER_CONTEXT,
) -> Image:
    """The trainer image for `context` as it is now: built with buildah on the local base
    (made first if needed), or found in storage by the hash of its inputs."""
    recipe = recipe or TrainerRecipe()
    tools.require("buildah")
    started = time.monotonic()
    base = ensure_base(progress=progress)
    build = _Build(
        "trainer",
        TRAINER_REPO,
        trainer_inputs(recipe, base.id, context),
        context,
        context / "Dockerfile",
        None,
        recipe.build_args(),
    )
    return _ensure_built(build, base, started, progress)


def ensure_operator(
    recipe: OperatorRecipe | None = None,
    progress: Progress = lambda _: None,
    root: Path = REPO_ROOT,
) -> Image:
    """The operator image (operator/Dockerfile, from the repository's root cut down by
    operator/Dockerfile.dockerignore) on the local base, built or found by its hash."""
    recipe = recipe or OperatorRecipe()
    tools.require("buildah")
    started = time.monotonic()
    base = ensure_base(progress=progress)
    dockerfile = root / OPERATOR_DOCKERFILE
    build = _Build(
        "operator",
        OPERATOR_REPO,
        operator_inputs(recipe, base.id, root),
        root,
        dockerfile,
        dockerfile.with_name("Dockerfile.dockerignore"),
        recipe.build_args(),
    )
    return _ensure_built(build, base, started, progress)


def _ensure_built(build: _Build, base: Image, started: float, progress: Progress) -> Image:
    with tools.locked(base.storage, build.kind, progress):
        return _build_unless_cached(build, base.storage, started, progress)


def _build_unless_cached(
    build: _Build, store: Storage, started: float, progress: Progress
) -> Image:
    kind, repo, key = build.kind, build.repo, build.key
    ref = f"{repo}:{key[:12]}"
    cached = _cached(store, f"{kind}:{key}")
    if cached and tools.image_id(store, ref) == cached:
        return Image(ref, cached, key, False, time.monotonic() - started, store)

    elapsed = time.monotonic() - started
    progress(f"{kind}: buildah build {build.context} ({key[:12]}) [{elapsed:.0f}s]")
    iidfile = store.tmpdir / f"{kind}-{key[:12]}.{os.getpid()}.iid"
    store.tmpdir.mkdir(parents=True, exist_ok=True)
    tools.stream(
        store,
        bud(
            store,
            build.context,
            [ref, f"{repo}:latest"],
            build.build_args,
            iidfile,
            dockerfile=build.dockerfile,
            ignorefile=build.ignorefile,
        ),
        "buildah build",
        progress,
        show=lambda line: line.startswith(("STEP ", "COMMIT", "--> Using cache")),
    )
    image = iidfile.read_text().strip().removeprefix("sha256:")
    iidfile.unlink(missing_ok=True)
    index.update(store.index, f"{kind}:{key}", image)
    _remove_older(store, repo, keep={ref, f"{repo}:latest"}, progress=progress)
    seconds = time.monotonic() - started
    progress(f"{kind}: {ref} built in {seconds:.0f}s")
    return Image(ref, image, key, True, seconds, store)


def _cached(store: Storage, key: str) -> str | None:
    value = index.load(store.index).get(key)
    return value if isinstance(value, str) else None


def _apt_sources() -> list[str]:
    texts = []
    for pattern in APT_SOURCES:
        for name in sorted(glob.glob(pattern)):
            texts.append(Path(name).read_text())
    return texts


def _remove_older(store: Storage, repo: str, keep: set[str], progress: Progress) -> None:
    """Builds of older trees (about 6 GB each with torch) are removed once a new one exists;
    layers the new image shares stay, and so does the layer cache of unnamed images."""
    listing = json.loads(tools.run(store, buildah(store, "images", "--json")))
    for entry in listing:
        names = entry.get("names") or []
        if names and all(n.startswith(f"{repo}:") and n not in keep for n in names):
            progress(f"removing an older build: {', '.join(names)}")
            try:
                tools.run(store, buildah(store, "rmi", entry["id"]))
            except ImageError as exc:  # still the parent of a newer one: kept, not fatal
                progress(f"kept {', '.join(names)}: {str(exc)[-160:]}")
