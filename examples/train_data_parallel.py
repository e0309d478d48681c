"""Train the byte-level LLaMA data parallel with memfit: the collectives inside the compiled step.

Launch one process per device with torchrun (gloo on CPU, NCCL on GPUs); every rank trains on its own
share of each global batch. ``--shard state`` keeps each parameter's optimizer state on one rank,
``--shard params`` its weights too, ``--shard auto --budget 60MiB`` lets the planner pick the least sharding
that fits (before any lossy lever); the checkpoint written with ``--save`` loads at any world size.

    torchrun --nproc-per-node 2 examples/train_data_parallel.py --steps 100 --shard state --save ckpt
    torchrun --nproc-per-node 4 examples/train_data_parallel.py --steps 200 --resume ckpt
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from tqdm import tqdm

import memfit
from memfit import data, models


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="train until this many optimizer steps in total")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step, over all ranks")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: tiny-llama's)")
    ap.add_argument("--shard", choices=("none", "state", "params", "auto"), default="state")
    ap.add_argument("--budget", default=None, help="per-rank memory budget, e.g. 60MiB (with --shard auto)")
    ap.add_argument("--save", default=None, help="write a checkpoint directory here at the end")
    ap.add_argument("--resume", default=None, help="continue from a checkpoint directory (any world size)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the world size {world}")
    per = args.batch // world
    batches = data.ByteBatches(data.stdlib_corpus(), args.batch, args.seq, seed=0)  # the same on every rank

    def mine():
        x, y = next(batches)
        return x[rank * per:(rank + 1) * per].to(device), y[rank * per:(rank + 1) * per].to(device)

    layers = {} if args.layers is None else {"num_hidden_layers": args.layers}
    model = models.build_llama("tiny-llama", seed=0, **layers).to(device)
    trainer = memfit.optimize(model, example_inputs=mine(), loss_fn=models.lm_loss,
                              optimizer=memfit.AdamW(lr=args.lr, weight_decay=0.1), process_group="world",
                              shard=args.shard, budget=args.budget)
    if args.resume:
        memfit.load_checkpoint(trainer, args.resume)
        for _ in range(trainer.step_count):  # the data stream resumes where it stopped
            next(batches)
    if rank == 0:
        print(trainer.plan)
    loss = float("nan")
    bar = tqdm(range(trainer.step_count, args.steps), desc=f"rank {rank}", unit="step", disable=rank != 0)
    for _ in bar:
        loss_t = trainer.step(*mine()).detach().clone()
        dist.all_reduce(loss_t)
        loss = float(loss_t) / world
        bar.set_postfix(loss=f"{loss:.3f}")
    if rank == 0:
        print(f"step {trainer.step_count}: loss {loss:.4f} (the ranks' mean)")
    if args.save:
        memfit.save_checkpoint(trainer, args.save)
    dist.destroy_process_group()
    return loss


if __name__ == "__main__":
    main()
