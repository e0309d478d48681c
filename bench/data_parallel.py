"""Data parallel on CPU (gloo, loopback): memfit's in-step all-reduce against PyTorch DDP, and what is sent.

Launches ``--world`` ranks of this script (as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR/PORT) on the
tiny LLaMA (4 layers), each rank training on its share of a global batch of ``--batch`` x 128 tokens of the
stdlib corpus, ``--steps`` steps, the methods stepped round-robin in each rank:

- **PyTorch DDP + torch AdamW** (``DistributedDataParallel``, bucketed all-reduce overlapping the backward);
- **memfit AdamW** (``memfit.optimize(process_group=...)``: one all-reduce per gradient inside the step);
- **memfit GaLore r=64** (``lowrank`` rank 64: its factored gradients all-gathered as factors);
- **memfit APOLLO-Mini** (rank 1: full gradients all-reduced; APOLLO needs the full gradient).

Columns (rank 0): the step time as a ratio of medians to DDP's (first step excluded), the measured peak of
a step (memfit: the storage tracker; DDP: ``memfit.measure_peak`` on its step, parameters, gradients and
state counted), the bytes each rank sends per step (memfit: counted by its collectives, ``ops.COMMUNICATED``;
DDP: its gradients' bytes, what its all-reduce buckets carry), and the final loss (the ranks' mean).

    python bench/data_parallel.py [--world 2] [--steps 12]
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

LOWRANK = {"memfit GaLore r=64": ("lowrank", {"rank": 64, "gap": 50}),
           "memfit APOLLO-Mini": ("lowrank", {"rule": "apollo", "rank": 1, "scale": 128.0, "scaling": "tensor",
                                              "projector": "random", "gap": 50})}


def rank_main(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    per = args.batch // world
    data = [(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
            for x, y in batches("finetune", args.batch, 128, args.steps, seed=11)]
    torch.manual_seed(0)
    model = build_llama("tiny-llama")
    methods = {}
    ddp_model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    ddp_opt = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3, weight_decay=0.0)

    def ddp_step(x, y):
        loss = lm_loss(ddp_model(x), y)
        loss.backward()
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)
        return loss.detach()

    methods["PyTorch DDP + AdamW"] = ddp_step
    trainers = {}
    for name, extra in [("memfit AdamW", None), *LOWRANK.items()]:
        passes = None if extra is None else ["fused_cross_entropy", "remat", "fused_update", extra]
        t = memfit.optimize(copy.deepcopy(model), example_inputs=data[0], loss_fn=lm_loss,
                            optimizer=memfit.AdamW(lr=1e-3, weight_decay=0.0), passes=passes,
                            process_group=dist.group.WORLD)
        trainers[name] = t
        methods[name] = t.step
    times = {n: [] for n in methods}
    losses = {n: [] for n in methods}
    sent = {n: 0 for n in trainers}
    for x, y in data:
        for n, step in methods.items():
            memfit.ops.COMMUNICATED.update(all_reduce_bytes=0, all_gather_bytes=0, calls=0)
            t0 = time.perf_counter()
            loss = step(x, y).detach().clone()
            times[n].append(time.perf_counter() - t0)
            if n in trainers:
                sent[n] = memfit.ops.COMMUNICATED["all_reduce_bytes"] + memfit.ops.COMMUNICATED["all_gather_bytes"]
            dist.all_reduce(loss)
            losses[n].append(float(loss) / world)
    x, y = data[-1]
    grads_bytes = sum(p.numel() * p.element_size() for p in ddp_model.parameters())
    state = [s for st in ddp_opt.state.values() for s in st.values() if isinstance(s, torch.Tensor)]
    ddp_peak = memfit.measure_peak(ddp_step, x, y, device="cpu",
                                   existing=iter([*ddp_model.parameters(), *ddp_model.buffers(), *state, x, y]))
    rows = []
    base = statistics.median(times["PyTorch DDP + AdamW"][1:])
    for n in methods:
        row = {"method": n, "world": world, "step_time_ratio": round(statistics.median(times[n][1:]) / base, 3),
               "final_loss": round(losses[n][-1], 4)}
        if n in trainers:
            t = trainers[n]
            row.update(peak_bytes=t.measure_step(x, y).peak_bytes, predicted_peak_bytes=t.plan.peak_bytes,
                       bytes_sent_per_step=sent[n], declared_bytes_per_step=t.graph.info["data_parallel"]
                       ["bytes_per_step"])
        else:
            row.update(peak_bytes=ddp_peak.peak_bytes, bytes_sent_per_step=grads_bytes)
        rows.append(row)
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if "RANK" in os.environ:
        rank_main(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path("/tmp") / f"memfit-dp-{os.getpid()}.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(args.world),
           "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(args.world)]
    if any(p.wait() for p in procs):
        raise SystemExit("a rank failed")
    rows = json.loads(out.read_text())
    for r in rows:
        r["peak"] = mib(r["peak_bytes"])
        r["predicted"] = mib(r["predicted_peak_bytes"]) if "predicted_peak_bytes" in r else "-"
        r["sent"] = mib(r["bytes_sent_per_step"])
    header = (f"Data parallel on CPU: {args.world} ranks (gloo, loopback, 1 thread each), tiny-llama (4 layers), "
              f"global batch {args.batch} x 128, {args.steps} AdamW steps (lr 1e-3) round-robin in each rank. Rank 0's "
              "figures; sent: bytes each rank contributes to its collectives per step.")
    print(write_table("data_parallel", rows, [
        ("method", "method"), ("peak", "measured peak per rank"), ("predicted", "predicted"),
        ("sent", "sent per rank per step"), ("step_time_ratio", "step time vs DDP"), ("final_loss", "final loss")],
        header))
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
