"""Pruning on the pretrained tiny-llama: one-shot criteria, PERP recovery, and pruning during training.

Part A, one-shot (``memfit.prune_model``) on the tiny-llama pretrained on slice A of the stdlib corpus
(``bench/_pretrain.py``, ``--pretrain-steps`` 1500: 30 min on one thread the first time, cached after), every
attention and MLP projection pruned, the embedding table and head dense:

- 50% unstructured and 2:4: magnitude (per layer; per row of 4 for 2:4), Wanda (``|W| * ||X_j||`` per output
  row) and GBLM (Wanda's term plus ``|W| * ||100 g||`` over per-sample gradients), calibrated on
  ``--calib`` batches of slice B; eval loss on the fixed held-out batches of slice C;
- PERP recovery of each pruned model, ``--perp-steps`` AdamW steps on slice B with the mask fixed: (a) only
  the norms train (tiny-llama has no biases; ``frozen=`` every other parameter), (b) LoRA adapters (rank 8 on
  every projection, base frozen) evaluated beside the sparse weight, and merged through the mask
  (``W + (BA) * M``, PERP's MaskLoRA) so the model stays sparse; "gap closed" = (pruned - recovered) /
  (pruned - dense) in eval loss.

Part B, pruning while training (dense to sparse, and GraNet sparse to sparse with compressed state) from the
same pretrained model on slice B, ``--steps`` steps
of batch ``--batch`` x ``--seq``, every method stepped round-robin in one process on the same batches
(memfit GraNet sparse-to-sparse with ``compress=True`` beside them):
dense AdamW (eager torch); memfit ``prune`` gradual magnitude (cubic schedule from 0 to the final sparsity at
steps ``1 + k * --every``, ``k = 0..--events``); memfit GraNet (the same plus prune-and-regrow of 0.3 of the
kept weights per event, cosine-decayed); torch.ao.pruning's ``WeightNormSparsifier`` (unstructured blocks
of 1) under ``CubicSL`` stepped at the same events (eager torch AdamW). Final sparsities 0.8 and 0.9.
Columns: eval loss, final train loss (mean of the last 20 steps), measured peak of one step
(``memfit.measure_peak`` / ``Trainer.measure_step``), step-time ratio to dense (median), the sparsity
reached.

    python bench/pruning.py                    # both parts (about 15 min on 2 cores)
    python bench/pruning.py --part a --perp-steps 50
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, mib, write_table
from _pretrain import batches, eval_batches, eval_loss, eval_model, pretrained_tiny_llama

import memfit
from memfit import models
from memfit import sparsity as sp

TARGETS = ["model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight"]
LORA_TARGETS = ("*_proj.weight",)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {f: params[f] != 0 for f in params if any(fnmatch.fnmatchcase(f, t) for t in TARGETS)}


def target_density(model: nn.Module) -> float:
    m = masks_of(model)
    return sum(int(k.sum()) for k in m.values()) / sum(k.numel() for k in m.values())


# ---- part A ----------------------------------------------------------------------------------------------


def perp_norms(pruned: nn.Module, train: list, steps: int, lr: float) -> nn.Module:
    model = copy.deepcopy(pruned)
    frozen = [f for f, _ in model.named_parameters() if "norm" not in f]
    t = memfit.optimize(model, example_inputs=train[0], loss_fn=models.lm_loss,
                        optimizer=memfit.AdamW(lr=lr, weight_decay=0.0), frozen=frozen)
    for i in range(steps):
        t.step(*train[i % len(train)])
    return t.export()


def perp_lora(pruned: nn.Module, train: list, steps: int, lr: float) -> tuple[Any, nn.Module]:
    model = copy.deepcopy(pruned)
    masks = masks_of(model)
    t = memfit.optimize(model, example_inputs=train[0], loss_fn=models.lm_loss,
                        optimizer=memfit.AdamW(lr=lr, weight_decay=0.0),
                        passes=[("lora", {"rank": 8, "alpha": 16, "targets": LORA_TARGETS}), "remat", "fused_update"])
    for i in range(steps):
        t.step(*train[i % len(train)])
    merged = t.export()
    with torch.no_grad():  # MaskLoRA: the merged weight through the mask keeps the model sparse
        for f, p in merged.named_parameters():
            if f in masks:
                p.mul_(masks[f])
    return t, merged


def part_a(pretrained: nn.Module, held_out: list, args) -> list[dict]:
    calib = batches("finetune", 4, args.seq, args.calib, seed=7)
    train = batches("finetune", args.batch, args.seq, args.perp_steps, seed=11)
    dense = eval_model(pretrained, held_out)
    # the dense model given the same retraining: what PERP's gains are measured against as well
    dense_norms = eval_model(perp_norms(pretrained, train, args.perp_steps, args.perp_lr_norms), held_out)
    lora_t, _ = perp_lora(pretrained, train, args.perp_steps, args.perp_lr_lora)
    dense_lora = eval_loss(lambda x, t=lora_t: _logits(t(x)), held_out)
    rows = [{"method": "dense", "pattern": "-", "eval_loss": round(dense, 4), "perp_norms": round(dense_norms, 4),
             "perp_lora": round(dense_lora, 4)}]
    print(f"dense eval loss {dense:.4f}; after the same norms-only retraining {dense_norms:.4f}, LoRA {dense_lora:.4f}",
          flush=True)
    for pattern in (None, "2:4"):
        for crit in ("magnitude", "wanda", "gblm"):
            model = copy.deepcopy(pretrained)
            t0 = time.perf_counter()
            scope = "layer" if crit == "magnitude" else "row"
            sp.prune_model(model, 0.5, criterion=crit, data=calib, loss_fn=models.lm_loss, scope=scope,
                           pattern=pattern, targets=TARGETS)
            prune_s = time.perf_counter() - t0
            loss = eval_model(model, held_out)
            row = {"method": crit, "pattern": pattern or "50% unstructured", "scope": scope if not pattern else "n:m",
                   "density": round(target_density(model), 4), "eval_loss": round(loss, 4),
                   "gap": round(loss - dense, 4), "prune_s": round(prune_s, 2)}
            print(row, flush=True)
            if crit in ("magnitude", "wanda"):
                norms = perp_norms(model, train, args.perp_steps, args.perp_lr_norms)
                rec = eval_model(norms, held_out)
                lora_t, merged = perp_lora(model, train, args.perp_steps, args.perp_lr_lora)
                beside = eval_loss(lambda x, t=lora_t: _logits(t(x)), held_out)
                masked = eval_model(merged, held_out)
                gap = loss - dense
                row.update(perp_norms=round(rec, 4), perp_norms_closed=round((loss - rec) / gap, 3),
                           perp_norms_vs_equal=round(rec - dense_norms, 4),
                           perp_lora_vs_equal=round(beside - dense_lora, 4),
                           perp_lora=round(beside, 4), perp_lora_closed=round((loss - beside) / gap, 3),
                           perp_masklora=round(masked, 4), perp_masklora_closed=round((loss - masked) / gap, 3),
                           masklora_density=round(target_density(merged), 4))
                print(row, flush=True)
            rows.append(row)
    return rows


# ---- part B ----------------------------------------------------------------------------------------------


class Eager:
    def __init__(self, model: nn.Module, lr: float, sparsifier=None, scheduler=None, every: int = 1, events: int = 0):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.sparsifier, self.scheduler = sparsifier, scheduler
        self.every, self.events, self.count = every, events, 0
        model.train()

    def step(self, x, y):
        self.count += 1
        k, r = divmod(self.count - 1, self.every)
        if self.sparsifier is not None and r == 0 and k <= self.events:
            if k > 0:
                self.scheduler.step()
            self.sparsifier.step()
        loss = models.lm_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def peak(self, x, y) -> int:
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        masks = [b for b in self.model.buffers()]
        m = memfit.measure_peak(self.step, x, y, device="cpu",
                                existing=iter([*self.model.parameters(), *masks, *state, x, y]))
        return m.peak_bytes

    def final(self) -> nn.Module:
        if self.sparsifier is None:
            return self.model
        self.sparsifier.squash_mask()  # the masks folded into the weights: zeros in place
        return self.model

    def __call__(self, x):
        return self.model(x)


class Memfit:
    def __init__(self, model: nn.Module, lr: float, cfg: dict, example):
        self.trainer = memfit.optimize(model, example_inputs=example, loss_fn=models.lm_loss,
                                       optimizer=memfit.AdamW(lr=lr, weight_decay=0.0),
                                       passes=["remat", "fused_update", ("prune", cfg)])

    def step(self, x, y):
        return self.trainer.step(x, y)

    def peak(self, x, y) -> int:
        return self.trainer.measure_step(x, y).peak_bytes

    def final(self) -> nn.Module:
        return self.trainer.export()


def torch_ao(model: nn.Module, lr: float, sparsity: float, args) -> Eager:
    from torch.ao.pruning import CubicSL, WeightNormSparsifier

    params = dict(model.named_parameters())
    config = [{"tensor_fqn": f} for f in masks_of(model)]
    assert config and all(c["tensor_fqn"] in params for c in config)
    sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, config)
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=1, total_t=args.events)
    return Eager(model, lr, sparsifier, scheduler, args.every, args.events)


def part_b(pretrained: nn.Module, held_out: list, args) -> list[dict]:
    train = batches("finetune", args.batch, args.seq, args.steps, seed=21)
    rows = []
    methods: dict[str, Any] = {"dense": Eager(copy.deepcopy(pretrained), args.lr)}
    for s in args.sparsities:
        base = {"sparsity": s, "schedule": "gradual", "start": 1, "every": args.every, "events": args.events,
                "targets": tuple(TARGETS), "total_steps": args.steps}
        methods[f"memfit gradual {s}"] = Memfit(copy.deepcopy(pretrained), args.lr, base, train[0])
        methods[f"memfit granet {s}"] = Memfit(copy.deepcopy(pretrained), args.lr,
                                               {**base, "schedule": "granet", "regrow": args.regrow}, train[0])
        methods[f"torch.ao gradual {s}"] = torch_ao(copy.deepcopy(pretrained), args.lr, s, args)
        methods[f"memfit granet s2s compressed {s}"] = Memfit(
            copy.deepcopy(pretrained), args.lr, {**base, "schedule": "granet", "regrow": args.regrow, "initial": s,
                                                 "compress": True}, train[0])
        one_shot = copy.deepcopy(pretrained)
        sp.prune_model(one_shot, s, targets=TARGETS)  # magnitude, per layer
        methods[f"memfit one-shot + fixed, state and weights compressed {s}"] = Memfit(
            one_shot, args.lr, {"schedule": "fixed", "sparsity": s, "targets": tuple(TARGETS), "compress": True,
                                "compress_weights": True}, train[0])
    losses: dict[str, list[float]] = {k: [] for k in methods}
    times: dict[str, list[float]] = {k: [] for k in methods}
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(train):
        for name, m in methods.items():
            t = time.perf_counter()
            losses[name].append(float(m.step(x, y)))
            times[name].append(time.perf_counter() - t)
        if (i + 1) % max(1, args.steps // 10) == 0:
            print(f"step {i + 1}/{args.steps} ({time.perf_counter() - t0:.0f} s): "
                  + ", ".join(f"{k} {statistics.fmean(v[-10:]):.3f}" for k, v in losses.items()), flush=True)
    x, y = train[-1]
    dense_t = statistics.median(times["dense"][1:])
    for name, m in methods.items():
        peak = m.peak(x, y)
        final = m.final()
        params = dict(final.named_parameters())
        dens = [params[f] != 0 for f in masks_of(final)]
        density = sum(int(d.sum()) for d in dens) / sum(d.numel() for d in dens)
        rows.append({"method": name.rsplit(" ", 1)[0] if name != "dense" else "dense",
                     "final_sparsity": float(name.rsplit(" ", 1)[1]) if name != "dense" else 0.0,
                     "sparsity_reached": round(1 - density, 4), "eval_loss": round(eval_model(final, held_out), 4),
                     "final_loss": round(statistics.fmean(losses[name][-20:]), 4), "peak_bytes": peak,
                     "step_time_ratio": round(statistics.median(times[name][1:]) / dense_t, 2)})
        print(rows[-1], flush=True)
    return rows


# ---- report ----------------------------------------------------------------------------------------------


def report_a(rows: list[dict], args, info: dict) -> str:
    dense = rows[0]["eval_loss"]
    out = [{**rows[0], "pattern": "dense", "method": "-", "density": 1.0, "eval": f"{dense:.4f}",
            "norms": f"{rows[0]['perp_norms']:.4f}", "lora": f"{rows[0]['perp_lora']:.4f}", "masklora": "-"}]
    for r in rows[1:]:
        out.append({**r, "eval": f"{r['eval_loss']:.4f} (+{r['gap']:.4f})",
                    "norms": f"{r['perp_norms']:.4f} ({r['perp_norms_closed']:.2f}; {r['perp_norms_vs_equal']:+.4f})"
                    if "perp_norms" in r else "-",
                    "lora": f"{r['perp_lora']:.4f} ({r['perp_lora_closed']:.2f}; {r['perp_lora_vs_equal']:+.4f})"
                    if "perp_lora" in r else "-",
                    "masklora": f"{r['perp_masklora']:.4f} ({r['perp_masklora_closed']:.2f})"
                    if "perp_masklora" in r else "-"})
    header = (f"One-shot pruning of the pretrained tiny-llama ({info.get('steps', '?')} steps on slice A, dense eval "
              f"loss {dense:.4f}): every attention and MLP projection at 50% (unstructured, or 2:4), embeddings and "
              f"head dense; calibration {args.calib} batches of 4 x {args.seq} from slice B; eval on 16 held-out "
              f"batches of 4 x 128 (slice C). PERP: {args.perp_steps} AdamW steps of {args.batch} x {args.seq} on "
              f"slice B, mask fixed: norms only (lr {args.perp_lr_norms}), or LoRA r8 on every projection "
              f"(lr {args.perp_lr_lora}) evaluated beside the sparse weights and merged through the mask "
              f"(MaskLoRA, still sparse). In brackets: the fraction of the gap to the dense model closed, then the "
              f"distance left to the dense model given the same retraining (its row: the dense model retrained "
              f"alike); retraining on slice B also lowers the dense model's loss, so a fraction above 1 is expected.")
    md = write_table("pruning_oneshot", rows, [], header)  # JSON rows; the md is rewritten below
    cols = [("pattern", "pattern"), ("method", "criterion"), ("density", "density"), ("eval", "eval loss (gap)"),
            ("norms", "PERP norms"), ("lora", "PERP LoRA"), ("masklora", "PERP MaskLoRA")]
    lines = [header, "", "| " + " | ".join(t for _, t in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in out:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / "pruning_oneshot.md").write_text(md)
    return md


def report_b(rows: list[dict], args) -> str:
    for r in rows:
        r["peak"] = mib(r["peak_bytes"])
    header = (f"Pruning while training, dense to sparse, from the pretrained tiny-llama: {args.steps} steps of "
              f"{args.batch} x {args.seq} on slice B, AdamW lr {args.lr}, every method stepped round-robin on the "
              f"same batches. Schedule: cubic from 0 at step 1 to the final sparsity at step "
              f"{1 + args.events * args.every} (an event every {args.every} steps); GraNet regrows "
              f"{args.regrow} of the kept weights per event (cosine-decayed); torch.ao.pruning: WeightNormSparsifier "
              f"(blocks of 1) under CubicSL at the same events. Eval loss on 16 held-out batches (slice C); final "
              f"loss: mean of the last 20 training steps; peak: one step measured (live tensor bytes); step time: "
              f"median ratio to dense. memfit gradual / granet (dense to sparse) hold the optimizer state dense "
              f"(plus a 1-bit mask), so their peak does not fall with density; granet s2s compressed (sparse to "
              f"sparse: magnitude-pruned to the final sparsity at step 1, then GraNet's prune-and-regrow at every "
              f"event) keeps AdamW's moments for the kept weights only (prune(compress=True)); one-shot + fixed "
              f"(magnitude-pruned before training, mask fixed) holds the weights as their kept values too "
              f"(compress_weights=True).")
    return write_table("pruning_training", rows, [
        ("method", "method"), ("final_sparsity", "final sparsity"), ("sparsity_reached", "reached"),
        ("eval_loss", "eval loss"), ("final_loss", "final train loss"), ("peak", "measured peak"),
        ("step_time_ratio", "step time")], header)


def plot_b(rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
        pts = sorted((r["final_sparsity"], r["eval_loss"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
    dense = next(r["eval_loss"] for r in rows if r["method"] == "dense")
    ax.axhline(dense, color="gray", ls="--", label="dense")
    ax.set_xlabel("final sparsity")
    ax.set_ylabel("eval loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "pruning_training.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--perp-steps", type=int, default=100)
    ap.add_argument("--perp-lr-norms", type=float, default=3e-3)
    ap.add_argument("--perp-lr-lora", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--events", type=int, default=7)
    ap.add_argument("--regrow", type=float, default=0.3)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    ap.add_argument("--pretrain-steps", type=int, default=1500,
                    help="steps of the cached pretraining (300 leaves weights close to their init, where no "
                         "criterion can tell weights apart: 50%% of them cost +0.003 whichever are pruned)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info: dict = {}
    t0 = time.perf_counter()
    pretrained = pretrained_tiny_llama(args.pretrain_steps, info=info)
    held_out = eval_batches(4, 128, 16)
    if args.part in ("a", "both"):
        rows = part_a(pretrained, held_out, args)
        print(report_a(rows, args, info))
    if args.part in ("b", "both"):
        rows = part_b(pretrained, held_out, args)
        print(report_b(rows, args))
        plot_b(rows)
    print(f"wall {time.perf_counter() - t0:.0f} s")
    (RESULTS / "pruning_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")


if __name__ == "__main__":
    main()
