"""Pushing an image to a plain-HTTP registry (the local `docker-registry` the node pulls
from), once per image and destination."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from joule.images import index, tools
from joule.images.argv import push as push_argv
from joule.images.build import Image
from joule.images.tools import ImageError, Progress

# Every manifest type buildah may push; a registry answers HEAD only for types it is offered.
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


@dataclass(frozen=True)
class Pushed:
    ref: str  # what a pod's `image:` names, e.g. 127.0.0.1:5000/joule-dev/trainer:0.1.0
    digest: str  # the manifest's digest in the registry (sha256:...)
    pushed: bool  # False: the registry had this image's manifest already
    seconds: float


def destination(registry: str, name: str, tag: str) -> str:
    return f"{registry}/{name}:{tag}"


def manifest_digest(registry: str, name: str, tag: str, timeout: float = 10) -> str | None:
    """The digest the registry serves for name:tag (Docker-Content-Digest), None if it has
    no such manifest. Plain HTTP: this is for a registry on loopback."""
    request = urllib.request.Request(
        f"http://{registry}/v2/{name}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": ", ".join(MANIFEST_TYPES)},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.headers.get("Docker-Content-Digest")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise ImageError(f"registry {registry}: HEAD {name}:{tag} answered {exc.code}") from None
    except OSError as exc:
        raise ImageError(f"registry {registry} cannot be reached: {exc}") from None


def push(
    image: Image,
    registry: str,
    name: str = "joule-dev/trainer",
    tag: str = "0.1.0",
    *,
    progress: Progress = lambda _: None,
) -> Pushed:
    """Push `image` to `registry` (host:port, plain HTTP) as name:tag, unless the registry
    already serves a manifest this image was pushed as (recorded at each push). Registries of
    the local clusters share one storage folder, so a cluster's new registry (a new port)
    usually serves it already."""
    started = time.monotonic()
    store = image.storage
    dest = destination(registry, name, tag)
    record_key = f"pushed:{image.id}"
    recorded = index.load(store.index).get(record_key)
    digests = set(recorded) if isinstance(recorded, list) else set()
    current = manifest_digest(registry, name, tag)
    if current is not None and current in digests:
        return Pushed(dest, current, False, time.monotonic() - started)

    progress(f"push: {image.ref} -> {dest}")
    store.tmpdir.mkdir(parents=True, exist_ok=True)
    digestfile = store.tmpdir / f"push-{image.id[:12]}.digest"
    tools.stream(
        store,
        push_argv(store, image.id, dest, digestfile),
        "buildah push",
        progress,
        show=lambda line: line.startswith(("Copying blob", "Copying config", "Writing manifest")),
    )
    digest = digestfile.read_text().strip()
    digestfile.unlink(missing_ok=True)
    served = manifest_digest(registry, name, tag)
    if served != digest:
        raise ImageError(f"pushed {dest} as {digest}, but the registry serves {served}")
    index.update(store.index, record_key, sorted(digests | {digest}))
    seconds = time.monotonic() - started
    progress(f"push: {dest} {digest[:19]} in {seconds:.0f}s")
    return Pushed(dest, digest, True, seconds)
