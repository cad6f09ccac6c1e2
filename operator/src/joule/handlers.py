"""kopf glue: which events lead to a reconcile. No decisions here (see ``reconcile``).

Three triggers feed the same level-triggered ``Reconciler.reconcile``: watch events of a job
(including the initial listing when the operator starts), changes of its pods (from the pod
cache's own watch, ``podcache``, which the API server filters by Joule's label), and a resync
thread that reconciles jobs whose startup timeout, deadline or TTL is due, or that have not
been looked at for ``resync_seconds``. The same thread runs the energy and scaling loop
(``Autoscaler.evaluate``) for jobs whose evaluation is due, apart from their reconciles: a
slow evaluation never delays a job's lifecycle, and its status write comes back as a watch
event that the reconciler acts on.

kopf's change handlers and timers are deliberately not used: change handlers retry a failed
handler with backoff and hold every later change of the job behind it, and both they and
timers keep state (annotations, a finalizer) on the user's object. A finalizer would make
jobs undeletable whenever the operator is not running, and annotations look like drift to
GitOps tools. The object stays exactly as the user wrote it.

Triggers are coalesced per job: one reconcile in flight and at most one queued behind it,
however many events arrive meanwhile (a burst of pod events is one reconcile, not one each:
the reconcile is level-triggered and reads the newest state when it starts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from joule import metrics
from joule.autoscaler import Autoscaler
from joule.config import OperatorConfig
from joule.constants import GROUP, PLURAL, VERSION
from joule.lifecycle import Reconciler
from joule.podcache import PodCache

log = logging.getLogger("joule.handlers")
Key = tuple[str, str]
RETRY_FIRST_SECONDS = 0.5


class Scheduler:
    """Remembers the jobs the operator knows, when each is next due, and runs reconciles."""

    def __init__(
        self, reconciler: Reconciler, config: OperatorConfig, autoscaler: Autoscaler | None = None
    ) -> None:
        self.reconciler = reconciler
        self.autoscaler = autoscaler
        self.config = config
        self.due: dict[Key, float] = {}
        self.seen: dict[Key, float] = {}
        self.known: set[Key] = set()
        self.inflight: set[Key] = set()
        self.again: set[Key] = set()  # triggered while in flight: reconciled once more after
        self.failures: dict[Key, int] = {}  # reconciles failed in a row (API server away)
        self.pod_cache: PodCache | None = None  # started and stopped with the resync thread
        self.evaluation_due: dict[Key, float] = {}
        self.evaluating: set[Key] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="resync")
        # Evaluations wait on workers (a scrape deadline each): their own threads, so that
        # timers (startup timeout, deadline, TTL) never queue behind them.
        self.evaluations = ThreadPoolExecutor(
            max_workers=config.workers, thread_name_prefix="evaluate"
        )
        self.thread = threading.Thread(target=self._loop, name="joule-resync", daemon=True)

    def trigger(self, namespace: str, name: str) -> None:
        """Reconcile the job soon, on the pool: at once when none is in flight, else once
        more when the one in flight ends (however often this is called meanwhile)."""
        key = (namespace, name)
        with self.lock:
            self.known.add(key)
            if key in self.inflight:
                self.again.add(key)
                metrics.RECONCILE_TRIGGERS.labels(outcome="coalesced").inc()
                return
            self.inflight.add(key)
        metrics.RECONCILE_TRIGGERS.labels(outcome="started").inc()
        self._submit(self.pool, self._triggered, key, self.inflight)

    def _triggered(self, key: Key) -> None:
        """A watch event's reconcile: from the job's body as the watch reported it (timers
        and periodic resyncs read it from the API server)."""
        self._resync(key, cached=True)

    def run(self, namespace: str, name: str, cached: bool = False) -> None:
        key = (namespace, name)
        with self.lock:
            self.known.add(key)
        try:
            outcome = self.reconciler.reconcile(namespace, name, cached=cached)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(loop="lifecycle").inc()
            raise
        finally:
            now = time.monotonic()
            with self.lock:
                self.seen[key] = now
        if outcome.gone:  # deleted while we were not watching (or its DELETED was missed)
            self.forget(namespace, name)
            return
        after = outcome.plan.requeue_after if outcome.plan else None
        with self.lock:
            if after is None:
                self.due.pop(key, None)
            else:
                self.due[key] = now + max(after, 0.0)
            self._set_evaluation(key, outcome.evaluate_after, now)

    def _set_evaluation(self, key: Key, after: float | None, now: float) -> None:
        """Called with the lock held."""
        if after is None:
            self.evaluation_due.pop(key, None)
        else:
            self.evaluation_due[key] = now + max(after, 0.0)

    def forget(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self.lock:
            for table in (self.due, self.seen, self.evaluation_due):
                table.pop(key, None)
            self.known.discard(key)
            self.again.discard(key)
            self.failures.pop(key, None)
        self.reconciler.forget(namespace, name)
        if self.autoscaler is not None:
            self.autoscaler.forget(namespace, name)

    def _loop(self) -> None:
        while not self.stop.wait(self.config.tick_seconds):
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        """Start what is due: resyncs on the pool, energy evaluations on theirs."""
        with self.lock:
            ready = [
                k for k in self.known
                if k not in self.inflight and (
                    now >= self.due.get(k, float("inf"))
                    or now - self.seen.get(k, 0.0) >= self.config.resync_seconds
                )
            ]  # fmt: skip
            self.inflight.update(ready)
            evaluate = [
                k for k, at in self.evaluation_due.items()
                if now >= at and k not in self.evaluating
            ]  # fmt: skip
            self.evaluating.update(evaluate)
        for key in ready:
            self._submit(self.pool, self._resync, key, self.inflight)
        for key in evaluate:
            self._submit(self.evaluations, self._evaluate, key, self.evaluating)

    def _submit(
        self, pool: ThreadPoolExecutor, work: Callable[[Key], None], key: Key, marks: set[Key]
    ) -> None:
        try:
            pool.submit(work, key)
        except RuntimeError:  # shut down by kopf's cleanup between the tick and here
            with self.lock:
                marks.discard(key)
            if not self.stop.is_set():
                raise

    def _evaluate(self, key: Key) -> None:
        after: float | None = None
        try:
            if self.autoscaler is not None:
                after = self.autoscaler.evaluate(*key)
        except Exception:  # retried after a while (the job's own interval is not known here)
            metrics.RECONCILE_ERRORS.labels(loop="energy").inc()
            log.exception("evaluating %s/%s failed", *key)
            after = self.config.resync_seconds
        finally:
            with self.lock:
                self.evaluating.discard(key)
                if key in self.known:
                    self._set_evaluation(key, after, time.monotonic())

    def _resync(self, key: Key, cached: bool = False) -> None:
        try:
            self.run(*key, cached=cached)
            with self.lock:
                self.failures.pop(key, None)
        except Exception:
            log.exception("reconciling %s/%s failed", *key)
            # Retried soon, then less often (0.5 s doubling, up to the resync period), as
            # client-go's workqueue does: an API server back after a restart is seen within
            # a second, not at the next resync.
            with self.lock:
                failed = self.failures.get(key, 0) + 1
                self.failures[key] = failed
                if key in self.known:
                    retry = min(RETRY_FIRST_SECONDS * 2 ** (failed - 1), self.config.resync_seconds)
                    self.due[key] = time.monotonic() + retry
        finally:
            with self.lock:
                again = key in self.again and key in self.known
                self.again.discard(key)
                if not again:
                    self.inflight.discard(key)
            if again:  # still marked in flight: nothing else starts it meanwhile
                self._submit(self.pool, self._triggered, key, self.inflight)


def register(
    reconciler: Reconciler, config: OperatorConfig, autoscaler: Autoscaler | None = None
) -> Scheduler:
    scheduler = Scheduler(reconciler, config, autoscaler)

    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = logging.WARNING  # our Events say what was decided
        settings.execution.max_workers = config.workers
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        # An API server back after a restart is found within a second or two (kopf's own
        # default starts at 1, 1, 2, 3, 5 s), and one away for long is still waited for.
        settings.networking.error_backoffs = (0.5, 0.5, 1, 1, 2, 2, 3, 5, 8, 13, 21, 34)
        scheduler.thread.start()
        if scheduler.pod_cache is not None:
            scheduler.pod_cache.start()

    @kopf.on.cleanup()
    def shutdown(**_: Any) -> None:
        scheduler.stop.set()
        if scheduler.pod_cache is not None:
            scheduler.pod_cache.stop.set()
        scheduler.pool.shutdown(wait=False, cancel_futures=True)
        scheduler.evaluations.shutdown(wait=False, cancel_futures=True)

    # On the event loop, not in kopf's thread pool: it only records the body and queues a
    # reconcile (in-memory, under locks held for microseconds), so a thread hop per event
    # would cost more than it does, and idle pool threads hold memory.
    @kopf.on.event(GROUP, VERSION, PLURAL)
    async def job_event(event: dict[str, Any], name: str, namespace: str, **_: Any) -> None:
        if event.get("type") == "DELETED":
            scheduler.forget(namespace, name)  # the garbage collector takes the children
            return
        if event.get("object"):
            reconciler.api.remember_job(event["object"])
        scheduler.trigger(namespace, name)

    return scheduler
