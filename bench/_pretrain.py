"""Shared by bench/qlora.py and bench/qat.py: a pretrained tiny-llama and the three slices of the byte corpus.

``stdlib_corpus()`` (8 MB of the Python standard library's sources, sorted paths) is cut by byte offset
into three disjoint slices (``SPLITS``):

- ``pretrain`` (A, the first 60%): what ``pretrained_tiny_llama`` trains on;
- ``finetune`` (B, 60% to 90%): the fine-tuning / continued-training data of the two benches;
- ``eval`` (C, the last 10%): the held-out batches every eval loss is the mean over (``eval_batches``).

``pretrained_tiny_llama(steps, seed)`` builds ``build_llama("tiny-llama", seed)`` and trains it with eager
``torch.optim.AdamW`` (lr ``PRETRAIN_LR``, linear warm-up over the first 5% of the steps then cosine decay to
10%, weight decay 0, gradient norm clipped at 1) on ``ByteBatches`` over slice A. The trained state_dict is
cached under ``/tmp/memfit-bench-pretrain`` (``MEMFIT_BENCH_CACHE`` overrides it) keyed by every setting (and
the corpus length), so the second bench reuses it; a cached model is loaded, not retrained. ``info`` (a dict, if
given) receives the pretraining's settings, wall time, first and final training losses and whether it came from
the cache. Measured with the defaults (300 steps of batch 8 x seq 128, one intra-op thread on a shared 2-core
machine): 130 s, training loss 5.64 -> 2.25, held-out eval loss 5.66 -> 2.51 (16 batches of 4 x 128).

    python bench/_pretrain.py [steps]    # make (or load) the cached model and print its eval loss
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memfit import data, models

SPLITS = {"pretrain": (0.0, 0.6), "finetune": (0.6, 0.9), "eval": (0.9, 1.0)}
CACHE = Path(os.environ.get("MEMFIT_BENCH_CACHE", "/tmp/memfit-bench-pretrain"))

PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 8
PRETRAIN_SEQ = 128
PRETRAIN_LR = 3e-3
EVAL_SEED = 1234  # the held-out batches' seed (fixed: every row of every bench sees the same ones)

_CORPUS: torch.Tensor | None = None


def corpus() -> torch.Tensor:
    global _CORPUS
    if _CORPUS is None:
        _CORPUS = data.stdlib_corpus()
    return _CORPUS


def corpus_slice(name: str) -> torch.Tensor:
    """Slice ``name`` (``pretrain``, ``finetune`` or ``eval``) of the byte corpus, by byte offset."""
    c = corpus()
    lo, hi = SPLITS[name]
    return c[int(lo * c.numel()):int(hi * c.numel())]


def batches(name: str, batch: int, seq: int, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (input, target) batches of ``batch`` x ``seq`` bytes from slice ``name``, drawn once."""
    it = iter(data.ByteBatches(corpus_slice(name), batch, seq, seed=seed))
    return [next(it) for _ in range(n)]


def eval_batches(batch: int, seq: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out batches: ``n`` batches from slice C (seed ``EVAL_SEED``)."""
    return batches("eval", batch, seq, n, EVAL_SEED)


@torch.no_grad()
def eval_loss(forward: Callable[[torch.Tensor], Any], held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-byte loss of ``forward`` (a model, or anything mapping inputs to logits) over ``held_out``."""
    return statistics.fmean(float(models.lm_loss(forward(x), y)) for x, y in held_out)


def eval_model(model: nn.Module, held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``eval_loss`` of an nn.Module in eval mode (its mode restored afterwards)."""
    was = model.training
    model.eval()
    try:
        return eval_loss(model, held_out)
    finally:
        model.train(was)


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def pretrained_tiny_llama(steps: int = PRETRAIN_STEPS, seed: int = 0, *, batch: int = PRETRAIN_BATCH,
                          seq: int = PRETRAIN_SEQ, lr: float = PRETRAIN_LR, info: dict | None = None,
                          log: Callable[[str], None] = print) -> nn.Module:
    """tiny-llama pretrained on slice A for ``steps`` AdamW steps (see the module docstring); cached."""
    settings = dict(model="tiny-llama", steps=steps, seed=seed, batch=batch, seq=seq, lr=lr, schedule="warmup5-cos10",
                    clip=1.0, split=SPLITS["pretrain"], corpus_bytes=corpus().numel(), torch=torch.__version__)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"tiny-llama-{key}.pt"
    model = models.build_llama("tiny-llama", seed=seed)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        if info is not None:
            info.update(json.loads(saved["info"]), cached=True, path=str(path))
        log(f"pretrained tiny-llama loaded from {path}")
        return model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    model.train()
    losses = []
    t0 = time.perf_counter()
    it = iter(data.ByteBatches(corpus_slice("pretrain"), batch, seq, seed=seed))
    for i in range(steps):
        x, y = next(it)
        loss = models.lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
            log(f"pretrain step {i + 1}/{steps} ({time.perf_counter() - t0:.0f} s): loss "
                f"{statistics.fmean(losses[-20:]):.3f} (mean of the last 20)")
    wall = time.perf_counter() - t0
    meta = dict(settings, wall_s=round(wall, 1), first_loss=round(losses[0], 4),
                final_loss=round(statistics.fmean(losses[-20:]), 4))
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "info": json.dumps(meta)}, tmp)
    tmp.replace(path)
    if info is not None:
        info.update(meta, cached=False, path=str(path))
    return model


if __name__ == "__main__":  # make (or load) the cached model: python bench/_pretrain.py [steps]
    import sys

    torch.set_num_threads(1)
    made: dict = {}
    m = pretrained_tiny_llama(int(sys.argv[1]) if len(sys.argv) > 1 else PRETRAIN_STEPS, info=made)
    print(made)
    print(f"eval loss {eval_model(m, eval_batches(4, 128, 16)):.4f} (16 held-out batches of 4 x 128)")
