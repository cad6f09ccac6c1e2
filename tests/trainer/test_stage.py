"""``joule-data stage`` from a folder and from an HTTPS server on this machine, run as the
staging pod runs it (a subprocess): the result JSON, a ``.part`` left by a run killed
mid-file continued with a range request, corrupt and missing files, an untrusted server,
the cache folder refusing writes; and its pure parts in process."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joule_trainer import dataset, stage

JOULE_DATA = [sys.executable, "-m", "joule_trainer.data_cli"]
SHARD_TOKENS = 1_000_000  # 2 MB shards (uint16): more than one 1 MiB read each


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A prepared dataset of 5 shards (~7.7 MiB), bytes tokenizer."""
    root = tmp_path_factory.mktemp("stage-src")
    text = root / "in.txt"
    text.write_bytes(os.urandom(4_050_000))
    prepared = dataset.prepare([text], root / "ds", tokenizer="bytes", shard_tokens=SHARD_TOKENS)
    assert len(prepared.manifest["shards"]) == 5
    return root / "ds"


def copy_of(source: Path, tmp_path: Path) -> Path:
    """A copy of the dataset that a test may change."""
    out = tmp_path / "src"
    out.mkdir()
    for p in source.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def run_stage(*args: str, term: Path, env: dict[str, str] | None = None, timeout: float = 120):
    run = subprocess.run(
        [*JOULE_DATA, "stage", *args, "--termination-log", str(term), "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    message = term.read_text() if term.exists() else ""
    return run, message


def expected_json(source: Path, skipped: int) -> dict:
    raw = (source / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    return {
        "files": len(manifest["shards"]),
        "bytes": sum(s["bytes"] for s in manifest["shards"]),
        "manifestDigest": "sha256:" + hashlib.sha256(raw).hexdigest(),
        "version": manifest["version"],
        "skipped": skipped,
    }


def check_result(message: str, source: Path, skipped: int) -> dict:
    result = json.loads(message)
    assert result.pop("seconds") >= 0
    assert result == expected_json(source, skipped)
    return result


def listing(cache: Path) -> set[str]:
    """The cache folder's files, less the staging runs' lock file."""
    return {p.name for p in cache.iterdir()} - {stage.LOCK}


def assert_same(cache: Path, source: Path) -> None:
    names = sorted(p.name for p in source.iterdir())
    assert sorted(listing(cache)) == names  # no .part left behind
    for name in names:
        assert (cache / name).read_bytes() == (source / name).read_bytes(), name
    dataset.verify(cache)


# --- from a folder ---------------------------------------------------------------------------


def test_a_folder_is_staged_and_the_result_is_one_json_object(source, tmp_path):
    cache, term = tmp_path / "cache" / "ds", tmp_path / "term"
    run, message = run_stage("--dir", str(source), "--into", str(cache), term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=0)
    assert_same(cache, source)
    assert run.stdout.startswith(f"joule-data: staged {source}/ into {cache}: 5 files (")
    # Over a complete copy: nothing fetched, nothing rewritten.
    assert (cache / stage.LOCK).stat().st_size == 0
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    run, message = run_stage("--dir", str(source), "--into", str(cache), term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=5)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert ", 0.0 MiB fetched in " in run.stdout


def test_parts_are_continued_bad_prefixes_refetched_and_changed_files_replaced(source, tmp_path):
    cache, term = tmp_path / "cache", tmp_path / "term"
    assert run_stage("--dir", str(source), "--into", str(cache), term=term)[0].returncode == 0
    shards = [f"shard-{i:05d}.npy" for i in range(5)]
    # What a killed run leaves: shard 1 half written, shard 2 written with another version's
    # first bytes, shard 3 gone, shard 4 changed in place, and no manifest yet.
    data = (cache / shards[1]).read_bytes()
    (cache / shards[1]).unlink()
    (cache / f"{shards[1]}.part").write_bytes(data[: len(data) // 2])
    data = bytearray((cache / shards[2]).read_bytes())
    (cache / shards[2]).unlink()
    data[100] ^= 0xFF
    (cache / f"{shards[2]}.part").write_bytes(data[:1_500_000])
    (cache / shards[3]).unlink()
    with open(cache / shards[4], "r+b") as f:
        f.seek(50)
        f.write(b"\x00\x01\x02")
    (cache / "manifest.json").unlink()

    run, message = run_stage("--dir", str(source), "--into", str(cache), term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=1)
    assert_same(cache, source)
    err = run.stderr
    assert f"continuing {shards[1]} from byte {len(data) // 2} of {len(data)}" in err
    assert f"continuing {shards[2]} from byte 1500000 of {len(data)}" in err
    assert f"{shards[2]}: sha256 " in err and "fetching it from the start" in err
    assert f"{cache / shards[4]} differs from the manifest's; fetching it again" in err
    assert "joule-data: staging 4 of 5 files " in err


def test_trust_existing_checks_sizes_only_where_the_manifest_is_this_one(source, tmp_path):
    cache, term = tmp_path / "cache", tmp_path / "term"
    assert run_stage("--dir", str(source), "--into", str(cache), term=term)[0].returncode == 0
    with open(cache / "shard-00000.npy", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xfe")
    trusting = ("--dir", str(source), "--into", str(cache), "--trust-existing")
    run, message = run_stage(*trusting, term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=5)  # sizes match: trusted, not read
    assert (cache / "shard-00000.npy").read_bytes() != (source / "shard-00000.npy").read_bytes()
    # Without the flag every file is hashed, and the changed one fetched again.
    run, message = run_stage("--dir", str(source), "--into", str(cache), term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=4)
    assert_same(cache, source)


def test_a_corrupt_or_short_source_file_is_refused_with_its_name(source, tmp_path):
    src = copy_of(source, tmp_path)
    manifest = json.loads((src / "manifest.json").read_text())
    entry = manifest["shards"][3]
    data = bytearray((src / entry["file"]).read_bytes())
    data[12345] ^= 0x01
    (src / entry["file"]).write_bytes(data)
    cache, term = tmp_path / "cache", tmp_path / "term"
    run, message = run_stage("--dir", str(src), "--into", str(cache), term=term)
    actual = hashlib.sha256(data).hexdigest()
    line = (
        f"shard-00003.npy: sha256 {actual} does not match the manifest's {entry['sha256']} "
        f"(from {src}/shard-00003.npy)"
    )
    assert (run.returncode, message) == (65, line)
    assert run.stderr.endswith(f"joule-data: {line}\n")
    # No manifest (not a complete copy), nothing of shard 3; the others fetched meanwhile,
    # 4 at a time, are in place or left as .part files to be continued.
    left = listing(cache)
    assert "manifest.json" not in left and not {"shard-00003.npy", "shard-00003.npy.part"} & left
    assert left <= {f"shard-{i:05d}.npy{tail}" for i in (0, 1, 2, 4) for tail in ("", ".part")}

    (src / entry["file"]).write_bytes(data[:-10])
    run, message = run_stage("--dir", str(src), "--into", str(cache), term=term)
    assert run.returncode == 65
    short = f"shard-00003.npy: size {len(data) - 10} does not match the manifest's {len(data)}"
    assert message == f"{short} (from {src}/shard-00003.npy)"


def test_a_missing_manifest_or_file_is_named(source, tmp_path):
    src = copy_of(source, tmp_path)
    cache, term = tmp_path / "cache", tmp_path / "term"
    (src / "shard-00004.npy").unlink()
    run, message = run_stage("--dir", str(src), "--into", str(cache), term=term)
    assert run.returncode == 66
    assert message == f"shard-00004.npy: no such file: {src}/shard-00004.npy"
    run, message = run_stage("--dir", str(tmp_path / "nowhere"), "--into", str(cache), term=term)
    assert run.returncode == 66
    assert message == f"manifest.json: no such file: {tmp_path}/nowhere/manifest.json"
    # A manifest that is not one, or was changed after it was prepared.
    (src / "manifest.json").write_text('{"format": "joule-dataset", "format_version": 1}')
    run, message = run_stage("--dir", str(src), "--into", str(cache), term=term)
    assert run.returncode == 65
    assert message.startswith(f"manifest.json from {src}/: its version says None, its content")


def test_a_cache_that_cannot_be_written_is_exit_74_naming_it(source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    term = tmp_path / "term"
    run, message = run_stage("--dir", str(source), "--into", str(blocker / "cache"), term=term)
    assert run.returncode == 74
    assert message == (
        f"cache directory {blocker / 'cache'} cannot be written: Not a directory (errno 20); "
        "0 of 5 files are staged, and a later run continues from there"
    )


def test_a_cache_without_room_for_what_is_missing_is_refused_before_fetching(
    source, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    real = os.statvfs

    class Small:
        def __init__(self, path):
            fs = real(path)
            self.f_frsize, self.f_blocks, self.f_bavail = 4096, fs.f_blocks or 1, 1024  # 4 MiB

    monkeypatch.setattr(stage.os, "statvfs", Small)
    with pytest.raises(stage.StageError) as full:
        stage.stage(stage.DirSource(source), cache, say=lambda line: None)
    assert full.value.code == 74
    assert str(full.value).startswith(
        f"cache directory {cache} is full: No space left on device (errno 28), 4.0 MiB free "
        "and the dataset needs 7.7 MiB more; 0 of 5 files are staged"
    )
    assert listing(cache) == set()


# --- from an HTTPS server --------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stage-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_pem, key_pem


class Server:
    """An HTTPS file server over a folder that honours ``Range: bytes=N-``, records each
    request's path and Range, and can stall one file after ``stall_after`` bytes until
    ``release`` is set."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.root, self.requests = root, []
        self.stall: tuple[str, int] | None = None
        self.drop: tuple[str, int] | None = None  # close the connection after so many bytes
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                folder, _, name = self.path.rpartition("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                path = server.root / name
                if folder != "/ds" or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                try:
                    if server.drop and server.drop[0] == name:
                        cut, server.drop = server.drop[1], None  # once
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if server.stall and server.stall[0] == name:
                        cut = server.stall[1]
                        self.wfile.write(body[:cut])
                        self.wfile.flush()
                        server.release.wait(60)
                        body = body[cut:]
                    self.wfile.write(body)
                except OSError:
                    pass

        cert, key = self_signed(tmp_path)
        self.ca = cert
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/ds"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(source, tmp_path):
    s = Server(source, tmp_path)
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("joule_data_")
    }


def test_a_run_killed_mid_file_is_continued_with_a_range_request(source, server, tmp_path):
    """The real thing: a run is SIGKILLed while shard 2 is half received (its .part holds the
    first MiB), its gauges read while it waits; the next run asks for the rest only."""
    cache, term = tmp_path / "cache", tmp_path / "term"
    manifest = json.loads((source / "manifest.json").read_text())
    sizes = [s["bytes"] for s in manifest["shards"]]
    server.stall = ("shard-00002.npy", 1_500_000)
    port = free_port()
    argv = [*JOULE_DATA, "stage", "--https", server.url, "--ca-bundle", str(server.ca)]
    argv += ["--parallel", "1"]  # one file at a time: the requests below come in order
    argv += ["--into", str(cache), "--termination-log", str(term), "--metrics-port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = cache / "shard-00002.npy.part"
    try:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 2**20):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached shard 2"
            time.sleep(0.05)
        # The gauges are set just after each write: read until they show that first MiB.
        want = {
            "joule_data_total_files": 5,
            "joule_data_total_bytes": sum(sizes),
            "joule_data_staged_files": 2,
            "joule_data_staged_bytes": sizes[0] + sizes[1] + 2**20,
        }
        while (gauges := scrape(port)) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gauges == want
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert part.stat().st_size == 2**20
    assert not (cache / "manifest.json").exists() and not term.exists()

    server.stall = None
    server.requests.clear()
    run = subprocess.run([*argv[:-1], "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check_result(term.read_text(), source, skipped=2)
    assert_same(cache, source)
    assert server.requests == [
        ("manifest.json", None),
        ("shard-00002.npy", f"bytes={2**20}-"),
        ("shard-00003.npy", None),
        ("shard-00004.npy", None),
    ]


def test_https_errors_say_which_and_exit_distinctly(source, server, tmp_path):
    cache, term = tmp_path / "cache", tmp_path / "term"
    # The system's CAs do not know the test server's certificate.
    run, message = run_stage("--https", server.url, "--into", str(cache), term=term)
    host = server.url.split("/")[2]
    assert run.returncode == 69
    assert message.startswith(f"{server.url}/: {host} cannot be reached: TLS verification failed")
    ca = ("--ca-bundle", str(server.ca), "--into", str(cache))
    run, message = run_stage("--https", server.url + "/nothing", *ca, term=term)
    assert run.returncode == 66
    url = f"{server.url}/nothing/manifest.json"
    assert message == f"manifest.json: not found at {url}: HTTP 404 Not Found"
    closed = f"127.0.0.1:{free_port()}"
    run, message = run_stage("--https", f"https://{closed}/ds", *ca, term=term)
    assert run.returncode == 69
    assert message == f"https://{closed}/ds/: {closed} cannot be reached: connection refused"
    run, message = run_stage("--https", "https://no-such-host.invalid/ds", *ca, term=term)
    assert run.returncode == 69
    assert message.startswith(
        "https://no-such-host.invalid/ds/: no-such-host.invalid cannot be reached: "
        "DNS lookup failed"
    )
    missing = ("--ca-bundle", str(tmp_path / "none.pem"), "--into", str(cache))
    run, message = run_stage("--https", server.url, *missing, term=term)
    assert run.returncode == 78
    assert message.startswith(f"--ca-bundle {tmp_path / 'none.pem'} cannot be read: No such file")
    # And with the right CA it works, every file checked.
    run, message = run_stage("--https", server.url, *ca, term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=0)
    assert_same(cache, source)


# --- pure parts ------------------------------------------------------------------------------


def test_the_manifest_is_refused_for_names_that_leave_the_cache(source):
    raw = (source / "manifest.json").read_bytes()
    assert stage.check_manifest(raw, "x")["shards"][0]["file"] == "shard-00000.npy"
    for bad in ("../escape.npy", "sub/shard.npy", ".hidden", "manifest.json", "a.npy.part", ""):
        m = json.loads(raw)
        m["shards"][1]["file"] = bad
        m["version"] = dataset.version_of(m)
        with pytest.raises(stage.StageError) as refused:
            stage.check_manifest(json.dumps(m).encode(), "src/")
        assert refused.value.code == 65
        why = f"file name {bad!r} is not a plain, unique file name"
        assert str(refused.value) == f"manifest.json from src/: {why}"
    m = json.loads(raw)
    m["shards"][0]["sha256"] = "00"
    m["version"] = dataset.version_of(m)
    with pytest.raises(stage.StageError, match=r"shard-00000\.npy: '00' is not a sha256"):
        stage.check_manifest(json.dumps(m).encode(), "src/")
    with pytest.raises(stage.StageError, match="not JSON"):
        stage.check_manifest(b"<html>", "src/")


def test_network_errors_are_named_and_mid_transfer_losses_are_transient():
    import http.client

    u3 = urllib3.exceptions
    cases = [
        (u3.MaxRetryError(None, "/", u3.NewConnectionError(None, "x")), False),
        (u3.ProtocolError("Connection broken", ConnectionResetError(104, "reset")), True),
        (http.client.IncompleteRead(b"abc", 10), True),
        (u3.MaxRetryError(None, "/", ConnectionRefusedError(111, "refused")), False),
    ]
    # urllib3's NewConnectionError is also a ConnectTimeoutError; what it was comes from its cause.
    refused = u3.NewConnectionError(None, "Failed to establish a new connection")
    refused.__cause__ = ConnectionRefusedError(111, "Connection refused")
    cases.append((u3.MaxRetryError(None, "/", refused), False))
    for exc, transient in cases:
        assert stage._network_reason(exc)[1] is transient, exc
    assert stage._network_reason(cases[3][0]) == ("connection refused", False)
    assert stage._network_reason(cases[4][0]) == ("connection refused", False)
    assert stage._network_reason(cases[0][0]) == ("None: x", False)
    assert stage._network_reason(cases[2][0])[0].startswith("connection lost mid-transfer")


def test_the_gauges_follow_the_counts(source, tmp_path):
    from prometheus_client import generate_latest

    gauges = stage.Gauges()
    lines: list[str] = []
    done = stage.stage(stage.DirSource(source), tmp_path / "c", gauges=gauges, say=lines.append)
    text = generate_latest(gauges.registry).decode()
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln[0] != "#"}
    assert values == {
        "joule_data_staged_bytes": done.bytes,
        "joule_data_total_bytes": done.bytes,
        "joule_data_staged_files": 5,
        "joule_data_total_files": 5,
    }
    assert lines[-1].startswith("joule-data: staged 7.7 MiB of 7.7 MiB (100%), 5 of 5 files, ")


def test_flags_that_do_not_go_together_are_refused(tmp_path, capsys):
    from joule_trainer import data_cli

    for argv, why in [
        (["--s3", "b/p"], "--s3 needs --endpoint"),
        (["--dir", "d", "--endpoint", "https://h"], "--endpoint and --region go with --s3"),
        (["--dir", "d", "--ca-bundle", "c"], "--ca-bundle goes with --s3 or --https"),
        (["--dir", "d", "--https", "https://h"], "not allowed with argument"),
    ]:
        with pytest.raises(SystemExit) as refused:
            data_cli.main(["stage", *argv, "--into", str(tmp_path / "c")])
        assert refused.value.code == 2
        assert why in capsys.readouterr().err
    with pytest.raises(stage.StageError) as half:
        stage.S3Source("b/p", "https://h:1", access_key="AKIA", secret_key="")
    assert (half.value.code, str(half.value)) == (
        78,
        "AWS_SECRET_ACCESS_KEY is not set (or empty) but its pair is",
    )
    with pytest.raises(stage.StageError, match="is not https://host"):
        stage.S3Source("b/p", "h:9000")


def test_files_are_fetched_in_parallel(source, server, tmp_path):
    """4 at a time: while shard 0 is held mid-file, the next three arrive whole; released,
    it completes and the run succeeds."""
    cache, term = tmp_path / "cache", tmp_path / "term"
    server.stall = ("shard-00000.npy", 1_500_000)
    argv = [*JOULE_DATA, "stage", "--https", server.url, "--ca-bundle", str(server.ca)]
    argv += ["--into", str(cache), "--termination-log", str(term), "--metrics-port", "0"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        want = {f"shard-0000{i}.npy" for i in (1, 2, 3)}
        while not want <= {p.name for p in cache.glob("shard-*")}:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the files after shard 0 never arrived"
            time.sleep(0.05)
        assert (cache / "shard-00000.npy.part").exists()
        assert not (cache / "shard-00000.npy").exists()
        server.release.set()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    check_result(term.read_text(), source, skipped=0)
    assert_same(cache, source)


def test_a_second_run_into_the_same_cache_waits_for_the_first(source, server, tmp_path):
    """Two jobs sharing a cache and a dataset: the second staging run waits on the folder's
    lock while the first holds it, then finds every file in place and fetches nothing."""
    cache = tmp_path / "cache"
    server.stall = ("shard-00001.npy", 1_500_000)

    def start(term: Path) -> subprocess.Popen[str]:
        argv = [*JOULE_DATA, "stage", "--https", server.url, "--ca-bundle", str(server.ca)]
        argv += ["--into", str(cache), "--termination-log", str(term), "--metrics-port", "0"]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start(tmp_path / "first")
    try:
        deadline = time.monotonic() + 60
        while not (cache / "shard-00001.npy.part").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never reached shard 1"
            time.sleep(0.05)
        second = start(tmp_path / "second")
        try:
            line = second.stderr.readline()  # type: ignore[union-attr]
            assert (
                line == f"joule-data: another run is staging into {cache}; waiting for it to end\n"
            )
            assert second.poll() is None
            server.release.set()
            _, err = first.communicate(timeout=60)
            assert first.returncode == 0, err
            _, err = second.communicate(timeout=60)
            assert second.returncode == 0, err
        finally:
            if second.poll() is None:
                second.kill()
    finally:
        if first.poll() is None:
            first.kill()
    check_result((tmp_path / "first").read_text(), source, skipped=0)
    check_result((tmp_path / "second").read_text(), source, skipped=5)
    assert_same(cache, source)
    assert [r for r in server.requests if r[0] == "manifest.json"] == [("manifest.json", None)] * 2
    assert len(server.requests) == 2 + 5


def test_a_connection_lost_mid_file_is_continued_within_the_run(source, server, tmp_path):
    cache, term = tmp_path / "cache", tmp_path / "term"
    server.drop = ("shard-00001.npy", 1_200_000)
    ca = ("--ca-bundle", str(server.ca), "--into", str(cache), "--parallel", "1")
    run, message = run_stage("--https", server.url, *ca, term=term)
    assert run.returncode == 0, run.stderr
    check_result(message, source, skipped=0)
    assert_same(cache, source)
    assert "shard-00001.npy: " in run.stderr and "connection lost mid-transfer" in run.stderr
    assert "continuing (try 2 of 3)" in run.stderr
    # The second request asked for the rest only: every byte received was kept.
    assert [r for r in server.requests if r[0] == "shard-00001.npy"] == [
        ("shard-00001.npy", None),
        ("shard-00001.npy", "bytes=1200000-"),
    ]
    assert "shard-00001.npy ended after 1200000 of the 2000128 bytes" in run.stderr


def test_a_source_longer_than_the_manifest_says_is_refused(source, tmp_path):
    src = copy_of(source, tmp_path)
    with open(src / "shard-00002.npy", "ab") as f:
        f.write(b"more")
    run, message = run_stage("--dir", str(src), "--into", str(tmp_path / "c"), term=tmp_path / "t")
    size = (source / "shard-00002.npy").stat().st_size
    assert run.returncode == 65
    assert message == (
        f"shard-00002.npy: the source has more than the manifest's {size} bytes "
        f"(from {src}/shard-00002.npy)"
    )
