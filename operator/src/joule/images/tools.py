"""Running the builders: checks that they are there, the storage driver, and a runner that
streams their progress. The I/O edge of `joule.images`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from joule.images.argv import Storage, buildah

Progress = Callable[[str], None]

INSTALL_HINT = "apt-get install buildah mmdebstrap"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(RuntimeError):
    """A build or push that failed; the message says which step and why, in one line or with
    the end of the tool's output."""


def require(*tools: str) -> None:
    """Fail early, in one line, where a builder cannot run here."""
    missing = [tool for tool in tools if shutil.which(tool, path=SYSTEM_PATH) is None]
    if missing:
        raise ImageError(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    if os.geteuid() != 0:
        raise ImageError(
            "building images needs root (buildah's private storage, mmdebstrap --mode=root); "
            "run it as root"
        )


def env(storage: Storage) -> dict[str, str]:
    """The builders' environment: buildah's temp files and cache mounts under Joule's cache,
    not /var/tmp; the system's PATH, so mmdebstrap's helpers run Debian's python3 rather
    than a version manager's shim (pyenv's cost ~1 s per package unpacked)."""
    storage.tmpdir.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(storage.tmpdir), "PATH": SYSTEM_PATH}


def run(storage: Storage, argv: Sequence[str], timeout: float = 120) -> str:
    """Run a short command; its stdout, or ImageError with its stderr."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=env(storage)
        )
    except subprocess.TimeoutExpired:
        raise ImageError(f"{argv[0]} timed out after {timeout:.0f}s: {_show(argv)}") from None
    if proc.returncode != 0:
        raise ImageError(f"{_show(argv)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def stream(
    storage: Storage,
    argv: Sequence[str],
    what: str,
    progress: Progress,
    show: Callable[[str], bool],
    heartbeat: float = 30,
) -> None:
    """Run a long command, passing the lines that `show` picks to `progress` with the elapsed
    time, and saying every `heartbeat` seconds that a quiet step is still running (pip prints
    nothing for minutes while it fetches torch)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(storage),
    )
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    tail: deque[str] = deque(maxlen=40)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    current = ""
    last_said = started
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, last_said + heartbeat - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None:
                break
            now = time.monotonic()
            if line:
                tail.append(line)
            if line and show(line):
                current = line.strip()[:100]
                progress(f"  {current} [{now - started:.0f}s]")
                last_said = now
            elif current and now - last_said >= heartbeat:
                progress(f"  ... {current} [{now - started:.0f}s]")
                last_said = now
    except BaseException:
        proc.terminate()  # an interrupted build: buildah removes its container (--force-rm)
        proc.wait()
        raise
    if proc.wait() != 0:
        raise ImageError(
            f"{what} failed (exit {proc.returncode}); its last lines:\n" + "\n".join(tail)
        )


@contextlib.contextmanager
def locked(storage: Storage, name: str, progress: Progress) -> Iterator[None]:
    """One build of `name` at a time on this machine: a second caller (another test run, the
    demo) waits, then finds the first one's image by its hash instead of building it again."""
    storage.cache.mkdir(parents=True, exist_ok=True)
    with (storage.cache / f"{name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"{name}: waiting for another build of it on this machine")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def choose_driver(cache: Path, progress: Progress) -> Storage:
    """overlay where the kernel allows it here (fast, shares layers), else vfs (copies every
    layer: slower and larger, but works on any filesystem)."""
    overlay = Storage(cache, "overlay")
    try:
        run(overlay, buildah(overlay, "images", "--quiet"))
        return overlay
    except ImageError as exc:
        progress(f"overlay storage does not work here, using vfs ({str(exc)[-200:]})")
        return Storage(cache, "vfs")


def image_id(storage: Storage, image: str) -> str | None:
    """The id of the image a name (or id) resolves to in storage; None if there is none."""
    proc = subprocess.run(
        buildah(storage, "inspect", "--type", "image", "--format", "{{.FromImageID}}", image),
        capture_output=True,
        text=True,
        env=env(storage),
    )
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def image_size(storage: Storage, image: str) -> str:
    """The image's size as buildah shows it (its layers unpacked, e.g. "5.91 GB")."""
    return str(json.loads(run(storage, buildah(storage, "images", "--json", image)))[0]["size"])


def _show(argv: Sequence[str]) -> str:
    """The command without buildah's storage flags, which say nothing about what failed."""
    words = list(argv)
    if words[:1] == ["buildah"] and "--storage-driver" in words:
        words = ["buildah", *words[words.index("--storage-driver") + 2 :]]
    return " ".join(words)[:300]
