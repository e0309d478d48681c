"""Data parallel on CPU (gloo, loopback): memfit's in-step collectives against PyTorch's DDP, ZeRO and FSDP2.

Launches ``--worlds`` (default 1 and 2) ranks of this script (as torchrun would: RANK, WORLD_SIZE,
MASTER_ADDR/PORT) on the tiny LLaMA (4 layers), each rank training on its share of a global batch of
``--batch`` x 128 tokens of the stdlib corpus, ``--steps`` steps, the methods stepped round-robin in each rank:

- **PyTorch DDP + torch AdamW** (``DistributedDataParallel``, bucketed all-reduce overlapping the backward);
- **PyTorch DDP + ZeroRedundancyOptimizer(AdamW)** (``torch.distributed.optim``: ZeRO-1, each rank the state
  of its share of the parameters, parameters broadcast after the step);
- **PyTorch FSDP2 + torch AdamW** (``fully_shard`` per layer and whole: parameters, gradients and state
  sharded, parameters all-gathered for use);
- **memfit AdamW** (``memfit.optimize(process_group=...)``: the gradients all-reduced inside the step in
  buckets whose all-reduce overlaps the rest of the backward), and the same with one synchronous all-reduce
  per gradient (``bucket_bytes=0``);
- **memfit AdamW, state sharded** (``shard="state"``: each gradient reduced onto its parameter's owner,
  which alone holds the state, updates and broadcasts the parameter: ZeRO-1/2);
- **memfit AdamW, parameters sharded** (``shard="params"``: FSDP-style by whole parameter, each fetched from
  its owner before its first read in the forward and again in the backward);
- **memfit GaLore r=64** (``lowrank`` rank 64, gap 50): projected communication (``P^T G`` all-reduced
  between refreshes), and the same with it off (``projected=False``: the whole gradient, or its factors);
- **memfit APOLLO-Mini** (rank 1: the whole gradient all-reduced; APOLLO steps the scaled full gradient).

Columns: the ranks' largest measured peak (memfit: the storage tracker; PyTorch: ``memfit.measure_peak`` on
its step, parameters, gradients and optimizer state counted; FSDP2: its local shards), memfit's predicted
peak, the largest optimizer-state bytes a rank holds, the bytes each rank hands its collectives per step
(memfit: counted by its collectives, ``ops.COMMUNICATED``, averaged over the steps; DDP: its gradients'
bytes, what its all-reduce buckets carry), the step time as a ratio of medians to DDP's (first step
excluded) and the final loss (the ranks' mean).

    python bench/data_parallel.py [--worlds 1 2] [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import mib, write_table
from _pretrain import batches

import memfit
from memfit.models import build_llama, lm_loss

GALORE = ("lowrank", {"rank": 64, "gap": 50})
LOWRANK = {"memfit GaLore r=64, projected": [GALORE],
           "memfit GaLore r=64, whole gradient": [GALORE, ("data_parallel", {"projected": False})],
           "memfit APOLLO-Mini": [("lowrank", {"rule": "apollo", "rank": 1, "scale": 128.0, "scaling": "tensor",
                                               "projector": "random", "gap": 50})]}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def rank_main(args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = args.batch // world
    data = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
            for x, y in batches("finetune", args.batch, 128, args.steps, seed=11)]
    torch.manual_seed(0)
    model = build_llama("tiny-llama")
    methods, opts, modules = {}, {}, {}

    def torch_step(m, opt):
        def step(x, y):
            loss = lm_loss(m(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return step

    ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    opts["PyTorch DDP + AdamW"] = torch.optim.AdamW(ddp.parameters(), lr=1e-3, weight_decay=0.0)
    zero = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    opts["PyTorch DDP + ZeroRedundancyOptimizer"] = ZeroRedundancyOptimizer(
        zero.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-3, weight_decay=0.0)
    fsdp = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in fsdp.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    opts["PyTorch FSDP2 + AdamW"] = torch.optim.AdamW(fsdp.parameters(), lr=1e-3, weight_decay=0.0)
    for name, m in (("PyTorch DDP + AdamW", ddp), ("PyTorch DDP + ZeroRedundancyOptimizer", zero),
                    ("PyTorch FSDP2 + AdamW", fsdp)):
        methods[name] = torch_step(m, opts[name])
        modules[name] = m
    trainers = {}
    for name, extra, shard in [("memfit AdamW", None, "none"),
                               ("memfit AdamW, one all-reduce per gradient", [("data_parallel", {"bucket_bytes": 0})],
                                "none"),
                               ("memfit AdamW, state sharded", None, "state"),
                               ("memfit AdamW, parameters sharded", None, "params"),
                               *((n, e, "none") for n, e in LOWRANK.items())]:
        passes = None if extra is None else ["fused_cross_entropy", "remat", "fused_update", *extra]
        t = memfit.optimize(copy.deepcopy(model), example_inputs=data[0], loss_fn=lm_loss,
                            optimizer=memfit.AdamW(lr=1e-3, weight_decay=0.0), passes=passes,
                            process_group=dist.group.WORLD, shard=shard)
        trainers[name] = t
        methods[name] = t.step
    times = {n: [] for n in methods}
    losses = {n: [] for n in methods}
    sent = {n: 0 for n in trainers}
    for x, y in data:
        for n, step in methods.items():
            memfit.ops.reset_communicated()
            t0 = time.perf_counter()
            loss = step(x, y).detach().clone()
            times[n].append(time.perf_counter() - t0)
            if n in trainers:
                sent[n] += memfit.ops.communicated_bytes()
            dist.all_reduce(loss)
            losses[n].append(float(loss) / world)
    x, y = data[-1]
    mine = {}
    for n in methods:
        if n in trainers:
            t = trainers[n]
            mine[n] = {"peak_bytes": t.measure_step(x, y).peak_bytes, "predicted_peak_bytes": t.plan.peak_bytes,
                       "state_bytes": sum(v.numel() * v.element_size() for v in t.executor.state.values()),
                       "bytes_sent_per_step": sent[n] // len(data)}
            continue
        m, opt = modules[n], opts[n]
        inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer: the local optimizer holds this rank's state
        state = [_local(v) for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        peak = memfit.measure_peak(methods[n], x, y, device="cpu",
                                   existing=iter([*(_local(p) for p in m.parameters()), *m.buffers(), *state, x, y]))
        grads = sum(p.numel() * p.element_size() for p in m.parameters())
        mine[n] = {"peak_bytes": peak.peak_bytes, "state_bytes": sum(
            v.numel() * v.element_size() for v in state if v.dim() > 0),
            "bytes_sent_per_step": grads if "FSDP" not in n else None}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    rows = []
    base = statistics.median(times["PyTorch DDP + AdamW"][1:])
    for n in methods:
        per_rank = [e[n] for e in every]
        row = {"method": n, "world": world, "step_time_ratio": round(statistics.median(times[n][1:]) / base, 3),
               "final_loss": round(losses[n][-1], 4), "peak_bytes": max(r["peak_bytes"] for r in per_rank),
               "state_bytes": max(r["state_bytes"] for r in per_rank)}
        if per_rank[0].get("predicted_peak_bytes") is not None:
            row["predicted_peak_bytes"] = max(r["predicted_peak_bytes"] for r in per_rank)
        if per_rank[0]["bytes_sent_per_step"] is not None:
            row["bytes_sent_per_step"] = max(r["bytes_sent_per_step"] for r in per_rank)
        rows.append(row)
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if "RANK" in os.environ:
        rank_main(args)
        return
    t0 = time.perf_counter()
    rows = []
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = Path("/tmp") / f"memfit-dp-{os.getpid()}-{world}.json"
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(out)]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a rank failed (world size {world})")
        rows += json.loads(out.read_text())
    for r in rows:
        r["peak"] = mib(r["peak_bytes"])
        r["predicted"] = mib(r["predicted_peak_bytes"]) if "predicted_peak_bytes" in r else "-"
        r["state"] = mib(r["state_bytes"])
        r["sent"] = mib(r["bytes_sent_per_step"]) if "bytes_sent_per_step" in r else "-"
    header = (f"Data parallel on CPU (`python bench/data_parallel.py`): {' and '.join(map(str, args.worlds))} ranks "
              f"(gloo, loopback, 1 thread each), tiny-llama (4 layers), global batch {args.batch} x 128, "
              f"{args.steps} AdamW steps (lr 1e-3) round-robin in each rank. Peak and state: the largest over the "
              "ranks; sent: bytes each rank hands its collectives per step (FSDP2's not counted); step time vs "
              "DDP at the same world size.")
    print(write_table("data_parallel", rows, [
        ("method", "method"), ("world", "ranks"), ("peak", "measured peak per rank"), ("predicted", "predicted"),
        ("state", "optimizer state per rank"), ("sent", "sent per rank per step"),
        ("step_time_ratio", "step time vs DDP"), ("final_loss", "final loss")], header))
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
