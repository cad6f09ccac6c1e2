"""Start, probe and stop the control-plane processes, by pid.

A pid alone is not an identity: after a reboot or a long time another process may hold it.
Each record keeps the process's start time from /proc as well, and nothing is signalled unless
both match, so `cluster down` never kills a stranger.
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcessRecord:
    name: str
    pid: int
    start_time: int  # clock ticks since boot, field 22 of /proc/<pid>/stat
    log: str
    health_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessRecord:
        return cls(
            str(data["name"]),
            int(data["pid"]),
            int(data["start_time"]),
            str(data["log"]),
            data.get("health_url"),
        )


def start(
    name: str,
    argv: list[str],
    log_path: Path,
    health_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ProcessRecord:
    """Start a detached process (its own session, so Ctrl-C in a terminal does not reach it).
    ``env``: its whole environment (default: ours), e.g. to pass secrets off the command line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    start_time = _start_time(proc.pid)
    if start_time is None:
        raise RuntimeError(f"{name} exited immediately; see {log_path}")
    return ProcessRecord(name, proc.pid, start_time, str(log_path), health_url)


def record(name: str, pid: int, log: str = "") -> ProcessRecord | None:
    """The identity (pid + start time) of a process running now, for one this module did not
    start (another's child, a process found in /proc); None if it is gone."""
    started = _start_time(pid)
    return None if started is None else ProcessRecord(name, pid, started, log)


def alive(record: ProcessRecord) -> bool:
    started = _start_time(record.pid)
    return started is not None and started == record.start_time and not _zombie(record.pid)


def stop(records: list[ProcessRecord], grace_seconds: float = 10.0) -> None:
    """SIGTERM every live process, wait up to the grace period, then SIGKILL the rest."""
    live = [r for r in records if alive(r)]
    for record in live:
        _signal(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(alive(r) for r in live):
        _reap(live)
        time.sleep(0.1)
    for record in live:
        if alive(record):
            _signal(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(r) for r in live):
        _reap(live)
        time.sleep(0.05)


def kill(record: ProcessRecord) -> None:
    """SIGKILL, and wait (5 s at most) until it is gone."""
    if alive(record):
        _signal(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(record):
        _reap([record])
        time.sleep(0.05)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def healthy(url: str, ca: Path | None = None, timeout: float = 2.0) -> bool:
    """True when ``url`` answers 200. Component health ports use self-signed serving certs;
    only the API server's is checked against the cluster CA."""
    context: ssl.SSLContext | None = None
    if url.startswith("https://"):
        if ca is not None:
            context = ssl.create_default_context(cafile=str(ca))
        else:
            context = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(path: str | Path, lines: int = 20) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(records: list[ProcessRecord]) -> None:
    """Collect exit statuses of our own children, so they do not linger as zombies."""
    for record in records:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
