"""The trainer's Prometheus metrics (one registry per process, served on /metrics).

Names follow the conventions: base units, ``_total`` counters. Every series carries job,
replica, rank and gpu; power and energy also carry the meter's ``source``, so an estimate is
never mistaken for a measurement. Samples and throughput are per process: sum over ranks for
the job's figure.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class TrainerMetrics:
    registry: CollectorRegistry
    samples: Counter
    steps: Counter
    loss: Gauge
    step_seconds: Histogram
    throughput: Gauge
    world_size: Gauge
    power: Gauge
    energy: Counter
    power_limit: Gauge
    gpu_utilization: Gauge
    gpu_memory: Gauge

    @classmethod
    def create(cls, job: str, replica: str, rank: int, gpu: str, source: str) -> TrainerMetrics:
        reg = CollectorRegistry()
        base = {"job": job, "replica": replica, "rank": str(rank), "gpu": gpu}
        names = list(base)

        def g(name: str, doc: str, extra: dict[str, str] | None = None) -> Gauge:
            labels = {**base, **(extra or {})}
            return Gauge(name, doc, list(labels), registry=reg).labels(**labels)

        src = {"source": source}
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
            loss=g("joule_trainer_loss", "Mean training loss of the last global batch"),
            step_seconds=Histogram(
                "joule_trainer_step_duration_seconds",
                "Wall time of one optimizer step",
                names,
                buckets=STEP_BUCKETS,
                registry=reg,
            ).labels(**base),
            throughput=g(
                "joule_trainer_throughput_samples_per_second",
                "Samples per second of this rank over the last step",
            ),
            world_size=g("joule_trainer_world_size", "Processes in the training group now"),
            power=g("joule_trainer_power_watts", "Power drawn by this rank's device", src),
            energy=Counter(
                "joule_trainer_energy_joules",
                "Energy used by this rank's device since the process started",
                [*names, "source"],
                registry=reg,
            ).labels(**base, **src),
            power_limit=g("joule_trainer_power_limit_watts", "Enforced device power limit", src),
            gpu_utilization=g(
                "joule_trainer_gpu_utilization_ratio", "GPU busy fraction (NVML), 0-1"
            ),
            gpu_memory=g("joule_trainer_gpu_memory_used_bytes", "GPU memory in use"),
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
