"""One rank of tests/test_data_parallel.py (run as a script with RANK, WORLD_SIZE, MASTER_ADDR/PORT set, as
torchrun would): trains each configuration's share of the global batches data parallel and, on rank 0,
saves the losses (averaged over the ranks) and the final weights."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import memfit
from memfit.models import build_llama, lm_loss


def main(out: str, configs: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (passes, steps, per_rank, *opts) in json.loads(configs).items():
        print(f"config {name}", flush=True)
        torch.manual_seed(0)
        model = build_llama("tiny-llama", num_hidden_layers=1)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 256, (per_rank * world, 32), generator=gen) for _ in range(steps)]
        mine = [b[rank * per_rank:(rank + 1) * per_rank] for b in batches]
        passes = [p if isinstance(p, str) else tuple(p) for p in passes] if passes else None
        memfit.ops.reset_communicated()
        t = memfit.optimize(model, example_inputs=(mine[0], torch.roll(mine[0], -1, 1)), loss_fn=lm_loss,
                            optimizer=memfit.AdamW(lr=1e-3), passes=passes, process_group="world",
                            **(opts[0] if opts else {}))
        losses = []
        for x in mine:
            loss = t.step(x, torch.roll(x, -1, 1)).detach().clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / world)
        total = memfit.ops.communicated_bytes()
        sent = total // steps
        t.gather_parameters()  # shard="params": every rank's model gets every weight (a no-op otherwise)
        if rank == 0:  # the weights after the steps (before the measured one below)
            weights = {f: p.detach().clone() for f, p in model.named_parameters()}
            weights.update({f: w.detach().clone() for f, w in t.plain_weights().items()})  # INT8/NF4 held
            torch.save(weights, f"{out}.{name.replace('/', '-')}.pt")
        mem = {"peak": t.plan.peak_bytes, "state_bytes": sum(v.numel() * v.element_size()
                                                             for v in t.executor.state.values()),
               "measured": t.measure_step(mine[0], torch.roll(mine[0], -1, 1)).peak_bytes, "bytes_per_step": sent}
        ranks = [None] * world
        dist.all_gather_object(ranks, mem)
        results[name] = {"losses": losses, "bytes_per_step": sent, "bytes_total": total,
                         "declared": t.graph.info["data_parallel"], "peak": t.plan.peak_bytes,
                         "measured": mem["measured"], "ranks": ranks, "recomputed_flops": int(
                             t.graph.info.get("pass_stats", {}).get("remat", {}).get("recomputed_flops", 0))}
    if rank == 0:
        with open(f"{out}.json", "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
