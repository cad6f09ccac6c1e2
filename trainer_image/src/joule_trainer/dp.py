"""Differential privacy for the built-in trainer: DP-SGD with Opacus.

On when a noise multiplier (``--dp-noise-multiplier``, ``$JOULE_DP_NOISE_MULTIPLIER``) or a
target epsilon (``--dp-target-epsilon``, ``$JOULE_DP_TARGET_EPSILON``) is given. Every
sample's gradient is clipped to ``--dp-max-grad-norm`` (default 1.0) and Gaussian noise of
standard deviation noise multiplier x max grad norm is added once per optimizer step (one
global batch, whatever the world size and the micro-batches), by rank 0 only; the sum of the
clipped gradients and the noise, over every rank, divided by the global batch, is the step's
gradient. An RDP accountant counts every step at sampling rate global batch / N (N: the
dataset's windows); its history is in every checkpoint, so epsilon continues across restarts
and resizes. Before a step that would take epsilon past the target, training stops
(``Privacy.would_exceed``).

Opacus is imported only here and only when DP is on: a run without it never loads it.
"""

from __future__ import annotations

import argparse
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from joule_trainer import crypt

# The termination message's stopReason when training stopped at the target epsilon.
STOP_REASON = "PrivacyBudgetReached"
DEFAULT_MAX_GRAD_NORM = 1.0
ENV = {
    "noise_multiplier": "JOULE_DP_NOISE_MULTIPLIER",
    "max_grad_norm": "JOULE_DP_MAX_GRAD_NORM",
    "target_epsilon": "JOULE_DP_TARGET_EPSILON",
    "delta": "JOULE_DP_DELTA",
}


class DPConfigError(crypt.ConfigError):
    """Differential privacy settings that cannot be used; ``str()`` is one line, and the
    trainer exits ``EXIT_CONFIG`` (78) with it, as for a bad key file."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags, as strings (checked by ``settings``: a bad value exits 78, not 2)."""
    env = os.environ
    helps = {
        "noise_multiplier": "Gaussian noise, as a multiple of the max grad norm, added once "
        "per optimizer step: turns differential privacy on",
        "max_grad_norm": "every sample's gradient is clipped to this L2 norm (default 1.0)",
        "target_epsilon": "stop, with a checkpoint, before a step that would spend more than "
        "this epsilon; alone, also turns DP on with the noise multiplier that reaches it at "
        "--steps",
        "delta": "the delta of (epsilon, delta)-DP (default 1/N, N the dataset's samples)",
    }
    for name, var in ENV.items():
        p.add_argument(
            f"--dp-{name.replace('_', '-')}",
            dest=f"dp_{name}",
            default=env.get(var) or None,
            help=f"{helps[name]}; default ${var}",
        )


@dataclass(frozen=True)
class Settings:
    noise_multiplier: float | None  # None: derived from target_epsilon
    max_grad_norm: float
    target_epsilon: float | None
    delta: float | None  # None: 1/N


def _number(args: argparse.Namespace, name: str) -> float | None:
    raw = getattr(args, f"dp_{name}")
    if raw is None:
        return None
    flag = f"--dp-{name.replace('_', '-')} (${ENV[name]})"
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise DPConfigError(f"{flag} {raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise DPConfigError(f"{flag} {raw!r} must be a finite number > 0")
    return value


def settings(args: argparse.Namespace) -> Settings | None:
    """The DP settings of these arguments; None where DP is off. DPConfigError for values
    that cannot be used, and for DP parameters given without DP on (fail closed: a spec
    that meant DP must not train without it)."""
    sigma = _number(args, "noise_multiplier")
    norm = _number(args, "max_grad_norm")
    target = _number(args, "target_epsilon")
    delta = _number(args, "delta")
    if delta is not None and delta >= 1:
        raise DPConfigError(f"--dp-delta (${ENV['delta']}) {args.dp_delta!r} must be < 1")
    if sigma is None and target is None:
        given = [f"--dp-{n.replace('_', '-')}" for n, v in (("max_grad_norm", norm),
                 ("delta", delta)) if v is not None]  # fmt: skip
        if given:
            raise DPConfigError(
                f"{' and '.join(given)} without --dp-noise-multiplier or "
                "--dp-target-epsilon: differential privacy is off, refusing to train without it"
            )
        return None
    if args.model != "gpt":
        raise DPConfigError(
            "differential privacy needs a dataset of known size: --model cnn trains on "
            "generated images; use --model gpt"
        )
    return Settings(sigma, norm or DEFAULT_MAX_GRAD_NORM, target, delta)


def check_continuity(name: str, step: int, state: dict[str, Any] | None, *, dp_on: bool) -> None:
    """A job trained with differential privacy goes on with it, and one trained without
    does not turn it on: either way its guarantee (or the stop at the target) would be lost.
    ``state``: the privacy state of checkpoint ``name`` (None: trained without). Every rank
    reads the same checkpoint, so every rank stops alike (78)."""
    if state is not None and not dp_on:
        raise DPConfigError(
            f"checkpoint {name} was trained with differential privacy (epsilon "
            f"{state.get('epsilon', 0.0):.4g} spent) and this run has it off: set "
            "--dp-noise-multiplier or --dp-target-epsilon as before"
        )
    if state is None and dp_on and step > 0:
        raise DPConfigError(
            f"checkpoint {name} was trained without differential privacy: its steps used the "
            "data without a privacy guarantee, so DP cannot be turned on now; start from an "
            "empty checkpoint directory"
        )


def _history(history: list[Any]) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in history]


class Privacy:
    """DP-SGD around a model and its optimizer, with its accountant. Every rank holds one,
    with the same history (from the same checkpoint), so every rank takes the same decisions
    without a collective."""

    def __init__(
        self,
        config: Settings,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        samples: int,
        global_batch: int,
        steps: int,
    ) -> None:
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        if global_batch > samples:
            raise DPConfigError(
                f"differential privacy: the global batch ({global_batch}) is larger than the "
                f"dataset ({samples} samples)"
            )
        self.samples = samples
        self.sample_rate = global_batch / samples
        self.delta = config.delta if config.delta is not None else 1 / samples
        self.target = config.target_epsilon
        self.max_grad_norm = config.max_grad_norm
        if config.noise_multiplier is not None:
            self.noise_multiplier = config.noise_multiplier
            self.derived = False
        else:
            assert self.target is not None
            try:  # the noise that spends the target in --steps steps
                self.noise_multiplier = float(
                    get_noise_multiplier(
                        target_epsilon=self.target,
                        target_delta=self.delta,
                        sample_rate=self.sample_rate,
                        steps=steps,
                        accountant="rdp",
                    )
                )
            except ValueError as exc:
                raise DPConfigError(
                    f"--dp-target-epsilon {self.target}: no noise multiplier reaches it in "
                    f"{steps} steps at delta {self.delta:.3g}: {exc}"
                ) from None
            self.derived = True
        self.accountant = RDPAccountant()
        self._alphas = RDPAccountant.DEFAULT_ALPHAS
        self._rdp_cache: dict[tuple[float, float], Any] = {}
        # DPDDP broadcasts rank 0's weights; it syncs no gradients (the optimizer does, after
        # clipping). Per-sample gradients of each sequence's loss: loss_reduction "sum".
        # Opacus' hooks on the first layer see no input that requires a gradient (token ids):
        # PyTorch says so at every backward, harmlessly.
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        self.module = GradSampleModule(DPDDP(model), batch_first=True, loss_reduction="sum")
        self.optimizer = _global_mean_optimizer()(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=global_batch,
            loss_reduction="sum",
        )
        self.epsilon = 0.0

    def epsilon_after(self, steps: int = 1) -> float:
        """Epsilon spent once ``steps`` more steps are taken (0: now): what the RDP
        accountant's ``get_epsilon`` says for its history and those steps, the same
        arithmetic, with each (noise, rate)'s RDP of one step computed once (RDP adds up
        over steps) instead of at every call (47 ms on one CPU core)."""
        from opacus.accountants.analysis import rdp as analysis

        history = list(self.accountant.history)
        if steps:
            history.append((self.noise_multiplier, self.sample_rate, steps))
        if not history:
            return 0.0
        rdp = sum([self._rdp_of_one_step(s, q) * n for s, q, n in history])
        eps, _ = analysis.get_privacy_spent(orders=self._alphas, rdp=rdp, delta=self.delta)
        return float(eps)

    def _rdp_of_one_step(self, sigma: float, rate: float) -> Any:
        from opacus.accountants.analysis import rdp as analysis

        key = (sigma, rate)
        if key not in self._rdp_cache:
            self._rdp_cache[key] = analysis.compute_rdp(
                q=rate, noise_multiplier=sigma, steps=1, orders=self._alphas
            )
        return self._rdp_cache[key]

    def would_exceed(self) -> tuple[bool, float]:
        """(whether the next step would take epsilon past the target, epsilon after it)."""
        after = self.epsilon_after(1)
        return self.target is not None and after > self.target, after

    def stepped(self, epsilon_after: float) -> None:
        """One optimizer step taken: into the accountant."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self.epsilon = epsilon_after

    def state_dict(self) -> dict[str, Any]:
        """Plain data (a weights_only load takes it): the accountant's history of
        (noise multiplier, sample rate, steps)."""
        return {
            "mechanism": "rdp",
            "history": [list(h) for h in _history(self.accountant.history)],
            "epsilon": self.epsilon,
            "delta": self.delta,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.history = _history(state["history"])
        self.epsilon = self.epsilon_after(0)

    def termination(self, step: int) -> dict[str, Any]:
        return {
            "stopReason": STOP_REASON,
            "epsilon": round(self.epsilon, 6),
            "delta": self.delta,
            "targetEpsilon": self.target,
            "step": step,
        }


def _global_mean_optimizer() -> type:
    """Opacus' distributed DP optimizer, with the step's gradient the mean over the global
    batch: (sum of every rank's clipped per-sample gradients + rank 0's noise) / global
    batch, whatever the split (ranks' shares differ by one where the world does not divide
    the batch; Opacus' "mean" assumes equal shares)."""
    from opacus.optimizers import DistributedDPOptimizer

    class GlobalMeanDPOptimizer(DistributedDPOptimizer):
        def scale_grad(self) -> None:  # before the all-reduce (a sum): the same, linear
            for p in self.params:
                p.grad /= self.expected_batch_size

        def reduce_gradients(self) -> None:
            """One all-reduce (a sum) of every gradient, flattened, where Opacus does one
            per parameter (38 for the default GPT: 3 ms each with gloo on CPU)."""
            grads = [p.grad for p in self.params if p.requires_grad]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    return GlobalMeanDPOptimizer
