"""The container entrypoint: torchrun, configured from the environment the operator injects.

torchrun reads ``PET_<FLAG>`` variables as its own flags; writing them out explicitly makes
the command visible in the logs and lets a pod without PET_* (a laptop, a test) run
standalone. The backend follows the hardware: NCCL where CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

PET_FLAGS = (
    ("PET_NNODES", "--nnodes"),
    ("PET_NPROC_PER_NODE", "--nproc-per-node"),
    ("PET_RDZV_BACKEND", "--rdzv-backend"),
    ("PET_RDZV_ENDPOINT", "--rdzv-endpoint"),
    ("PET_RDZV_ID", "--rdzv-id"),
    ("PET_MAX_RESTARTS", "--max-restarts"),
    ("PET_NODE_RANK", "--node-rank"),
)


def torchrun_argv(env: Mapping[str, str], program: Sequence[str]) -> list[str]:
    """The torchrun command for ``program`` (``-m module args`` or ``script.py args``)."""
    argv = [sys.executable, "-m", "torch.distributed.run"]
    if not env.get("PET_RDZV_ENDPOINT"):
        argv.append("--standalone")
    for var, flag in PET_FLAGS:
        value = env.get(var)
        if value and not (flag == "--rdzv-endpoint" and "--standalone" in argv):
            argv.append(f"{flag}={value}")
    if not env.get("PET_NPROC_PER_NODE"):
        argv.append("--nproc-per-node=1")
    # A departed node must not stall the group for torchrun's default 30 s+ heartbeat.
    argv.append(f"--monitor-interval={env.get('JOULE_MONITOR_INTERVAL', '1')}")
    return [*argv, *program]


def backend(cuda_available: bool) -> str:
    return "nccl" if cuda_available else "gloo"


def main(args: Sequence[str] | None = None) -> None:
    """``joule-launch [program...]``; without a program, the built-in trainer."""
    import torch

    program = list(sys.argv[1:] if args is None else args) or ["-m", "joule_trainer.train"]
    if program[0] not in ("-m",) and not program[0].endswith(".py"):
        program = ["-m", "joule_trainer.train", *program]
    env = dict(os.environ)
    env.setdefault("JOULE_DIST_BACKEND", backend(torch.cuda.is_available()))
    argv = torchrun_argv(env, program)
    print(f"joule-launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
