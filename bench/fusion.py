"""Generated pointwise kernels (the ``fuse`` pass) on the tiny LLaMA, GPT-2 and the digits CNN, on CPU.

Each model's step is compiled twice from the same weights, with the lossless pipeline and with ``fuse``
after it (one LLaMA row with ``clip_grad_norm`` per parameter, whose ``g * coef`` each update folds in),
and the two are stepped round-robin in one process on the same batches (``--steps``, AdamW lr 1e-3).
Columns: fusion groups, update prologues and distinct generated kernels, the nodes they cover and their
share of the step's non-matmul compute nodes, the bytes of intermediates no longer materialised over the step,
predicted and measured peak (the storage tracker), the measured peak without fusion, the step time as the
ratio of medians (fused / unfused, first step excluded), and the loss difference after the last step.
On CPU a fused group runs as a chunked evaluation (``kernels.pointwise.run_chunked``); the generated Triton
kernels run only on a GPU (or under the Triton interpreter in the tests).

    python bench/fusion.py [--steps 8]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import mib, write_table
from _pretrain import batches

import memfit
from memfit.models import build_gpt2_small, build_llama, build_mobilenet_tiny, lm_loss
from memfit.passes.base import PIPELINES


def cases():
    text = batches("finetune", 8, 128, 1, seed=5)[0]
    gen = torch.Generator().manual_seed(0)
    digits = (torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    clip = {"clip_grad_norm": 1.0, "clip": "per_param"}
    return {"tiny-llama (4 layers), 8 x 128": (build_llama("tiny-llama"), text, lm_loss, {}),
            "tiny-llama, clip_grad_norm per parameter": (build_llama("tiny-llama"), text, lm_loss, clip),
            "gpt2 (2 layers, 128 wide), 8 x 128": (build_gpt2_small(), text, lm_loss, {}),
            "digits CNN, batch 64": (build_mobilenet_tiny(), digits, F.cross_entropy, {})}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, (model, batch, loss_fn, extra) in cases().items():
        lossless = list(PIPELINES["lossless"])
        runs = {}
        for label, passes in (("unfused", lossless), ("fused", [*lossless, "fuse"])):
            runs[label] = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn,
                                          optimizer=memfit.AdamW(lr=1e-3), passes=passes, **extra)
        times = {k: [] for k in runs}
        losses = {k: [] for k in runs}
        for _ in range(args.steps):
            for k, t in runs.items():
                t0 = time.perf_counter()
                losses[k].append(float(t.step(*batch)))
                times[k].append(time.perf_counter() - t0)
        info = runs["fused"].graph.info["fuse"]
        measured = {k: t.measure_step(*batch).peak_bytes for k, t in runs.items()}
        row = {"model": name, "method": "memfit + fuse", "groups": info["groups"], "prologues": info["prologues"],
               "kernels": info["kernels"],
               "nodes_fused": info["nodes_fused"], "views_fused": info["views_fused"],
               "compute_nodes": info["compute_nodes"], "share": info["share"],
               "bytes_not_materialised": info["bytes_not_materialised"],
               "predicted_peak_bytes": runs["fused"].plan.peak_bytes, "peak_bytes": measured["fused"],
               "unfused_peak_bytes": measured["unfused"],
               "step_time_ratio": round(statistics.median(times["fused"][1:]) /
                                        statistics.median(times["unfused"][1:]), 3),
               "final_loss": losses["fused"][-1],
               "loss_rel_diff": abs(losses["fused"][-1] - losses["unfused"][-1]) / abs(losses["unfused"][-1])}
        print(row, flush=True)
        rows.append(row)
    for r in rows:
        r["cover"] = f"{r['nodes_fused']} of {r['compute_nodes']} ({r['share']:.0%})"
        r["saved"] = mib(r["bytes_not_materialised"])
        r["predicted"] = mib(r["predicted_peak_bytes"])
        r["measured"] = mib(r["peak_bytes"])
        r["unfused"] = mib(r["unfused_peak_bytes"])
        r["diff"] = f"{r['loss_rel_diff']:.1e}"
    header = (f"`fuse` on CPU: {args.steps} AdamW steps round-robin against the same model without it, "
              f"{args.threads} thread(s). Cover: nodes in fused groups of the step's non-matmul compute nodes; "
              "update prologues: groups folded into the update op that reads them (it makes the gradient "
              "chunk by chunk); views inside: view ops inside groups (index maps read through the inputs' strides); "
              "not materialised: the groups' intermediates over the whole step; step time: fused / unfused "
              "(ratio of medians, first step excluded); loss diff: relative, after the last step.")
    md = write_table("fusion", rows, [
        ("model", "model"), ("groups", "groups"), ("prologues", "update prologues"), ("kernels", "kernels"),
        ("cover", "nodes covered"),
        ("views_fused", "views inside"),
        ("saved", "not materialised"), ("predicted", "predicted peak"), ("measured", "measured peak"),
        ("unfused", "peak without fuse"), ("step_time_ratio", "step time vs unfused"), ("diff", "loss diff")],
        header)
    print(md)


if __name__ == "__main__":
    main()
