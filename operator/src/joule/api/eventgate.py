"""Which of a job's Events become API calls, and which kind. Pure (the caller gives the time).

As client-go's EventCorrelator does for every controller: an Event the same as one posted for
the job in the last ``DEDUP_SECONDS`` (type, reason and message) is counted on that Event
(``count`` and ``lastTimestamp``, one PATCH) instead of making another object; and each job
may make ``BURST`` calls at once, then one per ``REFILL_SECONDS``. What is over that is
dropped and counted (``joule_operator_events_dropped_total``): Events explain, status and
the job's series are the record, so a flapping job cannot flood the API server and etcd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from joule.api.events import Event

DEDUP_SECONDS = 600.0
BURST = 25
REFILL_SECONDS = 10.0
JobKey = tuple[str, str, str]  # namespace, name, uid: a namesake job starts afresh


@dataclass(frozen=True)
class Verdict:
    action: Literal["create", "count", "drop"]
    name: str | None = None  # the Event to count on
    count: int = 1  # its count after this one


@dataclass
class _Posted:
    name: str
    count: int
    at: float  # when it was made (the window runs from there)


class EventGate:
    """Per job: a token bucket and the Events made in the last ten minutes."""

    def __init__(self) -> None:
        self._tokens: dict[JobKey, tuple[float, float]] = {}  # tokens, when last refilled
        self._posted: dict[tuple[JobKey, str, str, str], _Posted] = {}

    def admit(self, job: JobKey, event: Event, now: float) -> Verdict:
        tokens, at = self._tokens.get(job, (float(BURST), now))
        tokens = min(float(BURST), tokens + (now - at) / REFILL_SECONDS)
        if tokens < 1.0:
            self._tokens[job] = (tokens, now)
            return Verdict("drop")
        self._tokens[job] = (tokens - 1.0, now)
        same = self._posted.get((job, event.type, event.reason, event.message))
        if same is not None and now - same.at < DEDUP_SECONDS:
            same.count += 1
            return Verdict("count", same.name, same.count)
        return Verdict("create")

    def made(self, job: JobKey, event: Event, name: str, now: float) -> None:
        """An Event object was created under ``name``: later ones like it count on it."""
        self._posted[(job, event.type, event.reason, event.message)] = _Posted(name, 1, now)
        if len(self._posted) > 4 * BURST * max(len(self._tokens), 1):  # now and then
            self._posted = {k: p for k, p in self._posted.items() if now - p.at < DEDUP_SECONDS}

    def forget(self, namespace: str, name: str) -> None:
        """The job is gone: its tables go too."""
        for key in [k for k in self._tokens if k[:2] == (namespace, name)]:
            del self._tokens[key]
        self._posted = {k: p for k, p in self._posted.items() if k[0][:2] != (namespace, name)}
