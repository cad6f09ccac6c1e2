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
    ("PET_RDZV_CONF", "--rdzv-conf"),
)

# torchrun's defaults notice a vanished node after 3 missed 5 s heartbeats and then wait a
# 30 s "last call" for latecomers: 45 s of a stalled group on every scale-down. A pod that is
# scaled away is gone for good, so notice it in 6 s and close the round 5 s after the
# minimum is met. PET_RDZV_CONF overrides these key by key.
DEFAULT_RDZV_CONF = "last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3"

# Set for every torchrun we start. With torch's default (the rendezvous TCP store shared
# with the workers), an agent that was rank 0 in an earlier round does not republish the
# bootstrap address in the next one, so a node joining a shrunk group waits for it forever
# (seen with torch 2.15 growing 1 -> 2). Unshared, every round gets a fresh worker store.
#
# RES_OPTIONS: the rendezvous store looks up the name of every client that connects, on its
# only thread; with glibc's default (5 s, twice) one lost DNS packet froze the store for 10 s,
# the agents' heartbeats (6 s tolerance, above) aged out, and a newcomer dropped the host and
# formed a second group (seen in CI). 1 s, twice, keeps a lost packet far below that.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "RES_OPTIONS": "timeout:1 attempts:2"}


def rdzv_conf(given: str) -> str:
    """Our defaults, overridden key by key by ``given`` (``key=value,...``)."""
    conf = dict(item.split("=", 1) for item in DEFAULT_RDZV_CONF.split(","))
    for item in filter(None, given.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"joule-launch: PET_RDZV_CONF item {item!r} is not key=value")
        conf[key.strip()] = value.strip()
    return ",".join(f"{k}={v}" for k, v in conf.items())


def torchrun_argv(env: Mapping[str, str], program: Sequence[str]) -> list[str]:
    """The torchrun command for ``program`` (``-m module args`` or ``script.py args``)."""
    # torchrun itself, but for its exit code and last line on a failure (see .torchrun).
    argv = [sys.executable, "-m", "joule_trainer.torchrun"]
    if not env.get("PET_RDZV_ENDPOINT"):
        argv.append("--standalone")
    for var, flag in PET_FLAGS:
        value = None if var == "PET_RDZV_CONF" else env.get(var)
        if value and not (flag == "--rdzv-endpoint" and "--standalone" in argv):
            argv.append(f"{flag}={value}")
    if not env.get("PET_NPROC_PER_NODE"):
        argv.append("--nproc-per-node=1")
    if env.get("PET_RDZV_ENDPOINT"):
        argv.append(f"--rdzv-conf={rdzv_conf(env.get('PET_RDZV_CONF', ''))}")
    # How often the agent checks its workers and the rendezvous for newcomers.
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
    for key, value in TORCHRUN_ENV.items():
        env.setdefault(key, value)
    argv = torchrun_argv(env, program)
    print(f"joule-launch: {shlex.join(argv)}", file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
    main()
