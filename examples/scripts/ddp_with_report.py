"""A plain PyTorch DDP training script: a small model on synthetic data, NCCL or gloo.

    torchrun --nproc-per-node=2 examples/scripts/plain_ddp.py --steps 200

plain_ddp.py is what you would write (torch only); ddp_with_report.py is the same script plus
the one call that tells Joule how far training has come (``diff`` them): with it, each process
serves its progress on /metrics (port 9090 + LOCAL_RANK), which the operator reads.
"""

from __future__ import annotations

import argparse
import os
import sys

import joule_trainer
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

FEATURES = 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32, help="samples per process and step")
    p.add_argument("--log-every", type=int, default=20)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    model = DDP(net, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    target = torch.randn(FEATURES, 1, generator=torch.Generator().manual_seed(0))
    data = torch.Generator().manual_seed(1 + rank)  # each rank draws its own samples

    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch, FEATURES, generator=data)
        y = x @ target + 0.1 * torch.randn(args.batch, 1, generator=data)
        loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        joule_trainer.report(samples=args.batch)
        if step % args.log_every == 0 or step == args.steps:
            # One write per line: the ranks share stdout, and print() can write the text and
            # its newline separately, which merges two ranks' lines into one.
            sys.stdout.write(f"rank {rank} step {step} loss {loss.item():.4f}\n")
            sys.stdout.flush()

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
