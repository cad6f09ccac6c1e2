"""How large a job's status and its energy bookkeeping grow, at the CRD's largest job.

Runs the operator's own evaluation (``joule.scaling.evaluate``, pure) for a job of
``--workers`` workers with ``--gpus`` processes each, every process reporting its energy and
samples, for ``--rounds`` evaluations; then prints the bytes of ``status`` (what every watch of
the TrainingJob carries; etcd refuses objects over 1.5 MiB) and of the bookkeeping ConfigMap
(``<job>-joule-energy``; a ConfigMap holds at most 1 MiB).

    .venv/bin/python benchmarks/status_size.py [--workers 1024] [--gpus 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

from joule.api.types import MAX_REPLICAS, JobRef, TrainingJobSpec
from joule.builders.bookkeeping import bookkeeping_configmap
from joule.policy.types import ClusterView
from joule.scaling import Measured, evaluate, split_energy

ETCD_LIMIT = 1.5 * 1024 * 1024
CONFIGMAP_LIMIT = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=MAX_REPLICAS)
    parser.add_argument("--gpus", type=int, default=8, help="processes per worker")
    parser.add_argument("--rounds", type=int, default=3, help="evaluations")
    args = parser.parse_args()

    spec = TrainingJobSpec.parse({
        "image": "trainer:1", "replicas": args.workers, "gpusPerReplica": args.gpus,
        "energy": {"powerCapWatts": 400 * args.workers * args.gpus, "budget": "1000000MJ"},
        "scaling": {"evaluationIntervalSeconds": 30},
    })  # fmt: skip
    job = JobRef("big", "ml", "uid-big")
    start = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    status: dict = {"phase": "Running", "startTime": "2026-11-30T00:00:00Z"}
    kept: dict = {}
    keys = [f"pod-{w:04d}-uid/{r}@1764460800.00" for w in range(args.workers)
            for r in range(args.gpus)]  # fmt: skip
    took = []
    for n in range(1, args.rounds + 1):
        began = time.perf_counter()
        now = start + dt.timedelta(seconds=30 * n)
        readings = Measured(
            joules={k: 300.0 * 30 * n for k in keys},
            samples={k: 100.0 * 30 * n for k in keys},
            source="node",
            meter="nvml",
            utilization=0.9,
        )
        merged = {**status, "energy": {**status.get("energy", {}), **kept}}
        result = evaluate(spec, merged, readings, ClusterView(0), now, args.workers, True)
        shown, kept = split_energy(result.status.get("energy", {}))
        status = {**result.status, "energy": shown}
        took.append(time.perf_counter() - began)

    status_bytes = len(json.dumps({"status": status}, separators=(",", ":")))
    configmap_bytes = len(json.dumps(bookkeeping_configmap(job, kept), separators=(",", ":")))
    processes = args.workers * args.gpus
    print(f"job: {args.workers} workers x {args.gpus} processes = {processes}, "
          f"{args.rounds} evaluations")  # fmt: skip
    print(f"status:              {status_bytes:>9,} bytes  ({status_bytes / ETCD_LIMIT:.2%} of "
          "etcd's 1.5 MiB object limit)")  # fmt: skip
    print(f"bookkeeping ConfigMap {configmap_bytes:>9,} bytes  "
          f"({configmap_bytes / CONFIGMAP_LIMIT:.1%} of a ConfigMap's 1 MiB)")  # fmt: skip
    print(f"per process in the ConfigMap: {configmap_bytes / processes:.0f} bytes")
    print(f"one evaluation (the pure accounting and policy): {min(took):.2f} s fastest, "
          f"{max(took):.2f} s slowest")  # fmt: skip


if __name__ == "__main__":
    main()
