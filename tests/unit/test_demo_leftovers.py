"""What a dead demo left running is found and stopped by the next one, and nothing else; the
demo's signals all tear down once, however many arrive."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from joule.cluster import process
from joule.cluster.process import ProcessRecord
from joule.demo import leftovers
from joule.demo.run import Interrupts

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def sleeper(procs: list[subprocess.Popen]) -> subprocess.Popen:
    proc = subprocess.Popen(SLEEP)
    procs.append(proc)
    return proc


def test_stop_stops_the_live_ones_and_never_a_reused_pid(started):
    mine = sleeper(started)
    victim = sleeper(started)
    record = process.record("operator", mine.pid)
    assert record is not None
    reused = process.record("operator", victim.pid)
    assert reused is not None
    impostor = ProcessRecord("operator", victim.pid, reused.start_time + 1, "")
    gone = ProcessRecord("operator", 2**22 + 1, 1, "")  # above pid_max: never a process
    stopped = leftovers.stop([record, impostor, gone], grace_seconds=5)
    assert stopped == [record]
    assert not process.alive(record)
    assert victim.poll() is None, "a process whose start time differs was signalled"
    assert leftovers.describe(stopped) == f"operator (pid {mine.pid})"


def test_state_round_trips_and_a_torn_file_reads_as_empty(tmp_path):
    path = tmp_path / "demo.json"
    assert leftovers.load(path) == leftovers.DemoState()
    state = leftovers.DemoState(
        demo=ProcessRecord("demo", 10, 100, ""),
        children=[ProcessRecord("operator", 11, 101, "/tmp/op.log")],
    )
    leftovers.save(path, state)
    assert leftovers.load(path) == state
    path.write_text('{"demo": {"name": "demo", "pi')
    assert leftovers.load(path) == leftovers.DemoState()


def test_describe_names_each_and_nothing_is_empty():
    records = [ProcessRecord("operator", 5, 1, ""), ProcessRecord("registry", 9, 1, "")]
    assert leftovers.describe(records) == "operator (pid 5), registry (pid 9)"
    assert leftovers.describe([]) == ""


def test_only_the_first_signal_interrupts():
    """A closed terminal sends SIGHUP twice; the second must not break into the teardown."""
    interrupts = Interrupts()
    with pytest.raises(KeyboardInterrupt):
        interrupts._handle(1, None)
    interrupts._handle(1, None)  # ignored: the teardown runs
    assert interrupts.stopping


def test_a_signal_while_a_child_is_being_recorded_waits_for_the_record():
    interrupts = Interrupts()
    recorded = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        interrupts._handle(15, None)
        recorded.append("operator")
    assert recorded == ["operator"]
