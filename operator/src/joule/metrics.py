"""Every metric the operator exports, in one place (names follow Prometheus conventions:
``joule_operator_<what>_<unit>``, counters end in ``_total``)."""

from __future__ import annotations

import threading
from collections import Counter as _Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILE_SECONDS = Histogram(
    "joule_operator_reconcile_duration_seconds",
    "Time to reconcile one TrainingJob (read, decide, act, write status)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_CONFLICTS = Counter(
    "joule_operator_reconcile_conflicts_total",
    "Status writes refused because the job changed meanwhile (the reconcile is redone)",
)
RECONCILE_TRIGGERS = Counter(
    "joule_operator_reconcile_triggers_total",
    "Reasons to reconcile a job (its watch events, its pods' changes): started at once, or "
    "coalesced into the one queued behind a reconcile in flight",
    ["outcome"],
)
POD_CACHE_PODS = Gauge(
    "joule_operator_pod_cache_pods",
    "Worker pods held in the operator's pod cache (from its label-selected watch)",
)
EVENTS_DROPPED = Counter(
    "joule_operator_events_dropped_total",
    "Events not posted because their job had used its rate (25 at once, then one per 10 s); "
    "each is still logged, and status and the joule_job_* series still record it",
)
DECISIONS = Counter(
    "joule_operator_decisions_total",
    "Decisions the operator made and recorded as Events, by reason",
    ["reason"],
)
POLICY_DECISIONS = Counter(
    "joule_operator_policy_evaluations_total",
    "Scaling-policy evaluations, by the reason of the decision (Steady, ScaleUp, PowerCap...)",
    ["reason"],
)
RECONCILE_ERRORS = Counter(
    "joule_operator_reconcile_errors",
    "Reconciles (lifecycle) and evaluations (energy) that failed with an error; retried",
    ["loop"],
)
PODS_CREATED = Counter("joule_operator_pods_created_total", "Worker pods created")
PODS_DELETED = Counter("joule_operator_pods_deleted_total", "Worker pods deleted")
LEADER = Gauge(
    "joule_operator_leader",
    "1 while this replica reconciles (it holds the leader lease, or runs without election), "
    "0 while it waits as a standby",
)

ENERGY_SOURCE = Gauge(
    "joule_operator_energy_source_info",
    "Where this operator reads jobs' energy: node (the node agents), prometheus, or trainer "
    "(self-reported by Joule's trainer)",
    ["source"],
)


class JobPhases(Collector):
    """``joule_operator_jobs{phase}``: how many known jobs are in each phase, at scrape time."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("joule_operator_jobs", "TrainingJobs by phase", labels=["phase"])
        with self._lock:
            tally = _Tally(self._phases.values())
        for phase, count in sorted(tally.items()):
            family.add_metric([phase], count)
        yield family


JOBS = JobPhases()


def register(registry: CollectorRegistry = REGISTRY) -> None:
    from joule.job_metrics import JOB_SERIES

    registry.register(JOBS)
    registry.register(JOB_SERIES)
