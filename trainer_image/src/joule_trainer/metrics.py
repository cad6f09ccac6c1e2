"""The trainer's Prometheus metrics (one registry per process, served on /metrics).

Names follow the conventions: base units, ``_total`` counters. Every series carries job,
replica, rank and gpu; power and energy also carry the meter's ``source``, so an estimate is
never mistaken for a measurement. Samples and throughput are per process: sum over ranks for
the job's figure.

GPU utilisation and memory exist only once a meter has measured them (NVML): a series
exported before its first value would read 0, and the operator takes a 0 utilisation for an
idle GPU and shrinks the job. Absent means unknown.

A process without a meter (a user's own script calling ``joule_trainer.report``, whose energy
the node agent measures) exports no power or energy series at all, rather than a 0 joule
counter that would claim a source; nor a loss until it reports one.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from joule_trainer.energy.api import Reading

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry
    samples: Counter
    steps: Counter
    loss: Gauge | LateGauge
    step_seconds: Histogram
    throughput: Gauge
    world_size: Gauge
    # None without a meter (source None): no power or energy series at all.
    power: Gauge | None
    energy: Counter | None
    power_limit: Gauge | None
    labels: dict[str, str]
    # Created with their first measured value (see the module's docstring).
    gpu_utilization: Gauge | None = None
    gpu_memory: Gauge | None = None
    # The meter's energy already counted: the counter grows by each reading's increase.
    energy_seen_joules: float = 0.0
    # Differential privacy's epsilon: only where DP is on (see privacy()).
    epsilon: Gauge | None = None

    @classmethod
    def create(
        cls,
        job: str,
        replica: str,
        rank: int,
        gpu: str,
        source: str | None,
        *,
        loss_from_start: bool = True,
    ) -> TrainerMetrics:
        """The registry of one process. ``source`` names its meter; None: it has none, and
        exports no power or energy. ``loss_from_start=False``: the loss series appears with
        its first value, for a process that may never report one."""
        reg = CollectorRegistry()
        # process_start_time_seconds and friends: the operator tells a restarted process
        # (torchrun restarts crashed ones in place) from the one before by its start time.
        ProcessCollector(registry=reg)
        base = {"job": job, "replica": replica, "rank": str(rank), "gpu": gpu}
        names = list(base)

        def g(name: str, doc: str, extra: dict[str, str] | None = None) -> Gauge:
            return _gauge(reg, name, doc, {**base, **(extra or {})})

        loss_doc = "Mean training loss of the last global batch"
        src = {"source": source or ""}
        meter = source is not None
        return cls(
            registry=reg,
            samples=Counter(
                "joule_trainer_samples",
                "Training samples processed by this rank",
                names,
                registry=reg,
            ).labels(**base),
            steps=Counter(
                "joule_trainer_steps", "Optimizer steps completed", names, registry=reg
            ).labels(**base),
            loss=(
                g("joule_trainer_loss", loss_doc)
                if loss_from_start
                else LateGauge(reg, "joule_trainer_loss", loss_doc, base)
            ),
            step_seconds=Histogram(
                "joule_trainer_step_duration_seconds",
                "Wall time of one optimizer step",
                names,
                buckets=STEP_BUCKETS,
                registry=reg,
            ).labels(**base),
            throughput=g(
                "joule_trainer_throughput_samples_per_second",
                "Samples per second of this rank, over its last step (report(): its last 10 s)",
            ),
            world_size=g("joule_trainer_world_size", "Processes in the training group now"),
            power=g("joule_trainer_power_watts", "Power drawn by this rank's device", src)
            if meter
            else None,
            energy=Counter(
                "joule_trainer_energy_joules",
                "Energy used by this rank's device since the process started",
                [*names, "source"],
                registry=reg,
            ).labels(**base, **src)
            if meter
            else None,
            power_limit=g("joule_trainer_power_limit_watts", "Enforced device power limit", src)
            if meter
            else None,
            labels=base,
        )

    def dataset(self, version: str) -> None:
        """``joule_trainer_dataset_info{version=...} 1``: the prepared dataset trained on (its
        manifest's version), for the operator to show."""
        _gauge(
            self.registry,
            "joule_trainer_dataset_info",
            "The prepared dataset this rank reads: its version (sha256 of its manifest)",
            {**self.labels, "version": version},
        ).set(1)

    def privacy(self, delta: float, target_epsilon: float | None) -> None:
        """The differential privacy series: ``joule_trainer_dp_epsilon`` (set by
        ``dp_epsilon``), ``joule_trainer_dp_delta`` and, with a target,
        ``joule_trainer_dp_target_epsilon``. Only where DP is on."""
        self.epsilon = _gauge(
            self.registry,
            "joule_trainer_dp_epsilon",
            "Differential privacy: epsilon spent so far, at joule_trainer_dp_delta (RDP)",
            self.labels,
        )
        _gauge(
            self.registry,
            "joule_trainer_dp_delta",
            "Differential privacy: the delta that joule_trainer_dp_epsilon is for",
            self.labels,
        ).set(delta)
        if target_epsilon is not None:
            _gauge(
                self.registry,
                "joule_trainer_dp_target_epsilon",
                "Differential privacy: training stops before epsilon would pass this",
                self.labels,
            ).set(target_epsilon)

    def dp_epsilon(self, value: float) -> None:
        if self.epsilon is None:
            raise TypeError("call privacy() first: these metrics have no DP series")
        self.epsilon.set(value)

    def record(self, reading: Reading) -> None:
        """One meter reading into the energy counter and the device gauges."""
        if self.energy is None or self.power is None or self.power_limit is None:
            raise TypeError("these metrics were created without a meter (source None)")
        delta = reading.energy_joules - self.energy_seen_joules
        if delta > 0:
            self.energy.inc(delta)
            self.energy_seen_joules = reading.energy_joules
        if reading.power_watts is not None:
            self.power.set(reading.power_watts)
        if reading.power_limit_watts is not None:
            self.power_limit.set(reading.power_limit_watts)
        if reading.gpu_utilization_ratio is not None:
            self.gpu_utilization = self._measured(
                self.gpu_utilization, "joule_trainer_gpu_utilization_ratio",
                "GPU busy fraction (NVML), 0-1", reading.gpu_utilization_ratio,
            )  # fmt: skip
        if reading.gpu_memory_used_bytes is not None:
            self.gpu_memory = self._measured(
                self.gpu_memory, "joule_trainer_gpu_memory_used_bytes",
                "GPU memory in use on this rank's device (NVML, all processes)",
                reading.gpu_memory_used_bytes,
            )  # fmt: skip

    def _measured(self, gauge: Gauge | None, name: str, doc: str, value: float) -> Gauge:
        """A gauge created with its first measured value (see the module's docstring)."""
        if gauge is None:
            gauge = _gauge(self.registry, name, doc, self.labels)
        gauge.set(value)
        return gauge

    def serve(self, port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, Thread]:
        """/metrics on a daemon thread; OSError when the port is taken."""
        return start_http_server(port, addr=addr, registry=self.registry)


class LateGauge:
    """One labelled gauge series that exists only from its first value on (see the module's
    docstring). Its first ``set`` registers it: callers from several threads serialise."""

    def __init__(
        self, registry: CollectorRegistry, name: str, doc: str, labels: dict[str, str]
    ) -> None:
        self._registry, self._name, self._doc, self._labels = registry, name, doc, labels
        self._gauge: Gauge | None = None

    def set(self, value: float) -> None:
        if self._gauge is None:
            self._gauge = _gauge(self._registry, self._name, self._doc, self._labels)
        self._gauge.set(value)


def _gauge(registry: CollectorRegistry, name: str, doc: str, labels: dict[str, str]) -> Gauge:
    """The one series of a labelled gauge."""
    return Gauge(name, doc, list(labels), registry=registry).labels(**labels)
