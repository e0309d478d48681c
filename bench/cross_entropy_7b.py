"""The llama-7b step (bf16, batch 1, seq 2048) planned with and without ``fused_cross_entropy``.

Both plans are made on the meta device (no weights allocated) by the planner the users' doors run, for the
CUDA runtime (Triton kernels). "without" takes ``fused_cross_entropy`` out of the lossless pipeline for this
run (``PIPELINES["lossless"]``); "with" is the default. Columns: the lossless plan's peak and the bytes the
head's values hold at it (``by_layer["lm_head"]``: the logits, their fp32 copy, the log-probabilities and
the backward's two (tokens, vocabulary) tensors, or the fused op's outputs and chunk), then the smallest
peak the planner reaches with every lever of ``--levers`` (the smallest feasible budget: planned with a
budget of one byte, the plan of the BudgetError) and its head bytes.

    python bench/cross_entropy_7b.py [--levers lossy] [--seq 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _common import mib, write_table

import memfit
from memfit.cli import meta_model, plan_on_meta
from memfit.passes import base


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(fused: bool, args) -> dict:
    lossless = base.PIPELINES["lossless"]
    if not fused:
        base.PIPELINES["lossless"] = tuple(p for p in lossless if p != "fused_cross_entropy")
    try:
        t0 = time.perf_counter()
        p0 = plan_on_meta(meta_model("llama-7b", "bf16"), batch=1, seq=args.seq, device="cuda")
        try:
            plan_on_meta(meta_model("llama-7b", "bf16"), batch=1, seq=args.seq, device="cuda", budget="1B",
                         levers=args.levers)
            raise RuntimeError("a one-byte budget fitted")
        except memfit.BudgetError as e:
            small = e.plan
        seconds = time.perf_counter() - t0
    finally:
        base.PIPELINES["lossless"] = lossless
    return {"method": "with fused_cross_entropy" if fused else "without (logits materialised)",
            "peak_bytes": p0.peak_bytes, "head_bytes_at_peak": p0.by_layer.get("lm_head", 0),
            "peak_node": p0.peak_node, "smallest_peak_bytes": small.peak_bytes,
            "smallest_head_bytes": small.by_layer.get("lm_head", 0), "smallest_peak_node": small.peak_node,
            "plan_seconds": round(seconds, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--levers", default="lossy", choices=("lossless", "near-lossless", "lossy"))
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args(argv)
    rows = [run(False, args), run(True, args)]
    for r in rows:
        r["peak"] = gib(r["peak_bytes"])
        r["head"] = mib(r["head_bytes_at_peak"])
        r["smallest"] = gib(r["smallest_peak_bytes"])
        r["smallest_head"] = mib(r["smallest_head_bytes"])
    header = (f"llama-7b, bf16 weights, batch 1 x {args.seq}, AdamW, planned on meta for the CUDA runtime. Lossless "
              f"plan and the smallest peak with every `{args.levers}` lever (the smallest feasible budget); head "
              "bytes: what the lm_head's values hold at that peak.")
    md = write_table("cross_entropy_7b", rows, [
        ("method", "method"), ("peak", "lossless peak"), ("head", "head bytes at it"), ("peak_node", "at"),
        ("smallest", f"smallest feasible ({args.levers})"), ("smallest_head", "head bytes at it"),
        ("smallest_peak_node", "at")], header)
    print(md)


if __name__ == "__main__":
    main()
