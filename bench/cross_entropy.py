"""Linear + cross-entropy at the head of a small LLaMA with a large vocabulary: who materialises the logits.

A LLaMA of hidden 256 (``tiny-llama``'s layers, ``--layers`` of them) with vocabulary 32,000 and 128,256,
batch 4 x seq 512 of the standard-library byte corpus read as bigram ids (``(prev * 256 + byte) % V``, so the
whole vocabulary is in play), trained with AdamW (lr 1e-3) from the same weights on the same batches, the
methods stepped round-robin in one process:

- **HF eager**: ``model(input_ids, labels=...)``, Hugging Face's own loss (``logits.float()``, cross-entropy),
  ``torch.optim.AdamW``;
- **torch.compile loss (Inductor)**: the same model eager, its loss function ``torch.compile``d (the logits
  still come out of the model whole);
- **memfit unfused**: ``memfit.optimize(..., passes=["remat", "fused_update"])`` on the model's own loss;
- **memfit fused_cross_entropy**: the same with ``fused_cross_entropy`` first (the logits never whole).

Columns: peak (``memfit.profiler_peak_bytes``: every CPU allocation of one step, kernel scratch included,
above what was held before it, plus the bytes held: parameters, optimizer state, batch), for memfit rows
also the plan's predicted peak and the storage tracker's measured one; step time as the ratio of medians
to HF eager's (same run); the loss of the first step relative to HF eager's; and the largest relative
difference of the head's two gradients (``dh``, ``dW``), computed once at the initial weights on the
batch's final hidden states, from each method's loss against eager fp32 autograd. Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` runs here only under the Triton interpreter: its gradients are
checked on the first ``--liger-tokens`` tokens (the interpreter would take minutes per full step), and its
peak is not reported (the interpreter copies every kernel argument).

    python bench/cross_entropy.py                 # both vocabularies, about 10 minutes on 2 cores
    python bench/cross_entropy.py --vocab 32000 --steps 2
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # Liger's kernels on CPU (before triton is imported)

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _common import mib, write_table
from _pretrain import corpus

import memfit
from memfit import ops
from memfit.measure import profiler_peak_bytes
from memfit.models import build_llama


def bigram_batches(vocab: int, n: int, batch: int = 4, seq: int = 512, seed: int = 0) -> list[torch.Tensor]:
    data = corpus().long()
    ids = (data[:-1] * 256 + data[1:]) % vocab
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, ids.numel() - seq, (batch,), generator=gen)
        out.append(torch.stack([ids[s:s + seq] for s in starts.tolist()]))
    return out


def held(*objs) -> int:
    seen, total = set(), 0
    for o in objs:
        for t in (o if isinstance(o, (list, tuple)) else [o]):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


class Eager:
    def __init__(self, model, lr, compiled_loss: bool):
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, foreach=False)
        self.loss_fn = None
        if compiled_loss:
            def loss(logits, labels):  # Hugging Face's ForCausalLMLoss, written out
                labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
                return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
            self.loss_fn = torch.compile(loss)

    def step(self, x):
        if self.loss_fn is None:
            loss = self.model(input_ids=x, labels=x.clone()).loss
        else:
            loss = self.loss_fn(self.model(input_ids=x).logits, x.clone())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def peak(self, x) -> dict:
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        base = held(list(self.model.parameters()), state, x, x.clone())
        return {"peak_bytes": base + profiler_peak_bytes(self.step, x)}


class Memfit:
    def __init__(self, model, lr, x, fused: bool):
        passes = (["fused_cross_entropy"] if fused else []) + ["remat", "fused_update"]
        self.t = memfit.optimize(model, example_inputs=({"input_ids": x, "labels": x.clone()},),
                                 optimizer=memfit.AdamW(lr=lr, weight_decay=0.0), passes=passes)

    def step(self, x):
        return float(self.t.step({"input_ids": x, "labels": x.clone()}))

    def peak(self, x) -> dict:
        batch = {"input_ids": x, "labels": x.clone()}
        base = held(list(self.t.executor.params.values()), list(self.t.executor.state.values()),
                    list(self.t.executor.buffers.values()) if hasattr(self.t.executor, "buffers") else [],
                    list(batch.values()))
        out = {"peak_bytes": base + profiler_peak_bytes(self.t.step, batch),
               "predicted_peak_bytes": self.t.plan.peak_bytes}
        out["tracker_peak_bytes"] = self.t.measure_step(batch).peak_bytes
        return out


def head_gradients(model, x, vocab: int, liger_tokens: int) -> dict[str, dict]:
    """Each method's loss and (dh, dW) at the initial weights, against eager fp32 autograd."""
    with torch.no_grad():
        h = model.model(input_ids=x).last_hidden_state.flatten(0, 1)
    w = model.lm_head.weight.detach()
    labels = F.pad(x, (0, 1), value=-100)[..., 1:].flatten()

    def autograd(loss_fn, hh, ww, tt):
        hh, ww = hh.clone().requires_grad_(True), ww.clone().requires_grad_(True)
        loss = loss_fn(hh, ww, tt)
        loss.backward()
        return loss.detach(), hh.grad, ww.grad

    def eager_ce(hh, ww, tt):
        return F.cross_entropy((hh @ ww.t()).float(), tt, ignore_index=-100)

    compiled = torch.compile(lambda logits, tt: F.cross_entropy(logits.float(), tt, ignore_index=-100))
    ref = autograd(eager_ce, h, w, labels)
    got = {"torch.compile loss (Inductor)": autograd(lambda hh, ww, tt: compiled(hh @ ww.t(), tt), h, w, labels),
           "memfit fused_cross_entropy": ops.run_linear_cross_entropy(None, h, w, None, labels, -100, 0.0, 1, 16)}

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max())

    out = {name: {"loss_rel_diff": abs(float(r[0]) - float(ref[0])) / abs(float(ref[0])),
                  "dh_rel_diff": rel(r[1], ref[1]), "dW_rel_diff": rel(r[2], ref[2])} for name, r in got.items()}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        print(f"Liger-Kernel not importable: {e}")
        return out
    n = liger_tokens
    lg = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    t0 = time.perf_counter()
    small_ref = autograd(eager_ce, h[:n], w, labels[:n])
    small = autograd(lambda hh, ww, tt: lg(ww, hh, tt), h[:n], w, labels[:n])
    print(f"Liger on {n} tokens under the Triton interpreter: {time.perf_counter() - t0:.0f} s")
    out[f"Liger fused linear CE (first {n} tokens, Triton interpreter)"] = {
        "loss_rel_diff": abs(float(small[0]) - float(small_ref[0])) / abs(float(small_ref[0])),
        "dh_rel_diff": rel(small[1], small_ref[1]), "dW_rel_diff": rel(small[2], small_ref[2])}
    return out


def run_vocab(vocab: int, args) -> list[dict]:
    torch.manual_seed(0)
    model = build_llama("tiny-llama", num_hidden_layers=args.layers, vocab_size=vocab, max_seq=512)
    data = bigram_batches(vocab, args.steps + 1, seed=vocab)
    x0 = data[0]
    grads = head_gradients(model, x0, vocab, args.liger_tokens)
    methods = {"HF eager": Eager(copy.deepcopy(model), args.lr, False),
               "torch.compile loss (Inductor)": Eager(copy.deepcopy(model), args.lr, True),
               "memfit unfused": Memfit(copy.deepcopy(model), args.lr, x0, False),
               "memfit fused_cross_entropy": Memfit(copy.deepcopy(model), args.lr, x0, True)}
    losses = {n: [] for n in methods}
    times = {n: [] for n in methods}
    for i, x in enumerate(data):
        for n, m in methods.items():  # round-robin
            t = time.perf_counter()
            losses[n].append(m.step(x))
            times[n].append(time.perf_counter() - t)
        print(f"V={vocab} step {i + 1}/{len(data)}", {n: round(v[-1], 6) for n, v in losses.items()}, flush=True)
    rows = []
    base_time = statistics.median(times["HF eager"][1:])  # the first step compiles / warms up
    for n, m in methods.items():
        row = {"vocab": vocab, "method": n, **m.peak(data[-1]),
               "step_time_ratio": round(statistics.median(times[n][1:]) / base_time, 3),
               "first_loss": losses[n][0], "final_loss": losses[n][-1],
               "first_loss_rel_diff": abs(losses[n][0] - losses["HF eager"][0]) / abs(losses["HF eager"][0])}
        row.update({k: v for k, v in grads.get(n, {}).items() if k != "loss_rel_diff"})
        rows.append(row)
        print(row, flush=True)
    for n, g in grads.items():
        if n not in methods:
            rows.append({"vocab": vocab, "method": n, **g})
    return rows


def fmt(v, kind):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if kind == "bytes":
        return mib(v)
    if kind == "rel":
        return f"{v:.1e}"
    return f"{v}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="*", default=[32000, 128256])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--liger-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = []
    for v in args.vocab:
        rows += run_vocab(v, args)
    for r in rows:
        r["peak"] = fmt(r.get("peak_bytes"), "bytes")
        r["predicted"] = fmt(r.get("predicted_peak_bytes"), "bytes")
        r["tracker"] = fmt(r.get("tracker_peak_bytes"), "bytes")
        r["time"] = fmt(r.get("step_time_ratio"), "")
        r["loss_diff"] = fmt(r.get("first_loss_rel_diff", r.get("loss_rel_diff")), "rel")
        r["dh"] = fmt(r.get("dh_rel_diff"), "rel")
        r["dw"] = fmt(r.get("dW_rel_diff"), "rel")
    header = (f"Linear + cross-entropy on a LLaMA of hidden 256, {args.layers} layers, batch 4 x 512 (bigram ids of "
              f"the stdlib corpus), AdamW lr {args.lr}, {args.steps + 1} steps round-robin, {args.threads} threads. "
              "Peak: every CPU allocation of a step (torch.profiler) plus the bytes held; predicted / tracker: "
              "memfit's plan and its storage tracker. Step time: ratio of medians to HF eager (first step "
              "excluded). Loss: first step's loss relative to HF eager's; dh / dW: the head gradients' largest "
              "relative difference from eager fp32 autograd at the initial weights.")
    md = write_table("cross_entropy", rows, [
        ("vocab", "vocab"), ("method", "method"), ("peak", "peak"), ("predicted", "predicted"),
        ("tracker", "tracker"), ("time", "step time vs HF eager"), ("loss_diff", "loss rel. diff"),
        ("dh", "dh rel. diff"), ("dw", "dW rel. diff")], header)
    print(md)
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
