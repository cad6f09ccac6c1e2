"""Run by test_privacy under torchrun: the gradient one DP step hands AdamW, from the
trainer's own path (per micro-batch clipping, rank 0's noise, the all-reduce), against the
definition computed on one process: the mean over the global batch of every sample's gradient
clipped to the max norm. Noise ~0 (a multiplier of 1e-9); prints one JSON line per rank."""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from joule_trainer import batching, dp
from joule_trainer.models import TinyGPT, for_per_sample_gradients
from joule_trainer.train import init_process_group
from torch import nn

GLOBAL, MICRO, VOCAB, BLOCK, NORM = 7, 2, 20, 8, 0.05


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1).sum()


def main() -> None:
    init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = for_per_sample_gradients(TinyGPT(VOCAB, BLOCK, 16, 1, 2))
    reference = copy.deepcopy(model)
    x = torch.randint(0, VOCAB, (GLOBAL, BLOCK))
    y = torch.randint(0, VOCAB, (GLOBAL, BLOCK))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    settings = dp.Settings(1e-9, NORM, None, None)
    privacy = dp.Privacy(settings, model, optimizer, samples=100, global_batch=GLOBAL, steps=1)
    seen: list[torch.Tensor] = []
    original_step = optimizer.step

    def capture(*a: object, **k: object) -> None:
        seen.extend(p.grad.clone() for p in model.parameters())
        original_step()

    optimizer.step = capture  # type: ignore[method-assign]
    share = batching.share(GLOBAL, world, rank, MICRO)
    opt = privacy.optimizer
    opt.zero_grad(set_to_none=True)
    last = len(share.micro_batches) - 1
    for k, (offset, n) in enumerate(share.micro_batches):
        loss_of(privacy.module, x[offset : offset + n], y[offset : offset + n]).backward()
        if k < last:
            opt.signal_skip_step(do_skip=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
    opt.step()

    expected = [torch.zeros_like(p) for p in reference.parameters()]
    norms = []
    for i in range(GLOBAL):
        reference.zero_grad()
        loss_of(reference, x[i : i + 1], y[i : i + 1]).backward()
        grads = [p.grad for p in reference.parameters()]
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))
        norms.append(norm)
        for e, g in zip(expected, grads, strict=True):
            e += g * min(1.0, NORM / (norm + 1e-6)) / GLOBAL
    diff = max(float((a - b).abs().max()) for a, b in zip(seen, expected, strict=True))
    scale = max(float(e.abs().max()) for e in expected)
    line = {"rank": rank, "world": world, "max_diff": diff, "max_grad": scale,
            "min_norm": min(norms)}  # fmt: skip
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
