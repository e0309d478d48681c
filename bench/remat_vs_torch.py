"""memfit's recomputation vs PyTorch's ``activation_memory_budget``, on the same joint graph.

Both sides run tiny-llama through torch.compile with AOTAutograd and memfit's lowering; they differ only
in what the backward recomputes: PyTorch's min-cut partitioner under
``torch._functorch.config.activation_memory_budget`` in {1.0, 0.5, 0.1}, or memfit's ``remat`` pass
followed by the plain partition (free mode; budget mode over a sweep of bytes to free; budget mode
under FLOP caps, ``max_flops``). For each run: the bytes the forward saves for the backward, the FLOPs
recomputed (FLOPs of the forward and backward graphs minus those of the joint graph) and the measured
peak of one forward+backward (``torch.profiler`` memory events), the same quantity for both sides.
Then, for each PyTorch budget: memfit's peak with ``max_flops`` set to PyTorch's recomputed FLOPs
("equal FLOPs": is it no higher?) and memfit's fewest recomputed FLOPs among runs whose peak is no
higher than PyTorch's ("equal peak": no more?), the cap for that found by bisection on the measured
peak; memfit dominates at that budget when both hold.

    python bench/remat_vs_torch.py [--batch 8 --seq 128]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch import config as functorch_config
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

from memfit import models
from memfit.frontends.dynamo import fqn_from_source, joint_train_graph
from memfit.graph import node_flops, value_nbytes
from memfit.measure import profiler_peak_bytes
from memfit.passes.base import Pipeline, make_pass
from memfit.runtime.lower import lower
from memfit.runtime.memory import fmt_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_table


def _flops(gm) -> int:
    return sum(node_flops(n) for n in gm.graph.nodes)


def _saved(fw, num_fwd_outputs: int) -> int:
    """Bytes of the distinct storages the forward hands to the backward (views of one storage count once)."""
    out = next(n for n in fw.graph.nodes if n.op == "output")
    seen, total = set(), 0
    for a in list(out.args[0])[num_fwd_outputs:]:
        val = getattr(a, "meta", {}).get("val")
        if isinstance(val, torch.Tensor):
            key = val.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                total += value_nbytes(val)
    return total


def run(model, x, y, partition_with) -> dict:
    """Compile with a partition function, run one forward+backward, return saved bytes, FLOPs and peak."""
    torch._dynamo.reset()
    stats: dict = {}

    def backend(gm, example_inputs):
        names = [fqn_from_source(n.meta["grapharg"].source.name) if n.meta.get("grapharg") else None
                 for n in gm.graph.nodes if n.op == "placeholder"]

        def partition(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
            joint_flops = _flops(joint)
            fw, bw = partition_with(joint, joint_inputs, num_fwd_outputs, names, kwargs)
            stats["recomputed_flops"] = _flops(fw) + _flops(bw) - joint_flops
            stats["saved_bytes"] = _saved(fw, num_fwd_outputs)
            return fw, bw

        def compile_graph(graph, inputs):
            return lower(graph, "cpu").fn

        return aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph, partition_fn=partition)(
            gm, example_inputs)

    compiled = torch.compile(model, backend=backend)

    def step():
        models.lm_loss(compiled(x), y).backward()

    step()  # compile
    for p in model.parameters():
        p.grad = None
    stats["peak_bytes"] = profiler_peak_bytes(step)
    return stats


def torch_partition(budget):
    def partition_with(joint, joint_inputs, num_fwd_outputs, names, kwargs):
        with functorch_config.patch(activation_memory_budget=budget):
            return min_cut_rematerialization_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                                       **kwargs)
    return partition_with


def memfit_partition(remat_config):
    """memfit's choice (remat with this config; None: recompute nothing), then the plain partition."""
    def partition_with(joint, joint_inputs, num_fwd_outputs, names, kwargs):
        g = joint_train_graph(joint, num_fwd_outputs, names)
        if remat_config is not None:
            g = Pipeline([make_pass(("remat", remat_config))])(g)
        return default_partition(g.gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    return partition_with


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--search-steps", type=int, default=5, help="bisection steps for the fewest FLOPs at a peak")
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    y = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    base = models.build_llama("tiny-llama")

    def memfit_run(cfg):
        return run(copy.deepcopy(base), x, y, memfit_partition(cfg))

    rows, torch_runs, memfit_runs = [], [], []
    for budget in (1.0, 0.5, 0.1):
        s = run(copy.deepcopy(base), x, y, torch_partition(budget))
        torch_runs.append((budget, s))
        rows.append(dict(method=f"torch activation_memory_budget={budget}", **_fmt(s)))
    none = memfit_run(None)
    memfit_runs.append(none)
    rows.append(dict(method="memfit, no recomputation", **_fmt(none)))
    free = memfit_run({"mode": "free"})
    memfit_runs.append(free)
    rows.append(dict(method="memfit remat free", **_fmt(free)))
    for share in (0.125, 0.25, 0.5, 0.75, 1.0):
        s = memfit_run({"mode": "budget", "free_bytes": int(free["saved_bytes"] * share)})
        memfit_runs.append(s)
        rows.append(dict(method=f"memfit remat budget, free {share:.3g} of saved", **_fmt(s)))

    capped: dict[int, dict] = {}

    def at_cap(cap: int) -> dict:
        if cap not in capped:
            capped[cap] = memfit_run({"mode": "budget", "max_flops": int(cap)})
            memfit_runs.append(capped[cap])
        return capped[cap]

    lines = []
    for budget, t in torch_runs:
        # equal FLOPs: memfit's lowest peak for at most torch's recomputed FLOPs
        same_flops = at_cap(t["recomputed_flops"])
        # equal peak: the smallest FLOP cap whose measured peak is no higher than torch's (bisection)
        lo, hi = 0, t["recomputed_flops"]
        while at_cap(hi)["peak_bytes"] > t["peak_bytes"] and hi < 64 * max(t["recomputed_flops"], 1):
            lo, hi = hi, max(2 * hi, 1)
        for _ in range(args.search_steps):
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if at_cap(mid)["peak_bytes"] <= t["peak_bytes"] else (mid, hi)
        fits = [m for m in memfit_runs if m["peak_bytes"] <= t["peak_bytes"]]
        fewest = min((m["recomputed_flops"] for m in fits), default=None)
        lower = same_flops["peak_bytes"] <= t["peak_bytes"]
        fewer = fewest is not None and fewest <= t["recomputed_flops"]
        lines.append(
            f"torch budget {budget}: peak {fmt_bytes(t['peak_bytes'])}, recomputed {_mf(t['recomputed_flops'])}"
            f" | memfit at FLOPs <= that (max_flops={t['recomputed_flops']}): peak "
            f"{fmt_bytes(same_flops['peak_bytes'])} with {_mf(same_flops['recomputed_flops'])}"
            f" ({'no higher' if lower else 'HIGHER'})"
            f" | memfit at peak <= that: fewest recomputed {'n/a' if fewest is None else _mf(fewest)}"
            f" ({'no more' if fewer else 'MORE'})"
            f" | {'memfit dominates' if lower and fewer else 'memfit does NOT dominate'}")
    for cap in sorted(capped):
        rows.append(dict(method=f"memfit remat budget, max_flops {_mf(cap)}", **_fmt(capped[cap])))
    header = (f"### Recomputation: memfit remat vs torch activation_memory_budget, tiny-llama {args.batch}x{args.seq}, "
              "cpu\n\nSame joint graph, same lowering; peak of one forward+backward from torch.profiler memory events; "
              "recomputed FLOPs = FLOPs(forward graph) + FLOPs(backward graph) - FLOPs(joint graph). "
              "For each torch budget: memfit with `max_flops` = torch's recomputed FLOPs (equal FLOPs), and the "
              "fewest FLOPs among memfit's runs whose peak is no higher than torch's (equal peak; the FLOP cap "
              "found by bisection on the measured peak).")
    md = write_table("remat_vs_torch", rows, [("method", "method"), ("saved", "saved for backward"),
                                              ("peak", "measured peak (fwd+bwd)"), ("mflops", "recomputed MFLOP")],
                     header + "\n\n" + "\n".join(f"- {ln}" for ln in lines))
    print(md)


def _mf(flops: int) -> str:
    return f"{flops / 1e6:.1f} MFLOP"


def _fmt(s: dict) -> dict:
    return dict(saved=fmt_bytes(s["saved_bytes"]), peak=fmt_bytes(s["peak_bytes"]),
                mflops=f"{s['recomputed_flops'] / 1e6:.1f}", **s)


if __name__ == "__main__":
    main()
