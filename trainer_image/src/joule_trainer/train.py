"""The built-in trainer: what torchrun starts on every process of every worker.

    torchrun ... -m joule_trainer.train --model gpt --steps 500 --global-batch 32

Elastic by construction: the global batch is fixed and split across whatever world size the
rendezvous produced (``batching``); samples are a pure function of their index (``data``);
every state that matters (model, optimizer, schedule, step, RNG) is checkpointed atomically
(``checkpoint``). A restart or a resize resumes from the latest good checkpoint and continues
the same optimisation. SIGTERM writes a final checkpoint before exiting.

A checkpoint directory that cannot take a checkpoint (read-only, full, not permitted) stops
every rank with exit code ``checkpoint.EXIT_STORAGE`` (74) and one line that says so, as the
trainer's last; it is found before the first step where it can be.

With ``JOULE_CHECKPOINT_KEY_FILE`` (``--checkpoint-key-file``), checkpoints are encrypted
(``crypt``). A key file that is not a key, or checkpoints of which none verifies with it,
stop every rank before training with exit code ``checkpoint.EXIT_CONFIG`` (78) and one line.

With ``--dp-noise-multiplier`` or ``--dp-target-epsilon`` (``JOULE_DP_*``), it trains with
differential privacy (``dp``: DP-SGD with Opacus) and, at the target epsilon, stops with a
checkpoint, exit code 0 and a JSON termination message (``{"stopReason":
"PrivacyBudgetReached", ...}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from joule_trainer import batching, checkpoint, crypt, dp
from joule_trainer.data import Shapes, TextWindows
from joule_trainer.dataset import EXIT_DATA, DataError, ShardWindows
from joule_trainer.energy import MeterError, Reading, probe
from joule_trainer.energy.limit import LimitFile
from joule_trainer.metrics import TrainerMetrics
from joule_trainer.models import SmallCNN, TinyGPT, for_per_sample_gradients

log = logging.getLogger("joule_trainer")
EXIT_SIGTERM = 143  # 128 + SIGTERM: interrupted, not finished, so never read as success
# Where the kubelet takes a container's termination message from (its default path). A
# worker's status then quotes our last line, not torchrun's report that follows it in the log.
TERMINATION_LOG = "/dev/termination-log"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="joule_trainer.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gpt", "cnn"], default="gpt")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps in total")
    p.add_argument(
        "--global-batch",
        type=int,
        default=32,
        help="samples per optimizer step, whatever the number of workers",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        default=16,
        help="most samples per forward pass; more are gradient-accumulated",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="text file for the language model (default: the bundled corpus)",
    )
    p.add_argument(
        "--dataset",
        type=Path,
        default=env.get("JOULE_DATASET_DIR") or None,
        help="a dataset made by `joule-data prepare` for the language model (in place of "
        "--corpus), streamed from its shards; default $JOULE_DATASET_DIR",
    )
    p.add_argument("--block", type=int, default=64, help="context length (gpt)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument(
        "--checkpoint-dir", type=Path, default=Path(env.get("JOULE_CHECKPOINT_DIR", "checkpoints"))
    )
    p.add_argument(
        "--checkpoint-key-file",
        type=Path,
        default=env.get(crypt.KEY_ENV) or None,
        help="encrypt checkpoints with the AES-256 key in this file (32 bytes, raw or as "
        f"base64 or hex text); default ${crypt.KEY_ENV}, which Joule sets where "
        "spec.checkpoint.encryption is",
    )
    p.add_argument("--checkpoint-every-steps", type=int, default=50)
    p.add_argument("--checkpoint-every-seconds", type=float, default=300.0)
    p.add_argument(
        "--final-save-timeout",
        type=float,
        default=45.0,
        help="seconds a rank waits for rank 0's last checkpoint after SIGTERM (within the "
        "pod's 60 s grace period), so that a dead peer cannot hold the exit",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(env.get("JOULE_METRICS_PORT", "9090")),
        help="base port of /metrics (plus the local rank); 0 turns it off",
    )
    p.add_argument("--metrics-addr", default=env.get("JOULE_METRICS_ADDR", "0.0.0.0"))
    p.add_argument(
        "--tensorboard-dir",
        type=Path,
        default=env.get("JOULE_TENSORBOARD_DIR") or None,
        help="write TensorBoard event files here (rank 0); default $JOULE_TENSORBOARD_DIR, "
        "which Joule sets where spec.tensorboard is enabled",
    )
    dp.add_arguments(p)
    args = p.parse_args(argv)
    for name in ("steps", "global_batch", "micro_batch", "checkpoint_every_steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.dataset and args.corpus:
        p.error("--dataset and --corpus: one or the other")
    if args.dataset and args.model != "gpt":
        p.error("--dataset is text for the language model (--model gpt)")
    return args


def init_process_group(backend: str) -> dist.Store:
    """Join the group torchrun formed; returns its store (the final-save wait uses it).

    Under joule-launch every rendezvous round publishes a fresh MASTER_PORT and rank 0 hosts
    a fresh store there, so no key of an earlier round can be seen. When torchrun shares its
    agent store instead (its default; a user's own launcher), keys outlive a round: seen with
    gloo, a restarted rank dialled its dead predecessor's port. Prefixing with the restart
    count keeps restarts apart there (a membership change can still stall; see launch.py).
    """
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,
        wait_for_workers=False,
    )
    if agent_store:
        store = dist.PrefixStore(
            f"joule/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
        )
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return store


class Trainer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # Before any collective: a key file that is no key stops every rank alike.
        self.key = crypt.load_key(args.checkpoint_key_file) if args.checkpoint_key_file else None
        self.dp_settings = dp.settings(args)  # likewise for differential privacy settings
        self.privacy: dp.Privacy | None = None
        self._privacy_state: dict[str, Any] | None = None
        self.termination_message: str | None = None
        backend = os.environ.get("JOULE_DIST_BACKEND") or (
            "nccl" if torch.cuda.is_available() else "gloo"
        )
        self.store = init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

        torch.manual_seed(args.seed)
        if args.model == "gpt":
            self.data: TextWindows | ShardWindows | Shapes = (
                ShardWindows(args.dataset, args.block, args.seed)
                if args.dataset
                else TextWindows(args.corpus, args.block, args.seed)
            )
            if isinstance(self.data, ShardWindows):
                self._verify_dataset(self.data)
            model: nn.Module = TinyGPT(
                self.data.vocab, args.block, args.dim, args.layers, args.heads
            )
            if self.dp_settings:
                for_per_sample_gradients(model)
        else:
            self.data = Shapes(args.seed)
            model = SmallCNN(Shapes.classes)
            model(torch.zeros(1, 1, 16, 16))  # materialise the lazy layer before DDP
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        # The global sample cursor: samples 0..samples-1 are trained. A step takes the next
        # global batch from here, whatever the world size, so a restart or a resize goes on
        # at exactly the next sample.
        self.samples = 0
        # JOULE_SAMPLE_LOG: each rank appends the sample indices it trained, a line a step.
        self.sample_log = os.environ.get("JOULE_SAMPLE_LOG") or None
        self.saved_step: int | None = None  # the newest checkpoint known to be whole
        self._resume_agreed()
        # Before any step: a volume that cannot take a checkpoint would waste every step
        # trained on it. Rank 0 writes checkpoints, so it alone looks; every rank stops.
        problem = None
        if self.rank == 0:
            problem = checkpoint.check_storage(args.checkpoint_dir, self.saved_step)
        code = torch.tensor([problem.code if problem else 0], device=self.device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        self._stop_on_storage(problem, int(code.item()), "before training")
        self._check_same_start()
        if self.dp_settings:
            assert not isinstance(self.data, Shapes)
            self.privacy = dp.Privacy(
                self.dp_settings,
                self.model,
                self.optimizer,
                samples=self.data.windows,
                global_batch=args.global_batch,
                steps=args.steps,
            )
            if self._privacy_state is not None:
                self.privacy.load_state_dict(self._privacy_state)
            self._log(
                event="privacy",
                noise_multiplier=self.privacy.noise_multiplier,
                noise_multiplier_derived=self.privacy.derived,
                max_grad_norm=self.privacy.max_grad_norm,
                delta=self.privacy.delta,
                target_epsilon=self.privacy.target,
                sample_rate=self.privacy.sample_rate,
                dataset_samples=self.privacy.samples,
                epsilon=self.privacy.epsilon,
            )
        else:
            self.ddp = DDP(
                self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None
            )

        gpu = str(self.local_rank) if self.device.type == "cuda" else "none"
        self.meter = probe(self.local_rank if self.device.type == "cuda" else None)
        self.metrics = TrainerMetrics.create(
            os.environ.get("JOULE_JOB_NAME", "local"),
            os.environ.get("JOULE_REPLICA_INDEX", "0"),
            self.rank,
            gpu,
            self.meter.source,
        )
        self.metrics.world_size.set(self.world)
        if self.privacy:
            self.metrics.privacy(self.privacy.delta, self.privacy.target)
            self.metrics.dp_epsilon(self.privacy.epsilon)
        if isinstance(self.data, ShardWindows):
            self.metrics.dataset(self.data.version)
            self._log(
                event="dataset",
                version=self.data.version,
                path=str(args.dataset),
                tokens=self.data.total,
                shards=len(self.data.shards),
                tokenizer=self.data.tokenizer.name,
                vocab=self.data.vocab,
                windows=self.data.windows,
                verified_s=round(self.verify_seconds, 3),
            )
        self._read_meter()  # a first reading, so that the first scrape sees measured figures
        if args.metrics_port:
            self.metrics.serve(args.metrics_port + self.local_rank, args.metrics_addr)
        self.limit_file = LimitFile(os.environ.get("JOULE_POWER_LIMIT_FILE"))
        self.tb = None
        if args.tensorboard_dir and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # Flushed often: the job's TensorBoard shows the steps as they come.
            self.tb = SummaryWriter(str(args.tensorboard_dir), flush_secs=10)

    def _verify_dataset(self, data: ShardWindows) -> None:
        """Every shard's sha256 before the first step, the ranks sharing the work (rank r
        hashes shards r, r + world, ...) and learning from one all-reduce whether any is
        corrupt: then every rank stops, each saying why, rather than one failing mid-step
        while the others wait for it in a collective. Shuffled samples touch most shards in
        the first steps, so checking on first use would have every rank hash nearly all."""
        began = time.monotonic()
        found: DataError | None = None
        bad = torch.zeros(len(data.shards), dtype=torch.int64, device=self.device)
        for k in range(self.rank, len(data.shards), self.world):
            try:
                data.check(k)
            except DataError as exc:
                found = found or exc
                bad[k] = 1
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if found is not None:
            raise found
        corrupt = [k for k, flag in enumerate(bad.tolist()) if flag]
        if corrupt:
            k = corrupt[0]
            raise DataError(
                f"rank {self.rank}: stopped before training: rank {k % self.world} found "
                f"dataset shard {data.directory / data.shards[k]['file']} corrupt"
            )
        data.verified.update(range(len(data.shards)))
        self.verify_seconds = time.monotonic() - began

    def _lr_factor(self, step: int) -> float:
        warm = max(self.args.warmup_steps, 1)
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(self.args.steps - warm, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _resume_agreed(self) -> None:
        """Resume; where any rank found only checkpoints it must refuse (the key), every
        rank stops, none left waiting in a collective for one that has gone."""
        refused = None
        try:
            self._resume()
        except checkpoint.CheckpointsRefused as exc:
            refused = exc
        flag = torch.tensor([1 if refused else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if refused is not None:
            raise refused
        if int(flag.item()):
            raise checkpoint.CheckpointsRefused(
                f"rank {self.rank}: stopped before training: another rank refused the "
                f"checkpoints in {self.args.checkpoint_dir}"
            )

    def _resume(self) -> None:
        found = checkpoint.load_latest(self.args.checkpoint_dir, self.key)
        if found is None:
            self._log(event="start", step=0, samples=0, world=self.world)
            return
        step, state = found
        self._privacy_state = state.get("privacy")
        dp.check_continuity(
            checkpoint.path_for(self.args.checkpoint_dir, step).name,
            step,
            self._privacy_state,
            dp_on=self.dp_settings is not None,
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        restore_rng(state["rng"])
        self.step = self.saved_step = step
        # Checkpoints from before the cursor was kept: their global batch never changed.
        self.samples = int(state.get("samples", step * state["global_batch"]))
        self._log(
            event="resumed",
            step=step,
            samples=self.samples,
            world=self.world,
            previous_world=state.get("world"),
            checkpoint=str(checkpoint.path_for(self.args.checkpoint_dir, step)),
        )

    def _check_same_start(self) -> None:
        """Every rank must resume from the same step: ranks that see different checkpoint
        folders (one volume per pod) would train out of step and hang at the end."""
        # On the group's device: NCCL reduces no CPU tensor.
        bounds = torch.tensor([self.step, -self.step], dtype=torch.int64, device=self.device)
        dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
        high, low = int(bounds[0]), -int(bounds[1])
        if high != low:
            raise SystemExit(
                f"ranks resumed from different checkpoints (steps {low}..{high}): the "
                "checkpoint directory must be shared by every worker (a ReadWriteMany volume)"
            )

    def _stop_on_storage(
        self, problem: checkpoint.StorageError | None, code: int, when: str
    ) -> None:
        """Every rank stops where rank 0 found that the checkpoint directory cannot take a
        checkpoint: ``problem`` is rank 0's (None elsewhere), ``code`` its errno as every rank
        learnt it from a collective (0: none), so that each says why and none is left
        waiting in a collective for a rank that has gone."""
        if problem is not None:
            raise problem
        if code:
            raise checkpoint.StorageError(
                f"rank {self.rank}: stopped {when}: rank 0 cannot write checkpoints to "
                f"{self.args.checkpoint_dir}: {os.strerror(code)} (errno {code})",
                code,
            )

    def _save_in_training(self) -> checkpoint.StorageError | None:
        """A checkpoint during training (rank 0's); what stops it, if anything. A full disk
        stops training rather than going on: every later save would fail too, so every step
        trained from here would be lost at the next crash, resize or preemption while the
        newest good checkpoint grows older. Stopping keeps that loss to one interval and
        says so; the job resumes from the newest checkpoint once there is room."""
        try:
            self.save()
        except checkpoint.StorageError as exc:
            return exc
        return None

    def save(self) -> None:
        """Rank 0 writes the checkpoint; a directory that cannot take it raises
        StorageError, with nothing of it left behind and the earlier ones untouched."""
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "world": self.world,
            "global_batch": self.args.global_batch,
            "samples": self.samples,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": rng_state(),
        }
        if self.privacy:
            state["privacy"] = self.privacy.state_dict()
        directory = self.args.checkpoint_dir
        try:
            path = checkpoint.save(directory, self.step, state, key=self.key)
        except OSError as exc:
            raise checkpoint.save_failed(directory, self.step, exc, self.saved_step) from exc
        self.saved_step = self.step
        self._log(event="checkpoint", step=self.step, path=str(path))

    def train_step(self) -> float:
        if self.privacy:
            return self._train_step_private(self.privacy)
        args = self.args
        share = batching.share(args.global_batch, self.world, self.rank, args.micro_batch)
        self.share_size = share.size
        scale = batching.loss_scale(args.global_batch, self.world)
        base = self.samples
        total = torch.zeros((), device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        last = len(share.micro_batches) - 1
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        for k, (offset, n) in enumerate(share.micro_batches):
            x, y = self.data.batch(range(base + offset, base + offset + n))
            x, y = x.to(self.device), y.to(self.device)
            sync = contextlib.nullcontext() if k == last else self.ddp.no_sync()
            with sync, autocast:
                out = self.ddp(x)
                loss_sum = self._loss(out, y)
            (loss_sum * scale).backward()
            total += loss_sum.detach()
        self.optimizer.step()
        self.schedule.step()
        dist.all_reduce(total)
        self.metrics.samples.inc(share.size)
        if self.sample_log:
            self._log_samples(base, share)
        return float(total) / args.global_batch

    def _train_step_private(self, privacy: dp.Privacy) -> float:
        """One optimizer step of DP-SGD over the global batch. Each micro-batch's per-sample
        gradients are clipped and summed into the optimizer's accumulator at once (Opacus'
        skipped step), keeping one micro-batch of per-sample gradients in memory; after the
        last, rank 0 adds the noise, once for the whole global batch, and the sums are
        all-reduced (``dp._global_mean_optimizer``). In float32: no autocast."""
        args = self.args
        share = batching.share(args.global_batch, self.world, self.rank, args.micro_batch)
        self.share_size = share.size
        base = self.samples
        total = torch.zeros((), device=self.device)
        optimizer = privacy.optimizer
        optimizer.zero_grad(set_to_none=True)
        last = len(share.micro_batches) - 1
        for k, (offset, n) in enumerate(share.micro_batches):
            x, y = self.data.batch(range(base + offset, base + offset + n))
            x, y = x.to(self.device), y.to(self.device)
            loss_sum = self._loss(privacy.module(x), y)
            loss_sum.backward()  # per-sample gradients of each sample's loss
            total += loss_sum.detach()
            if k < last:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()  # clip and accumulate only
                optimizer.zero_grad(set_to_none=True)  # keeps the accumulated sum
        optimizer.step()  # clip, noise (rank 0), all-reduce, the AdamW step
        self.schedule.step()
        dist.all_reduce(total)
        self.metrics.samples.inc(share.size)
        if self.sample_log:
            self._log_samples(base, share)
        return float(total) / args.global_batch

    def _stop_at_privacy_budget(self, privacy: dp.Privacy) -> None:
        """The next step would take epsilon past the target: save, and say so (the
        termination message). Every rank decides alike, from the same accountant history;
        a restart finds the same and stops again at once."""
        if self.saved_step != self.step:
            self.save()  # a full disk here raises StorageError, as any save
        message = privacy.termination(self.step)
        self.termination_message = json.dumps(message)
        self._log(event="privacy_budget_reached", **message)

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.args.model == "gpt":
            per_seq = nn.functional.cross_entropy(
                out.float().transpose(1, 2), y, reduction="none"
            ).mean(dim=1)
            return per_seq.sum()
        return nn.functional.cross_entropy(out.float(), y, reduction="sum")

    def run(self) -> int:
        args = self.args
        last_ckpt = time.monotonic()
        window_start, window_samples = time.monotonic(), 0
        while self.step < args.steps:
            epsilon_after = 0.0
            if self.privacy:
                exceed, epsilon_after = self.privacy.would_exceed()
                if exceed:
                    self._stop_at_privacy_budget(self.privacy)
                    return 0
            started = time.monotonic()
            loss = self.train_step()
            if self.privacy:
                self.privacy.stepped(epsilon_after)
                self.metrics.dp_epsilon(epsilon_after)
            self._hold_power_limit()
            self.step += 1
            self.samples += args.global_batch
            elapsed = time.monotonic() - started
            self._observe(loss, elapsed)
            window_samples += args.global_batch
            if self.step % args.log_every == 0 or self.step == args.steps:
                now = time.monotonic()
                reading = self._read_meter()
                self._log(
                    event="step",
                    step=self.step,
                    loss=round(loss, 4),
                    samples_per_s=round(window_samples / max(now - window_start, 1e-9), 1),
                    world=self.world,
                    watts=_round(reading.power_watts if reading else None),
                    joules=_round(self.metrics.energy_seen_joules),
                    energy_source=self.meter.source,
                    **self._privacy_fields(),
                )
                if self.tb:
                    self.tb.add_scalar("loss", loss, self.step)
                    rate = window_samples / max(now - window_start, 1e-9)
                    self.tb.add_scalar("samples_per_second", rate, self.step)
                    self.tb.add_scalar("world_size", self.world, self.step)
                window_start, window_samples = now, 0
            due = (
                self.step % args.checkpoint_every_steps == 0
                or time.monotonic() - last_ckpt >= args.checkpoint_every_seconds
            )
            problem = None
            if due and self.step < args.steps:
                problem = self._save_in_training()
                last_ckpt = time.monotonic()
            if self._stop_agreed(problem):
                self.save()
                self._wait_for_final_save()
                self._log(event="sigterm", step=self.step)
                return EXIT_SIGTERM
        self.save()
        self._log(event="done", step=self.step, loss=round(loss, 4), **self._privacy_fields())
        return 0

    def _privacy_fields(self) -> dict[str, float]:
        if not self.privacy:
            return {}
        return {"epsilon": round(self.privacy.epsilon, 6), "delta": self.privacy.delta}

    def _stop_agreed(self, problem: checkpoint.StorageError | None = None) -> bool:
        """All ranks stop at the same step if any of them was asked to (SIGTERM); all raise
        StorageError if rank 0's checkpoint this step failed (``problem``). One collective
        for both, every step on every rank: a save is due by each rank's own clock
        (``--checkpoint-every-seconds``), so a collective of its own could go unmatched."""
        code = float(problem.code) if problem else 0.0
        flags = torch.tensor([1.0 if self.stop_requested else 0.0, code], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._stop_on_storage(problem, int(flags[1].item()), f"at step {self.step}")
        return bool(flags[0].item())

    def _wait_for_final_save(self) -> None:
        """No rank leaves before rank 0's last checkpoint is on disk.

        A rank that exits (143, a failure to torchrun) lets its agent tear down the local
        group, rank 0 with it if it is there, mid-save. So rank 0 announces the save in the
        store and every other rank waits for that, then says it saw it; rank 0 waits for
        those answers, as it hosts the store and must not take it down before they are read.
        The store, not a collective: it works whatever the backend and takes a timeout, so a
        dead peer delays the exit by at most ``--final-save-timeout``. Only here: at the end
        of training every rank exits 0, and torchrun's own exit barrier holds the group.
        """
        if self.world == 1:
            return
        saved = f"joule/final-save/{self.step}"
        timeout = timedelta(seconds=self.args.final_save_timeout)
        began = time.monotonic()
        try:
            if self.rank == 0:
                self.store.set(saved, "on disk")
                self.store.wait([f"{saved}/seen/{r}" for r in range(1, self.world)], timeout)
            else:
                self.store.wait([saved], timeout)
                self.store.set(f"{saved}/seen/{self.rank}", "1")
            error = None
        except RuntimeError as exc:  # DistStoreError (timeout), DistNetworkError (peer gone)
            error = str(exc).splitlines()[0]
            log.warning("rank %d: final checkpoint not confirmed: %s", self.rank, error)
        self._log(
            event="final_save_waited",
            every_rank=True,
            rank=self.rank,
            step=self.step,
            ok=error is None,
            waited_s=round(time.monotonic() - began, 3),
        )

    def _log_samples(self, base: int, share: batching.Share) -> None:
        """Append the global sample indices this rank trained this step, as ranges, to
        ``$JOULE_SAMPLE_LOG`` (a debugging aid, shared by the ranks: one write per line, with
        O_APPEND, so their lines never mix)."""
        ranges = [[base + offset, base + offset + n] for offset, n in share.micro_batches]
        line = json.dumps(
            {"step": self.step, "rank": self.rank, "world": self.world, "samples": ranges}
        )
        fd = os.open(str(self.sample_log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def _observe(self, loss: float, elapsed: float) -> None:
        m = self.metrics
        m.steps.inc()
        m.loss.set(loss)
        m.step_seconds.observe(elapsed)
        m.throughput.set(self.share_size / max(elapsed, 1e-9))
        self._read_meter()

    def _hold_power_limit(self) -> None:
        """Apply a new power limit from the operator; where the device cannot enforce one
        itself (the estimated meter), idle after the step as a limited GPU would run slower."""
        if self.limit_file.changed():
            watts = self.limit_file.current
            try:
                enforced = self.meter.set_power_limit(watts)
                self._log(event="power_limit", watts=watts, enforced=_round(enforced),
                          source=self.meter.source)  # fmt: skip
            except MeterError as exc:
                log.warning("power limit %s W not applied: %s", watts, exc)
                self._log(event="power_limit", watts=watts, error=str(exc))
        pause = self.meter.pause_seconds()
        if pause > 0:
            time.sleep(pause)

    def _read_meter(self) -> Reading | None:
        try:
            reading = self.meter.read()
        except MeterError as exc:
            log.warning("energy meter %s failed: %s", self.meter.source, exc)
            return None
        self.metrics.record(reading)
        return reading

    def _log(self, every_rank: bool = False, **fields: Any) -> None:
        """One JSON line on stdout; from rank 0 only unless ``every_rank``."""
        if every_rank or getattr(self, "rank", 0) == 0:
            # One write per line: ranks share stdout, and print() may write the text and
            # its newline separately, which interleaves two ranks' lines into one.
            sys.stdout.write(json.dumps({"ts": round(time.time(), 3), **fields}) + "\n")
            sys.stdout.flush()

    def close(self) -> None:
        self.meter.close()
        if self.tb:
            self.tb.close()
        dist.destroy_process_group()


def rng_state() -> dict[str, Any]:
    """The state of every random generator the trainer draws from, as tensors and plain data
    (what a weights_only load accepts). Saved by rank 0 and restored on every rank."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return  # saved without CUDA, or resumed on a machine without it
    if len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    else:  # one state per device: with another count there is no right pairing
        log.warning(
            "CUDA RNG state not restored: saved for %d devices, %d here",
            len(cuda),
            torch.cuda.device_count(),
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    termination = termination_log()
    if termination is not None:  # a message of an earlier process here would mislead
        with contextlib.suppress(OSError):
            termination.write_text("")
    try:
        trainer = Trainer(args)
        try:
            code = trainer.run()
            if trainer.termination_message and termination is not None:
                with contextlib.suppress(OSError):
                    termination.write_text(trainer.termination_message + "\n")
            return code
        finally:
            trainer.close()
    except (checkpoint.StorageError, crypt.ConfigError) as exc:
        # One line, the last this process writes, and the container's termination message:
        # no traceback, as there is no bug to show, only a volume (or a key) to fix.
        line = str(exc)
        sys.stdout.flush()
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if termination is not None:
            with contextlib.suppress(OSError):
                termination.write_text(line + "\n")
        if isinstance(exc, crypt.ConfigError):
            return checkpoint.EXIT_CONFIG
        return checkpoint.EXIT_STORAGE
    except DataError as exc:
        # The dataset is not what its manifest says (a corrupt shard): one line, as above.
        say_last(str(exc), termination)
        return EXIT_DATA


def say_last(line: str, termination: Path | None) -> None:
    """``line`` as this process's last on stderr, and as the container's termination
    message where this process writes it."""
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if termination is not None:
        with contextlib.suppress(OSError):
            termination.write_text(line + "\n")


def termination_log() -> Path | None:
    """The container's termination message file, where this process is the one to write it:
    local rank 0 (rank 0 where it runs, so its line is the one a pod with rank 0 shows), and
    only where the kubelet made the file (never created elsewhere: not in a laptop's /dev).
    ``JOULE_TERMINATION_LOG`` names another path (a template's terminationMessagePath)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return None
    path = Path(os.environ.get("JOULE_TERMINATION_LOG") or TERMINATION_LOG)
    return path if path.is_file() else None


def exit_now(code: int) -> None:
    """Leave without running C++ static destructors: at interpreter exit, gloo and the
    TCPStore sometimes abort ("terminate called without an active exception", exit -6)
    after a clean finish, and torchrun then restarts a finished group instead of exiting.
    Everything that matters (checkpoints, logs) is written and flushed before this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
