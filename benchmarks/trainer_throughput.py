"""The trainer's instrumentation overhead and its throughput on CPU. Prints figures.

    .venv/bin/python benchmarks/trainer_throughput.py [--steps 300] [--model gpt]

1. Overhead: one process builds the real ``Trainer`` (world of 1, gloo) and runs training
   steps; every step is followed by the instrumentation the trainer does per step
   (``_hold_power_limit``: the power-limit file check and the meter's pause, none here as no
   limit is set; ``_observe``: counters, loss gauge, step-time histogram, throughput, a meter
   read and the energy counter). The instrumentation is timed on its own and set against
   the median step time. A second, A/B figure alternates blocks of steps with and without it.
2. Throughput: torchrun (as joule-launch starts it) with 1 and then 2 workers on this
   machine; samples/s is the median of the trainer's own per-window figure after warm-up.

The meter is the estimated one here (no GPU); NVML reads cost more, and run on a GPU machine
this script measures them the same way. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from joule_trainer.launch import TORCHRUN_ENV, torchrun_argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_args(model: str, steps: int, ckpt: Path, log_every: int) -> list[str]:
    return [
        "--model",
        model,
        "--steps",
        str(steps),
        "--global-batch",
        "32",
        "--micro-batch",
        "16",
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every-steps",
        str(steps * 10),
        "--checkpoint-every-seconds",
        "1e9",
        "--log-every",
        str(log_every),
        "--metrics-port",
        "0",
    ]


def overhead(model: str, steps: int) -> None:
    import torch
    from joule_trainer.train import Trainer, parse_args

    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), JOULE_ENERGY_SOURCE="estimated",
    )  # fmt: skip
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(parse_args(trainer_args(model, steps, Path(tmp), 10)))
        try:
            for _ in range(20):  # warm-up: allocator, autograd graph, first checkpoint-free steps
                trainer.train_step()
            step_times, instr_times = [], []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = trainer.train_step()
                t1 = time.perf_counter()
                trainer._hold_power_limit()
                trainer._observe(loss, t1 - t0)
                t2 = time.perf_counter()
                step_times.append(t1 - t0)
                instr_times.append(t2 - t1)
            # A/B: blocks of 10 steps alternately with and without instrumentation.
            with_i, without = [], []
            for block in range(steps // 10):
                instrument = block % 2 == 0
                t0 = time.perf_counter()
                for _ in range(10):
                    s0 = time.perf_counter()
                    loss = trainer.train_step()
                    if instrument:
                        trainer._hold_power_limit()
                        trainer._observe(loss, time.perf_counter() - s0)
                (with_i if instrument else without).append((time.perf_counter() - t0) / 10)
        finally:
            trainer.close()
    step_ms = statistics.median(step_times) * 1e3
    instr_us = statistics.median(instr_times) * 1e6
    instr_p99_us = sorted(instr_times)[int(len(instr_times) * 0.99)] * 1e6
    ab = (statistics.median(with_i) / statistics.median(without) - 1) * 100
    q = statistics.quantiles(without, n=4)
    spread = (q[2] - q[0]) / statistics.median(without) * 100
    print(f"overhead ({model}, 1 process, meter={trainer.meter.source}, {steps} steps):")
    print(f"  median step time            {step_ms:9.2f} ms")
    print(f"  instrumentation per step    {instr_us:9.1f} us median, {instr_p99_us:.1f} us p99")
    print(f"  instrumentation / step time {instr_us / 1e3 / step_ms * 100:9.3f} %  (target < 1 %)")
    print(f"  A/B block medians           {ab:+9.2f} %  (blocks' own IQR: {spread:.1f} %)")


def throughput(model: str, steps: int, workers: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            **TORCHRUN_ENV,
            "PET_NPROC_PER_NODE": str(workers),
            "JOULE_ENERGY_SOURCE": "estimated",
            "OMP_NUM_THREADS": "1",
        }
        argv = torchrun_argv(
            env, ["-m", "joule_trainer.train", *trainer_args(model, steps, Path(tmp), 10)]
        )
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            sys.exit(f"torchrun with {workers} workers failed:\n{out.stderr[-3000:]}")
    rates = [
        e["samples_per_s"]
        for e in (json.loads(line) for line in out.stdout.splitlines() if line.startswith("{"))
        if e["event"] == "step"
    ]
    return statistics.median(rates[len(rates) // 4 :])  # skip the warm-up windows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", choices=["gpt", "cnn"], default="gpt")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, torch threads per worker: 1")
    overhead(args.model, args.steps)
    print(f"throughput ({args.model}, global batch 32, {args.steps} steps, gloo):")
    one = throughput(args.model, args.steps, 1)
    print(f"  1 worker   {one:8.1f} samples/s", flush=True)
    two = throughput(args.model, args.steps, 2)
    print(f"  2 workers  {two:8.1f} samples/s  (x{two / one:.2f})")


if __name__ == "__main__":
    main()
