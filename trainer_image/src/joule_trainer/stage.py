"""``joule-data stage``: copy a prepared dataset (``manifest.json`` and the files it lists) from
an S3 bucket, an HTTPS folder or a mounted folder into a cache folder the workers then read.
A job's staging pod runs it, without a GPU, before the workers are created.

The copy is resumable and never trusted half-made:

- ``manifest.json`` is fetched first (and checked: format, its own version, safe file names).
  A different ``manifest.json`` already in the cache is removed before anything else changes,
  so the cache is never taken for a complete copy of either version meanwhile.
- A file already in the cache with the manifest's size and sha256 is kept (``skipped``);
  one that differs is removed and fetched again (the cache repairs itself).
- A download goes to ``<name>.part``; a ``.part`` that a killed run left is continued from its
  end with a range request where the source honours one (S3's ``Range``, HTTPS ``Range``, a
  seek in a folder), and restarted where it does not. A connection lost mid-file is continued
  the same way, a few times, within the run.
- Each file is checked (size and sha256, hashed as it is written) and fsynced before it is
  renamed into place. One that does not match after a resumed download is fetched once more
  from the start (the old ``.part`` may hold another version's bytes); one that does not
  match from the start is refused (exit 65).
- Files are fetched ``parallel`` at a time (``--parallel``, default 4); the first that fails
  stops the others, whose ``.part`` files stay to be continued.
- One run at a time in a cache folder (``_exclusive``): a second waits for the first.
- ``manifest.json`` is written last, atomically: a cache with ``manifest.json`` is a complete,
  verified copy.

Re-running over a complete cache fetches nothing and rehashes every file (a corrupt file is
fetched again instead of failing the job's trainer, which hashes every shard before its first
step too); ``--trust-existing`` checks only sizes where the cache's ``manifest.json`` is the
source's, for caches too large to read once per job.

Every failure is one line on stderr and in the termination message file, with its own exit
code (sysexits.h); success writes one JSON object there (``Staged.to_json``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from joule_trainer import dataset

EXIT_DATA = 65  # EX_DATAERR: a file (or the manifest) is not what the manifest says
EXIT_NOINPUT = 66  # EX_NOINPUT: no manifest, bucket, object or file where the source should have it
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the source cannot be reached (DNS, refused, TLS, timeout)
EXIT_CACHE = 74  # EX_IOERR: the cache folder cannot take the dataset (full, read-only)
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug here; the traceback is on stderr
EXIT_NOPERM = 77  # EX_NOPERM: the source refused the credentials or the access
EXIT_CONFIG = 78  # EX_CONFIG: a --ca-bundle that cannot be read, half the credentials
TERMINATION_LOG = Path("/dev/termination-log")
TERMINATION_MAX = 4096  # what the kubelet keeps of a termination message
CHUNK = 1 << 20
ATTEMPTS = 3  # per file: tries on a connection lost mid-transfer, each continuing the last
MANIFEST_MAX = 64 << 20
PART = ".part"
LOCK = ".joule-stage.lock"  # see _exclusive; left in the cache folder, empty
PROGRESS_EVERY = 5.0
PARALLEL = 4  # files fetched at a time: one S3 stream rarely fills a node's network
# What S3 servers answer for credentials or access they refuse (XAdminUserNotFound: VersityGW's
# unknown access key in single-account mode, where AWS says InvalidAccessKeyId).
S3_NOPERM = {
    "AccessDenied",
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "XAdminUserNotFound",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidSecurity",
}
S3_NOINPUT = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Cancelled(Exception):
    """Another file's failure stopped this one (its .part stays, to be continued)."""


class StageError(Exception):
    """Staging stopped; ``str()`` is the one line that says why, ``code`` the exit code.
    ``transient``: the connection was lost mid-transfer (worth continuing from the .part)."""

    def __init__(self, line: str, code: int, *, transient: bool = False) -> None:
        super().__init__(line)
        self.code = code
        self.transient = transient


# --- sources ---------------------------------------------------------------------------------


class Body(Protocol):
    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


@dataclass
class Opened:
    """A file's bytes from ``start`` on: the offset asked for, or 0 where the source ignored
    the range (the whole file follows). ``length``: how many bytes the source says follow
    (Content-Length), where it says; a body that ends before them was cut short."""

    body: Body
    start: int
    length: int | None = None


def _content_length(headers: Any) -> int | None:
    value = headers.get("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


class Source(Protocol):
    where: str  # for messages: s3://bucket/prefix/, https://host/path/, /mnt/data/

    def open(self, name: str, offset: int) -> Opened: ...

    def location(self, name: str) -> str:
        """Where ``name`` is fetched from, for messages."""
        ...

    def error(self, exc: BaseException, name: str) -> StageError:
        """``exc`` (raised while opening or reading ``name``) as the line and exit code."""
        ...


def _why(err: OSError) -> str:
    """The system's words and the errno: "No space left on device (errno 28)"."""
    return f"{err.strerror or err} (errno {err.errno})" if err.errno else str(err)


def _network_reason(exc: BaseException) -> tuple[str, bool]:
    """What went wrong on the way to a server, in words, and whether it is a connection lost
    mid-transfer (transient) rather than one never made. Walks the exception's causes."""
    import urllib3.exceptions as u3

    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS verification failed: {e.verify_message or e.reason}", False
        if isinstance(e, u3.NameResolutionError | socket.gaierror):
            return f"DNS lookup failed: {_strip(e)}", False
        if isinstance(e, ConnectionRefusedError):
            return "connection refused", False
        if isinstance(e, u3.ProtocolError | http.client.IncompleteRead | ConnectionResetError):
            return f"connection lost mid-transfer: {_strip(e)}", True
        if isinstance(e, u3.ReadTimeoutError):
            return "timed out reading", True
        # urllib3's NewConnectionError is a ConnectTimeoutError too: its cause says more.
        if isinstance(e, u3.ConnectTimeoutError) and not isinstance(e, u3.NewConnectionError):
            return "timed out connecting", False
        if isinstance(e, TimeoutError | socket.timeout):
            return "timed out", True
        if isinstance(e, u3.ResponseError):
            return f"the server kept failing: {e}", False
        if isinstance(e, ssl.SSLError):
            return f"TLS failed: {e.reason or e}", False
        if isinstance(e, u3.MaxRetryError) and e.reason is not None:
            todo.append(e.reason)
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException):
            todo.append(e.reason)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
    if isinstance(exc, u3.MaxRetryError) and exc.reason is not None:
        return _strip(exc.reason), False
    return _strip(exc), False


def _strip(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _ssl_context(ca_bundle: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(ca_bundle) if ca_bundle else None)
    except (OSError, ssl.SSLError) as exc:
        why = _why(exc) if isinstance(exc, OSError) and exc.errno else _strip(exc)
        raise StageError(f"--ca-bundle {ca_bundle} cannot be read: {why}", EXIT_CONFIG) from None


class S3Source:
    """Objects ``<prefix>/<name>`` of a bucket, with the MinIO SDK (SigV4, as boto3 signs)."""

    def __init__(
        self,
        location: str,
        endpoint: str,
        *,
        region: str | None = None,
        ca_bundle: Path | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        parallel: int = PARALLEL,
    ) -> None:
        import urllib3
        from minio import Minio

        bucket, _, prefix = location.strip("/").partition("/")
        if not bucket:
            raise StageError(f"--s3 {location!r} names no bucket (BUCKET/PREFIX)", EXIT_CONFIG)
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("https", "http") or not url.netloc or url.path not in ("", "/"):
            raise StageError(
                f"--endpoint {endpoint!r} is not https://host[:port] (or http://)", EXIT_CONFIG
            )
        if bool(access_key) != bool(secret_key):
            missing = "AWS_SECRET_ACCESS_KEY" if access_key else "AWS_ACCESS_KEY_ID"
            raise StageError(f"{missing} is not set (or empty) but its pair is", EXIT_CONFIG)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = endpoint.rstrip("/")
        self.where = f"s3://{bucket}/{self.prefix + '/' if self.prefix else ''}"
        http = urllib3.PoolManager(
            ssl_context=_ssl_context(ca_bundle) if url.scheme == "https" else None,
            # Connections that fail to start, and 5xx answers (S3's SlowDown is a 503), are
            # tried again here; a body cut short is continued by stage_file.
            retries=urllib3.Retry(
                total=3,
                connect=2,
                read=0,
                redirect=0,
                backoff_factor=0.5,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,
            ),
            timeout=urllib3.Timeout(connect=10, read=60),
            maxsize=max(4, parallel),
        )
        self.s3 = Minio(
            url.netloc,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=url.scheme == "https",
            region=region or None,
            http_client=http,
        )

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def location(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def open(self, name: str, offset: int) -> Opened:
        response = self.s3.get_object(self.bucket, self.key(name), offset=offset)
        # 206: the range was honoured; 200: the whole object follows.
        start = offset if offset and response.status == 206 else 0
        return Opened(response, start, _content_length(response.headers))

    def error(self, exc: BaseException, name: str) -> StageError:
        from minio.error import MinioException, S3Error, ServerError

        if isinstance(exc, S3Error):
            said = f"{exc.code}" + (f" ({exc.message})" if exc.message else "")
            if exc.code in S3_NOPERM:
                return StageError(
                    f"{self.where}: {self.endpoint} refused access to {self.key(name)}: {said}",
                    EXIT_NOPERM,
                )
            if exc.code == "NoSuchBucket":
                return StageError(
                    f"{self.where}: no bucket {self.bucket} at {self.endpoint}: {said}",
                    EXIT_NOINPUT,
                )
            if exc.code in S3_NOINPUT:
                return StageError(
                    f"{name}: no object {self.key(name)} in bucket {self.bucket} at "
                    f"{self.endpoint}: {said}",
                    EXIT_NOINPUT,
                )
            return StageError(
                f"{self.where}: {self.endpoint} answered {said} for {self.key(name)}",
                EXIT_UNAVAILABLE,
            )
        if isinstance(exc, ServerError | MinioException):
            return StageError(
                f"{self.where}: {self.endpoint} failed for {self.key(name)}: {_strip(exc)}",
                EXIT_UNAVAILABLE,
            )
        reason, transient = _network_reason(exc)
        return StageError(
            f"{self.where}: {self.endpoint} cannot be reached: {reason}",
            EXIT_UNAVAILABLE,
            transient=transient,
        )


class HttpsSource:
    """Files under an HTTPS folder, with urllib."""

    def __init__(self, url: str, *, ca_bundle: Path | None = None, timeout: float = 60) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.netloc:
            raise StageError(f"--https {url!r} is not an https:// URL", EXIT_CONFIG)
        if parts.path.endswith("/" + dataset.MANIFEST):  # the manifest's own URL given
            url = url[: url.rindex("/")]
        self.where = url.rstrip("/") + "/"
        self.context = _ssl_context(ca_bundle)
        self.timeout = timeout

    def url(self, name: str) -> str:
        return self.where + urllib.parse.quote(name)

    def location(self, name: str) -> str:
        return self.url(name)

    def open(self, name: str, offset: int) -> Opened:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        request = urllib.request.Request(self.url(name), headers=headers)
        try:
            response = urllib.request.urlopen(request, context=self.context, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # the file is shorter than the .part: start again
                exc.close()
                return self.open(name, 0)
            raise
        start = 0
        if response.status == 206:
            first = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not first or int(first.group(1)) != offset:
                response.close()
                raise StageError(
                    f"{self.url(name)}: a request for bytes {offset}- was answered with "
                    f"Content-Range {response.headers.get('Content-Range')!r}",
                    EXIT_UNAVAILABLE,
                )
            start = offset
        return Opened(response, start, _content_length(response.headers))

    def error(self, exc: BaseException, name: str) -> StageError:
        if isinstance(exc, urllib.error.HTTPError):
            said = f"HTTP {exc.code} {exc.reason}"
            if exc.code in (404, 410):
                return StageError(f"{name}: not found at {self.url(name)}: {said}", EXIT_NOINPUT)
            if exc.code in (401, 403):
                return StageError(f"{self.url(name)}: access refused: {said}", EXIT_NOPERM)
            return StageError(f"{self.url(name)}: {said}", EXIT_UNAVAILABLE)
        reason, transient = _network_reason(exc)
        host = urllib.parse.urlsplit(self.where).netloc
        return StageError(
            f"{self.where}: {host} cannot be reached: {reason}",
            EXIT_UNAVAILABLE,
            transient=transient,
        )


class DirSource:
    """Files in a folder: a mounted PersistentVolumeClaim, or any path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = f"{str(path).rstrip('/')}/"

    def location(self, name: str) -> str:
        return str(self.path / name)

    def open(self, name: str, offset: int) -> Opened:
        f = open(self.path / name, "rb")  # noqa: SIM115 - the caller closes it
        try:
            f.seek(offset)
        except BaseException:
            f.close()
            raise
        return Opened(f, offset)

    def error(self, exc: BaseException, name: str) -> StageError:
        path = self.path / name
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            return StageError(f"{name}: no such file: {path}", EXIT_NOINPUT)
        if isinstance(exc, PermissionError):
            return StageError(f"{name}: {path} cannot be read: {_why(exc)}", EXIT_NOPERM)
        if isinstance(exc, OSError):
            return StageError(f"{name}: {path} cannot be read: {_why(exc)}", EXIT_UNAVAILABLE)
        return StageError(f"{name}: {path} cannot be read: {_strip(exc)}", EXIT_UNAVAILABLE)


# --- the manifest ----------------------------------------------------------------------------


def check_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest fetched from ``where``, checked for form, against its own version and for
    file names that stay inside the cache; StageError (65) if it is not right."""

    def refuse(why: str) -> StageError:
        return StageError(f"{dataset.MANIFEST} from {where}: {why}", EXIT_DATA)

    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise refuse(f"not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != dataset.FORMAT:
        raise refuse(f"not a {dataset.FORMAT} manifest")
    if manifest.get("format_version") != dataset.FORMAT_VERSION:
        raise refuse(
            f"format version {manifest.get('format_version')!r}; this trainer reads version "
            f"{dataset.FORMAT_VERSION}"
        )
    actual = dataset.version_of(manifest)
    if manifest.get("version") != actual:
        raise refuse(f"its version says {manifest.get('version')}, its content is {actual}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise refuse("it lists no files")
    names: set[str] = set()
    for entry in shards:
        name = entry.get("file") if isinstance(entry, dict) else None
        if (
            not isinstance(name, str)
            or not _SAFE_NAME.match(name)
            or name == dataset.MANIFEST
            or name.endswith(PART)
            or name in names
        ):
            raise refuse(f"file name {name!r} is not a plain, unique file name")
        names.add(name)
        size, digest = entry.get("bytes"), entry.get("sha256")
        if type(size) is not int or size < 0 or not isinstance(digest, str):
            raise refuse(f"{name} has no size or sha256")
        if not _HEX64.match(digest):
            raise refuse(f"{name}: {digest!r} is not a sha256")
    return manifest


# --- the cache -------------------------------------------------------------------------------


def _state(err: OSError) -> str:
    if err.errno == errno.EROFS:
        return "is read-only"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "is full"
    return "cannot be written"


def cache_error(into: Path, err: OSError, staged: int, total: int) -> StageError:
    """The line for a cache folder that refused a write, in the checkpoint module's words."""
    return StageError(
        f"cache directory {into} {_state(err)}: {_why(err)}; {staged} of {total} files are "
        "staged, and a later run continues from there",
        EXIT_CACHE,
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, limit: int | None = None) -> tuple[Any, int]:
    """The sha256 object of ``path``'s first ``limit`` bytes (all without), and their count."""
    sha = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while limit is None or done < limit:
            chunk = f.read(CHUNK if limit is None else min(CHUNK, limit - done))
            if not chunk:
                break
            sha.update(chunk)
            done += len(chunk)
    return sha, done


# --- progress and metrics --------------------------------------------------------------------


class Gauges:
    """joule_data_{staged,total}_{bytes,files} in a registry of their own (served on
    ``--metrics-port``)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.staged_bytes = Gauge(
            "joule_data_staged_bytes", "Bytes of the dataset in the cache", registry=r
        )
        self.total_bytes = Gauge(
            "joule_data_total_bytes", "Bytes of the dataset (its manifest's files)", registry=r
        )
        self.staged_files = Gauge(
            "joule_data_staged_files", "Files of the dataset verified in the cache", registry=r
        )
        self.total_files = Gauge(
            "joule_data_total_files", "Files the dataset's manifest lists", registry=r
        )


@dataclass
class Progress:
    """Counts (the fetching threads share them), and a line on stderr at most every ``every``
    seconds."""

    total_bytes: int = 0
    total_files: int = 0
    done_bytes: int = 0  # of the files verified in place
    staged_files: int = 0
    fetched: int = 0  # bytes received from the source in this run
    gauges: Gauges | None = None
    every: float = PROGRESS_EVERY
    say: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))
    began: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    partial: dict[str, int] = field(default_factory=dict)  # what each .part being written holds
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def staged_bytes(self) -> int:
        """Verified in place, plus what the .part files being written hold."""
        return self.done_bytes + sum(self.partial.values())

    def part(self, name: str, held: int, received: int = 0) -> None:
        with self.lock:
            self.partial[name] = held
            self.fetched += received
        self.update()

    def drop(self, name: str) -> None:
        with self.lock:
            self.partial.pop(name, None)
        self.update()

    def staged(self, name: str, size: int) -> None:
        with self.lock:
            self.partial.pop(name, None)
            self.done_bytes += size
            self.staged_files += 1
        self.update()

    def update(self, *, force: bool = False) -> None:
        with self.lock:
            if self.gauges is not None:
                self.gauges.staged_bytes.set(self.staged_bytes)
                self.gauges.total_bytes.set(self.total_bytes)
                self.gauges.staged_files.set(self.staged_files)
                self.gauges.total_files.set(self.total_files)
            now = time.monotonic()
            if not force and now - self.last < self.every:
                return
            self.last = now
        pct = 100 * self.staged_bytes / self.total_bytes if self.total_bytes else 100.0
        rate = self.fetched / max(now - self.began, 1e-9) / 1e6
        self.say(
            f"joule-data: staged {_mib(self.staged_bytes)} of {_mib(self.total_bytes)} "
            f"({pct:.0f}%), {self.staged_files} of {self.total_files} files, "
            f"fetching at {rate:.1f} MB/s"
        )


# --- staging ---------------------------------------------------------------------------------


@dataclass
class Staged:
    files: int
    bytes: int
    manifest_digest: str
    version: str
    skipped: int
    seconds: float
    fetched_bytes: int

    def to_json(self) -> dict[str, Any]:
        """The termination message, which the operator copies into the job's status.data."""
        return {
            "files": self.files,
            "bytes": self.bytes,
            "manifestDigest": self.manifest_digest,
            "version": self.version,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


def _fetch_manifest(source: Source) -> bytes:
    try:
        opened = source.open(dataset.MANIFEST, 0)
        try:
            raw = opened.body.read(MANIFEST_MAX + 1)
        finally:
            opened.body.close()
    except StageError:
        raise
    except Exception as exc:
        raise source.error(exc, dataset.MANIFEST) from None
    if len(raw) > MANIFEST_MAX:
        raise StageError(
            f"{dataset.MANIFEST} from {source.where} is larger than {_mib(MANIFEST_MAX)}", EXIT_DATA
        )
    return raw


def _mismatch(name: str, size: int, sha: str, entry: dict[str, Any]) -> str | None:
    if size > entry["bytes"]:  # reading stops one byte past the manifest's size
        return f"{name}: the source has more than the manifest's {entry['bytes']} bytes"
    if size != entry["bytes"]:
        return f"{name}: size {size} does not match the manifest's {entry['bytes']}"
    if sha != entry["sha256"]:
        return f"{name}: sha256 {sha} does not match the manifest's {entry['sha256']}"
    return None


def stage_file(
    source: Source,
    into: Path,
    entry: dict[str, Any],
    progress: Progress,
    say: Callable[[str], None],
    on_cache_error: Callable[[OSError], StageError],
    cancel: threading.Event | None = None,
) -> None:
    """Fetch ``entry``'s file into ``into`` through ``<name>.part`` (continued where one is
    left), check it, and rename it into place; StageError if it cannot be done, Cancelled
    when ``cancel`` is set meanwhile."""
    name, size = entry["file"], entry["bytes"]
    part = into / (name + PART)
    attempts = 0
    restarted = False
    while True:
        attempts += 1
        try:
            offset = part.stat().st_size if part.exists() else 0
            if offset > size:
                say(f"joule-data: {part.name} is longer than {name}; fetching it again")
                part.unlink()
                offset = 0
            sha, offset = _hash_file(part, offset) if offset else (hashlib.sha256(), 0)
        except OSError as err:
            raise on_cache_error(err) from None
        resumed = offset
        opened: Opened | None = None
        try:
            if offset < size:
                try:
                    opened = source.open(name, offset)
                except StageError:
                    raise
                except Exception as exc:
                    raise source.error(exc, name) from None
                if opened.start != offset:
                    say(f"joule-data: {source.where} ignores ranges; fetching {name} afresh")
                    sha, offset, resumed = hashlib.sha256(), 0, 0
                elif offset:
                    say(f"joule-data: continuing {name} from byte {offset} of {size}")
            try:
                f = open(part, "r+b" if part.exists() else "wb")  # noqa: SIM115
            except OSError as err:
                raise on_cache_error(err) from None
            with f:
                try:
                    f.truncate(offset)
                    f.seek(offset)
                except OSError as err:
                    raise on_cache_error(err) from None
                progress.part(name, offset)
                got = 0  # from this response
                while opened is not None and offset <= size:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled(name)
                    try:
                        chunk = opened.body.read(min(CHUNK, size + 1 - offset))
                    except Exception as exc:
                        raise source.error(exc, name) from None
                    if not chunk:
                        if opened.length is not None and got < opened.length:
                            raise StageError(
                                f"{source.where}: connection lost mid-transfer: {name} ended "
                                f"after {got} of the {opened.length} bytes the source announced",
                                EXIT_UNAVAILABLE,
                                transient=True,
                            )
                        break
                    got += len(chunk)
                    try:
                        f.write(chunk)
                    except OSError as err:
                        raise on_cache_error(err) from None
                    sha.update(chunk)
                    offset += len(chunk)
                    progress.part(name, min(offset, size), len(chunk))
                try:
                    f.flush()
                    os.fsync(f.fileno())
                except OSError as err:
                    raise on_cache_error(err) from None
        except StageError as exc:
            if exc.transient and attempts < ATTEMPTS:
                say(f"joule-data: {name}: {exc}; continuing (try {attempts + 1} of {ATTEMPTS})")
                time.sleep(0.5 * attempts)
                continue
            raise
        finally:
            if opened is not None:
                opened.body.close()
        wrong = _mismatch(name, offset, sha.hexdigest(), entry)
        if wrong is not None:
            try:
                part.unlink()
            except OSError as err:
                raise on_cache_error(err) from None
            progress.drop(name)
            if resumed and not restarted:
                # The bytes before the resume point may be another version's: once more,
                # all of it from the source.
                say(f"joule-data: {wrong} after continuing a .part; fetching it from the start")
                restarted, attempts = True, 0
                continue
            raise StageError(f"{wrong} (from {source.location(name)})", EXIT_DATA)
        try:
            os.replace(part, into / name)
        except OSError as err:
            raise on_cache_error(err) from None
        progress.staged(name, size)
        return


def _fetch_all(
    source: Source,
    into: Path,
    todo: list[dict[str, Any]],
    progress: Progress,
    say: Callable[[str], None],
    refused: Callable[[OSError], StageError],
    parallel: int,
) -> None:
    """``stage_file`` for each of ``todo``, ``parallel`` at a time, in the manifest's order.
    The first failure stops the others (their .part files stay) and is raised."""
    if parallel <= 1:
        for entry in todo:
            stage_file(source, into, entry, progress, say, refused)
        return
    cancel = threading.Event()
    with ThreadPoolExecutor(parallel, thread_name_prefix="stage") as pool:
        futures = [
            pool.submit(stage_file, source, into, e, progress, say, refused, cancel) for e in todo
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            cancel.set()
            for f in futures:
                f.cancel()
    if failed:
        # The first in the manifest's order among those that failed before the others stopped.
        raise failed[0].exception()  # type: ignore[misc]


@contextlib.contextmanager
def _exclusive(
    into: Path, say: Callable[[str], None], refused: Callable[[OSError], StageError]
) -> Iterator[None]:
    """One staging run at a time in a cache folder (jobs that share a cache and a dataset
    would otherwise write the same .part files): an flock on ``LOCK`` there, which the kernel
    releases when the process dies however it dies. Where the lock file cannot be made (a
    read-only or foreign cache) or locked (a file system without locks), it goes on without:
    it then writes nothing, or cannot write anyway."""
    try:
        fd = os.open(into / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise refused(err) from None
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"joule-data: another run is staging into {into}; waiting for it to end")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:
            say(f"joule-data: cannot lock {into / LOCK} ({_why(err)}); going on without")
        yield
    finally:
        os.close(fd)


def stage(
    source: Source,
    into: Path,
    *,
    trust_existing: bool = False,
    parallel: int = 1,
    gauges: Gauges | None = None,
    say: Callable[[str], None] | None = None,
    every: float = PROGRESS_EVERY,
) -> Staged:
    """Copy the dataset at ``source`` into ``into``, ``parallel`` files at a time; see the
    module's docstring."""
    began = time.monotonic()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    raw = _fetch_manifest(source)
    manifest = check_manifest(raw, source.where)
    entries: list[dict[str, Any]] = manifest["shards"]
    total = sum(e["bytes"] for e in entries)
    progress = Progress(total, len(entries), gauges=gauges, every=every, say=say)
    progress.update()

    def refused(err: OSError) -> StageError:
        return cache_error(into, err, progress.staged_files, len(entries))

    try:
        into.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise refused(err) from None
    with _exclusive(into, say, refused):
        local_manifest = into / dataset.MANIFEST
        try:
            same = local_manifest.is_file() and local_manifest.read_bytes() == raw
            if local_manifest.exists() and not same:
                # Another version (or a damaged copy): from now on, not a complete copy.
                say(f"joule-data: {local_manifest} is another dataset's; replacing that dataset")
                local_manifest.unlink()
                _fsync_dir(into)
        except OSError as err:
            raise refused(err) from None

        # What is in place already: kept if it checks out, removed (to be fetched) if not.
        todo: list[dict[str, Any]] = []
        for entry in entries:
            path = into / entry["file"]
            try:
                if path.is_file() and path.stat().st_size == entry["bytes"]:
                    if trust_existing and same:
                        good = True
                    else:
                        sha, _ = _hash_file(path)
                        good = sha.hexdigest() == entry["sha256"]
                    if good:
                        progress.staged(entry["file"], entry["bytes"])
                        continue
                if path.exists() or path.is_symlink():
                    say(f"joule-data: {path} differs from the manifest's; fetching it again")
                    path.unlink()
            except OSError as err:
                raise refused(err) from None
            todo.append(entry)
        skipped = len(entries) - len(todo)

        if todo:
            try:
                held = 0
                for entry in todo:
                    part = into / (entry["file"] + PART)
                    if part.is_file():
                        held += min(part.stat().st_size, entry["bytes"])
                needed = sum(e["bytes"] for e in todo) - held
                fs = os.statvfs(into)
            except OSError as err:
                raise refused(err) from None
            free = fs.f_bavail * fs.f_frsize
            if fs.f_blocks and free < needed:
                full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise StageError(
                    f"cache directory {into} is full: {_why(full)}, {_mib(free)} free and the "
                    f"dataset needs {_mib(needed)} more; {progress.staged_files} of {len(entries)} "
                    "files are staged",
                    EXIT_CACHE,
                )
            say(
                f"joule-data: staging {len(todo)} of {len(entries)} files "
                f"({_mib(sum(e['bytes'] for e in todo))}) from {source.where} into {into}"
            )
            progress.began = time.monotonic()
            _fetch_all(source, into, todo, progress, say, refused, parallel)
        try:
            if todo or not same:
                _fsync_dir(into)  # the files' renames, before the manifest says they are there
                tmp = into / (dataset.MANIFEST + PART)
                with open(tmp, "wb") as f:
                    f.write(raw)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, local_manifest)
                _fsync_dir(into)
        except OSError as err:
            raise refused(err) from None
        progress.update(force=True)
        return Staged(
            files=len(entries),
            bytes=total,
            manifest_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
            version=manifest["version"],
            skipped=skipped,
            seconds=time.monotonic() - began,
            fetched_bytes=progress.fetched,
        )


# --- the command -----------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    """``joule-data stage``'s flags, on its subparser."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--s3",
        metavar="BUCKET/PREFIX",
        help="an S3 bucket and the prefix holding manifest.json (with --endpoint; credentials "
        "from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)",
    )
    src.add_argument("--https", metavar="URL", help="the HTTPS folder holding manifest.json")
    src.add_argument(
        "--dir", type=Path, metavar="PATH", help="a folder holding manifest.json (a mounted PVC)"
    )
    p.add_argument("--endpoint", metavar="URL", help="the S3 server: https://host:port")
    p.add_argument("--region", metavar="R", help="the S3 region (default: the bucket's own)")
    p.add_argument(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        help="PEM certificates that verify the server (default: the system's)",
    )
    p.add_argument("--into", type=Path, required=True, metavar="DIR", help="the cache folder")
    p.add_argument(
        "--trust-existing",
        action="store_true",
        help="where DIR holds this manifest already, check its files' sizes only, not sha256",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=PARALLEL,
        metavar="N",
        help=f"files fetched at a time (default {PARALLEL})",
    )
    p.add_argument(
        "--termination-log",
        type=Path,
        metavar="PATH",
        help=f"where the result goes (default {TERMINATION_LOG} where it exists)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9090,
        metavar="N",
        help="Prometheus metrics port (default 9090; 0: none)",
    )


def check_arguments(args: Any, error: Callable[[str], Any]) -> None:
    if args.s3 is not None and not args.endpoint:
        error("--s3 needs --endpoint")
    if args.s3 is None and (args.endpoint or args.region):
        error("--endpoint and --region go with --s3")
    if args.dir is not None and args.ca_bundle is not None:
        error("--ca-bundle goes with --s3 or --https")
    if args.parallel < 1:
        error("--parallel must be >= 1")
    if not 0 <= args.metrics_port < 65536:
        error("--metrics-port must be 0..65535")


def make_source(args: Any) -> Source:
    if args.s3 is not None:
        return S3Source(
            args.s3,
            args.endpoint,
            region=args.region,
            ca_bundle=args.ca_bundle,
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            parallel=args.parallel,
        )
    if args.https is not None:
        return HttpsSource(args.https, ca_bundle=args.ca_bundle)
    return DirSource(args.dir)


def write_termination(path: Path | None, message: str) -> None:
    if path is None:
        return
    data = message.encode()[:TERMINATION_MAX]
    try:
        path.write_bytes(data)
    except OSError as err:
        line = f"joule-data: cannot write the termination message to {path}: {_why(err)}"
        print(line, file=sys.stderr, flush=True)


def run(args: Any) -> int:
    """``joule-data stage``: the exit code; the result in the termination message file."""
    term = args.termination_log
    if term is None and TERMINATION_LOG.exists():
        term = TERMINATION_LOG
    try:
        gauges = None
        if args.metrics_port:
            gauges = Gauges()
            try:
                from prometheus_client import start_http_server

                start_http_server(args.metrics_port, registry=gauges.registry)
            except OSError as err:  # the copy matters more than its metrics
                line = f"joule-data: no metrics on port {args.metrics_port}: {_why(err)}"
                print(line, file=sys.stderr, flush=True)
        source = make_source(args)
        done = stage(
            source,
            args.into,
            trust_existing=args.trust_existing,
            parallel=args.parallel,
            gauges=gauges,
        )
    except StageError as exc:
        line = f"joule-data: {exc}"
        print(line, file=sys.stderr, flush=True)
        write_termination(term, str(exc))
        return exc.code
    except Exception as exc:  # a bug: say so in the pod's status too
        import traceback

        traceback.print_exc()
        write_termination(term, f"internal error: {type(exc).__name__}: {_strip(exc)}")
        return EXIT_SOFTWARE
    rate = done.fetched_bytes / max(done.seconds, 1e-9) / 1e6
    print(
        f"joule-data: staged {source.where} into {args.into}: {done.files} files "
        f"({_mib(done.bytes)}), {done.skipped} already there, {_mib(done.fetched_bytes)} "
        f"fetched in {done.seconds:.1f} s ({rate:.1f} MB/s); dataset version {done.version}",
        flush=True,
    )
    write_termination(term, json.dumps(done.to_json(), separators=(",", ":")))
    return 0
