"""`joule operator`: load credentials, serve metrics and probes, take the leader lease (when
electing), register handlers, run kopf; on SIGTERM stop reconciling, then release the lease.

Order matters: kopf and the resync thread start only once this replica holds the lease, and
the lease is handed back only after they have stopped, so two replicas never reconcile at once
(short of the lost-lease exit, which ends this process before a standby may take over).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from joule.config import OperatorConfig
from joule.constants import CREATE_FANOUT, GROUP, PLURAL, VERSION
from joule.health import InitialSync, Limits, ProbeServer, Vitals

if TYPE_CHECKING:
    from joule.handlers import Scheduler
    from joule.leader import LeaderElector

log = logging.getLogger("joule.runner")
Key = tuple[str, str]


@dataclass
class _Runtime:
    """What the probes read; written by the threads that own each part."""

    electing: bool
    elector: LeaderElector | None = None
    connected: bool = False  # without election: the first listing of jobs succeeded
    scheduler: Scheduler | None = None
    loop_beat: float | None = None
    kopf_ready: threading.Event | None = None
    synced: bool = False

    def vitals(self) -> Vitals:
        now = time.monotonic()
        elector = self.elector
        leading = elector.leading if elector is not None else True  # alone: always leads
        return Vitals(
            now=now,
            connected=self.connected or (elector is not None and elector.connected),
            leading=leading,
            electing=self.electing,
            elector_beat=elector.beat if elector is not None else None,
            renewing=elector.renewing() if elector is not None and leading else True,
            loop_beat=self.loop_beat,
            scheduler_alive=_scheduler_alive(self.scheduler),
            stalest=_stalest(self.scheduler),
            synced=self.synced and self.kopf_ready is not None and self.kopf_ready.is_set(),
        )


def _scheduler_alive(scheduler: Scheduler | None) -> bool | None:
    if scheduler is None or scheduler.thread.ident is None or scheduler.stop.is_set():
        return None  # not started yet, or stopping on purpose
    return scheduler.thread.is_alive()


def _stalest(scheduler: Scheduler | None) -> tuple[str, float] | None:
    if scheduler is None:
        return None
    # Copies without the scheduler's lock: a probe must answer even when that lock is stuck
    # (which is one of the things it detects). dict.copy and set.copy are atomic under the GIL.
    seen = scheduler.seen.copy()
    known = scheduler.known.copy()
    times = [(at, key) for key in known if (at := seen.get(key)) is not None]
    if not times:
        return None
    at, (namespace, name) = min(times)
    return f"{namespace}/{name}", at


def run_operator(config: OperatorConfig) -> None:
    import kopf
    from kubernetes import client
    from kubernetes import config as kube_config
    from prometheus_client import start_http_server

    from joule import handlers, metrics
    from joule.autoscaler import Autoscaler, NodeAgents
    from joule.kube import JobApi
    from joule.leader import LeaderElector, LeaseLock
    from joule.lifecycle import Reconciler
    from joule.metrics import LEADER
    from joule.podcache import PodCache
    from joule.prometheus_energy import configured

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        kube_config.load_kube_config()  # KUBECONFIG or ~/.kube/config
    kopf.configure(
        log_format=kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.PLAIN,
        verbose=False,
    )
    logging.getLogger("joule").setLevel(logging.INFO)
    # kopf logs every handler run at INFO; our reconcile logs what was decided instead.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api_client = client.ApiClient(api_configuration(config.workers))
    runtime = _Runtime(electing=config.leader_elect)

    # Both servers come up before the election: a standby answers its probes and exports
    # joule_operator_leader 0.
    metrics.register()
    if config.metrics_port:
        start_http_server(config.metrics_port, addr="0.0.0.0")
        log.info("metrics on :%d/metrics", config.metrics_port)
    if config.health_port:
        limits = Limits.for_periods(config.resync_seconds, config.lease_duration_seconds)
        ProbeServer(config.health_port, runtime.vitals, limits).start()

    # SIGTERM before kopf runs (a standby, or a leader still starting) ends the wait; once
    # kopf runs it installs its own handler, and _operate stops kopf if this event was set in
    # the moment between the two.
    terminating = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: terminating.set())

    elector: LeaderElector | None = None
    if config.leader_elect:
        identity = config.identity or f"{socket.gethostname()}-{os.getpid()}"
        # A client of its own: renewals never queue behind the reconcilers' connections.
        lock = LeaseLock(
            client.CoordinationV1Api(client.ApiClient()), config.lease_namespace, config.lease_name
        )
        elector = LeaderElector(
            lock,
            identity,
            lease_duration=config.lease_duration_seconds,
            renew_deadline=config.renew_deadline_seconds,
            retry_period=config.retry_period_seconds,
            on_lost=lambda reason: _exit_lost(reason, identity),
        )
        runtime.elector = elector
        if not elector.acquire(until=terminating):
            log.info("SIGTERM while waiting for lease %s: stopped (%s)", lock, identity)
            return
        elector.start_renewing()
    else:
        LEADER.set(1)

    scheduler: Scheduler | None = None
    try:
        api = JobApi(api_client)
        agents = prometheus = None
        api.trainer_limits = config.energy_source == "trainer"
        if config.job_network_policy is not None:
            api.metrics_from = list(config.job_network_policy)
        if config.energy_source != "trainer" and config.node_agents:
            agents = NodeAgents(
                config.node_agent_namespace, config.node_agent_selector, config.node_agent_port
            )
        if config.energy_source == "prometheus":
            prometheus = configured(
                config.prometheus_url, config.prometheus_preset, config.prometheus_query,
                config.prometheus_pod_label, config.prometheus_counter,
            )  # fmt: skip
        log.info("energy source: %s", config.energy_source)
        metrics.ENERGY_SOURCE.labels(source=config.energy_source).set(1)
        autoscaler = Autoscaler(api, agents, prometheus)
        scheduler = handlers.register(Reconciler(api), config, autoscaler)
        # Reconciles read pods from this watch; each change of a job's pods reconciles it.
        api.pod_cache = PodCache(api.core, config.namespaces, scheduler.trigger)
        scheduler.pod_cache = api.pod_cache
        runtime.scheduler = scheduler
        runtime.kopf_ready = threading.Event()
        custom = client.CustomObjectsApi(api_client)
        threading.Thread(
            target=_track_initial_sync,
            args=(runtime, scheduler, lambda: _list_jobs(custom, config.namespaces), terminating),
            name="joule-initial-sync",
            daemon=True,
        ).start()
        # What is loaded by now (the Kubernetes client, kopf, aiohttp: ~65k objects) lives
        # as long as the process: kept out of the collector's full passes, each of which
        # would walk it again (17 ms each, a pause in whatever reconcile is running).
        gc.freeze()
        if not terminating.is_set():
            asyncio.run(_operate(config, runtime, terminating))
    finally:
        if elector is not None:
            if scheduler is not None:
                _drain(scheduler, timeout=5.0)
            elector.release()


# Besides the reconcile workers: the parallel creates of a batch of workers, the
# autoscaler's reads and the initial-sync listing.
POOL_SPARE = 4 + CREATE_FANOUT


def api_configuration(workers: int) -> Any:
    """The loaded client configuration with a connection pool for every worker: the
    client's default (5 per CPU) is smaller than 16 workers on 2 cores, and each worker
    over it opens and drops a connection per call ("Connection pool is full")."""
    from kubernetes import client

    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = max(
        workers + POOL_SPARE, configuration.connection_pool_maxsize or 0
    )
    return configuration


async def _operate(config: OperatorConfig, runtime: _Runtime, terminating: threading.Event) -> None:
    import kopf

    async def heartbeat() -> None:  # the liveness probe's view of kopf's event loop
        while True:
            runtime.loop_beat = time.monotonic()
            await asyncio.sleep(1.0)

    operator = asyncio.create_task(
        kopf.operator(
            clusterwide=not config.namespaces,
            namespaces=list(config.namespaces),
            standalone=True,
            ready_flag=runtime.kopf_ready,
        )
    )
    loop = asyncio.get_running_loop()

    async def relay() -> None:
        # A SIGTERM caught by our handler (in force until kopf installs its own) stops kopf.
        # Not through kopf's stop_flag: kopf leaves the flag's waiter pending when a signal
        # stops it, then waits 5 s for that "hung" task, which delays the lease's release.
        await loop.run_in_executor(None, terminating.wait)
        operator.cancel()  # nothing to do if kopf has already finished

    # Created before kopf spawns its tasks, so kopf's shutdown leaves these alone.
    helpers = [asyncio.create_task(heartbeat()), asyncio.create_task(relay())]
    try:
        await operator
    except asyncio.CancelledError:
        if not terminating.is_set():
            raise
    finally:
        runtime.loop_beat = None
        terminating.set()  # ends the relay's executor thread, which asyncio.run joins
        for task in helpers:
            task.cancel()


def _exit_lost(reason: str, identity: str) -> None:
    """Stop reconciling at once, as controller-runtime does: a standby may take the lease
    from now on, and kopf's threads cannot all be stopped in time; the restarted pod comes
    back as a standby."""
    log.critical(
        "lost leadership as %s: %s; exiting so that this pod restarts as a standby",
        identity,
        reason,
    )
    for handler in logging.getLogger().handlers + logging.getLogger("joule").handlers:
        handler.flush()
    os._exit(1)


def _list_jobs(custom: Any, namespaces: tuple[str, ...]) -> set[Key]:
    from joule.kube import API_TIMEOUT

    if namespaces:
        items = [
            item
            for namespace in namespaces
            for item in custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _request_timeout=API_TIMEOUT
            ).get("items", [])
        ]
    else:
        body = custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, _request_timeout=API_TIMEOUT
        )
        items = body.get("items", [])
    return {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items}


def _track_initial_sync(
    runtime: _Runtime,
    scheduler: Scheduler,
    list_jobs: Callable[[], set[Key]],
    stop: threading.Event,
) -> None:
    """Mark the replica synced once each job listed at the start has been reconciled (or is
    gone); lists again now and then, since a job deleted before kopf listed it never is."""
    sync: InitialSync | None = None
    last_list = 0.0
    while not stop.wait(0.5):
        try:
            if sync is None or time.monotonic() - last_list > 10.0:
                existing = list_jobs()
                last_list = time.monotonic()
                runtime.connected = True
                if sync is None:
                    sync = InitialSync(existing)
                    continue
                sync.update((), existing)
            if sync.update(scheduler.seen.copy()):
                runtime.synced = True
                log.info("reconciled every job of the first listing: ready")
                return
        except Exception as exc:
            log.warning("listing TrainingJobs for readiness failed: %s", exc)


def _drain(scheduler: Scheduler, timeout: float) -> None:
    """Let in-flight reconciles finish before the lease goes to another replica."""

    def wait() -> None:
        scheduler.pool.shutdown(wait=True, cancel_futures=True)
        scheduler.evaluations.shutdown(wait=True, cancel_futures=True)

    waiter = threading.Thread(target=wait, name="joule-drain", daemon=True)
    waiter.start()
    waiter.join(timeout)
