"""Build and push times of Joule's trainer image on this machine. Prints figures.

    .venv/bin/python benchmarks/images.py [--cache DIR] [--keep] [--warm-pip]

1. cold: the base (mmdebstrap) and the trainer (buildah, torch from PyPI) into an empty
   cache (a fresh JOULE_CACHE_DIR), so nothing is reused: this is a new machine's first build.
   With --warm-pip, pip's cache is copied in from ~/.cache/joule first (no torch download).
2. cached: the same tree again (the hash of its inputs finds the image).
3. a source change: one trainer file changed, rebuilt on the cached torch layer.
4. push to a throwaway docker-registry on loopback; again (skipped); the changed image
   (only its new layers).

Needs root, buildah, mmdebstrap and docker-registry, and ~15 GB free under --cache. Not a
test: nothing is asserted. The cache is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    config = root / "registry.yml"
    config.write_text(
        f"version: 0.1\nstorage: {{filesystem: {{rootdirectory: {root / 'data'}}}}}\n"
        f"http: {{addr: {address}}}\nlog: {{level: warn}}\n"
    )
    proc = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # it logs every probe of a missing blob as an error
    )
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{address}/v2/", timeout=1).close()
            return proc, address
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("docker-registry did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/var/tmp"), help="parent of the cache")
    parser.add_argument("--keep", action="store_true", help="keep the cache")
    parser.add_argument("--warm-pip", action="store_true", help="reuse ~/.cache/joule's pip cache")
    args = parser.parse_args()

    home_cache = Path(os.environ.get("JOULE_CACHE_DIR") or Path.home() / ".cache" / "joule")
    cache = Path(tempfile.mkdtemp(prefix="joule-images-bench-", dir=args.cache))
    os.environ["JOULE_CACHE_DIR"] = str(cache)  # read by joule.cluster.settings.cache_dir()
    if args.warm_pip:
        pip = home_cache / "buildah" / "tmp" / "buildah-cache"
        shutil.copytree(pip, cache / "buildah" / "tmp" / "buildah-cache", symlinks=True)

    from joule.images import ensure_trainer, push
    from joule.images.build import TRAINER_CONTEXT
    from joule.images.tools import image_size

    rows: list[tuple[str, float, str]] = []
    try:
        started = time.monotonic()
        image = ensure_trainer(progress=say)
        rows.append(("cold build (base + trainer)", time.monotonic() - started, image.ref))
        size = image_size(image.storage, image.id)
        base_size = image_size(image.storage, "localhost/joule-base:bookworm")

        started = time.monotonic()
        again = ensure_trainer(progress=say)
        rows.append(("cached (unchanged tree)", time.monotonic() - started, str(again.built)))

        context = cache / "trainer_image"
        shutil.copytree(TRAINER_CONTEXT, context)
        train = context / "src" / "joule_trainer" / "train.py"
        train.write_text(train.read_text() + "\n# changed\n")
        started = time.monotonic()
        changed = ensure_trainer(progress=say, context=context)
        rows.append(("one source file changed", time.monotonic() - started, changed.ref))

        registry, address = start_registry(cache)
        try:
            pushed = push(image, address, progress=say)
            rows.append(("push (gzip layers)", pushed.seconds, pushed.digest))
            again_pushed = push(image, address, progress=say)
            rows.append(("push again (registry has it)", again_pushed.seconds, ""))
            pushed = push(changed, address, "joule-dev/trainer", "changed", progress=say)
            rows.append(("push of the changed image", pushed.seconds, "(shared layers skipped)"))
            data = sum(f.stat().st_size for f in (cache / "data").rglob("*") if f.is_file())
        finally:
            registry.terminate()
            registry.wait()
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)

    print(f"{'step':<32} {'seconds':>8}  note")
    for what, seconds, note in rows:
        print(f"{what:<32} {seconds:>8.1f}  {note}")
    print(f"image sizes: trainer {size}, base {base_size}")
    print(f"registry storage after the pushes: {data / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
