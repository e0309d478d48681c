"""One Trainer through batches of several shapes, without a new ``optimize()``, against eager AdamW.

tiny-llama (4 layers, hidden 256), planned under a budget for the largest batch (8 x 128); then batches
of sequence length 17, 64 and 128 at batch sizes 8 and 3, in an interleaved order. Each step's loss is
compared with eager ``torch.optim.AdamW`` on a copy of the model fed the same batches; each new shape is
compiled on first sight (its compile time and predicted peak are listed), and the largest shape's step is
measured at the end. Writes bench/results/variable_shapes.{md,json}.

    python bench/variable_shapes.py [--budget-share 0.9]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import memfit
from memfit import data, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mib, write_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-share", type=float, default=0.9,
                    help="budget as a share of the lossless plan's peak at the largest shape")
    args = ap.parse_args(argv)
    model = models.build_llama("tiny-llama")
    eager = copy.deepcopy(model)
    corpus = data.stdlib_corpus()
    biggest = next(data.ByteBatches(corpus, 8, 128, seed=0))
    lossless = memfit.plan(copy.deepcopy(model), example_inputs=biggest, loss_fn=models.lm_loss).peak_bytes
    budget = int(args.budget_share * lossless)
    t = time.perf_counter()
    tr = memfit.optimize(model, example_inputs=biggest, loss_fn=models.lm_loss, budget=budget,
                         optimizer=memfit.AdamW(lr=1e-3, weight_decay=0.0))
    setup = time.perf_counter() - t
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
    rows = []
    shapes = [(8, 17), (3, 64), (8, 128), (3, 17), (8, 64), (3, 128), (8, 17), (3, 64)]
    for i, (b, s) in enumerate(shapes):
        x, y = next(data.ByteBatches(corpus, b, s, seed=100 + i))
        known = len(tr.compiled_shapes)
        t = time.perf_counter()
        loss = float(tr.step(x, y))
        took = time.perf_counter() - t
        opt.zero_grad()
        ref = models.lm_loss(eager(x), y)
        ref.backward()
        opt.step()
        ref = float(ref.detach())
        compiled = tr._compiled[next(k for k in reversed(tr.compiled_shapes))]
        new = len(tr.compiled_shapes) > known
        rows.append({"method": f"step {i + 1}: {b}x{s}", "batch": b, "seq": s, "loss": round(loss, 6),
                     "eager_loss": round(ref, 6), "rel_diff": abs(loss - ref) / abs(ref),
                     "compiled_now": int(new), "step_s": round(took, 2),
                     "predicted_peak_bytes": compiled.plan.peak_bytes})
        print(rows[-1], flush=True)
    measured = tr.measure_step(*biggest).peak_bytes
    rows.append({"method": "largest shape 8x128, measured", "batch": 8, "seq": 128,
                 "predicted_peak_bytes": tr.plan.peak_bytes, "measured_peak_bytes": measured,
                 "budget_bytes": budget})
    for r in rows:
        r["rel"] = f"{r['rel_diff']:.1e}" if "rel_diff" in r else ""
        r["peak"] = mib(r["predicted_peak_bytes"]) + (f" (measured {mib(r['measured_peak_bytes'])})"
                                                     if "measured_peak_bytes" in r else "")
        r["new"] = {1: "yes", 0: "no"}.get(r.get("compiled_now"), "")
    header = (f"### One Trainer, many batch shapes (tiny-llama, cpu): budget {mib(budget)} "
              f"({args.budget_share:g}x the lossless peak at 8x128), optimize() {setup:.1f} s\n\n"
              "Each row is one optimizer step; `compiled` says whether that shape was captured then (a new "
              "shape costs a capture, once); the loss is compared with eager torch.optim.AdamW fed the same "
              "batches.")
    cols = [("method", "step"), ("loss", "memfit loss"), ("eager_loss", "eager loss"), ("rel", "relative diff"),
            ("new", "compiled"), ("step_s", "step time (s)"), ("peak", "predicted peak")]
    print(write_table("variable_shapes", rows, cols, header))
    print(f"largest shape: predicted {tr.plan.peak_bytes} B, measured {measured} B, budget {budget} B")


if __name__ == "__main__":
    main()
