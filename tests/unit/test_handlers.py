"""The Scheduler: which jobs are resynced, and that a deleted job is forgotten everywhere."""

import time

from joule.config import OperatorConfig
from joule.handlers import Scheduler
from joule.lifecycle import Outcome
from joule.reconcile import Plan


class FakeReconciler:
    def __init__(self):
        self.gone: set[tuple[str, str]] = set()
        self.calls: list[tuple[str, str]] = []
        self.forgotten: list[tuple[str, str]] = []

    def reconcile(self, namespace, name, cached=False):
        self.calls.append((namespace, name))
        if (namespace, name) in self.gone:
            return Outcome(None, False, gone=True)
        return Outcome(Plan(requeue_after=0.0), False)

    def forget(self, namespace, name):
        self.forgotten.append((namespace, name))


def test_a_job_that_returns_404_leaves_every_table_and_is_not_polled_again():
    fake = FakeReconciler()
    sched = Scheduler(fake, OperatorConfig(tick_seconds=0.05, resync_seconds=0.05))
    sched.run("ns", "a")
    sched.run("ns", "b")
    assert ("ns", "b") in sched.due
    fake.gone.add(("ns", "b"))
    sched.thread.start()
    try:
        deadline = time.monotonic() + 5
        while ("ns", "b") in sched.known and time.monotonic() < deadline:
            time.sleep(0.05)
        calls = fake.calls.count(("ns", "b"))
        time.sleep(0.5)  # ten more ticks: the deleted job is not reconciled again
    finally:
        sched.stop.set()
        sched.pool.shutdown(wait=True)
    assert ("ns", "b") not in sched.known
    assert ("ns", "b") not in sched.due and ("ns", "b") not in sched.seen
    assert ("ns", "b") in fake.forgotten
    assert fake.calls.count(("ns", "b")) == calls
    assert fake.calls.count(("ns", "a")) > 2  # the live job still is


def test_a_tick_after_kopfs_cleanup_shut_the_pools_starts_nothing_and_raises_nothing():
    fake = FakeReconciler()
    sched = Scheduler(fake, OperatorConfig(tick_seconds=0.05, resync_seconds=0.05))
    sched.run("ns", "a")
    sched.evaluation_due[("ns", "a")] = 0.0
    # kopf's cleanup handler: stop, then the pools, while the loop is between its wait and
    # its submits ("cannot schedule new futures after shutdown" was printed on every stop).
    sched.stop.set()
    sched.pool.shutdown(wait=True)
    sched.evaluations.shutdown(wait=True)
    sched.tick(time.monotonic() + 60)
    assert sched.inflight == set() and sched.evaluating == set()
    assert fake.calls == [("ns", "a")]


class SlowReconciler(FakeReconciler):
    """Holds each reconcile until released, to trigger a job many times while one runs."""

    def __init__(self):
        super().__init__()
        import threading

        self.entered = threading.Event()
        self.release = threading.Event()

    def reconcile(self, namespace, name, cached=False):
        self.entered.set()
        self.release.wait(5)
        self.calls.append((namespace, name))
        return Outcome(Plan(), False)


def settle(slow: SlowReconciler, sched: Scheduler) -> None:
    """Let the held reconciles go, and wait until none is in flight or queued."""
    slow.release.set()
    deadline = time.monotonic() + 5
    while (sched.inflight or sched.again) and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_burst_of_triggers_while_a_reconcile_runs_is_one_more_reconcile():
    slow = SlowReconciler()
    sched = Scheduler(slow, OperatorConfig(resync_seconds=3600))
    try:
        sched.trigger("ns", "a")
        assert slow.entered.wait(5)
        for _ in range(50):  # fifty pod events of the job while its reconcile runs
            sched.trigger("ns", "a")
        sched.trigger("ns", "b")  # another job is not held behind it
        settle(slow, sched)
    finally:
        sched.stop.set()
        sched.pool.shutdown(wait=True)
    assert slow.calls.count(("ns", "a")) == 2  # the one running, and one for all fifty
    assert slow.calls.count(("ns", "b")) == 1
    assert sched.inflight == set() and sched.again == set()


def test_a_trigger_for_a_job_forgotten_meanwhile_is_not_run_again():
    slow = SlowReconciler()
    sched = Scheduler(slow, OperatorConfig(resync_seconds=3600))
    try:
        sched.trigger("ns", "a")
        assert slow.entered.wait(5)
        sched.trigger("ns", "a")
        sched.forget("ns", "a")  # its DELETED event
        settle(slow, sched)
    finally:
        sched.stop.set()
        sched.pool.shutdown(wait=True)
    assert slow.calls == [("ns", "a")]


class FlakyReconciler(FakeReconciler):
    """Fails while the API server is away (the first ``down`` calls), then works."""

    def __init__(self, down: int):
        super().__init__()
        self.down = down
        self.times: list[float] = []

    def reconcile(self, namespace, name, cached=False):
        self.times.append(time.monotonic())
        if len(self.times) <= self.down:
            raise ConnectionError("connection refused")
        return Outcome(Plan(), False)


def test_a_reconcile_that_failed_is_retried_within_a_second_then_less_often():
    flaky = FlakyReconciler(down=3)
    sched = Scheduler(flaky, OperatorConfig(tick_seconds=0.05, resync_seconds=3600))
    sched.thread.start()
    try:
        sched.trigger("ns", "a")
        deadline = time.monotonic() + 10
        while len(flaky.times) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sched.stop.set()
        sched.pool.shutdown(wait=True)
    assert len(flaky.times) == 4  # three failures, then the one that worked; no resync needed
    gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:], strict=False)]
    # 0.5, 1 and 2 s apart (never sooner; later only by a busy machine's ticks), all long
    # before the hour's resync.
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 1.95, gaps
    assert ("ns", "a") not in sched.failures
