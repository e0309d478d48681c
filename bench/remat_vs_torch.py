"""memfit's recomputation vs PyTorch's ``activation_memory_budget``, on the same joint graph.

Both sides run tiny-llama through torch.compile with AOTAutograd and memfit's lowering; they differ only
in what the backward recomputes: PyTorch's min-cut partitioner under
``torch._functorch.config.activation_memory_budget`` in {1.0, 0.5, 0.1}, or memfit's ``remat`` pass
(free mode, then budget mode over a sweep of bytes to free) followed by the plain partition. For each
run: the bytes the forward saves for the backward, the FLOPs recomputed (FLOPs of the forward and
backward graphs minus those of the joint graph) and the measured peak of one forward+backward
(``torch.profiler`` memory events). Then, for each PyTorch budget: memfit's fewest FLOPs at a peak no
higher ("equal peak") and memfit's lowest peak at FLOPs no higher ("equal FLOPs").

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
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    y = torch.randint(0, 256, (args.batch, args.seq), generator=g)
    base = models.build_llama("tiny-llama")

    rows, torch_runs, memfit_runs = [], [], []
    for budget in (1.0, 0.5, 0.1):
        s = run(copy.deepcopy(base), x, y, torch_partition(budget))
        torch_runs.append((budget, s))
        rows.append(dict(method=f"torch activation_memory_budget={budget}", **_fmt(s)))
    none = run(copy.deepcopy(base), x, y, memfit_partition(None))
    memfit_runs.append(("none", none))
    rows.append(dict(method="memfit, no recomputation", **_fmt(none)))
    free = run(copy.deepcopy(base), x, y, memfit_partition({"mode": "free"}))
    memfit_runs.append(("free", free))
    rows.append(dict(method="memfit remat free", **_fmt(free)))
    for share in (0.125, 0.25, 0.5, 0.75, 1.0):
        cfg = {"mode": "budget", "free_bytes": int(free["saved_bytes"] * share)}
        s = run(copy.deepcopy(base), x, y, memfit_partition(cfg))
        memfit_runs.append((f"budget {share:.3g} of saved", s))
        rows.append(dict(method=f"memfit remat budget, free {share:.3g} of saved", **_fmt(s)))

    lines = []
    for budget, t in torch_runs:
        at_peak = [m for _, m in memfit_runs if m["peak_bytes"] <= t["peak_bytes"]]
        at_flops = [m for _, m in memfit_runs if m["recomputed_flops"] <= t["recomputed_flops"]]
        best_flops = min((m["recomputed_flops"] for m in at_peak), default=None)
        best_peak = min((m["peak_bytes"] for m in at_flops), default=None)
        lines.append(
            f"torch budget {budget}: peak {fmt_bytes(t['peak_bytes'])}, "
            f"recomputed {t['recomputed_flops'] / 1e6:.1f} MFLOP"
            f" | memfit at peak <= that: fewest recomputed "
            f"{'n/a' if best_flops is None else f'{best_flops / 1e6:.1f} MFLOP'}"
            f" ({'no more' if best_flops is not None and best_flops <= t['recomputed_flops'] else 'MORE'})"
            f" | memfit at FLOPs <= that: lowest peak {'n/a' if best_peak is None else fmt_bytes(best_peak)}"
            f" ({'no higher' if best_peak is not None and best_peak <= t['peak_bytes'] else 'HIGHER'})")
    header = (f"### Recomputation: memfit remat vs torch activation_memory_budget, tiny-llama {args.batch}x{args.seq}, "
              "cpu\n\nSame joint graph, same lowering; peak of one forward+backward from torch.profiler memory events; "
              "recomputed FLOPs = FLOPs(forward graph) + FLOPs(backward graph) - FLOPs(joint graph).")
    md = write_table("remat_vs_torch", rows, [("method", "method"), ("saved", "saved for backward"),
                                              ("peak", "measured peak (fwd+bwd)"), ("mflops", "recomputed MFLOP")],
                     header + "\n\n" + "\n".join(f"- {ln}" for ln in lines))
    print(md)


def _fmt(s: dict) -> dict:
    return dict(saved=fmt_bytes(s["saved_bytes"]), peak=fmt_bytes(s["peak_bytes"]),
                mflops=f"{s['recomputed_flops'] / 1e6:.1f}", **s)


if __name__ == "__main__":
    main()
