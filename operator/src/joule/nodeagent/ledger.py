"""Which pod used how many joules of which GPU. Pure.

A GPU's NVML energy counter runs from driver load and spans every tenant, so a pod's energy
is the counter's increase while the pod held the GPU: a pod's record starts at 0 when the
agent first sees it hold the GPU, and each update adds the counter's increase since the last
(split evenly among pods that share a GPU by time-slicing). The ledger is written to the
node's disk after every update, so an agent that restarts continues each record from the
counter value it last saw: the energy used while it was down is still the pod's. A counter
that went down was reset (the driver reloaded): its value since the reset is added. A GPU
without an energy counter (before Volta) is sampled: power x time since the last update.

Each record carries ``since``, when its accounting began: a record started afresh (the
ledger was lost) has a new ``since``, and the operator takes it for a new counter rather
than one that went backwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Holder:
    """A pod that holds a GPU now."""

    uid: str
    namespace: str
    name: str
    job: str = ""  # its TrainingJob's name, where it is a Joule worker


@dataclass(frozen=True)
class Record:
    """One pod's use of one GPU."""

    uid: str
    namespace: str
    pod: str
    job: str
    gpu: str
    since: float  # unix seconds: when this record's accounting began
    joules: float = 0.0
    last_counter: float | None = None  # the GPU's counter (J) at the last update
    last_time: float | None = None  # unix seconds of the last update
    sampled: bool = False  # from power samples (no energy counter on this GPU)
    ended: float | None = None  # unix seconds: when the pod was first seen not holding it

    @property
    def key(self) -> tuple[str, str]:
        return self.uid, self.gpu


# How long a record stays, final, after its pod let go of the GPU: the operator's next
# evaluation (every 30 s by default) still reads the pod's last joules.
RETAIN_SECONDS = 300.0


@dataclass(frozen=True)
class Meter:
    """One GPU's reading at an update."""

    counter_joules: float | None  # NVML's total-energy counter; None where unsupported
    power_watts: float | None


def update(
    ledger: Mapping[tuple[str, str], Record],
    holders: Mapping[str, list[Holder]],
    meters: Mapping[str, Meter],
    now: float,
) -> dict[tuple[str, str], Record]:
    """The ledger after one update at ``now``: ``holders`` maps a GPU's UUID to the pods
    holding it, ``meters`` its reading (a GPU not read this time keeps its records as they
    are). A record of a pod that no longer holds its GPU stays, final, for RETAIN_SECONDS."""
    out: dict[tuple[str, str], Record] = {}
    for gpu, pods in holders.items():
        meter = meters.get(gpu)
        share = 1.0 / len(pods) if pods else 0.0
        for pod in pods:
            old = ledger.get((pod.uid, gpu))
            if old is None:
                old = Record(pod.uid, pod.namespace, pod.name, pod.job, gpu, since=now)
            if meter is None:
                out[old.key] = old
                continue
            out[old.key] = _advance(replace(old, ended=None), meter, now, share)
    for key, old in ledger.items():
        if key in out:
            continue
        ended = old.ended if old.ended is not None else now
        if now - ended < RETAIN_SECONDS:
            out[key] = replace(old, ended=ended)
    return out


def _advance(old: Record, meter: Meter, now: float, share: float) -> Record:
    counter = meter.counter_joules
    added = 0.0
    if counter is not None:
        last = old.last_counter
        if last is not None and not old.sampled:
            # A counter lower than before was reset (driver reload): it counts from 0 again.
            added = counter - last if counter >= last else counter
        return replace(
            old, joules=old.joules + added * share, last_counter=counter, last_time=now,
            sampled=False,
        )  # fmt: skip
    if meter.power_watts is not None and old.last_time is not None and now > old.last_time:
        added = meter.power_watts * (now - old.last_time)
    return replace(
        old, joules=old.joules + added * share, last_counter=None, last_time=now, sampled=True
    )


def rebooted(ledger: Mapping[tuple[str, str], Record]) -> dict[tuple[str, str], Record]:
    """The ledger after a reboot: the counters restarted from 0, so the next reading adds
    its whole value (a counter past the last one seen would otherwise add only the excess)."""
    return {key: replace(r, last_counter=0.0) if not r.sampled else r for key, r in ledger.items()}


def dump(ledger: Mapping[tuple[str, str], Record]) -> list[dict[str, Any]]:
    return [asdict(r) for r in ledger.values()]


def load(rows: Any) -> dict[tuple[str, str], Record]:
    """The ledger from ``dump``'s rows; rows that do not fit are dropped (a damaged file
    restarts those records, with a new ``since``, rather than stop the agent)."""
    out: dict[tuple[str, str], Record] = {}
    for row in rows if isinstance(rows, list) else []:
        try:
            record = Record(**row)
            float(record.joules), float(record.since)
        except (TypeError, ValueError):
            continue
        out[record.key] = record
    return out
