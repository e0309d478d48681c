"""Gradient spikes: plain AdamW vs SPAM (spike-aware clipping + moment reset) in memfit's fused update.

One tiny-llama, one init, the same stdlib byte batches for every run; at step ``--spike-step`` the loss
of one batch is multiplied by ``--spike`` (x1000), so that step's gradient is x1000 (as the gradient
spikes SPAM measures in LLM training). Runs, stepped round-robin in one process:

- ``adamw clean``: memfit AdamW, no spike (the reference curve);
- ``adamw spiked``: memfit AdamW with the spike;
- ``spam spiked``: memfit AdamW with SPAM's spike clipping (threshold ``--threshold``) and moment reset
  every ``--reset`` steps with a ``--warmup``-step cosine warmup, with the spike;
- ``spam clean``: the same SPAM settings without the spike (what SPAM costs when nothing spikes).

The loss curves are the per-step training losses (the spiked step's loss divided back by the spike
factor), smoothed over ``--window`` steps. ``max_dev_after_spike`` is the largest relative gap between a
spiked run's smoothed curve and its own optimizer's clean run over the steps after the spike (what the spike
did to that optimizer), ``vs_adamw_clean`` the same against ``adamw clean``; ``final_loss`` the mean of the
last 20 losses. Writes bench/results/spam.{md,json,png}.

    python bench/spam.py [--steps 300 --spike-step 100 --spike 1000 --threshold 5000 --reset 100 --warmup 20
                          --seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import memfit
from memfit import data, models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_table


class ScaledLoss(nn.Module):
    """model + next-byte loss times a per-batch ``scale`` (a 0-dim input): how a spike is injected."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y, scale):
        return models.lm_loss(self.model(x), y) * scale


def smooth(xs: list[float], w: int) -> list[float]:
    return [statistics.fmean(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--spike-step", type=int, default=100)
    ap.add_argument("--spike", type=float, default=1000.0)
    ap.add_argument("--threshold", type=float, default=5000.0)
    ap.add_argument("--reset", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--seeds", default="0", help="comma-separated; the loss curves are averaged over the seeds")
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")]
    per_seed = [run_seed(args, seed) for seed in seeds]
    losses = {n: [statistics.fmean(run[n][i] for run in per_seed) for i in range(args.steps)] for n in per_seed[0]}
    report(args, seeds, losses, per_seed)


def run_seed(args, seed: int) -> dict[str, list[float]]:
    base = ScaledLoss(models.build_llama("tiny-llama", seed=seed))
    batches = data.ByteBatches(data.stdlib_corpus(), args.batch, args.seq, seed=seed)
    stream = [next(batches) for _ in range(args.steps)]
    one = torch.tensor(1.0)
    spam = dict(spike_threshold=args.threshold, reset_interval=args.reset, reset_warmup=args.warmup)
    runs = {
        "adamw clean": (memfit.AdamW(lr=args.lr, weight_decay=0.0), False),
        "adamw spiked": (memfit.AdamW(lr=args.lr, weight_decay=0.0), True),
        "spam spiked": (memfit.AdamW(lr=args.lr, weight_decay=0.0, **spam), True),
        "spam clean": (memfit.AdamW(lr=args.lr, weight_decay=0.0, **spam), False),
    }
    trainers = {name: memfit.optimize(copy.deepcopy(base), example_inputs=(*stream[0], one), optimizer=opt)
                for name, (opt, _) in runs.items()}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(1, args.steps + 1):
        x, y = stream[step - 1]
        for name, (_, spiked) in runs.items():  # round-robin: load falls on every run alike
            scale = args.spike if spiked and step == args.spike_step else 1.0
            loss = float(trainers[name].step(x, y, torch.tensor(scale)))
            losses[name].append(loss / scale)
        if step % 50 == 0:
            print(f"seed {seed} step {step}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in losses.items()), flush=True)
    return losses


def report(args, seeds: list[int], losses: dict[str, list[float]], per_seed: list[dict[str, list[float]]]) -> None:
    runs = {"adamw clean": False, "adamw spiked": True, "spam spiked": True, "spam clean": False}
    curves = {n: smooth(v, args.window) for n, v in losses.items()}
    after = range(args.spike_step - 1, args.steps)

    def dev(name: str, ref: str) -> float:
        return max(abs(curves[name][i] - curves[ref][i]) / curves[ref][i] for i in after)

    rows = []
    for name in curves:
        own = name.replace("spiked", "clean")
        rows.append({"method": name, "spike": (runs[name] and args.spike) or 1.0,
                     "max_dev_after_spike": round(dev(name, own), 4),
                     "vs_adamw_clean": round(dev(name, "adamw clean"), 4),
                     "final_loss": round(statistics.fmean(losses[name][-20:]), 4),
                     "loss_after_spike": round(losses[name][args.spike_step], 4), "losses": losses[name],
                     "losses_per_seed": [run[name] for run in per_seed]})
    header = (f"### Gradient spike x{args.spike:g} at step {args.spike_step}: AdamW vs SPAM (memfit fused update), "
              f"tiny-llama, {args.steps} steps, batch {args.batch} x seq {args.seq}, "
              f"seeds {seeds} (curves averaged)\n\n"
              f"SPAM: spike threshold {args.threshold:g}, moments reset every {args.reset} steps, {args.warmup}-step "
              f"cosine warmup after each reset. Deviation: the largest relative gap between a spiked run's loss "
              f"curve (mean over {args.window} steps) and the clean run of the same optimizer, over the steps "
              f"from the spike on (and, last column, against `adamw clean`).")
    cols = [("method", "run"), ("spike", "loss scale at the spike step"),
            ("max_dev_after_spike", "max deviation from its clean run after the spike"),
            ("vs_adamw_clean", "max deviation from adamw clean"),
            ("loss_after_spike", "loss the step after the spike"), ("final_loss", "final loss (last 20)")]
    print(write_table("spam", rows, cols, header))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, curve in curves.items():
            ax.plot(range(1, args.steps + 1), curve, label=name, lw=1.4, ls="--" if "clean" in name else "-")
        ax.axvline(args.spike_step, color="grey", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (mean over {args.window} steps)")
        ax.set_title(f"gradient x{args.spike:g} at step {args.spike_step}: AdamW vs SPAM")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "spam.png", dpi=110)
    except ImportError:
        print("matplotlib missing: no picture")


if __name__ == "__main__":
    main()
