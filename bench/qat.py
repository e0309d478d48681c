"""Low-bit (W4 by default, ``--bits`` 2, 3, 4 or 8) quantization of a pretrained tiny-llama: round-to-nearest
PTQ against memfit's ``qat`` pass (LSQ, QALoRA) and torchao's QAT, one process.

The model is tiny-llama (4 layers, hidden 256, byte vocabulary) pretrained by ``bench/_pretrain.py`` on
slice A of the stdlib byte corpus (cached under /tmp, shared with bench/qlora.py). The quantized weights are
every 2-D weight but the embedding table and the LM head (the q/k/v/o attention and gate/up/down MLP
projections, ``TARGETS``; memfit's ``qat`` default), at ``--bits`` bits (b), symmetric, qmax = 2**(b-1) - 1
(1, 3, 7, 127 at 2, 3, 4, 8 bits), one scale per group of ``GROUP`` (128) consecutive elements of the flattened
weight; the rest stays fp32. Every eval loss is the mean next-byte loss over the same fixed held-out batches
of slice C. Rows:

- ``fp32``: the pretrained model, unquantized (no training);
- ``ptq-rtn``: round-to-nearest post-training quantization of that model, written here in plain torch: per
  group, scale = absmax / qmax, codes = clamp(round(w / scale), -qmax - 1, qmax), weight = codes * scale;
- ``fp32-ft``: a control for the training the QAT rows get: the pretrained model trained on, unquantized, with
  eager ``torch.optim.AdamW`` for the same steps on the same batches (slice B) at ``--lr``: the baseline of
  the step-time ratios;
- ``fp32-ft+ptq-rtn``: ``ptq-rtn`` applied to ``fp32-ft``'s weights (PTQ after the same training);
- ``memfit-lsq-qat``: ``memfit.optimize`` with ``("qat", {"bits": b, "group": 128})``, ``remat`` and
  ``fused_update``: LSQ fake quantization with learned step sizes, every parameter and step size trained for
  the same steps and batches; evaluated as a real integer model: a copy of ``Trainer.export()`` whose
  quantized weights are rebuilt from ``Trainer.export_quantized()`` (codec ``int<b>``: int8 codes in
  [-qmax - 1, qmax] times the fp32 step of their group), checked against ``export()``'s weights;
- ``memfit-qalora``: the same with ``lora_rank=8, freeze_rest=True`` (QALoRA: W frozen, LoRA adapters merged
  into W before fake quantization; only adapters and step sizes train), evaluated the same way;
- ``torchao-qat``: torchao's QAT with ``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(
  torch.int<b>, group_size=128, is_symmetric=True), step="prepare"))`` on the same Linear layers (the LM head
  left out), eager ``torch.optim.AdamW`` over every parameter for the same steps and batches, then
  ``quantize_(model, QATConfig(IntxWeightOnlyConfig(torch.int<b>, PerGroup(128)), step="convert"))``:
  evaluated as that converted model (torchao's scale: absmax / ((2**b - 1) / 2) per group, 7.5 at 4 bits,
  recomputed every step, not learned).

The QAT rows (memfit's and torchao's) train at ``--qat-lr`` (default: ``--lr``); ``fp32-ft`` always at
``--lr``. A method whose library is missing or fails is recorded with its error and the run goes on.

Columns: ``eval_loss``; ``eval_loss_step0`` (trained rows: the forward each trains, fake-quantized for the
QAT rows, before the first step); ``gap_to_fp32`` = eval_loss - ``fp32``'s; ``gap_recovered`` = 1 - gap_to_fp32 /
``ptq-rtn``'s gap_to_fp32 (1: the quantized model is as good as fp32, 0: no better than PTQ; above 1 when the
training itself lowered the loss below the pretrained model's). Continued training on slice B lowers the loss
by itself, so the trained rows are also set against equal training: ``gap_to_fp32_ft`` = eval_loss -
``fp32-ft``'s, and ``vs_ptq_after_equal_training`` = eval_loss - ``fp32-ft+ptq-rtn``'s (negative: the row's
quantized model beats PTQ after the same training), with the paired standard error of the per-batch
differences over the eval batches. ``trainable_params`` counts what the optimizer updates (memfit: the trainer
graph's ``trainable``, step sizes and adapters included); ``steps`` the training steps; ``step_time_ratio``
the median step time over the run (the first step left out) over ``fp32-ft``'s, every training method stepped
round-robin (step i of every method, then step i + 1) so the machine's load falls on all alike. The header
checks the target (memfit's LSQ QAT recovers at least half of the PTQ gap to fp32) and says whether the PTQ gap
is large enough for that to mean anything: more than twice its paired standard error and more than what the
continued training alone moves the eval loss (fp32-ft vs fp32); then the same bar against equal training
(``gap_recovered_vs_equal_training`` = 1 - gap_to_fp32_ft / (``fp32-ft+ptq-rtn``'s gap_to_fp32_ft), meaningful
when that gap is more than twice its paired standard error).

Writes bench/results/<name>.md (the table), <name>.json (one object per row: ``method`` and its numbers),
<name>_details.json (settings, pretraining, the target check, per-row checks, per-step training losses and
per-batch eval losses) and <name>.png (training loss curves and the eval losses).

    python bench/qat.py [--bits 4 --steps 150 --batch 4 --seq 128 --lr 3e-4 --qat-lr 3e-4 --eval-batches 16]
                        [--threads 1 --only memfit-lsq-qat,torchao-qat --name qat]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import memfit
from memfit import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pretrain as pre
from _common import RESULTS, write_table

GROUP = 128
BITS_CHOICES = (2, 3, 4, 8)
LORA_RANK = 8
TARGETS = ("model.layers.*.self_attn.*_proj.weight", "model.layers.*.mlp.*_proj.weight")
BETAS, EPS = (0.9, 0.999), 1e-8
RECOVER_TARGET = 0.5


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def target_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 2 and any(fnmatch.fnmatchcase(n, g) for g in TARGETS)]


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@torch.no_grad()
def rtn(w: torch.Tensor, bits: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric ``bits``-bit quantization: (int8 codes in [-qmax - 1, qmax], fp32 scale per
    group of ``group`` flattened elements), qmax = 2**(bits - 1) - 1, scale = absmax / qmax (1 for an all-zero
    group)."""
    qmax = qmax_of(bits)
    g = w.detach().float().reshape(-1, group)
    scale = g.abs().amax(1) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(g / scale[:, None]), -qmax - 1, qmax).to(torch.int8)
    return codes.reshape(w.shape), scale


def dequant(codes: torch.Tensor, scales: torch.Tensor, group: int, shape) -> torch.Tensor:
    return (codes.reshape(-1, group).float() * scales.reshape(-1, 1).float()).reshape(shape)


@torch.no_grad()
def ptq_rtn(model: nn.Module, bits: int) -> nn.Module:
    """A copy of ``model`` with every target weight replaced by its round-to-nearest ``bits``-bit values."""
    q = copy.deepcopy(model)
    for name, p in q.named_parameters():
        if name in target_names(q):
            codes, scale = rtn(p, bits)
            p.copy_(dequant(codes, scale, GROUP, p.shape))
    return q


@torch.no_grad()
def batch_losses(forward: Callable[[torch.Tensor], Any], held_out: list) -> list[float]:
    """The loss of ``forward`` (a model in eval mode, or any inputs -> logits) on each held-out batch."""
    return [float(models.lm_loss(forward(x), y)) for x, y in held_out]


def model_losses(model: nn.Module, held_out: list) -> list[float]:
    model.eval()
    return batch_losses(model, held_out)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean, standard error) of the per-batch differences a - b."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(d), (statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan"))


# ---- one training method = one runner ----------------------------------------------------------


class EagerRunner:
    """An eager model and a torch AdamW over its trainable parameters; ``finish`` gives the model to evaluate."""

    def __init__(self, model: nn.Module, lr: float, finish: Callable[[nn.Module], nn.Module] | None = None):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
        self._finish = finish
        self.checks: dict[str, Any] = {}
        model.train()

    def step(self, x, y) -> torch.Tensor:
        loss = models.lm_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model as it trains (fake-quantized for torchao), in eval mode without gradients."""
        self.model.eval()
        try:
            with torch.no_grad():
                return _logits(self.model(x))
        finally:
            self.model.train()

    def final_model(self) -> nn.Module:
        self.model.eval()
        if self._finish is None:
            return self.model
        model = self._finish(self.model)
        w = next(m.weight for f, m in model.named_modules() if _is_target_linear(m, f))
        self.checks["converted_weight_type"] = type(w.data).__name__
        return model


class MemfitRunner:
    def __init__(self, trainer, bits: int):
        self.trainer = trainer
        self.bits = bits
        self.checks: dict[str, Any] = {}

    def step(self, x, y) -> torch.Tensor:
        return self.trainer.step(x, y)

    def trainable_params(self) -> int:
        ex = self.trainer.executor
        return sum(ex.params[n].numel() for n in self.trainer.graph.trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The trained step's own (fake-quantized) forward: ``Trainer.__call__``."""
        return _logits(self.trainer(x))

    def final_model(self) -> nn.Module:
        """The real integer model: ``export()`` with its quantized weights rebuilt from ``export_quantized()``'s
        codes and steps; records how it compares with ``export()`` in ``checks`` (codec ``int<bits>``, int8 codes
        in [-qmax - 1, qmax], one scale per ``GROUP`` codes)."""
        qmax = qmax_of(self.bits)
        exported = self.trainer.export()
        q = self.trainer.export_quantized()
        model = copy.deepcopy(exported)
        params = dict(model.named_parameters())
        ref = dict(exported.named_parameters())
        diff, bad = 0.0, []
        with torch.no_grad():
            for fqn, enc in q.items():
                codes, scales = enc["codes"], enc["scales"]
                if (enc["codec"] != f"int{self.bits}" or enc["group"] != GROUP or codes.dtype != torch.int8
                        or int(codes.min()) < -qmax - 1 or int(codes.max()) > qmax
                        or scales.numel() != codes.numel() // GROUP):
                    bad.append(fqn)
                w = dequant(codes, scales, enc["group"], params[fqn].shape)
                params[fqn].copy_(w)
                diff = max(diff, float((w - ref[fqn]).abs().max()))
        self.checks.update(int_weights=len(q), int_vs_export_max_abs_diff=diff, bad_encodings=bad,
                           targets_match=sorted(q) == sorted(target_names(model)),
                           code_range=[min(int(e["codes"].min()) for e in q.values()),
                                       max(int(e["codes"].max()) for e in q.values())] if q else None)
        self.checks["export_model"] = exported
        return model


def make_fp32_ft(model, x, y, args):
    return EagerRunner(model, args.lr)


def make_memfit(**qat: Any) -> Callable:
    def make(model, x, y, args):
        spec = {"bits": args.bits, "group": GROUP, "seed": args.seed, **qat}
        trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=models.lm_loss,
                                  optimizer=memfit.AdamW(lr=args.qat_lr, betas=BETAS, eps=EPS, weight_decay=0.0),
                                  passes=[("qat", spec), "remat", "fused_update"])
        return MemfitRunner(trainer, args.bits)
    return make


def _is_target_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "lm_head"


def torchao_group(in_features: int) -> int:
    """torchao groups along each output row, so its group must divide ``in_features``: ``GROUP`` when it does,
    else the smallest divisor above ``GROUP`` (688 -> 172: never finer than memfit's, one scale per 172 weights)."""
    return GROUP if in_features % GROUP == 0 else min(d for d in range(GROUP, in_features + 1) if in_features % d == 0)


def _torchao_groups(model: nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for fqn, m in model.named_modules():
        if _is_target_linear(m, fqn):
            groups.setdefault(torchao_group(m.in_features), []).append(fqn)
    return groups


def _torchao_convert(model: nn.Module) -> nn.Module:
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_
    from torchao.quantization.qat import QATConfig

    dtype = model.torchao_dtype
    for group, fqns in model.torchao_groups.items():
        quantize_(model, QATConfig(IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group)),
                                   step="convert"), filter_fn=lambda m, fqn, names=set(fqns): fqn in names)
    return model


def make_torchao(model, x, y, args):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    dtype = getattr(torch, f"int{args.bits}", None)  # torch.int1 .. torch.int7 and torch.int8
    if dtype is None:
        raise RuntimeError(f"this torch has no torch.int{args.bits} dtype for torchao's {args.bits}-bit QAT")

    def prepare(m: nn.Module, group: int, names: set[str] | None) -> None:
        cfg = QATConfig(weight_config=IntxFakeQuantizeConfig(dtype, group_size=group, is_symmetric=True),
                        step="prepare")
        quantize_(m, cfg, filter_fn=lambda mod, fqn: _is_target_linear(mod, fqn) and (names is None or fqn in names))

    first_try = None
    try:  # every target Linear at group 128, as memfit's rows (on a copy: a failure leaves it half-converted)
        prepare(copy.deepcopy(model), GROUP, None)
    except ValueError as e:
        first_try = _err(e)
    groups = _torchao_groups(model)  # group 128 where the rows allow it, the next divisor of in_features elsewhere
    for group, fqns in groups.items():
        prepare(model, group, set(fqns))
    model.torchao_groups = groups
    model.torchao_dtype = dtype
    runner = EagerRunner(model, args.qat_lr, finish=_torchao_convert)
    runner.checks["torchao_groups"] = {str(g): len(f) for g, f in groups.items()}
    if first_try:
        runner.checks["group_128_everywhere"] = first_try
    return runner


# key -> (label ({b}: the bits, {g}: the group, {q}: qmax), factory, what a failure means); fp32 and the PTQ rows
# are not trained
TRAINED: dict[str, tuple[str, Callable, str]] = {
    "fp32-ft": ("fp32, trained on (eager AdamW, no quantization)", make_fp32_ft, "failed"),
    "memfit-lsq-qat": ("memfit qat: LSQ W{b} g{g}, real INT{b} export", make_memfit(), "failed"),
    "memfit-qalora": (f"memfit qat: QALoRA r{LORA_RANK} W{{b}} g{{g}}, real INT{{b}} export",
                      make_memfit(lora_rank=LORA_RANK, freeze_rest=True), "failed"),
    "torchao-qat": ("torchao QAT (IntxFakeQuantizeConfig int{b} g{g}) + convert", make_torchao, "does not run"),
}
ORDER = ["fp32", "ptq-rtn", "fp32-ft", "fp32-ft+ptq-rtn", "memfit-lsq-qat", "memfit-qalora", "torchao-qat"]
_LABELS = {"fp32": "fp32 pretrained, no quantization", "ptq-rtn": "PTQ round-to-nearest W{b} g{g} (absmax/{q})",
           "fp32-ft+ptq-rtn": "PTQ round-to-nearest W{b} g{g} of fp32-ft", **{k: v[0] for k, v in TRAINED.items()}}


def label(key: str, bits: int) -> str:
    return _LABELS[key].format(b=bits, g=GROUP, q=qmax_of(bits))


@dataclass
class Result:
    key: str
    label: str
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    trainable: int | None = 0
    eval_loss: float | None = None
    per_batch: list[float] | None = None
    eval_graph: float | None = None  # memfit: the trained step's own (fake-quantized) forward
    eval_start: float | None = None  # trained rows: the forward they train (fake-quantized) before the first step
    setup_s: float | None = None
    checks: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


def _fail(res: Result, e: BaseException, what: str | None = None) -> None:
    res.error = f"{what or TRAINED[res.key][2]}: {_err(e)}"
    print(f"[{res.key}] {res.error}", flush=True)


def run(results: dict[str, Result], pretrained: nn.Module, train: list, held_out: list, args) -> None:
    """Evaluate fp32 and PTQ; train the training methods round-robin on ``train``; evaluate their models."""
    for key, model in (("fp32", pretrained), ("ptq-rtn", ptq_rtn(pretrained, args.bits))):
        results[key].per_batch = model_losses(copy.deepcopy(model), held_out)
        results[key].eval_loss = statistics.fmean(results[key].per_batch)
    for key in ("fp32", "ptq-rtn"):
        print(f"[{key}] eval loss {results[key].eval_loss:.4f}", flush=True)
    runners: dict[str, Any] = {}
    for key in TRAINED:
        res = results.get(key)
        if res is None:
            continue
        try:
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            runners[key] = TRAINED[key][1](copy.deepcopy(pretrained), *train[0], args)
            res.setup_s = time.perf_counter() - t0
            res.trainable = runners[key].trainable_params()
            res.eval_start = pre.eval_loss(runners[key].forward, held_out)
            print(f"[{key}] ready in {res.setup_s:.1f} s, {res.trainable:,} trainable parameters, eval loss at "
                  f"step 0 {res.eval_start:.4f}", flush=True)
        except Exception as e:  # one method failing must not stop the comparison
            _fail(res, e)
    live = [results[k] for k in runners]
    every = max(1, len(train) // 10)
    t_start = time.perf_counter()
    for i, (x, y) in enumerate(train):
        for res in live:
            if res.error:
                continue
            try:
                t = time.perf_counter()
                loss = runners[res.key].step(x, y)
                if i > 0:  # the first step builds the state
                    res.times.append(time.perf_counter() - t)
                res.losses.append(float(loss))
                res.steps += 1
            except Exception as e:
                _fail(res, e)
        if (i + 1) % every == 0 or i + 1 == len(train):
            now = ", ".join(f"{r.key} {statistics.fmean(r.losses[-every:]):.3f}" for r in live if not r.error)
            print(f"step {i + 1}/{len(train)} ({time.perf_counter() - t_start:.0f} s): {now}", flush=True)
    for res in live:
        if res.error:
            continue
        runner = runners[res.key]
        try:
            model = runner.final_model()
        except Exception as e:
            _fail(res, e, "trained, but the quantized model could not be made")
            continue
        exported = runner.checks.pop("export_model", None)
        res.checks = runner.checks
        res.per_batch = model_losses(model, held_out)
        res.eval_loss = statistics.fmean(res.per_batch)
        if isinstance(runner, MemfitRunner):
            res.eval_graph = pre.eval_loss(runner.forward, held_out)
            res.checks["export_eval_loss"] = pre.eval_model(exported, held_out)
        if res.key == "fp32-ft" and "fp32-ft+ptq-rtn" in results:
            results["fp32-ft+ptq-rtn"].per_batch = model_losses(ptq_rtn(model, args.bits), held_out)
            results["fp32-ft+ptq-rtn"].eval_loss = statistics.fmean(results["fp32-ft+ptq-rtn"].per_batch)
            results["fp32-ft+ptq-rtn"].steps = res.steps
        print(f"[{res.key}] eval loss {res.eval_loss:.4f} {res.checks or ''}", flush=True)


# ---- output ------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _rnd(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(v, nd)


def report(results: dict[str, Result], args, info: dict, wall_s: float) -> str:
    bits, qmax = args.bits, qmax_of(args.bits)
    fp32_r, ptq_r = results["fp32"], results["ptq-rtn"]
    fp32, ptq = fp32_r.eval_loss, ptq_r.eval_loss
    ptq_gap, ptq_se = paired(ptq_r.per_batch, fp32_r.per_batch)
    ft, ft_ptq = results.get("fp32-ft"), results.get("fp32-ft+ptq-rtn")
    ft_loss = ft.eval_loss if ft is not None else None
    ft_ptq_loss = ft_ptq.eval_loss if ft_ptq is not None else None
    ft_gap = ft_ptq_loss - ft_loss if ft_ptq_loss is not None and ft_loss is not None else None
    ft_gap_se = paired(ft_ptq.per_batch, ft.per_batch)[1] if ft_gap is not None else None
    base_s = ft.median_s if ft is not None else None
    rows, md_rows, details_rows = [], [], []
    for key in ORDER:
        r = results.get(key)
        if r is None:
            continue
        gap = r.eval_loss - fp32 if r.eval_loss is not None else None
        rec = 1 - gap / ptq_gap if gap is not None and ptq_gap else None
        trained = key not in ("fp32", "ptq-rtn")
        gap_ft = r.eval_loss - ft_loss if trained and r.eval_loss is not None and ft_loss is not None else None
        rec_ft = 1 - gap_ft / ft_gap if gap_ft is not None and ft_gap else None
        vs_ptq = (paired(r.per_batch, ft_ptq.per_batch) if trained and key != "fp32-ft+ptq-rtn" and r.per_batch
                  and ft_ptq is not None and ft_ptq.per_batch else None)
        ratio = r.median_s / base_s if r.median_s is not None and base_s else None
        notes = [r.error] if r.error else []
        c = r.checks
        if "int_vs_export_max_abs_diff" in c:
            notes.append(f"INT{bits} model from export_quantized(): {c['int_weights']} weights, codes in "
                         f"{c['code_range']}, max abs diff to export()'s weights {c['int_vs_export_max_abs_diff']:.1e}"
                         f"{', targets as listed' if c['targets_match'] else ', TARGETS DIFFER'}"
                         f"{', bad encodings ' + str(c['bad_encodings']) if c['bad_encodings'] else ''}; "
                         f"eval of export() {c['export_eval_loss']:.4f}, of the trained step {r.eval_graph:.4f}")
        if key == "torchao-qat" and not r.error:
            if "group_128_everywhere" in c:
                sizes = ", ".join(f"{n} weights at group {g}" for g, n in c["torchao_groups"].items())
                notes.append(f"group 128 on every target fails ({c['group_128_everywhere']}): torchao groups within "
                             f"each row, and down_proj's rows are 688 wide; run with {sizes} (the smallest divisor "
                             f"of 688 above 128: coarser than memfit's groups)")
            notes.append(f"evaluated after convert (IntxWeightOnlyConfig int{bits}: weights held as "
                         f"{c.get('converted_weight_type')})")
        if r.setup_s is not None and r.setup_s > 1:
            notes.append(f"setup {r.setup_s:.1f} s")
        note = "; ".join(notes)
        lr = (args.lr if key == "fp32-ft" else args.qat_lr) if trained and key != "fp32-ft+ptq-rtn" else None
        row = dict(method=key, label=r.label, bits=bits, group=GROUP, eval_loss=_rnd(r.eval_loss),
                   eval_loss_step0=_rnd(r.eval_start),
                   gap_to_fp32=_rnd(gap), gap_recovered=_rnd(rec, 4), gap_to_fp32_ft=_rnd(gap_ft),
                   gap_recovered_vs_equal_training=_rnd(rec_ft, 4),
                   vs_ptq_after_equal_training=_rnd(vs_ptq[0]) if vs_ptq else None,
                   vs_ptq_after_equal_training_se=_rnd(vs_ptq[1]) if vs_ptq else None,
                   trainable_params=r.trainable, steps=r.steps, lr=lr,
                   step_time_ratio=_rnd(ratio, 4), median_step_s=_rnd(r.median_s),
                   eval_loss_export=_rnd(c.get("export_eval_loss")), eval_loss_trained_step=_rnd(r.eval_graph),
                   int_vs_export_max_abs_diff=c.get("int_vs_export_max_abs_diff"),
                   setup_s=_rnd(r.setup_s, 2))
        if note:
            row["note"] = note
        rows.append(row)
        details_rows.append(dict(method=key, label=r.label, error=r.error, checks=c or None,
                                 eval_loss_per_batch=r.per_batch, train_losses=r.losses or None,
                                 step_times_s=r.times or None))
        md_rows.append(dict(method=f"`{key}`: {r.label}", start=_fmt(r.eval_start, ".4f"),
                            eval=_fmt(r.eval_loss, ".4f"), gap=_fmt(gap, "+.4f"),
                            rec=_fmt(rec, ".2f"), gap_ft=_fmt(gap_ft, "+.4f"), rec_ft=_fmt(rec_ft, ".2f"),
                            vs_ptq=f"{vs_ptq[0]:+.4f} ± {vs_ptq[1]:.4f}" if vs_ptq else "",
                            trainable=f"{r.trainable:,}" if r.trainable is not None else "", steps=str(r.steps),
                            lr=_fmt(lr, "g"), time=_fmt(ratio, ".2f"), note=note))
    lsq = next((row for row in rows if row["method"] == "memfit-lsq-qat"), None)
    moved = ft_loss - fp32 if ft_loss is not None else None
    above_se = ptq_gap > 2 * ptq_se
    above_moved = moved is None or ptq_gap > abs(moved)
    meaningful = above_se and above_moved
    n_se = ptq_gap / ptq_se if ptq_se else float("inf")
    target = "memfit LSQ QAT recovers at least half of the PTQ gap to fp32 (gap_recovered >= 0.5)"
    scale = (f"the PTQ gap is {ptq_gap:+.4f} ± {ptq_se:.4f} (paired standard error over the "
             f"{len(fp32_r.per_batch)} eval batches: {n_se:.1f} standard errors; "
             f"{ptq_gap / fp32 * 100:+.2f}% of the loss)")
    if ft_gap is not None:
        scale += f", {ft_gap:+.4f} after fp32-ft's training"
    if moved is not None:
        scale += f"; training alone moves the eval loss by {moved:+.4f} (fp32-ft vs fp32)"
    if meaningful:
        mean_line = (f"- meaningful: yes: {scale}: the gap is more than twice its standard error and "
                     + (f"{ptq_gap / abs(moved):.2f}x" if moved else "more than")
                     + " what the continued training alone moves")
        ft_row = next((row for row in rows if row["method"] == "fp32-ft"), None)
        if lsq is not None and (lsq["gap_recovered"] or 0) > 1 and ft_row is not None:
            mean_line += (f". A gap_recovered above 1 includes the continued training's own gain (fp32-ft, "
                          f"unquantized, scores {ft_row['gap_recovered']:.2f}); the check against equal training "
                          f"below takes that out")
    else:
        why = [w for w, bad in (("not clearly above its error", not above_se),
                                ("smaller than what training alone moves", not above_moved)) if bad]
        mean_line = (f"- meaningful: NO: {scale}. The gap is {' and '.join(why)}, so gap_recovered measures the "
                     f"continued training, not a recovery from quantization: the target cannot be judged on this "
                     f"model, whose weights lose almost nothing to round-to-nearest W{bits} g{GROUP}. The comparison "
                     f"that holds is against PTQ after the same training (`vs fp32-ft+ptq-rtn`: negative = the row's "
                     f"quantized model beats it)")
    if lsq is None or lsq["gap_recovered"] is None:
        why = f": {lsq['note']}" if lsq is not None and "note" in lsq else ""
        check = f"- could not be checked (no memfit-lsq-qat result{why})"
    else:
        ok = lsq["gap_recovered"] >= RECOVER_TARGET
        verdict = ("holds" if ok else "DOES NOT HOLD") + ("" if meaningful else " (as computed; not meaningful here)")
        check = (f"- {verdict}: gap_recovered {lsq['gap_recovered']:.2f} (memfit-lsq-qat eval {lsq['eval_loss']:.4f}, "
                 f"fp32 {fp32:.4f}, ptq-rtn {ptq:.4f})")
    lines = [check, mean_line]
    lsq_r = results.get("memfit-lsq-qat")
    if lsq_r is not None and lsq_r.eval_start is not None and ptq_gap:
        lines.append(f"- (informative) memfit LSQ QAT before its first step (fake-quantized with LSQ's initial step "
                     f"sizes, 2 mean|w| / sqrt(qmax) per group): eval {lsq_r.eval_start:.4f}, gap_recovered "
                     f"{1 - (lsq_r.eval_start - fp32) / ptq_gap:.2f}: what the initial step sizes alone give, "
                     f"before any training")
    if lsq is not None and lsq["gap_recovered_vs_equal_training"] is not None:
        ft_se = ft_gap_se
        ok = lsq["gap_recovered_vs_equal_training"] >= RECOVER_TARGET
        ft_meaningful = ft_gap > 2 * ft_se
        lines.append(f"- against equal training, the same bar: {'holds' if ok else 'DOES NOT HOLD'}"
                     f"{'' if ft_meaningful else ' (as computed; not meaningful here)'}: memfit LSQ QAT recovers "
                     f"{lsq['gap_recovered_vs_equal_training']:.2f} of the PTQ gap after the same training (fp32-ft "
                     f"{ft_loss:.4f}, fp32-ft+ptq-rtn {ft_ptq_loss:.4f}: gap {ft_gap:+.4f} ± {ft_se:.4f}, "
                     f"{'more' if ft_meaningful else 'not more'} than twice its standard error)")
    if lsq is not None and lsq["vs_ptq_after_equal_training"] is not None:
        d, se = lsq["vs_ptq_after_equal_training"], lsq["vs_ptq_after_equal_training_se"]
        lines.append(f"- memfit LSQ QAT's INT{bits} model vs fp32-ft+ptq-rtn: {d:+.4f} ± {se:.4f} "
                     f"({'better' if d + 2 * se < 0 else 'worse' if d - 2 * se > 0 else 'no clear difference'})")
    for row in rows:
        if row["method"] in ("memfit-qalora", "torchao-qat") and row["gap_recovered"] is not None:
            lines.append(f"- (informative) {row['method']}: gap_recovered {row['gap_recovered']:.2f}"
                         + (f", {row['gap_recovered_vs_equal_training']:.2f} against equal training"
                            if row["gap_recovered_vs_equal_training"] is not None else ""))
    check_text = f"Target: {target}.\n" + "\n".join(lines)
    pt = (f"{info.get('steps')} AdamW steps, batch {info.get('batch')} x seq {info.get('seq')}, lr "
          f"{info.get('lr'):g} warm-up + cosine, {info.get('wall_s')} s when made"
          f"{', loaded from the cache' if info.get('cached') else ''}")
    lr_text = (f"AdamW lr {args.lr:g} for every trained row (weights, LSQ step sizes and adapters alike)"
               if args.qat_lr == args.lr else
               f"AdamW lr {args.lr:g} for fp32-ft and **{args.qat_lr:g} for the QAT rows** (memfit-lsq-qat, "
               f"memfit-qalora, torchao-qat: weights, LSQ step sizes and adapters alike; a larger lr tried for the "
               f"QAT rows only, fp32-ft kept at its lr)")
    header = (
        f"### W{bits} (group {GROUP}) quantization of a pretrained tiny-llama (4 layers, hidden 256), cpu: PTQ vs "
        f"QAT, {args.steps} training steps, batch {args.batch} x seq {args.seq}\n\n"
        f"`{args.command}` ({wall_s / 60:.1f} min wall, {torch.get_num_threads()} intra-op thread(s)).\n\n"
        f"{check_text}\n\n"
        f"Pretrained on slice A (first 60%) of the stdlib byte corpus ({pt}); the trained rows continue on slice "
        f"B (60-90%), the same batches for every row, one seed ({args.seed}); eval loss: mean over "
        f"{args.eval_batches} fixed held-out batches of slice C (last 10%), batch {args.batch} x seq {args.seq}. "
        f"Quantized: the {args.n_targets} attention and MLP projection weights (not the embedding table nor the "
        f"LM head), {bits}-bit symmetric (codes in [{-qmax - 1}, {qmax}]), one fp32 scale per {GROUP} consecutive "
        f"elements of the flattened weight (memfit's groups and this PTQ's, whose scale is absmax/{qmax}; a "
        f"688-wide down_proj row is 5.4 groups, so groups straddle rows). {lr_text}, betas {BETAS}, eps {EPS:g}, "
        f"weight decay 0, constant lr, no clipping. memfit rows are evaluated as real INT{bits} models rebuilt from "
        f"`export_quantized()` (codes x scales), torchao's after its convert step. gap_recovered = 1 - gap / "
        f"ptq-rtn's gap (both to fp32); vs equal training: 1 - gap to fp32-ft / (fp32-ft+ptq-rtn's gap to "
        f"fp32-ft). vs fp32-ft+ptq-rtn: eval loss minus that of PTQ after the same training, ± the paired "
        f"standard error over the eval batches. Step time: median over the run as a ratio to fp32-ft's, methods "
        f"interleaved step by step. Eval loss at step 0 (trained rows): the forward each trains, before its first "
        f"step (fp32-ft: the pretrained model; QAT rows: fake-quantized at their initial scales).")
    columns = [("method", "method"), ("start", "eval loss at step 0"), ("eval", "eval loss"), ("gap", "gap to fp32"),
               ("rec", "gap recovered"),
               ("gap_ft", "gap to fp32-ft"), ("rec_ft", "gap recovered vs equal training"),
               ("vs_ptq", "vs fp32-ft+ptq-rtn"), ("trainable", "trainable params"), ("steps", "steps"),
               ("lr", "lr"), ("time", "step time vs fp32-ft"), ("note", "note")]
    md = write_table(args.name, md_rows, columns, header)
    # write_table wrote the display rows as JSON; the JSON holds the raw numbers, one object per method
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    details = dict(command=args.command, wall_s=round(wall_s, 1), threads=torch.get_num_threads(),
                   steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, qat_lr=args.qat_lr, bits=bits,
                   qmax=qmax, group=GROUP, eval_batches=args.eval_batches, seed=args.seed, targets=list(TARGETS),
                   n_targets=args.n_targets, pretrain=info, ptq_gap=ptq_gap, ptq_gap_se=ptq_se,
                   ptq_gap_after_ft=ft_gap, ptq_gap_after_ft_se=ft_gap_se, training_moves=moved, target=target,
                   target_holds=(lsq["gap_recovered"] >= RECOVER_TARGET
                                 if lsq is not None and lsq["gap_recovered"] is not None else None),
                   target_meaningful=meaningful, target_text=check_text, rows=details_rows)
    (RESULTS / f"{args.name}_details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    return md


def plot(results: dict[str, Result], args) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: {_err(e)} (pip install matplotlib)")
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    window = max(1, min(10, args.steps // 10))
    for i, key in enumerate(TRAINED):
        r = results.get(key)
        if r is None or r.error or not r.losses:
            continue
        xs = list(range(1, len(r.losses) + 1))
        smooth = [statistics.fmean(r.losses[max(0, j - window):j]) for j in xs]
        ax.plot(xs, smooth, label=key, linewidth=1.4, color=f"C{i}", linestyle="-" if key.startswith("memfit")
                else "--")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss (trailing mean of {window}; fake-quantized forward for the QAT rows)")
    ax.set_title("continued training on slice B")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    keys = [k for k in ORDER if k in results and results[k].eval_loss is not None]
    vals = [results[k].eval_loss for k in keys]
    bx.barh(keys, vals, color=[f"C{list(TRAINED).index(k)}" if k in TRAINED else "grey" for k in keys])
    lo = min(vals) - 0.5 * (max(vals) - min(vals) + 1e-3)
    bx.set_xlim(lo, max(vals) + 0.3 * (max(vals) - min(vals) + 1e-3))
    for k, v in zip(keys, vals, strict=True):
        bx.text(v, k, f" {v:.4f}", va="center", fontsize=8)
    bx.invert_yaxis()
    bx.set_xlabel("held-out eval loss (quantized models as exported)")
    bx.set_title(f"W{args.bits} g{GROUP}")
    fig.suptitle(f"pretrained tiny-llama, batch {args.batch} x seq {args.seq}: PTQ vs QAT")
    fig.tight_layout()
    path = RESULTS / f"{args.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4, choices=BITS_CHOICES, help="weight bits (memfit's qat: 2, 3, 4, 8)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW lr of fp32-ft (and of the QAT rows by default)")
    ap.add_argument("--qat-lr", type=float, default=None, help="AdamW lr of the QAT rows (memfit-lsq-qat, "
                    "memfit-qalora, torchao-qat); default: --lr")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=pre.PRETRAIN_STEPS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default); on a "
                    "shared machine more than one thread can make every op wait on the others")
    ap.add_argument("--only", default="", help=f"comma-separated trained methods from {', '.join(TRAINED)} "
                                              "(fp32, ptq-rtn and fp32-ft always run)")
    ap.add_argument("--name", default="qat", help="results file stem")
    args = ap.parse_args(argv)
    args.command = shlex.join(["python", "bench/qat.py", *(sys.argv[1:] if argv is None else argv)])
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is left out of the timing)")
    if args.qat_lr is None:
        args.qat_lr = args.lr
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = list(ORDER)
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in TRAINED]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; choose from {', '.join(TRAINED)}")
        keys = [k for k in ORDER if k not in TRAINED or k == "fp32-ft" or k in wanted]
    t0 = time.perf_counter()
    info: dict = {}
    pretrained = pre.pretrained_tiny_llama(args.pretrain_steps, info=info)
    args.n_targets = len(target_names(pretrained))
    held_out = pre.eval_batches(args.batch, args.seq, args.eval_batches)
    train = pre.batches("finetune", args.batch, args.seq, args.steps, seed=args.seed)
    results = {k: Result(k, label(k, args.bits)) for k in keys}
    run(results, pretrained, train, held_out, args)
    print(report(results, args, info, time.perf_counter() - t0))
    path = plot(results, args)
    if path:
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
