"""Per-rank memory of llama-7b and llama-70b trained data parallel on 8 GPUs, planned, beside ZeRO's formula.

Each model (bf16 weights, fp32 AdamW moments, batch 1 x seq 2048 per rank, planned for the CUDA runtime on
the meta device: nothing allocated) is planned by the planner the users' doors run:

- **memfit, one process**: ``memfit plan MODEL --dtype bf16 --device cuda`` (the lossless pipeline);
- **memfit, 8 ranks, state sharded**: ``memfit plan MODEL --world-size 8`` (``shard="state"``: each
  parameter's moments on one rank; every rank planned, whole step captured); the highest and lowest
  rank's peak and the largest share of the state;
- **memfit, 8 ranks, weights and state sharded**: ``--shard params`` (FSDP-style by whole parameter: a
  weight lives on its owner and is fetched just before use in the forward and again in the backward).

Beside them, the per-device *model states* (weights, gradients, optimizer state; no activations) of the
ZeRO paper's formula for mixed-precision Adam (Rajbhandari et al., 2020, section 5 and Figure 1: fp16
weights and gradients 2 + 2 bytes per parameter, K = 12 bytes of fp32 master weights and moments, N_d
devices): data parallel (2 + 2 + K)Ψ, P_os 4Ψ + KΨ/N_d, P_os+g 2Ψ + (2 + K)Ψ/N_d, P_os+g+p (4 + K)Ψ/N_d,
evaluated for the same Ψ and N_d = 8. memfit keeps no fp32 master copy (K = 8: the two moments) and no
gradient beyond the one being reduced (the fused update), so its model states per rank are 2Ψ + 8Ψ/N_d plus
balance: the ``model states`` column of memfit's rows is its weights plus its largest state share (with
``--shard params`` the largest share of weights and state together, i.e. (2 + 8)Ψ/N_d plus balance).

    python bench/zero_plan.py [--world 8] [--models llama-7b llama-70b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _common import write_table

from memfit.cli import meta_model, plan_on_meta


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def rows_for(name: str, world: int) -> list[dict]:
    model = meta_model(name, "bf16")
    psi = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    one = plan_on_meta(model, batch=1, seq=2048, device="cuda")
    t1 = time.perf_counter()
    many = plan_on_meta(meta_model(name, "bf16"), batch=1, seq=2048, device="cuda", world_size=world)
    t2 = time.perf_counter()
    fsdp = plan_on_meta(meta_model(name, "bf16"), batch=1, seq=2048, device="cuda", world_size=world,
                        shard="params")
    t3 = time.perf_counter()
    weights = one.persistent["parameters"]
    state_one = one.persistent.get("optimizer state", 0)
    shares = [r["state_bytes"] for r in many.ranks]
    peaks = [r["peak_bytes"] for r in many.ranks]
    out = [
        {"model": name, "method": "memfit, one process", "world": 1, "peak_bytes": one.peak_bytes,
         "lowest_rank_peak_bytes": one.peak_bytes, "model_state_bytes": weights + state_one,
         "state_bytes": state_one, "plan_seconds": round(t1 - t0, 1)},
        {"model": name, "method": "memfit, state sharded (ZeRO-1/2)", "world": world, "peak_bytes": max(peaks),
         "lowest_rank_peak_bytes": min(peaks), "model_state_bytes": weights + max(shares),
         "state_bytes": max(shares), "plan_seconds": round(t2 - t1, 1)},
        {"model": name, "method": "memfit, weights and state sharded (FSDP-style)", "world": world,
         "peak_bytes": max(r["peak_bytes"] for r in fsdp.ranks),
         "lowest_rank_peak_bytes": min(r["peak_bytes"] for r in fsdp.ranks),
         "model_state_bytes": max(r["param_bytes"] + r["state_bytes"] for r in fsdp.ranks),
         "state_bytes": max(r["state_bytes"] for r in fsdp.ranks), "plan_seconds": round(t3 - t2, 1)},
    ]
    k = 12
    for stage, per_param in (("data parallel", 2 + 2 + k), ("P_os", 4 + k / world), ("P_os+g", 2 + (2 + k) / world),
                             ("P_os+g+p", (4 + k) / world)):
        out.append({"model": name, "method": f"ZeRO formula, {stage} (K=12)",
                    "world": 1 if stage == "data parallel" else world, "model_state_bytes": int(per_param * psi)})
    for r in out:
        r["parameters"] = psi
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--models", nargs="+", default=["llama-7b", "llama-70b"])
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        rows += rows_for(name, args.world)
        print(f"{name} planned ({time.perf_counter() - t0:.0f} s)", flush=True)
    for r in rows:
        r["peak"] = gib(r["peak_bytes"]) if "peak_bytes" in r else "-"
        r["lowest"] = gib(r["lowest_rank_peak_bytes"]) if "lowest_rank_peak_bytes" in r else "-"
        r["states"] = gib(r["model_state_bytes"])
        r["state"] = gib(r["state_bytes"]) if "state_bytes" in r else "-"
    header = (f"Per-rank memory, {args.world} ranks, bf16 weights, AdamW, batch 1 x seq 2048 per rank, planned for "
              "CUDA on the meta device (`python bench/zero_plan.py`). memfit rows: predicted peak of the highest "
              "and lowest rank, model states (weights + the largest optimizer-state share). ZeRO rows: the paper's "
              "per-device model-state formula for the same parameter count (no activations).")
    print(write_table("zero_plan", rows, [
        ("model", "model"), ("method", "method"), ("world", "ranks"), ("peak", "peak per rank (highest)"),
        ("lowest", "lowest rank"), ("states", "model states per rank"), ("state", "optimizer state per rank")],
        header))
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
