"""Hung workers: a job that trains no new sample for ``spec.progress.hangTimeoutSeconds`` is
restarted as a group. Pure.

The design, and why:

- Progress is the workers' samples counter (``joule_trainer_samples_total``, or the script's
  own, ``spec.progress.samplesMetric``), read by the energy and scaling loop, which already
  reads the workers' /metrics (``autoscaler``). That loop runs for jobs with a policy or an
  energy limit; a job with a hang timeout is read there too, for its progress only. The
  lifecycle reconciler never reads a worker: a hung one must not hold its pods.
- The loop records what it saw in ``status.progress`` (``observe``): the summed counters as
  last read from every worker, when that sum last changed (``lastProgressTime``), and when it
  last looked (``checkedAt``). ``reconcile.plan`` decides from that record alone (``hang``):
  hung when the last look found no change for the timeout. The verdict thus rests on a fresh
  reading, never on a clock that ran while nobody looked: an operator that was down for longer
  than the timeout does not restart a job that trained meanwhile (its sum moved), and plan()
  needs no timer of its own (the loop's status write is the watch event that wakes it).
- Only a reading of every worker can show that the sum changed (one worker missing from a
  sum is no progress); a worker that cannot be read therefore counts as not training, as a
  process stuck with the GIL held cannot serve /metrics either.
- The record lives only while the job is Running with every worker ready (``keep``): a
  resize, a restart, a suspension or a finish drops it, and the next look starts the clock
  again, so neither a start nor a re-formed group is taken for a hang.
- The restart releases the whole group (one hung rank holds every other in its collectives),
  counts against backoffLimit without a backoff wait (the timeout spaces hangs already), and
  says ``Hung`` (reason, Event ``WorkerHung``) until every worker runs again; the condition is
  Reconciling (it heals on its own, as BackingOff), and Stalled once backoffLimit is spent.
- Off by default: a job may rightly stand still for long (a first epoch's data preparation,
  a slow checkpoint, an evaluation), and a script that reports no samples at all would be
  restarted until it failed; the user who knows the job's rhythm chooses the timeout.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from joule.api.events import fmt_time, parse_time
from joule.api.types import TrainingJobSpec

STEADY_REASON = "AllWorkersRunning"  # the status reason of a Running job whose workers all run
CLOCK = ("samples", "lastProgressTime", "checkedAt")
ENDED = ("Succeeded", "Failed", "Suspended")  # phases in which no worker is restarted


def watched(spec: TrainingJobSpec, st: dict[str, Any]) -> bool:
    """Whether the job's progress is being timed now: a hang timeout is set and the job is
    Running with every worker ready (not starting, resizing or finishing)."""
    return (
        spec.progress.hang_timeout_seconds is not None
        and st.get("phase") == "Running"
        and st.get("reason") == STEADY_REASON
    )


def observe(
    spec: TrainingJobSpec, st: dict[str, Any], samples: float | None, now: dt.datetime
) -> dict[str, Any] | None:
    """The new ``status.progress`` after reading the workers at ``now``; ``samples``: their
    counters summed, None where not every worker could be read. None: nothing is timed."""
    if not watched(spec, st):
        return None
    record = dict(st.get("progress") or {})
    record.pop("hung", None)
    started = "lastProgressTime" not in record
    if started or (samples is not None and samples != record.get("samples")):
        # Changed, not only grown: a process restarted in place counts from zero again.
        record["lastProgressTime"] = fmt_time(now)
        if samples is not None:
            record["samples"] = samples
    record["checkedAt"] = fmt_time(now)
    return record


def hang(spec: TrainingJobSpec, st: dict[str, Any]) -> str | None:
    """Why the workers count as hung (for the Event and status), or None while they are not:
    the last look at them found no new sample for hangTimeoutSeconds."""
    timeout = spec.progress.hang_timeout_seconds
    record = st.get("progress") or {}
    last, checked = parse_time(record.get("lastProgressTime")), parse_time(record.get("checkedAt"))
    if timeout is None or last is None or checked is None or not watched(spec, st):
        return None
    still = (checked - last).total_seconds()
    if still < timeout:
        return None
    return (
        f"no new sample ({spec.progress.metric}) for {still:.0f}s, from "
        f"{record['lastProgressTime']} to {record['checkedAt']} "
        f"(hangTimeoutSeconds={timeout})"
    )


def keep(spec: TrainingJobSpec, st: dict[str, Any]) -> None:
    """Keep ``status.progress`` as far as it still holds: its clock while the job is timed,
    the hang being restarted until every worker runs again. Updates st."""
    record = dict(st.get("progress") or {})
    if spec.progress.hang_timeout_seconds is None or st.get("phase") in ENDED:
        record = {}
    elif watched(spec, st):
        record.pop("hung", None)  # the restart is over: every worker runs again
    else:
        record = {k: v for k, v in record.items() if k not in CLOCK}
    if record:
        st["progress"] = record
    else:
        st.pop("progress", None)


def restarting(st: dict[str, Any]) -> str | None:
    """The hang the workers are being restarted for, while they are."""
    return (st.get("progress") or {}).get("hung")
