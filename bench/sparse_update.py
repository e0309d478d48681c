"""Sparse update (Tiny Training Engine) against PyTorch freezing, on a digits CNN and on the tiny LLaMA.

CNN transfer task (the Tiny Training Engine's setting, without downloads): scikit-learn's ``load_digits``
(1,797 8x8 images); ``models.build_mobilenet_tiny`` (depthwise-separable convs, BatchNorm, ReLU) is
pretrained on digits 0-4 (eager AdamW, ``--pretrain-epochs``), then fine-tuned on digits 5-9 (the first 70%
of their images; accuracy on the other 30%) for ``--steps`` steps of batch ``--batch``, lr ``--lr``, every
method from the same pretrained weights on the same batches, stepped round-robin in one process:

- **full**: every parameter trains (memfit ``remat`` + ``fused_update``; eager PyTorch beside it);
- **bias-only last k**: ``sparse_update`` training only the biases / BatchNorm affines of the last k layers;
- **PyTorch last k** (what users do today): ``requires_grad=False`` on everything but the last k layers
  (eager AdamW, autograd drops the frozen weight gradients);
- **memfit searched @ budget**: ``memfit.search_sparse_update`` (contribution analysis + evolutionary search)
  at budgets equal to the measured peaks of PyTorch's last-k rows, trained with the scheme it returns;
- **memfit planner lever @ budget**: ``memfit.optimize(budget=..., levers="adapters",
  lever_passes=["sparse_update"])``, the planner's own per-weight choice (frozen or a channel ratio, by the
  state bytes each saves, with no contribution analysis) at the same budgets.

Text: the tiny LLaMA pretrained on slice A of the stdlib corpus (``bench/_pretrain.py``), fine-tuned on
slice B, eval loss on slice C, the same rows (norms play the biases' part; the search covers the last
``--llama-layers`` Linear layers).

Columns: measured peak of one step (``memfit.measure_peak``: live tensor bytes; a memfit row's
``Trainer.measure_step``), memfit's predicted peak, final accuracy (CNN) or eval loss (LLaMA), and for memfit
rows the saved-activation bytes after the frozen layers' dead code, after the channel subsets and after the
1-bit masks (the plan's ``sparse_update`` report). The search's time, fine-tunes, plans and chosen scheme per
layer are written to ``bench/results/sparse_update_search.md``.

    python bench/sparse_update.py            # both tasks (about 10 min on 2 cores)
    python bench/sparse_update.py --task cnn
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, mib, write_table
from _pretrain import batches, eval_batches, pretrained_tiny_llama

import memfit
from memfit import models
from memfit.search import layers, uniform_scheme

# ---- data ------------------------------------------------------------------------------------------------


def digits_task(args) -> tuple[nn.Module, list, list, list]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    gen = torch.Generator().manual_seed(0)
    model = models.build_mobilenet_tiny(seed=0)
    old = (y < 5).nonzero().squeeze(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(args.pretrain_epochs):
        perm = old[torch.randperm(len(old), generator=gen)]
        for i in range(0, len(perm), 32):
            idx = perm[i:i + 32]
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    new = (y >= 5).nonzero().squeeze(1)
    new = new[torch.randperm(len(new), generator=gen)]
    cut = int(0.7 * len(new))
    tr, te = new[:cut], new[cut:]
    train = []
    for _ in range(args.steps):
        idx = tr[torch.randint(0, len(tr), (args.batch,), generator=gen)]
        train.append((x[idx], y[idx]))
    test = [(x[te[i:i + 128]], y[te[i:i + 128]]) for i in range(0, len(te), 128)]
    search_train = train[:args.search_steps]
    return model, train, test, search_train


def accuracy(forward, test) -> float:
    with torch.no_grad():
        hits = sum(int((forward(xb).argmax(-1) == yb).sum()) for xb, yb in test)
    return hits / sum(len(yb) for _, yb in test)


def lm_eval(forward, held) -> float:
    with torch.no_grad():
        return statistics.fmean(float(models.lm_loss(forward(xb), yb)) for xb, yb in held)


# ---- methods ---------------------------------------------------------------------------------------------


class Eager:
    def __init__(self, model: nn.Module, loss_fn, lr: float, trainable: set[str] | None = None):
        self.model, self.loss_fn = model, loss_fn
        for n, p in model.named_parameters():
            p.requires_grad_(trainable is None or n in trainable)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        model.train()

    def step(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def peak(self, x, y) -> tuple[int, None, dict]:
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        m = memfit.measure_peak(self.step, x, y, device="cpu",
                                existing=iter([*self.model.parameters(), *self.model.buffers(), *state, x, y]))
        return m.peak_bytes, None, {}

    def forward(self, x):
        self.model.eval()
        try:
            out = self.model(x)
            return out.logits if hasattr(out, "logits") else out
        finally:
            self.model.train()


class Memfit:
    def __init__(self, model: nn.Module, loss_fn, lr: float, example, scheme: dict | None,
                 budget: int | None = None):
        passes = ["remat", "fused_update"] if scheme is None else \
            [("sparse_update", {"scheme": scheme}), "remat", "fused_update"]
        kw = dict(passes=passes) if budget is None else \
            dict(budget=budget, levers="adapters", lever_passes=["sparse_update"])
        self.trainer = memfit.optimize(model, example_inputs=example, loss_fn=loss_fn,
                                       optimizer=memfit.AdamW(lr=lr, weight_decay=0.0), **kw)

    def step(self, x, y):
        return float(self.trainer.step(x, y))

    def peak(self, x, y) -> tuple[int, int, dict]:
        info = self.trainer.graph.info.get("sparse_update", {})
        keys = ("saved_bytes_before", "saved_bytes_after_freeze", "saved_bytes_after_channels",
                "saved_bytes_after_masks")
        return self.trainer.measure_step(x, y).peak_bytes, self.trainer.plan.peak_bytes, \
            {k: info[k] for k in keys if k in info}

    def forward(self, x):
        out = self.trainer(x)
        return out.logits if hasattr(out, "logits") else out


def last_k_names(model: nn.Module, k: int) -> set[str]:
    """Parameters of the last ``k`` layers (weights and companions) for PyTorch's requires_grad=False rows."""
    return {f for f, v in uniform_scheme(model, k, weights=True).items() if v}


def run_task(name: str, model: nn.Module, loss_fn, train: list, evaluate, search_train: list, search_held: list,
             args, result_key: str, ks: list[int], max_layers: int | None) -> tuple[list[dict], list[dict]]:
    """The rows of one task; the search ranks schemes by the held-out loss (smoother than accuracy over a short
    fine-tune); ``evaluate`` gives the row's figure (``result_key``)."""
    example = train[0]
    methods: dict[str, Any] = {"full (memfit)": Memfit(copy.deepcopy(model), loss_fn, args.lr, example, None),
                               "full (PyTorch)": Eager(copy.deepcopy(model), loss_fn, args.lr)}
    for k in ks:
        methods[f"bias-only last {k} (memfit)"] = Memfit(copy.deepcopy(model), loss_fn, args.lr, example,
                                                         uniform_scheme(model, k))
        methods[f"last {k} layers, requires_grad=False (PyTorch)"] = Eager(copy.deepcopy(model), loss_fn, args.lr,
                                                                            last_k_names(model, k))
    # budgets: the measured peaks of PyTorch's last-k rows
    x, y = example
    searches = []
    budgets = {}
    for k in ks:
        probe = Eager(copy.deepcopy(model), loss_fn, args.lr, last_k_names(model, k))
        probe.step(x, y)
        budgets[k] = probe.peak(x, y)[0]
    for k in ks:
        t0 = time.perf_counter()
        res = memfit.search_sparse_update(model, search_train, search_held, loss_fn=loss_fn, budget=budgets[k],
                                          lr=args.lr, steps=args.search_steps, metric="loss",
                                          population=args.population, generations=args.generations,
                                          max_layers=max_layers)
        searches.append({"task": name, "budget_of": f"PyTorch last {k}", "budget_bytes": budgets[k],
                         "seconds": round(time.perf_counter() - t0, 1), "fine_tunes": res.fine_tunes,
                         "plans": res.plans, "generations": res.generations, "predicted_peak": res.peak_bytes,
                         "summed_gain": round(res.gain, 4), "per_layer": res.per_layer, "scheme": res.scheme})
        print(res.report(), flush=True)
        methods[f"searched @ PyTorch last {k}'s peak (memfit)"] = Memfit(copy.deepcopy(model), loss_fn, args.lr,
                                                                        example, res.scheme)
        try:  # the planner's own per-parameter choice (sparse_update as a lever, no contribution analysis)
            methods[f"planner lever @ PyTorch last {k}'s peak (memfit)"] = Memfit(
                copy.deepcopy(model), loss_fn, args.lr, example, None, budget=budgets[k])
        except memfit.BudgetError as e:
            print(f"planner lever at {budgets[k]} B: {str(e)[:300]}", flush=True)
            searches[-1]["planner_lever"] = (f"no plan fits; its smallest peak is "
                                             f"{mib(e.plan.peak_bytes) if e.plan is not None else '?'}")
    losses = {n: [] for n in methods}
    t0 = time.perf_counter()
    for i, (xb, yb) in enumerate(train):
        for n, m in methods.items():
            losses[n].append(m.step(xb, yb))
        if (i + 1) % max(1, len(train) // 5) == 0:
            print(f"{name} step {i + 1}/{len(train)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    for n, m in methods.items():
        measured, predicted, saved = m.peak(x, y)
        value = evaluate(m.forward)
        row = {"task": name, "method": n, "peak_bytes": measured, "predicted_peak_bytes": predicted,
               result_key: round(value, 4),
               "final_loss": round(statistics.fmean(losses[n][-20:]), 4), **saved}
        rows.append(row)
        print(row, flush=True)
    return rows, searches


def report(rows: list[dict], searches: list[dict], args) -> str:
    for r in rows:
        r["peak"] = mib(r["peak_bytes"])
        r["predicted"] = mib(r["predicted_peak_bytes"]) if r.get("predicted_peak_bytes") else "-"
        r["result"] = f"{r['accuracy']:.3f}" if "accuracy" in r else f"{r['eval_loss']:.4f}"
        saved = [r.get(k) for k in ("saved_bytes_before", "saved_bytes_after_freeze", "saved_bytes_after_channels",
                                    "saved_bytes_after_masks")]
        r["saved"] = " / ".join(mib(v) for v in saved) if all(v is not None for v in saved) else "-"
    header = (f"Sparse update vs PyTorch freezing. CNN: mobilenet_tiny pretrained on digits 0-4 "
              f"({args.pretrain_epochs} epochs), fine-tuned on digits 5-9 for {args.steps} steps of batch {args.batch} "
              f"(lr {args.lr}), accuracy on a held-out 30% of 5-9. LLaMA: tiny-llama pretrained on slice A, "
              f"{args.llama_steps} steps of 4 x 128 on slice B, eval loss on slice C. Every method from the same "
              f"weights on the same batches, round-robin. Saved activations (memfit rows, from the plan): all "
              f"trained / after the frozen layers' dead code / after the channel subsets / after the 1-bit masks.")
    md = write_table("sparse_update", rows, [
        ("task", "task"), ("method", "method"), ("peak", "measured peak"), ("predicted", "predicted peak"),
        ("result", "accuracy / eval loss"), ("saved", "saved activations")], header)
    lines = ["Scheme searches (`memfit.search_sparse_update`, budget = the measured peak of the PyTorch row "
             "named): time, fine-tunes of the contribution analysis, distinct schemes planned, and the choice "
             "per layer.", ""]
    for s in searches:
        lines.append(f"**{s['task']}, budget {mib(s['budget_bytes'])} ({s['budget_of']})**: {s['seconds']} s, "
                     f"{s['fine_tunes']} fine-tunes, {s['plans']} plans, {s['generations']} generations; predicted "
                     f"peak {mib(s['predicted_peak'])}, summed gain {s['summed_gain']:+.4f}."
                     + (f" The planner lever (`lever_passes=['sparse_update']`) at this budget: {s['planner_lever']}."
                        if s.get("planner_lever") else ""))
        lines.append("")
        lines.append("| layer | setting | gain |")
        lines.append("|---|---|---|")
        for r in s["per_layer"]:
            lines.append(f"| {r['layer']} | {r['setting']} | {r['gain']:+.4f} |")
        lines.append("")
    (RESULTS / "sparse_update_search.md").write_text("\n".join(lines))
    (RESULTS / "sparse_update_search.json").write_text(json.dumps(
        [{k: v for k, v in s.items()} for s in searches], indent=2, default=str) + "\n")
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=["cnn", "llama", "both"], default="both")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--search-steps", type=int, default=20)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--generations", type=int, default=12)
    ap.add_argument("--llama-steps", type=int, default=60)
    ap.add_argument("--llama-lr", type=float, default=1e-3)
    ap.add_argument("--llama-layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, searches = [], []
    if args.task in ("cnn", "both"):
        model, train, test, search_train = digits_task(args)
        n = len(layers(model))
        r, s = run_task("digits CNN", model, F.cross_entropy, train, lambda fwd: accuracy(fwd, test),
                        search_train, test, args, "accuracy", [1, 2, n // 2], None)
        rows += r
        searches += s
    if args.task in ("llama", "both"):
        model = pretrained_tiny_llama()
        train = batches("finetune", 4, 128, args.llama_steps, seed=31)
        held = eval_batches(4, 128, 8)
        largs = argparse.Namespace(**{**vars(args), "lr": args.llama_lr, "search_steps": 10})
        r, s = run_task("tiny-llama", model, models.lm_loss, train, lambda fwd: lm_eval(fwd, held),
                        train[:10], held[:4], largs, "eval_loss", [1, 4], args.llama_layers)
        rows += r
        searches += s
    print(report(rows, searches, args))
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
