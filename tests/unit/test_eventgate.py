"""Which of a job's Events become API calls: the same Event within ten minutes is counted on
the first, and a job may make 25 calls at once, then one per 10 s."""

from joule.api.eventgate import BURST, DEDUP_SECONDS, REFILL_SECONDS, EventGate
from joule.api.events import Event

JOB = ("ml", "train", "uid-1")
FAILED = Event("Warning", "WorkerFailed", "train-worker-1 failed (Error, exit code 1)")


def test_the_same_event_again_is_counted_on_the_first_until_ten_minutes_have_passed():
    gate = EventGate()
    assert gate.admit(JOB, FAILED, 0.0).action == "create"
    gate.made(JOB, FAILED, "train.abc", 0.0)
    again = gate.admit(JOB, FAILED, 30.0)
    assert (again.action, again.name, again.count) == ("count", "train.abc", 2)
    assert gate.admit(JOB, FAILED, 60.0).count == 3
    assert gate.admit(JOB, FAILED, DEDUP_SECONDS + 1).action == "create"


def test_a_different_message_or_another_job_is_another_event():
    gate = EventGate()
    gate.admit(JOB, FAILED, 0.0)
    gate.made(JOB, FAILED, "train.abc", 0.0)
    other = Event("Warning", "WorkerFailed", "train-worker-0 failed (OOMKilled)")
    assert gate.admit(JOB, other, 1.0).action == "create"
    namesake = ("ml", "train", "uid-2")  # deleted and created again under the same name
    assert gate.admit(namesake, FAILED, 1.0).action == "create"


def test_a_flapping_job_gets_its_burst_then_one_event_per_refill():
    gate = EventGate()
    verdicts = [gate.admit(JOB, Event("Normal", "Resizing", f"to {i}"), 0.0) for i in range(40)]
    assert [v.action for v in verdicts].count("create") == BURST
    assert gate.admit(JOB, Event("Normal", "Resizing", "x"), 1.0).action == "drop"
    assert gate.admit(JOB, Event("Normal", "Resizing", "y"), REFILL_SECONDS).action == "create"
    # Other jobs are not held back by this one.
    assert gate.admit(("ml", "other", "u"), FAILED, REFILL_SECONDS).action == "create"


def test_a_forgotten_job_starts_afresh():
    gate = EventGate()
    for i in range(BURST):
        gate.admit(JOB, Event("Normal", "R", str(i)), 0.0)
    gate.forget("ml", "train")
    assert gate.admit(JOB, Event("Normal", "R", "again"), 0.0).action == "create"
