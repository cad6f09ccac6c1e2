"""Processes are stopped by pid, and never a stranger that reused one."""

import sys
import time

from joule.cluster import process
from joule.cluster.process import ProcessRecord


def test_start_stop_and_rss(tmp_path):
    record = process.start(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log"
    )
    assert process.alive(record)
    assert process.rss_bytes(record.pid) > 0
    process.stop([record], grace_seconds=5)
    assert not process.alive(record)
    assert process.rss_bytes(record.pid) is None


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    record = process.start("stubborn", [sys.executable, "-c", code], tmp_path / "log")
    time.sleep(0.5)  # let it install the handler
    started = time.monotonic()
    process.stop([record], grace_seconds=1)
    assert not process.alive(record)
    assert time.monotonic() - started < 5


def test_a_reused_pid_is_not_ours(tmp_path):
    record = process.start(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log"
    )
    impostor = ProcessRecord("impostor", record.pid, record.start_time + 1, record.log)
    assert not process.alive(impostor)
    process.stop([impostor], grace_seconds=1)
    assert process.alive(record), "stop() signalled a process whose start time differs"
    process.stop([record], grace_seconds=5)


def test_record_round_trips_through_json(tmp_path):
    record = ProcessRecord("etcd", 42, 1234, "/tmp/etcd.log", "http://127.0.0.1:1/health")
    assert ProcessRecord.from_json(record.to_json()) == record
