"""The energy and scaling loop: reads a job's workers, accounts their energy, asks the policy,
and writes the target (size, per-GPU power limit) to the job's status.

It runs every ``evaluationIntervalSeconds`` for jobs with a scaling policy or an energy
limit, and for jobs with a hang timeout, whose progress it records (``joule.hang``), apart
from the lifecycle reconciler (``lifecycle``) and under a lock of its own, so a slow or hung
worker costs this loop one scrape deadline and never holds the job's pods. It changes no
pod: the status write it makes is a watch event, and the lifecycle reconciler then makes the
pods match the new target (or restarts the hung ones). Per-worker counters and measured
rates are kept in a ConfigMap the job owns (``builders.bookkeeping``); status shows the
totals.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from joule import metrics
from joule.agent_metrics import LimitReport, limit_report, parse_agent_metrics
from joule.agent_metrics import counter_key as gpu_counter_key
from joule.api.events import Event, fmt_time
from joule.api.types import JobRef, SpecError, TrainingJobSpec
from joule.builders.template import placement
from joule.capacity import Capacity
from joule.constants import METRICS_PORT
from joule.hang import observe, watched
from joule.job_metrics import JOB_SERIES
from joule.kube import Conflict, JobApi
from joule.observe import PodView
from joule.prometheus_energy import PromQuery, QueryError, Series, query_energy
from joule.reconcile import conditions, desired_replicas, power_limit
from joule.scaling import (
    Measured,
    counter_key,
    evaluate,
    merge_energy,
    next_evaluation,
    split_energy,
)
from joule.scrape import Parse, Result, Target, scrape, scrape_all
from joule.staging import PROGRESS_SECONDS, parse_progress, staging
from joule.trainer_metrics import parse_privacy_metrics, parse_trainer_metrics, samples_parser

log = logging.getLogger("joule.autoscaler")
# One evaluation waits this long, in all, for the workers' /metrics.
SCRAPE_DEADLINE_SECONDS = 5.0
ONE_POD_SCRAPE_SECONDS = 2.0  # a figure for status (staged bytes, epsilon): late is no harm
NO_PROGRESS = (
    "no worker reports samples (joule_trainer.report): the policy sees energy and GPU "
    "utilisation only"
)


@dataclass(frozen=True)
class NodeAgents:
    """Where the node agents run, whose readings are the jobs' energy."""

    namespace: str
    selector: str
    port: int


class Autoscaler:
    """Evaluates one job at a time per job (a lock each), any number in parallel.
    Energy comes from ``prometheus`` where given, else from the node ``agents``, else from
    the trainers' self-report."""

    def __init__(
        self, api: JobApi, agents: NodeAgents | None = None, prometheus: PromQuery | None = None
    ) -> None:
        self.api = api
        self.agents = agents  # they set power limits and confirm them
        self.prometheus = prometheus  # energy from a query, where set; else from the agents
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._locks.pop((namespace, name), None)

    def evaluate(self, namespace: str, name: str) -> float | None:
        """Evaluate the job if it is due; returns the seconds until it is due again (None:
        not while it stays as it is: no policy or limit, not running, or gone)."""
        with self._guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        with lock:
            for _ in range(2):  # a conflict: the lifecycle wrote meanwhile; once more, fresh
                try:
                    return self._evaluate_once(namespace, name)
                except Conflict:
                    metrics.RECONCILE_CONFLICTS.inc()
            return 0.0

    def _evaluate_once(self, namespace: str, name: str) -> float | None:
        api = self.api
        body = api.get_job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        job = JobRef.from_body(body)
        try:
            spec = TrainingJobSpec.parse(body.get("spec") or {}, name=job.name)
        except SpecError:
            return None  # the lifecycle reconciler says why in status
        status = body.get("status") or {}
        now = api.clock()
        due = next_evaluation(spec, status, now)
        if due is None or due > 0:
            return due
        if staging(status):
            return self._staging_progress(body, job, status, now)
        pods = api.pods(job)
        privacy = self._privacy_spent(spec, status, pods, now)
        if privacy is not None:
            status = {**status, "privacy": privacy}  # written with whatever else is
        if not spec.managed:
            return self._watch_progress(body, job, spec, status, pods, now)
        kept, version = api.bookkeeping(job)
        merged = {**status, "energy": merge_energy(status.get("energy") or {}, kept)}
        generation = body["metadata"].get("generation", 1)
        new, events = self._assess(job, spec, merged, pods, now, generation)
        shown, kept = split_energy(new.get("energy") or {})
        new["energy"] = shown
        # The bookkeeping first: it holds the counters with the joules they added, so a
        # crash before the status write only leaves status one evaluation behind.
        api.write_bookkeeping(job, kept, version)
        api.write_status(body, new)
        for event in events:
            api.post_event(job, event)
            metrics.DECISIONS.labels(reason=event.reason).inc()
            JOB_SERIES.decided(namespace, name, event.reason)
        return next_evaluation(spec, new, now)

    def _privacy_spent(
        self, spec: TrainingJobSpec, status: dict[str, Any], pods: list[PodView], now: dt.datetime
    ) -> dict[str, Any] | None:
        """spec.privacy, while the job trains: the epsilon rank 0 says it has spent, for
        status.privacy (checkedAt even where it could not be read: it is due again later)."""
        if spec.privacy is None or status.get("phase") not in ("Running", "Resizing"):
            return None
        host = next((p for p in pods if p.index == 0), None)
        return _read_into(status.get("privacy") or {}, host, parse_privacy_metrics, now)

    def _staging_progress(
        self, body: dict[str, Any], job: JobRef, status: dict[str, Any], now: dt.datetime
    ) -> float:
        """spec.data: the running staging pod's gauges (bytes and files staged, of how many)
        into status.data, every few seconds until the lifecycle sees it finish."""
        data = _read_into(status["data"], self.api.stage_pod(job), parse_progress, now)
        self.api.write_status(body, {**status, "data": data})
        return PROGRESS_SECONDS

    def _watch_progress(
        self,
        body: dict[str, Any],
        job: JobRef,
        spec: TrainingJobSpec,
        status: dict[str, Any],
        pods: list[PodView],
        now: dt.datetime,
    ) -> float | None:
        """A job watched for hangs alone (no policy, no energy limit): read its workers'
        samples and record them (status.progress); no energy, no policy, no bookkeeping."""
        record = None
        if watched(spec, status):
            workers, _, expected = self._read_workers(spec, pods, progress_only=True)
            record = observe(spec, status, progress_samples(workers, expected), now)
        new = status if record is None else {**status, "progress": record}
        if new != (body.get("status") or {}):  # a hang record, or the epsilon spent
            self.api.write_status(body, new)
        return next_evaluation(spec, new, now)

    def _assess(
        self,
        job: JobRef,
        spec: TrainingJobSpec,
        status: dict[str, Any],
        pods: list[PodView],
        now: dt.datetime,
        generation: int,
    ) -> tuple[dict[str, Any], list[Event]]:
        """Read the job's meters, account energy, ask the policy: the new status and the
        Events that explain it (posted once it is stored)."""
        workers, names, expected = self._read_workers(spec, pods)
        trainers = []
        for key, result in workers.items():
            if result.reading is not None:
                uid, rank = key.split("/")
                trainers.append((counter_key(uid, int(rank), result.reading), result.reading))
        limits: LimitReport | None = None
        if self.agents is None and self.prometheus is None:
            measured = Measured.from_trainers(trainers)
            unread = sorted(
                f"{names[k]}: {r.error}" for k, r in workers.items() if r.error and k in expected
            )
            complete = not unread
        else:
            if self.agents is not None:
                measured, unread, complete, limits = self._read_agents(
                    self.agents, spec, status, pods, trainers
                )
            elif any(p.ready and p.active for p in pods):
                limits = LimitReport(False)  # no agents: no limit is ever confirmed
            if self.prometheus is not None:
                util = measured.utilization if self.agents is not None else None
                measured, unread, complete = self._read_prometheus(
                    self.prometheus, job, pods, trainers
                )
                measured = replace(measured, utilization=util)  # the agents' GPU utilisation
        running = sum(1 for p in pods if p.ready and p.active)
        # A round that missed a worker says nothing about the job's rate at this size.
        phase = status.get("phase")
        steady = phase == "Running" and running == desired_replicas(spec, status) and complete
        try:
            room = self.api.capacity()
        except Exception:  # the accounting must go on: without the cluster's view, no room
            log.warning("could not read the cluster's free GPUs", exc_info=True)
            room = Capacity((), waiting_gpus=0, total_gpus=0, jobs=0)
        # The template's nodeSelector and tolerations count too: its workers go where both say.
        cluster = room.view_for(spec.gpus_per_replica, *placement(spec.pod))
        result = evaluate(
            spec, status, measured, cluster, now, running, steady,
            # The job's pods, and the deleted ones whose last joules were still read.
            alive={p.uid for p in pods} | {k.split("/", 1)[0] for k in measured.joules},
            limits=limits,
        )  # fmt: skip
        metrics.POLICY_DECISIONS.labels(reason=result.decision.reason).inc()
        st = dict(result.status)
        record = observe(spec, status, progress_samples(workers, expected), now)
        if record is not None:
            st["progress"] = record
        if unread:
            st["metricsError"] = "; ".join(unread)[:1024]
        else:
            st.pop("metricsError", None)
        # The conditions that follow from this decision, in the same write: a reader never
        # sees a decision over the cap with a PowerCapExceeded condition still False.
        st["conditions"] = conditions(st, generation, st.get("conditions", []), now)
        return st, list(result.events)

    def _read_workers(
        self, spec: TrainingJobSpec, pods: list[PodView], progress_only: bool = False
    ) -> tuple[dict[str, Result], dict[str, str], set[str]]:
        """Every worker process's /metrics: results by "<pod uid>/<rank>", their names, and
        the keys that must answer (running, ready, not on their way out). With energy from
        outside the workers, or none read (``progress_only``), a script's own samples
        counter (spec.progress) may stand in for joule_trainer's series."""
        own = self.agents or self.prometheus or progress_only
        progress = spec.progress if own else None
        parse = parse_trainer_metrics
        if progress is not None and progress.samples_metric:
            parse = samples_parser(progress.samples_metric)
        # One endpoint per pod where the spec names its port; else one per process.
        ranks = 1 if progress is not None and progress.port else spec.nproc_per_node
        # Every process that runs, including workers on their way out: a terminating pod's
        # last reading still counts (it trains until SIGTERM and checkpoints after it).
        targets, names, expected = [], {}, set()
        for pod in pods:
            if not pod.ip or pod.phase != "Running":
                continue
            for rank in range(ranks):
                port = progress.port if progress is not None and progress.port else None
                targets.append(Target(f"{pod.uid}/{rank}", pod.ip, port or METRICS_PORT + rank))
                names[targets[-1].key] = f"{pod.name} rank {rank}"
                if pod.ready and pod.active:  # one on its way out may have stopped serving
                    expected.add(targets[-1].key)
        return scrape_all(targets, SCRAPE_DEADLINE_SECONDS, parse=parse), names, expected

    def _read_prometheus(
        self,
        query: PromQuery,
        job: JobRef,
        pods: list[PodView],
        trainers: list[tuple[str, Any]],
    ) -> tuple[Measured, list[str], bool]:
        """Energy from the cluster's Prometheus, for the workers that run."""
        running = [p for p in pods if p.phase == "Running"]
        found: dict[str, list[Series]] = {}
        unread: list[str] = []
        if running:
            try:
                found = query_energy(
                    query, job.namespace, [p.name for p in running], SCRAPE_DEADLINE_SECONDS
                )
            except QueryError as exc:
                unread.append(str(exc))
        joules: dict[str, float] = {}
        complete = not unread
        for pod in running:
            # A namesake's series (the worker this one replaced) is not this pod's.
            series = [x for x in found.get(pod.name, []) if x.uid in (None, pod.uid)]
            if not series and pod.ready and pod.active:
                complete = False  # not scraped yet, or the query misses it
            for x in series:
                joules[f"{pod.uid}/{x.key}"] = x.joules
        measured = Measured(
            joules=joules,
            samples={key: r.samples for key, r in trainers},
            source="prometheus",
            meter=query.meter,
            progress="reported by the workers" if trainers else NO_PROGRESS,
            baseline_new=query.counter == "device",
        )
        return measured, unread, complete

    def _read_agents(
        self,
        agents: NodeAgents,
        spec: TrainingJobSpec,
        status: dict[str, Any],
        pods: list[PodView],
        trainers: list[tuple[str, Any]],
    ) -> tuple[Measured, list[str], bool, LimitReport | None]:
        """Energy from the node agents of the nodes the job's workers run on; samples from
        the workers that report them (any script can: ``joule_trainer.report``). Returns
        the measurement, what could not be read, whether every worker was measured, and
        what the agents report of the job's power limit."""
        running = [p for p in pods if p.phase == "Running" and p.node]
        try:
            where = self.api.node_agents(agents.namespace, agents.selector)
        except Exception:
            log.warning("could not list the node agents", exc_info=True)
            where = {}
        # Every node one of the job's pods is on, finished or on its way out too: the agent
        # keeps a pod's last joules a while after it lets go of its GPU.
        nodes = sorted({p.node for p in pods if p.node})
        needed = {p.node for p in running}
        unread = [
            f"node {n}: no node agent runs there" for n in nodes if n not in where and n in needed
        ]
        targets = [Target(n, where[n], agents.port) for n in nodes if n in where]
        results = scrape_all(targets, SCRAPE_DEADLINE_SECONDS, parse=parse_agent_metrics)
        unread += sorted(
            f"node agent on {k}: {r.error}"
            for k, r in results.items()
            if r.error is not None and k in needed
        )
        joules: dict[str, float] = {}
        util: list[float] = []
        meters: set[str] = set()
        complete = not unread
        gpus = []
        readings = {n: r.reading for n, r in results.items() if r.reading is not None}
        for pod in pods:
            reading = readings.get(pod.node or "")
            is_running = pod.phase == "Running" and pod.node is not None
            if reading is None:
                if is_running:
                    complete = False
                    if pod.ready and pod.active:
                        gpus.append((pod.name, ()))  # no agent: no limit can be confirmed
                continue
            rows = reading.pods.get(pod.uid, ())
            for row in rows:
                joules[gpu_counter_key(pod.uid, row)] = row.joules
            if not is_running:
                continue  # its last joules count; nothing else is asked of it
            meters.add(reading.meter)
            blind = reading.unmeasured.get(pod.uid, ())
            if blind:
                unread.append(
                    f"{pod.name}: its node agent cannot measure {', '.join(blind)} (NVML does "
                    "not list it: a MIG slice, or a GPU the agent cannot see)"
                )
            if pod.ready and pod.active:
                gpus.append((pod.name, rows))
            if spec.gpus_per_replica and len(rows) < spec.gpus_per_replica and pod.active:
                complete = False  # the agent has not seen this worker's GPUs yet
            util += [row.utilization for row in rows if row.utilization is not None]
        # Workers already deleted whose counters the job keeps: their agent still reports
        # their last joules for a while (counted once: the counter is carried, not new).
        kept = {k.split("/", 1)[0] for k in (status.get("energy") or {}).get("counters", {})}
        for uid in kept - {p.uid for p in pods}:
            for reading in readings.values():
                for row in reading.pods.get(uid, ()):
                    joules[gpu_counter_key(uid, row)] = row.joules
        measured = Measured(
            joules=joules,
            samples={key: r.samples for key, r in trainers},
            source="node",
            meter=",".join(sorted(meters)) or None,
            utilization=sum(util) / len(util) if util else None,
            # Energy comes from the node; progress only from workers that report it.
            progress="reported by the workers" if trainers else NO_PROGRESS,
        )
        limits = limit_report(power_limit(spec, status), gpus) if gpus else None
        return measured, unread, complete, limits


def progress_samples(workers: dict[str, Result], expected: set[str]) -> float | None:
    """The samples counters of the workers that must answer, summed; None unless every one
    of them answered (one missing from the sum would read as progress, or its loss)."""
    if not expected or any(k not in workers or workers[k].error is not None for k in expected):
        return None
    return sum(workers[k].reading.samples for k in expected if workers[k].reading is not None)


def _read_into(
    held: dict[str, Any], pod: PodView | None, parse: Parse, now: dt.datetime
) -> dict[str, Any]:
    """``held`` (a part of status) with what ``parse`` reads from the running pod's /metrics,
    and checkedAt: set even where nothing could be read, as the read is due again later."""
    out = {**held, "checkedAt": fmt_time(now)}
    if pod is not None and pod.phase == "Running" and pod.ip:
        end = time.monotonic() + ONE_POD_SCRAPE_SECONDS
        result = scrape(pod.ip, METRICS_PORT, end, parse=parse)
        if result.reading:
            out.update(result.reading)
    return out
