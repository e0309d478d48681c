"""LoRA / QLoRA fine-tuning of a pretrained tiny-llama: memfit's ``lora`` pass against eager full fine-tuning,
peft LoRA and peft QLoRA over bitsandbytes NF4, one process.

The model is tiny-llama (4 layers, hidden 256, byte vocabulary) pretrained by ``bench/_pretrain.py`` on
slice A of the stdlib byte corpus (cached under /tmp, shared with bench/qat.py). Every method fine-tunes a
deep copy of that same model on the same batches of slice B (``ByteBatches``, drawn once) for the same number
of steps with AdamW (betas (0.9, 0.999), eps 1e-8, weight decay 0, constant lr, no gradient clipping, no
gradient checkpointing): one lr (``--lr``) for every LoRA row and, as usual, a lower one for full fine-tuning
(``--full-ft-lr``, the pretraining's final lr; at the LoRA lr full fine-tuning first climbs above the
pretrained loss). The eval loss is the mean next-byte loss over the same fixed held-out batches of slice C.
Every LoRA row uses rank ``RANK``, alpha ``ALPHA`` (scaling alpha / rank), dropout 0 and the same targets: the
q/k/v/o attention and gate/up/down MLP projections of every layer (``TARGETS``, given to peft as
``target_modules`` ``PEFT_MODULES``); only the adapters train (embeddings, norms and the LM head stay frozen).
Methods (rows):

- ``full-ft``: eager ``torch.optim.AdamW`` over every parameter: the baseline of the ratios;
- ``peft-lora``: ``peft.get_peft_model(model, LoraConfig(...))``, eager, torch AdamW over the trainable
  parameters (peft's own adapter init: A Kaiming-uniform, B zero, from torch's global RNG);
- ``peft-qlora-bnb``: the same over a bitsandbytes 4-bit model: the pretrained model saved and reloaded
  with ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, compute dtype fp32,
  no double quantization))`` (every Linear but the LM head becomes ``bnb.nn.Linear4bit``, NF4 block 64), then
  ``prepare_model_for_kbit_training(use_gradient_checkpointing=False)`` and ``get_peft_model``;
- ``memfit-lora``: ``memfit.optimize`` with ``("lora", {rank, alpha, targets})``, ``remat`` (its lossless
  default mode: cheap pointwise recomputation only) and ``fused_update``; fp32 frozen base;
- ``memfit-qlora``: the same with ``base="nf4"`` (NF4 codes, one fp32 absmax per block of 64, dequantized
  just in time: QLoRA without double quantization, as the bitsandbytes row);
- ``memfit-lq-lora``: ``base="nf4", init="lq"`` (LQ-LoRA: W ~ Q + s B A by alternating NF4 quantization
  and rank-r SVD, so the adapters start holding what quantization loses).

A method whose library is missing or fails is recorded with its error and the run goes on.

Columns: ``trainable_params`` counts the parameters the optimizer updates (eager: ``requires_grad``
parameters; memfit: the trainer graph's ``trainable``). ``peak_bytes`` is one fine-tuning step measured
with ``memfit.measure_peak`` after a warm-up step (CPU: live bytes over tensor storages), counting
parameters (bitsandbytes' packed 4-bit weights and their quantization state), buffers, optimizer state and
the batch, as bench/optimizers.py does; for memfit ``Trainer.measure_step`` (the executor's persistent
tensors and the batch). ``step_time_ratio`` is the median step time over the run (the warm-up and the
measured step left out) over ``full-ft``'s, every method stepped round-robin (step i of every method, then
step i + 1) so the machine's load falls on all alike. ``eval_loss_step0`` is the eval loss of each row's
model before its first step (the base it fine-tunes: NF4 rows show what quantization cost, LQ-LoRA what its
init recovers) and ``eval_loss`` the same after fine-tuning, in eval mode without gradients (memfit:
``Trainer.__call__``, the trained step's weights, each LoRA adapter applied beside its weight by a forward hook,
``out + linear(linear(x, A), B) * s``, as peft computes it); ``eval_loss_rel_peft`` is ``eval_loss`` / the peft
reference's - 1, the reference being ``peft-qlora-bnb`` when it ran, else ``peft-lora``.
``peft_max_abs_diff`` is the peft round trip of a memfit row: ``Trainer.save_adapters`` to a temporary
directory, ``peft.PeftModel.from_pretrained`` on a fresh copy of the pretrained model into which
``Trainer.base_weights()`` were loaded first (the NF4 base dequantized, as the step holds it), and the largest
|logit difference| between ``Trainer.__call__`` and the peft model as loaded (adapters beside the weights) on
the first held-out batch: the target. As information, ``peft_merged_max_abs_diff`` is the same after peft's
``merge_and_unload()`` (merged weights W + s B A round differently from the unmerged forward), and
``export_vs_peft_merged_max_abs_diff`` compares ``Trainer.export()`` (which merges the adapters) with that
merged peft model. The header gives
``eval_loss_before`` (the pretrained model), an NF4 check (memfit's NF4 base against the weights decoded from
bitsandbytes' own codes, and bitsandbytes' CPU ``dequantize_4bit`` against those codes) and checks the
targets: memfit QLoRA's eval loss within 1% of the peft reference's, its measured peak no higher than peft
QLoRA's (peft LoRA's if bitsandbytes did not run), and every round trip within 1e-5.
Writes bench/results/<name>.md (the table), <name>.json (one object per row: ``method`` and its numbers),
<name>_details.json (settings, pretraining, the NF4 check, the targets checked, per-step training losses) and
<name>.png (fine-tuning loss curves).

    python bench/qlora.py [--steps 150 --batch 4 --seq 128 --lr 1e-3 --full-ft-lr 3e-4 --eval-batches 16]
                          [--threads 1 --only full-ft,memfit-qlora]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import memfit
from memfit import models
from memfit.runtime.memory import fmt_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pretrain as pre
from _common import RESULTS, write_table

RANK, ALPHA = 8, 16
TARGETS = ("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.k_proj.weight",
           "model.layers.*.self_attn.v_proj.weight", "model.layers.*.self_attn.o_proj.weight",
           "model.layers.*.mlp.*.weight")
PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETAS, EPS = (0.9, 0.999), 1e-8
ROUNDTRIP_TOL = 1e-5
LOSS_TOL = 0.01
BNB_EVAL_NOTE = ("eval with bitsandbytes' CPU inference path off (`support_avx512bf16_for_cpu = False`): in eval mode "
                 "without gradients it repacks the 4-bit weights and asserts out_features % block_n == 0, which the "
                 "688-wide MLP projections fail (AssertionError: N must be divisible by block_n); the eval runs the "
                 "training step's dequantize + matmul instead")


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def held_tensors(obj: Any) -> list[torch.Tensor]:
    """Every plain tensor reachable from ``obj`` (containers, object attributes such as bitsandbytes'
    ``QuantState``), each once: what a step holds before it starts."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(o: Any) -> None:
        if id(o) in seen or o is None or isinstance(o, (int, float, str, bool, type, torch.dtype, torch.device)):
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            out.append(o)
            qs = getattr(o, "quant_state", None)  # bitsandbytes Params4bit: absmax, code (nested when double)
            if qs is not None:
                walk(vars(qs))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dict__") and not isinstance(o, nn.Module):
            walk(vars(o))

    walk(obj)
    return out


# ---- one method = one runner -------------------------------------------------------------------


class EagerRunner:
    """An eager model (plain or peft-wrapped) and a torch AdamW over its trainable parameters."""

    def __init__(self, model: nn.Module, lr: float):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0)
        model.train()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = models.lm_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self, x, y) -> torch.Tensor:
        return self._step(x, y)

    def measured_step(self, x, y) -> tuple[torch.Tensor, int]:
        existing = held_tensors([list(self.model.parameters()), list(self.model.buffers()), self.opt.state, x, y])
        m = memfit.measure_peak(self._step, x, y, existing=iter(existing))
        return m.value, m.peak_bytes

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        try:
            return _logits(self.model(x))
        finally:
            self.model.train()


class MemfitRunner:
    def __init__(self, trainer):
        self.trainer = trainer

    def step(self, x, y) -> torch.Tensor:
        return self.trainer.step(x, y)

    def measured_step(self, x, y) -> tuple[torch.Tensor, int]:
        m = self.trainer.measure_step(x, y)
        return m.value, m.peak_bytes

    def trainable_params(self) -> int:
        ex = self.trainer.executor
        return sum(ex.params[n].numel() for n in self.trainer.graph.trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.trainer(x))


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(PEFT_MODULES), bias="none",
                      task_type="CAUSAL_LM")


def make_full_ft(model, x, y, args):
    return EagerRunner(model, args.full_ft_lr)


def make_peft_lora(model, x, y, args):
    from peft import get_peft_model

    return EagerRunner(get_peft_model(model, _lora_config()), args.lr)


def bnb_nf4_model(model: nn.Module) -> nn.Module:
    """``model`` saved and reloaded through transformers with a bitsandbytes NF4 config (block 64, fp32
    compute, no double quantization): every Linear but the LM head becomes ``bnb.nn.Linear4bit``."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=False)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        q = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    import bitsandbytes as bnb

    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in q.modules())
    if n4 != 7 * q.config.num_hidden_layers:
        raise RuntimeError(f"expected {7 * q.config.num_hidden_layers} Linear4bit modules, got {n4}")
    return q


def make_peft_qlora_bnb(model, x, y, args):
    from peft import get_peft_model, prepare_model_for_kbit_training

    q = prepare_model_for_kbit_training(bnb_nf4_model(model), use_gradient_checkpointing=False)
    for m in q.modules():  # eval: the training step's dequantize + matmul path (see BNB_EVAL_NOTE)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return EagerRunner(get_peft_model(q, _lora_config()), args.lr)


def make_memfit(**lora: Any) -> Callable:
    def make(model, x, y, args):
        spec = {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "seed": args.seed, **lora}
        trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=models.lm_loss,
                                  optimizer=memfit.AdamW(lr=args.lr, betas=BETAS, eps=EPS, weight_decay=0.0),
                                  passes=[("lora", spec), "remat", "fused_update"])
        return MemfitRunner(trainer)
    return make


# key -> (label, factory, what a failure means)
METHODS: dict[str, tuple[str, Callable, str]] = {
    "full-ft": ("full fine-tuning (eager AdamW)", make_full_ft, "failed"),
    "peft-lora": ("peft LoRA", make_peft_lora, "does not run"),
    "peft-qlora-bnb": ("peft QLoRA (bitsandbytes NF4)", make_peft_qlora_bnb, "does not run"),
    "memfit-lora": ("memfit lora", make_memfit(), "failed"),
    "memfit-qlora": ("memfit lora, NF4 base (QLoRA)", make_memfit(base="nf4"), "failed"),
    "memfit-lq-lora": ("memfit lora, NF4 base, LQ init (LQ-LoRA)", make_memfit(base="nf4", init="lq"), "failed"),
}
COLOR = {"full-ft": 0, "peft-lora": 1, "memfit-lora": 1, "peft-qlora-bnb": 2, "memfit-qlora": 2, "memfit-lq-lora": 3}


@dataclass
class Result:
    key: str
    label: str
    losses: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    trainable: int | None = None
    eval_loss: float | None = None
    eval_start: float | None = None
    setup_s: float | None = None
    roundtrip: float | None = None
    roundtrip_all: dict[str, float] | None = None
    roundtrip_error: str | None = None
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


def _fail(res: Result, e: BaseException) -> None:
    res.error = f"{METHODS[res.key][2]}: {_err(e)}"
    print(f"[{res.key}] {res.error}", flush=True)


def peft_roundtrip(trainer, pretrained: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The trained step's logits (``Trainer.__call__``: each adapter applied beside its weight, as peft does)
    against peft's reload of its saved adapters, as loaded (adapters beside the weights) and after peft's
    ``merge_and_unload()``; and ``Trainer.export()`` (adapters merged) against that merged peft model."""
    from peft import PeftModel

    fresh = copy.deepcopy(pretrained)
    _, unexpected = fresh.load_state_dict(trainer.base_weights(), strict=False)
    if unexpected:
        raise RuntimeError(f"base_weights() names no parameter of the model: {unexpected[:3]}")
    with tempfile.TemporaryDirectory() as d:
        trainer.save_adapters(d)
        peft_model = PeftModel.from_pretrained(fresh, d)
    peft_model.eval()
    ours = _logits(trainer(x))
    exported = trainer.export()
    exported.eval()
    with torch.no_grad():
        loaded = _logits(peft_model(x))
        merged = _logits(peft_model.merge_and_unload()(x))
        ours_merged = _logits(exported(x))
    return dict(loaded=float((ours - loaded).abs().max()), merged=float((ours - merged).abs().max()),
                export_vs_merged=float((ours_merged - merged).abs().max()), logit_absmax=float(ours.abs().max()))


def nf4_vs_bnb(trainer, bnb_model: nn.Module) -> dict[str, Any]:
    """memfit's NF4 base (``base_weights()``) against bitsandbytes' NF4 of the same pretrained weights: the
    weights decoded from bitsandbytes' own codes and absmax (high nibble first, ``quant_state.code``), and what
    bitsandbytes' ``dequantize_4bit`` (the op its Linear4bit computes with) makes of those codes."""
    import bitsandbytes as bnb

    ours = trainer.base_weights()
    codes_diff, dequant_diff, wrong = 0.0, 0.0, []
    n = 0
    with torch.no_grad():
        for name, m in bnb_model.named_modules():
            if not isinstance(m, bnb.nn.Linear4bit):
                continue
            fqn = name.removeprefix("base_model.model.").removesuffix(".base_layer") + ".weight"
            qs, packed = m.weight.quant_state, m.weight.data.view(torch.uint8).reshape(-1)
            idx = torch.stack([packed >> 4, packed & 15], 1).reshape(-1).long()
            decoded = (qs.code.float()[idx].view(-1, qs.blocksize) * qs.absmax.float()[:, None]).view(ours[fqn].shape)
            theirs = bnb.functional.dequantize_4bit(m.weight.data, qs).float().view(ours[fqn].shape)
            codes_diff = max(codes_diff, float((ours[fqn] - decoded).abs().max()))
            d = float((theirs - decoded).abs().max())
            dequant_diff = max(dequant_diff, d)
            if d > 0:
                wrong.append(f"{fqn} {tuple(ours[fqn].shape)}")
            n += 1
    return dict(weights=n, ours_vs_bnb_codes=codes_diff, bnb_dequantize_vs_its_codes=dequant_diff,
                bnb_dequantize_wrong_on=wrong)


def run(results: list[Result], pretrained: nn.Module, train: list, held_out: list, args) -> None:
    """Fine-tune every method round-robin on ``train``; then eval and the peft round trips."""
    runners: dict[str, Any] = {}
    for res in results:
        try:
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            runners[res.key] = METHODS[res.key][1](copy.deepcopy(pretrained), *train[0], args)
            res.setup_s = time.perf_counter() - t0
            res.trainable = runners[res.key].trainable_params()
            res.eval_start = pre.eval_loss(runners[res.key].forward, held_out)
            print(f"[{res.key}] ready in {res.setup_s:.1f} s, {res.trainable:,} trainable parameters, eval loss "
                  f"at step 0 {res.eval_start:.4f}", flush=True)
        except Exception as e:  # one method failing must not stop the comparison
            _fail(res, e)
    live = [r for r in results if r.key in runners]
    every = max(1, len(train) // 10)
    t_start = time.perf_counter()
    for i, (x, y) in enumerate(train):
        for res in live:
            if res.error:
                continue
            try:
                t = time.perf_counter()
                if i == 1:  # the warm-up step made the state; measure this one, leave it out of the timing
                    loss, res.peak_bytes = runners[res.key].measured_step(x, y)
                else:
                    loss = runners[res.key].step(x, y)
                    if i > 0:
                        res.times.append(time.perf_counter() - t)
                res.losses.append(float(loss))
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
            res.eval_loss = pre.eval_loss(runner.forward, held_out)
        except Exception as e:
            _fail(res, e)
            continue
        if isinstance(runner, MemfitRunner):
            try:
                res.roundtrip_all = peft_roundtrip(runner.trainer, pretrained, held_out[0][0])
                res.roundtrip = res.roundtrip_all["loaded"]
            except Exception as e:
                res.roundtrip_error = f"peft round trip failed: {_err(e)}"
                print(f"[{res.key}] {res.roundtrip_error}", flush=True)
        extra = f", peft round trip {res.roundtrip_all}" if res.roundtrip is not None else ""
        print(f"[{res.key}] eval loss {res.eval_loss:.4f}{extra}", flush=True)
    bnb_runner, q_runner = runners.get("peft-qlora-bnb"), runners.get("memfit-qlora")
    if bnb_runner is not None and q_runner is not None:
        try:
            args.nf4_vs_bnb = nf4_vs_bnb(q_runner.trainer, bnb_runner.model)
            print(f"memfit NF4 base vs bitsandbytes NF4: {args.nf4_vs_bnb}", flush=True)
        except Exception as e:
            args.nf4_vs_bnb = _err(e)


# ---- output ------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _rnd(v: float | None, nd: int = 6) -> float | None:
    return None if v is None else round(v, nd)


def check_targets(by: dict[str, Result]) -> list[tuple[str, bool | None, str]]:
    """(target, holds (None: could not be checked), the numbers) for the header."""
    bnb, lora = by.get("peft-qlora-bnb"), by.get("peft-lora")
    ref = bnb if bnb is not None and bnb.eval_loss is not None else lora
    peak_ref = bnb if bnb is not None and bnb.peak_bytes is not None else lora
    q = by.get("memfit-qlora")
    out: list[tuple[str, bool | None, str]] = []
    if q is None or q.eval_loss is None or ref is None or ref.eval_loss is None:
        out.append(("memfit QLoRA eval loss within 1% of peft's", None, "a row is missing"))
    else:
        rel = q.eval_loss / ref.eval_loss - 1
        out.append((f"memfit QLoRA eval loss within {LOSS_TOL:.0%} of {ref.key}'s", abs(rel) <= LOSS_TOL,
                    f"{q.eval_loss:.4f} vs {ref.eval_loss:.4f} ({rel * 100:+.2f}%)"))
    if (q is not None and q.eval_loss is not None and ref is bnb and lora is not None
            and lora.eval_loss is not None):
        rel = q.eval_loss / lora.eval_loss - 1
        out.append(("(informative) memfit QLoRA eval loss within 1% of peft-lora's", abs(rel) <= LOSS_TOL,
                    f"{q.eval_loss:.4f} vs {lora.eval_loss:.4f} ({rel * 100:+.2f}%)"))
    if q is None or q.peak_bytes is None or peak_ref is None or peak_ref.peak_bytes is None:
        out.append(("memfit QLoRA measured peak no higher than peft's", None, "a row is missing"))
    else:
        out.append((f"memfit QLoRA measured peak no higher than {peak_ref.key}'s", q.peak_bytes <= peak_ref.peak_bytes,
                    f"{fmt_bytes(q.peak_bytes)} vs {fmt_bytes(peak_ref.peak_bytes)} "
                    f"({q.peak_bytes / peak_ref.peak_bytes:.2f}x)"))
    for key in ("memfit-lora", "memfit-qlora", "memfit-lq-lora"):
        r = by.get(key)
        if r is None:
            continue
        if r.roundtrip is None:
            out.append((f"{key}: peft round trip max |d logits| <= {ROUNDTRIP_TOL:g}", None,
                        r.error or r.roundtrip_error or "not run"))
        else:
            rt = r.roundtrip_all
            out.append((f"{key}: peft round trip max |d logits| <= {ROUNDTRIP_TOL:g} (memfit `t(x)` vs peft as loaded)",
                        r.roundtrip <= ROUNDTRIP_TOL,
                        f"as loaded {r.roundtrip:.2e}; information: memfit `t(x)` vs peft after merge_and_unload "
                        f"{rt['merged']:.2e} ({rt['merged'] / rt['logit_absmax']:.1e} of the largest logit: merged "
                        f"weights W + s B A round differently from the unmerged forward), memfit `export()` (merged) "
                        f"vs peft merged {rt['export_vs_merged']:.2e}"))
    return out


def report(results: list[Result], args, before: float, info: dict, wall_s: float) -> str:
    by = {r.key: r for r in results}
    base = by["full-ft"]
    bnb = by.get("peft-qlora-bnb")
    ref = bnb if bnb is not None and bnb.eval_loss is not None else by.get("peft-lora")
    targets = check_targets(by)
    json_rows, md_rows, details_rows = [], [], []
    for r in results:
        ratio = r.median_s / base.median_s if r.median_s is not None and base.median_s else None
        rel = r.eval_loss / ref.eval_loss - 1 if ref is not None and ref.eval_loss and r.eval_loss is not None \
            else None
        bits = [r.error] if r.error else []
        if r.roundtrip_error:
            bits.append(r.roundtrip_error)
        if r.key == "peft-qlora-bnb" and not r.error:
            bits.append(BNB_EVAL_NOTE)
        if r.setup_s is not None and r.setup_s > 1:
            bits.append(f"setup {r.setup_s:.1f} s")
        note = "; ".join(bits)
        rt = r.roundtrip_all or {}
        row = dict(method=r.key, label=r.label, trainable_params=r.trainable, peak_bytes=r.peak_bytes,
                   peak_ratio=round(r.peak_bytes / base.peak_bytes, 4) if r.peak_bytes and base.peak_bytes else None,
                   step_time_ratio=_rnd(ratio, 4), median_step_s=_rnd(r.median_s),
                   eval_loss=_rnd(r.eval_loss), eval_loss_step0=_rnd(r.eval_start),
                   eval_loss_rel_peft=_rnd(rel), peft_max_abs_diff=r.roundtrip,
                   peft_merged_max_abs_diff=rt.get("merged"),
                   export_vs_peft_merged_max_abs_diff=rt.get("export_vs_merged"),
                   logit_absmax=_rnd(rt.get("logit_absmax")),
                   final_train_loss=_rnd(statistics.fmean(r.losses[-10:])) if r.losses and not r.error else None,
                   setup_s=_rnd(r.setup_s, 2))
        if note:
            row["note"] = note
        json_rows.append(row)
        details_rows.append(dict(method=r.key, label=r.label, error=r.error, roundtrip_error=r.roundtrip_error,
                                 train_losses=r.losses or None, step_times_s=r.times or None))
        md_rows.append(dict(
            method=f"`{r.key}`: {r.label}",
            trainable=f"{r.trainable:,}" if r.trainable is not None else "",
            peak=fmt_bytes(r.peak_bytes) if r.peak_bytes is not None else "",
            peak_ratio=f"{r.peak_bytes / base.peak_bytes:.2f}" if r.peak_bytes and base.peak_bytes else "",
            time=_fmt(ratio, ".2f"), eval=_fmt(r.eval_loss, ".4f"), start=_fmt(r.eval_start, ".4f"),
            rel=f"{rel * 100:+.2f}%" if rel is not None else "",
            rt=(f"{r.roundtrip:.1e} / {r.roundtrip_all['merged']:.1e} / {r.roundtrip_all['export_vs_merged']:.1e}"
                if r.roundtrip_all else ""), note=note))
    ref_name = ref.key if ref is not None else "none"
    amax = [r.roundtrip_all["logit_absmax"] for r in results if r.roundtrip_all]
    logit_absmax = f"{max(amax):.1f} in magnitude" if amax else "n/a"
    nv = getattr(args, "nf4_vs_bnb", None)
    if isinstance(nv, dict):
        nf4_line = (f"NF4 check: memfit's NF4 base (`base_weights()`) vs the weights decoded from bitsandbytes' own "
                    f"NF4 codes and absmax of the same pretrained weights: {nv['weights']} weights, max |difference| "
                    f"{nv['ours_vs_bnb_codes']:.1e}. bitsandbytes' CPU `dequantize_4bit` (what its Linear4bit "
                    f"computes with) vs its own codes: max |difference| {nv['bnb_dequantize_vs_its_codes']:.1e}")
        if nv["bnb_dequantize_wrong_on"]:
            nf4_line += (f", wrong on {len(nv['bnb_dequantize_wrong_on'])} weights "
                         f"({', '.join(nv['bnb_dequantize_wrong_on'])}): its CPU kernel mis-decodes a weight whose "
                         f"rows are not a whole number of 64-element blocks (688 = 10.75 blocks), so the "
                         f"`peft-qlora-bnb` row computes with corrupted down_proj weights (see its eval loss at "
                         f"step 0)")
        nf4_line += ".\n\n"
    else:
        nf4_line = "" if nv is None else f"NF4 check: not run ({nv}).\n\n"
    checks = "\n".join(f"- {'holds' if ok else 'could not be checked' if ok is None else 'DOES NOT HOLD'}: {name} "
                       f"({numbers})" for name, ok, numbers in targets)
    pt = (f"{info.get('steps')} AdamW steps, batch {info.get('batch')} x seq {info.get('seq')}, lr "
          f"{info.get('lr'):g} warm-up + cosine, {info.get('wall_s')} s when made"
          f"{', loaded from the cache' if info.get('cached') else ''}")
    header = (
        f"### LoRA / QLoRA fine-tuning of a pretrained tiny-llama (4 layers, hidden 256), cpu: {args.steps} steps, "
        f"batch {args.batch} x seq {args.seq}\n\n"
        f"`{args.command}` ({wall_s / 60:.1f} min wall, {torch.get_num_threads()} intra-op thread(s)).\n\n"
        f"Pretrained on slice A (first 60%) of the stdlib byte corpus ({pt}); fine-tuned on slice B (60-90%), "
        f"every row on the same batches, one seed ({args.seed}: the batches, peft's adapter init, memfit's "
        f"adapter seed); eval loss: mean over {args.eval_batches} fixed held-out batches of slice C (last 10%), "
        f"batch {args.batch} x seq {args.seq}. **eval_loss_before** (the pretrained model, no fine-tuning): "
        f"**{before:.4f}**. AdamW lr {args.lr:g} for every LoRA row and {args.full_ft_lr:g} for full fine-tuning "
        f"(the usual lower lr: the pretraining's final one), betas {BETAS}, eps {EPS:g}, weight decay 0, constant "
        f"lr, no clipping, no gradient checkpointing (memfit's `remat` in its lossless default mode). LoRA rows: "
        f"rank {RANK}, alpha {ALPHA}, dropout 0, targets `{'`, `'.join(PEFT_MODULES)}` in every layer, only the "
        f"adapters train. QLoRA rows: NF4, block 64, fp32 absmax per block, no double quantization. Peak: one "
        f"step after a warm-up step, `memfit.measure_peak` (live bytes over tensor "
        f"storages: parameters, quantized weights and their state, buffers, optimizer state, batch). Step time: "
        f"median over the run as a ratio to full fine-tuning's, methods interleaved step by step. vs peft: eval "
        f"loss relative to `{ref_name}`'s. peft round trip: `save_adapters` + `base_weights()` reloaded with "
        f"`peft.PeftModel.from_pretrained`, max |logit difference| between memfit's inference `t(x)` (adapters "
        f"applied beside their weight by a forward hook, as peft computes them) and the peft model on a held-out "
        f"batch (logits up to {logit_absmax}), as loaded (the target) and, as information, after peft's "
        f"`merge_and_unload()`, and memfit's `export()` (adapters merged) against that merged peft model.\n\n"
        f"{nf4_line}"
        f"Targets:\n{checks}")
    columns = [("method", "method"), ("trainable", "trainable params"), ("peak", "measured peak"),
               ("peak_ratio", "peak vs full-ft"), ("time", "step time vs full-ft"), ("start", "eval loss at step 0"),
               ("eval", "eval loss"), ("rel", f"eval loss vs {ref_name}"),
               ("rt", "peft round trip max abs diff: t(x) vs as loaded / t(x) vs merged / export() vs merged"),
               ("note", "note")]
    md = write_table(args.name, md_rows, columns, header)
    # write_table wrote the display rows as JSON; the JSON holds the raw numbers, one object per method
    (RESULTS / f"{args.name}.json").write_text(json.dumps(json_rows, indent=2) + "\n")
    details = dict(command=args.command, wall_s=round(wall_s, 1), threads=torch.get_num_threads(),
                   steps=args.steps, batch=args.batch, seq=args.seq, lr=args.lr, full_ft_lr=args.full_ft_lr,
                   rank=RANK, alpha=ALPHA, targets=list(TARGETS), peft_target_modules=list(PEFT_MODULES),
                   eval_batches=args.eval_batches, seed=args.seed, pretrain=info,
                   eval_loss_before=before, peft_reference=ref_name, nf4_vs_bnb=nv, roundtrip_tol=ROUNDTRIP_TOL,
                   loss_tol=LOSS_TOL, targets_checked=[dict(target=n, holds=ok, numbers=s) for n, ok, s in targets],
                   rows=details_rows)
    (RESULTS / f"{args.name}_details.json").write_text(json.dumps(details, indent=2) + "\n")
    return md


def plot(results: list[Result], args, before: float) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no loss plot: {_err(e)} (pip install matplotlib)")
        return None
    window = max(1, min(10, args.steps // 10))

    def smooth(xs: list[float]) -> list[float]:
        return [statistics.fmean(xs[max(0, i - window):i]) for i in range(1, len(xs) + 1)]

    ok = [r for r in results if not r.error and r.losses]
    ref = next((r for r in ok if r.key == "peft-lora"), None)
    fig, axes = plt.subplots(1, 2 if ref is not None else 1, figsize=(14 if ref is not None else 9, 5.5),
                             squeeze=False)
    ax = axes[0][0]
    for r in ok:
        label = f"{r.key} (eval {r.eval_loss:.4f})" if r.eval_loss is not None else r.key
        ax.plot(range(1, len(r.losses) + 1), smooth(r.losses), label=label, linewidth=1.4,
                color=f"C{COLOR.get(r.key, 9)}", linestyle="-" if r.key.startswith("memfit") else "--")
    ax.axhline(before, color="grey", linewidth=0.8, linestyle=":", label=f"eval loss before ({before:.4f})")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel(f"training loss (trailing mean of {window})")
    ax.set_title("training loss (every row on the same batches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if ref is not None:
        bx = axes[0][1]
        for r in ok:
            if r is ref or len(r.losses) != len(ref.losses):
                continue
            bx.plot(range(1, len(r.losses) + 1), smooth([a - b for a, b in zip(r.losses, ref.losses, strict=True)]),
                    label=r.key, linewidth=1.4, color=f"C{COLOR.get(r.key, 9)}",
                    linestyle="-" if r.key.startswith("memfit") else "--")
        bx.axhline(0, color="grey", linewidth=0.8)
        bx.set_xlabel("fine-tuning step")
        bx.set_ylabel(f"training loss minus peft-lora's, same batch (trailing mean of {window})")
        bx.set_title("difference to peft LoRA")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    fig.suptitle(f"pretrained tiny-llama, batch {args.batch} x seq {args.seq}: LoRA r{RANK} / QLoRA fine-tuning")
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
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW lr of every LoRA row")
    ap.add_argument("--full-ft-lr", type=float, default=3e-4, help="AdamW lr of full-ft (the pretraining's final lr)")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=pre.PRETRAIN_STEPS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default); on a "
                    "shared machine more than one thread can make every op wait on the others (50x slower SVDs)")
    ap.add_argument("--only", default="", help=f"comma-separated methods from {', '.join(METHODS)} "
                                              "(full-ft, the baseline, always runs)")
    ap.add_argument("--name", default="qlora", help="results file stem")
    args = ap.parse_args(argv)
    args.command = shlex.join(["python", "bench/qlora.py", *(sys.argv[1:] if argv is None else argv)])
    if args.steps < 3:
        ap.error("--steps must be at least 3 (a warm-up step, a measured step, timed steps)")
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = list(METHODS)
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in METHODS]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        keys = ["full-ft", *(k for k in keys if k in wanted and k != "full-ft")]
    t0 = time.perf_counter()
    info: dict = {}
    pretrained = pre.pretrained_tiny_llama(args.pretrain_steps, info=info)
    held_out = pre.eval_batches(args.batch, args.seq, args.eval_batches)
    before = pre.eval_model(pretrained, held_out)
    print(f"pretrained tiny-llama: eval loss {before:.4f} on {args.eval_batches} held-out batches", flush=True)
    train = pre.batches("finetune", args.batch, args.seq, args.steps, seed=args.seed)
    results = [Result(k, METHODS[k][0]) for k in keys]
    run(results, pretrained, train, held_out, args)
    print(report(results, args, before, info, time.perf_counter() - t0))
    path = plot(results, args, before)
    if path:
        print(f"loss curves: {path}")


if __name__ == "__main__":
    main()
