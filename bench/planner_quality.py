"""What the planner chooses, old vs new, side by side, and whether the new plans hold when run.

1. Choice quality: tiny-llama (batch 8 x 128, fp32), llama-60m (bf16, 1 x 2048, planned on meta) and a GPT-2
   small config (12 x 768, bf16, 1 x 512, on meta), each at three tight budgets (shares of its lossless
   peak): parameters (count and elements) on lossy state and on 8-bit state, recomputed FLOPs, predicted
   peak, planning time. Both planners plan the whole captured graph. Each checkout runs in its own worker
   process; workers alternate case by case.
2. Predicted == measured (new planner, the CPU tracker): tiny-llama 8 x 128, the tiny GPT-2 and the CNN of
   ``models`` at a loose, a medium and a tight budget, one step run and measured.

    git worktree add /tmp/memfit-old/memfit 811e3b6
    python bench/planner_quality.py --old /tmp/memfit-old

Writes ``bench/results/planner_quality.{md,json}`` and ``bench/results/planner_measured.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_table

CASES = {  # name -> shares of the lossless peak
    "tiny-llama 8x128": (0.7, 0.5, 0.4),
    "llama-60m bf16 1x2048": (0.9, 0.75, 0.62),  # the logits hold the smallest peak at ~0.6 of the lossless
    "gpt2-small bf16 1x512": (0.7, 0.55, 0.45),  # smallest peak ~0.41 of the lossless
}


def _case(name: str):
    from memfit import models

    if name.startswith("tiny-llama"):
        gen = torch.Generator().manual_seed(0)
        batch = (torch.randint(0, 256, (8, 128), generator=gen), torch.randint(0, 256, (8, 128), generator=gen))
        return models.build_llama("tiny-llama"), batch, models.lm_loss
    if name.startswith("llama-60m"):
        with torch.device("meta"):
            model = models.build_llama("llama-60m")
        tokens = torch.zeros((1, 2048), dtype=torch.int64, device="meta")
        return model.to(torch.bfloat16), (tokens, tokens), models.lm_loss
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_positions=512))
    tokens = torch.zeros((1, 512), dtype=torch.int64, device="meta")
    return model.to(torch.bfloat16), (tokens, tokens), models.lm_loss


def worker(label: str, name: str) -> list[dict]:
    import memfit
    from memfit.api import build_graph

    model, batch, loss_fn = _case(name)
    _, lossless = build_graph(model, batch, loss_fn=loss_fn, passes=["remat", "fused_update"])
    rows = []
    for share in CASES[name]:
        budget = int(lossless.peak_bytes * share)
        t = time.perf_counter()
        try:
            g, plan = build_graph(model, batch, loss_fn=loss_fn, budget_bytes=budget)
        except memfit.BudgetError as e:
            rows.append({"method": label, "case": name, "share": share, "budget_bytes": budget, "fits": 0,
                         "seconds": round(time.perf_counter() - t, 2), "smallest_peak_bytes": e.smallest_peak_bytes})
            continue
        seconds = time.perf_counter() - t
        low = g.info.get("lowrank", {}).get("per_param", {})
        eight = g.info.get("quantize_state", {}).get("per_param", {})
        numel = {f: n.meta["val"].numel() for f, n in g.params.items()}
        rows.append({"method": label, "case": name, "share": share, "budget_bytes": budget, "fits": 1,
                     "seconds": round(seconds, 2), "lossless_peak_bytes": lossless.peak_bytes,
                     "peak_bytes": plan.peak_bytes, "lossy_params": len(low),
                     "lossy_elements": sum(numel[f] for f in low), "eight_bit_params": len(eight),
                     "eight_bit_elements": sum(numel[f] for f in eight),
                     "recomputed_flops": int(g.info.get("remat", {}).get("recomputed_flops", 0)),
                     "trials": len(g.info.get("planner", {}).get("trials", []))})
    return rows


def measured_rows() -> list[dict]:
    import torch.nn.functional as F

    import memfit
    from memfit import models

    gen = torch.Generator().manual_seed(0)
    cases = {
        "tiny-llama 8x128": (models.build_llama(), (torch.randint(0, 256, (8, 128), generator=gen),
                                                    torch.randint(0, 256, (8, 128), generator=gen)), models.lm_loss),
        "gpt2 (2x128)": (models.build_gpt2_small(), (torch.randint(0, 256, (4, 64), generator=gen),
                                                     torch.randint(0, 256, (4, 64), generator=gen)), models.lm_loss),
        "cnn": (models.build_cnn(), (torch.randn(16, 3, 32, 32, generator=gen),
                                     torch.randint(0, 10, (16,), generator=gen)), F.cross_entropy),
    }
    from memfit import zoo

    lstm = zoo.CASES["lstm-lm"](0)
    cases["lstm-lm (architecture matrix)"] = (lstm.model, lstm.batch, lstm.loss_fn)
    rows = []
    for name, (model, batch, loss_fn) in cases.items():
        lossless = memfit.plan(model, example_inputs=batch, loss_fn=loss_fn).peak_bytes
        try:  # the smallest peak the levers reach: the tight budget sits 1% above it
            memfit.plan(model, example_inputs=batch, loss_fn=loss_fn, budget=1)
        except memfit.BudgetError as e:
            smallest = e.smallest_peak_bytes
        budgets = {"loose": int(1.5 * lossless), "medium": (lossless + smallest) // 2, "tight": int(1.01 * smallest)}
        if "lstm" in name:
            budgets = {"0.7x": int(0.7 * lossless)}
        for label, budget in budgets.items():
            t = time.perf_counter()
            memfit.plan(model, example_inputs=batch, loss_fn=loss_fn, budget=budget)
            seconds = time.perf_counter() - t
            trainer = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, budget=budget)
            trainer.step(*batch)
            measured = trainer.measure_step(*batch).peak_bytes
            rows.append({"method": "memfit (new planner)", "case": name, "budget": label, "budget_bytes": budget,
                         "peak_bytes": trainer.plan.peak_bytes, "measured_peak_bytes": measured,
                         "exact": int(measured == trainer.plan.peak_bytes), "within_budget": int(measured <= budget),
                         "plan_seconds": round(seconds, 2),
                         "passes": ", ".join(p for p in trainer.graph.applied if p != "sink")})
            print(rows[-1], flush=True)
    return rows


def _mib(b) -> str:
    return f"{b / 2**20:.2f}" if isinstance(b, int) else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--case", default=None)
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--only-measured", action="store_true")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.case)))
        return
    rows = []
    for name in CASES if not args.only_measured else ():  # round-robin: old then new, case by case
        for label, checkout in (("old planner", args.old), ("new planner", None)):
            if label == "old planner" and not checkout:
                continue
            env = dict(os.environ, **({"PYTHONPATH": checkout} if checkout else {}))
            out = subprocess.run([sys.executable, __file__, "--worker", label, "--case", name], env=env,
                                 capture_output=True, text=True, cwd="/tmp")
            if out.returncode:
                print(out.stderr[-2000:])
                continue
            got = json.loads(out.stdout.strip().splitlines()[-1])
            for r in got:
                print(r, flush=True)
            rows += got
    for r in rows:
        r["peak_mib"], r["budget_mib"] = _mib(r.get("peak_bytes")), _mib(r["budget_bytes"])
        r["gflops"] = f"{r['recomputed_flops'] / 1e9:.2f}" if "recomputed_flops" in r else ""
    if rows:
        print(write_table("planner_quality", rows, [
        ("case", "case"), ("share", "budget / lossless peak"), ("budget_mib", "budget (MiB)"), ("method", "planner"),
        ("fits", "fits"), ("lossy_params", "params on lossy state"), ("lossy_elements", "elements on lossy"),
        ("eight_bit_params", "params on 8-bit"), ("eight_bit_elements", "elements on 8-bit"),
        ("gflops", "recomputed GFLOPs"), ("peak_mib", "predicted peak (MiB)"), ("trials", "trials"),
        ("seconds", "plan time (s)")],
        "Planner choices, old vs new (whole captured graph, same budgets; lossy = low-rank/APOLLO state)"))
    if not args.skip_measured:
        m = measured_rows()
        for r in m:
            r["peak_mib"], r["measured_mib"], r["budget_mib"] = (_mib(r["peak_bytes"]), _mib(r["measured_peak_bytes"]),
                                                                 _mib(r["budget_bytes"]))
        print(write_table("planner_measured", m, [
            ("case", "case"), ("budget", "budget"), ("budget_mib", "budget (MiB)"), ("peak_mib", "predicted (MiB)"),
            ("measured_mib", "measured (MiB)"), ("exact", "predicted == measured"),
            ("within_budget", "measured <= budget"), ("plan_seconds", "memfit.plan time (s)"),
            ("passes", "passes chosen")],
            "New planner: predicted vs measured peak of one step (CPU tracker); loose = 1.5x the lossless peak, "
            "medium = halfway to the smallest reachable peak, tight = 1% above it"))


if __name__ == "__main__":
    main()
