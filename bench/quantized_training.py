"""INT8 quantized-weight training on tiny-llama: memfit's ``quantize_weights`` against fp32 AdamW, one process.

Every method trains the same model from the same init (one ``build_llama("tiny-llama")`` per seed,
deep-copied per method) on the same byte batches (``ByteBatches`` over ``stdlib_corpus()``, drawn once
per seed) for the same number of steps, with the same AdamW hyperparameters (one lr for all, betas, eps,
weight decay 0). Methods (rows):

- ``adamw``: eager ``torch.optim.AdamW``, fp32 weights and moments: the baseline every ratio is taken
  against (always run);
- ``memfit-adamw``: ``memfit.optimize`` with ``remat`` and ``fused_update``, fp32 weights: a reference point;
- ``memfit-int8sr-adamw``: plus ``quantize_weights``: the weights it targets (every 2-D weight but the
  embedding table and the LM head) held as INT8 codes with one fp32 absmax scale per group of 128
  elements, no fp32 master copy; the fused AdamW update dequantizes, steps in fp32 and writes back with
  stochastic rounding; moments fp32;
- ``memfit-int8sr-adam8bit``: the same with ``quantize_state`` (8-bit moments);
- ``memfit-int8sr-galore``: INT8+SR weights, the ``lowrank`` GaLore update (SVD projector, rank ``--rank``,
  refresh every ``--gap`` steps, scale 0.25) on the attention and MLP weights, 8-bit moments;
- ``memfit-int8sr-apollo-mini``: INT8+SR weights, APOLLO-Mini (rank 1 random projection, tensor-wise
  scaling, scale 128) on the same weights, 8-bit moments;
- ``memfit-int8-nearest-adamw``: INT8 weights updated with round-to-nearest (``rounding="nearest"``), the
  control: an update smaller than half a quantization step is lost, so training should stall;
- ``torchao-int8-training``: torchao's ``int8_weight_only_quantized_training()`` applied with
  ``torchao.quantize_`` to the same linear layers (the LM head left fp32, as memfit leaves it), then an
  eager ``torch.optim.AdamW``: INT8 codes with one scale per output row, stochastic rounding on every
  in-place write. A failure is recorded in its row with the error and the run goes on.

The low-rank rows use the settings of bench/optimizers.py's GaLore and APOLLO-Mini rows (same targets,
rank, gap and scales); ``--group`` sets the INT8 group size of the memfit rows.

Columns: ``param_bytes`` is the bytes of the weights held after training: for memfit the trainer's
``executor.params`` (INT8 codes for the quantized weights, fp32 for the rest) plus the weight scales
(the ``executor.state`` entries named ``...::wscale``); for eager the model's parameters (a tensor
subclass counted by its inner tensors: torchao's codes and row scales); each storage counted once.
``state_bytes`` is the optimizer state held after training, weight scales excluded: every tensor reachable
from ``optimizer.state`` or memfit's ``executor.state``, each storage once. ``peak_bytes`` is one training
step measured with ``memfit.measure_peak`` after a warm-up step (CPU: live bytes over tensor storages;
CUDA: max_memory_allocated), counting parameters, buffers, optimizer state and the batch; the CPU storage
tracker cannot run over tensor-subclass weights (torchao's), so on CPU that row's peak is the bytes
held before the step plus ``memfit.measure.profiler_peak_bytes`` of the step (noted in the row).
``peak_ratio`` is ``peak_bytes`` over eager AdamW's. ``step_time_ratio`` is the median step time over
the run (the warm-up and the measured step left out, every seed's steps pooled) over eager AdamW's, all
methods stepped round-robin (step i of every method, then step i + 1) so the machine's load falls on all
alike. ``final_loss`` is the mean of the last 20 training losses, averaged over the seeds (``--seeds``:
each sets the init, the batches, the stochastic-rounding and the projectors' seeds, the same for every
method; the per-seed values are in the JSON); ``final_loss_rel`` is ``final_loss`` / eager AdamW's - 1.

Targets checked in the header: every INT8+SR row ends within 2% of fp32 AdamW's final loss; the measured
peak is at most 0.5x fp32 AdamW's; the round-to-nearest control stalls (ends more than 2% above fp32
AdamW and above INT8+SR AdamW in every seed).

Sizing: on CPU the INT8 rows' update (dequantize, AdamW, hash-based stochastic rounding, requantize, in
torch ops) costs 0.3-0.5 s a step whatever the batch, so one round of all eight rows takes 1.5-2.5 s on
one core; the defaults (150 steps, batch 2 x seq 64, 3 seeds, one intra-op thread) finish in about 13
minutes on a shared 2-core machine (a second thread there only adds contention). ``--steps 300`` takes
about twice that.

    python bench/quantized_training.py [--steps 150 --batch 2 --seq 64 --lr 1e-3 --seeds 0,1,2]
                                       [--rank 32 --gap 50 --group 128 --threads 1] [--only adamw,memfit-int8sr-adamw]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import memfit
from memfit import data, models
from memfit.runtime.memory import fmt_bytes

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import RESULTS, held_bytes, tensors_in, write_table

NAME = "quantized_training"
TARGETS = ("model.layers.*.self_attn.*.weight", "model.layers.*.mlp.*.weight")  # the low-rank rows' targets
BETAS = (0.9, 0.999)
EPS = 1e-8
GALORE_SCALE = 0.25  # GaLore's alpha, as bench/optimizers.py
APOLLO_MINI_SCALE = 128.0  # APOLLO-Mini's default, as bench/optimizers.py
LAST = 20  # final_loss: mean of the last LAST losses
LOSS_TARGET = 0.02  # INT8+SR rows: final loss within 2% of fp32 AdamW's
PEAK_TARGET = 0.5  # measured peak at most half of fp32 AdamW's
SR_ROWS = ("memfit-int8sr-adamw", "memfit-int8sr-adam8bit", "memfit-int8sr-galore", "memfit-int8sr-apollo-mini")
CONTROL = "memfit-int8-nearest-adamw"


@dataclass
class Config:
    lr: float
    weight_decay: float
    rank: int
    gap: int
    group: int
    device: torch.device
    seed: int = 0  # this repeat's seed: init, batches, stochastic rounding and the random projectors


# ---- byte accounting ---------------------------------------------------------------------------


def _subclass(tensors) -> bool:
    return any(hasattr(type(t), "__tensor_flatten__") for t in tensors)


# ---- one method = one runner -------------------------------------------------------------------


class EagerRunner:
    """A torch.optim optimizer stepping an eager model: forward, backward, step, zero_grad(None)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device):
        self.model, self.opt, self.device = model, opt, device

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = models.lm_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self, x, y) -> torch.Tensor:
        return self._step(x, y)

    def measured_step(self, x, y) -> tuple[torch.Tensor, int, str | None]:
        params = list(self.model.parameters())
        if self.device.type != "cuda" and (_subclass(params) or _subclass(tensors_in(self.opt.state))):
            return self._profiled_step(x, y)
        del params
        m = memfit.measure_peak(self._step, x, y, device=self.device,
                                existing=iter([*self.model.parameters(), *self.model.buffers(),
                                               *tensors_in(self.opt.state), x, y]))
        return m.value, m.peak_bytes, None

    def _profiled_step(self, x, y) -> tuple[torch.Tensor, int, str]:
        """The CPU storage tracker cannot follow tensor-subclass weights: measure this step with
        ``profiler_peak_bytes`` (every CPU allocation the step makes) on top of the bytes held before it."""
        from memfit.measure import profiler_peak_bytes

        held = tensors_in([list(self.model.parameters()), list(self.model.buffers()), self.opt.state, x, y])
        baseline = held_bytes(held)
        del held
        out = []
        added = profiler_peak_bytes(lambda: out.append(self._step(x, y)))
        note = ("peak = held bytes + memfit.measure.profiler_peak_bytes of the step (the CPU storage tracker "
                "cannot follow tensor-subclass weights)")
        return out[0], baseline + added, note

    def param_bytes(self) -> int:
        return held_bytes(tensors_in(list(self.model.parameters())))

    def state_bytes(self) -> int:
        return held_bytes(tensors_in(self.opt.state))

    def plan_param_bytes(self) -> int | None:
        return None


class MemfitRunner:
    def __init__(self, trainer):
        self.trainer = trainer

    def step(self, x, y) -> torch.Tensor:
        return self.trainer.step(x, y)

    def measured_step(self, x, y) -> tuple[torch.Tensor, int, None]:
        m = self.trainer.measure_step(x, y)
        return m.value, m.peak_bytes, None

    def param_bytes(self) -> int:
        ex = self.trainer.executor
        scales = [v for k, v in ex.state.items() if "::wscale" in k]
        return held_bytes(tensors_in([ex.params, scales]))

    def state_bytes(self) -> int:
        return held_bytes(tensors_in({k: v for k, v in self.trainer.executor.state.items() if "::wscale" not in k}))

    def plan_param_bytes(self) -> int | None:
        return self.trainer.plan.persistent.get("parameters")


def _adamw(params, cfg: Config) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=BETAS, eps=EPS, weight_decay=cfg.weight_decay)


def make_adamw(model, x, y, cfg):
    return EagerRunner(model, _adamw(model.parameters(), cfg), cfg.device)


def make_torchao(model, x, y, cfg):
    from torchao import quantize_
    from torchao.prototype.quantized_training import int8_weight_only_quantized_training

    # the layers memfit's default targets cover: every linear but the LM head (the embedding is no linear)
    quantize_(model, int8_weight_only_quantized_training(),
              filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn)
    return EagerRunner(model, _adamw(model.parameters(), cfg), cfg.device)


def _lowrank(cfg: Config, **kw) -> tuple[str, dict]:
    return ("lowrank", dict(gap=cfg.gap, targets=list(TARGETS), seed=cfg.seed, **kw))


def memfit_passes(key: str, cfg: Config) -> list:
    sr = ("quantize_weights", dict(group=cfg.group, seed=cfg.seed))
    galore = _lowrank(cfg, rank=cfg.rank, scale=GALORE_SCALE, projector="svd", rule="galore")
    apollo_mini = _lowrank(cfg, rank=1, scale=APOLLO_MINI_SCALE, projector="random", rule="apollo", scaling="tensor")
    return {
        "memfit-adamw": ["remat", "fused_update"],
        "memfit-int8sr-adamw": ["remat", "fused_update", sr],
        "memfit-int8sr-adam8bit": ["remat", "fused_update", "quantize_state", sr],
        "memfit-int8sr-galore": ["remat", "fused_update", galore, "quantize_state", sr],
        "memfit-int8sr-apollo-mini": ["remat", "fused_update", apollo_mini, "quantize_state", sr],
        CONTROL: ["remat", "fused_update", ("quantize_weights", dict(group=cfg.group, seed=cfg.seed,
                                                                      rounding="nearest"))],
    }[key]


def make_memfit(key: str) -> Callable:
    def make(model, x, y, cfg):
        trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=models.lm_loss,
                                  optimizer=memfit.AdamW(lr=cfg.lr, betas=BETAS, eps=EPS,
                                                         weight_decay=cfg.weight_decay),
                                  passes=memfit_passes(key, cfg))
        return MemfitRunner(trainer)
    return make


# --only key -> (label, factory, what a failure means)
METHODS: dict[str, tuple[str, Callable, str]] = {
    "adamw": ("eager AdamW (torch.optim), fp32", make_adamw, "failed"),
    "memfit-adamw": ("memfit AdamW, fp32 weights", make_memfit("memfit-adamw"), "not available"),
    "memfit-int8sr-adamw": ("memfit INT8+SR weights, AdamW", make_memfit("memfit-int8sr-adamw"), "not available"),
    "memfit-int8sr-adam8bit": ("memfit INT8+SR weights, 8-bit AdamW", make_memfit("memfit-int8sr-adam8bit"),
                               "not available"),
    "memfit-int8sr-galore": ("memfit INT8+SR weights, GaLore + 8-bit state", make_memfit("memfit-int8sr-galore"),
                             "not available"),
    "memfit-int8sr-apollo-mini": ("memfit INT8+SR weights, APOLLO-Mini + 8-bit state",
                                  make_memfit("memfit-int8sr-apollo-mini"), "not available"),
    CONTROL: ("memfit INT8 round-to-nearest weights, AdamW (control)", make_memfit(CONTROL), "not available"),
    "torchao-int8-training": ("torchao int8_weight_only_quantized_training + torch AdamW", make_torchao,
                              "does not run"),
}

# plot colours (torchao dashed)
COLOR = {"adamw": 0, "memfit-adamw": 7, "memfit-int8sr-adamw": 1, "memfit-int8sr-adam8bit": 2,
         "memfit-int8sr-galore": 4, "memfit-int8sr-apollo-mini": 5, CONTROL: 3, "torchao-int8-training": 6}


@dataclass
class Result:
    key: str
    label: str
    runs: list[list[float]] = field(default_factory=list)  # one loss curve per seed
    times: list[float] = field(default_factory=list)  # timed steps of every seed
    param_bytes: int | None = None
    state_bytes: int | None = None
    plan_param_bytes: int | None = None
    peak_bytes: int | None = None
    setup_s: list[float] = field(default_factory=list)
    peak_note: str | None = None
    error: str | None = None

    @property
    def finals(self) -> list[float]:
        """Final loss of each seed: the mean of its last LAST losses."""
        return [statistics.fmean(r[-LAST:]) for r in self.runs if r]

    @property
    def final_loss(self) -> float | None:
        return statistics.fmean(self.finals) if self.finals and not self.error else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None

    @property
    def curve(self) -> list[float]:
        """The loss curve averaged over the seeds."""
        return [statistics.fmean(step) for step in zip(*self.runs, strict=True)] if self.runs else []


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


def _fail(res: Result, e: BaseException, device: torch.device) -> None:
    failure = METHODS[res.key][2]
    where = "" if failure != "does not run" else f" on {device.type}"
    res.error = f"{failure}{where}: {_err(e)}"
    print(f"[{res.key}] {res.error}", flush=True)


def run_seed(results: list[Result], base: torch.nn.Module, batches: list, cfg: Config) -> None:
    """Train every method for one seed (``cfg.seed``), round-robin: step i of every method, then step
    i + 1. Appends each method's losses and step times to its Result (bytes and peak: first seed); a
    failure is recorded and takes that method out of the rotation."""
    steps = len(batches)
    every = max(1, steps // 10)
    runners: dict[str, Any] = {}
    losses: dict[str, list[float]] = {}
    for res in results:
        if res.error:
            continue
        try:
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            runners[res.key] = METHODS[res.key][1](model, *batches[0], cfg)
            res.setup_s.append(time.perf_counter() - t0)
            losses[res.key] = []
        except Exception as e:  # one method failing must not stop the comparison
            _fail(res, e, cfg.device)
    live = [r for r in results if r.key in runners]
    t_start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        for res in live:
            if res.error:
                continue
            runner = runners[res.key]
            try:
                t = time.perf_counter()
                # the warm-up step made the state: measure step 1 (first seed only), leave it out of the timing
                if i == 1 and res.peak_bytes is None:
                    loss, res.peak_bytes, res.peak_note = runner.measured_step(x, y)
                    loss = float(loss)
                elif i == 1:
                    loss = float(runner.step(x, y))  # step 1 of the later seeds: untimed alike
                else:
                    loss = float(runner.step(x, y))
                    if i > 0:
                        res.times.append(time.perf_counter() - t)
                losses[res.key].append(loss)
            except Exception as e:
                _fail(res, e, cfg.device)
                runners.pop(res.key)
        if (i + 1) % every == 0 or i + 1 == steps:
            now = ", ".join(f"{r.key} {losses[r.key][-1]:.3f}" for r in live if not r.error)
            print(f"seed {cfg.seed} step {i + 1}/{steps} ({time.perf_counter() - t_start:.0f} s): {now}", flush=True)
    for res in live:
        if not res.error:
            res.runs.append(losses[res.key])
            if res.state_bytes is None:
                r = runners[res.key]
                res.param_bytes, res.state_bytes = r.param_bytes(), r.state_bytes()
                res.plan_param_bytes = r.plan_param_bytes()


# ---- output ------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def targets(results: list[Result], lr: float) -> list[str]:
    """One line per target of the issue: what it asks, whether it holds, the numbers behind it."""
    by = {r.key: r for r in results}
    base = by["adamw"]
    if base.final_loss is None or base.peak_bytes is None:
        return ["- the fp32 AdamW baseline failed: no target can be checked"]
    lines = []
    sr = [by[k] for k in SR_ROWS if k in by]
    ok = [r for r in sr if r.final_loss is not None and r.final_loss / base.final_loss - 1 <= LOSS_TARGET]
    miss = [r for r in sr if r not in ok]
    rel = ", ".join(f"{r.key} {(r.final_loss / base.final_loss - 1) * 100:+.2f}%" if r.final_loss is not None
                    else f"{r.key} failed" for r in sr)
    lines.append(f"- INT8+SR rows within {LOSS_TARGET:.0%} of fp32 AdamW's final loss (at most {LOSS_TARGET:.0%} "
                 f"above it): "
                 f"{'holds' if sr and not miss else 'does not hold'} for "
                 f"{', '.join(r.key for r in ok) or 'none'}"
                 f"{'; misses: ' + ', '.join(r.key for r in miss) if miss else ''} ({rel}).")
    peaks = [r for r in results if r.key != "adamw" and r.peak_bytes is not None]
    meet = [r for r in peaks if r.peak_bytes <= PEAK_TARGET * base.peak_bytes]
    fail = [r for r in peaks if r not in meet]
    def held(r: Result) -> str:
        h = r.param_bytes + r.state_bytes
        return (f"{r.key} holds {fmt_bytes(h)} of weights and state ({h / base.peak_bytes:.2f}x) and the step adds "
                f"{fmt_bytes(r.peak_bytes - h)} (gradients, activations, dequantized copies)")

    why = [held(r) for r in [base, *fail] if r.param_bytes is not None and r.state_bytes is not None]
    lines.append(f"- measured peak <= {PEAK_TARGET:g}x fp32 AdamW's ({fmt_bytes(base.peak_bytes)}): met by "
                 f"{', '.join(f'{r.key} ({r.peak_bytes / base.peak_bytes:.2f}x)' for r in meet) or 'none'}; "
                 f"not met by {', '.join(f'{r.key} ({r.peak_bytes / base.peak_bytes:.2f}x)' for r in fail) or 'none'}"
                 + (f". Bytes: {'; '.join(why)}." if why else "."))
    ctl, sra = by.get(CONTROL), by.get("memfit-int8sr-adamw")
    if ctl is None or ctl.final_loss is None:
        lines.append("- round-to-nearest control: not run or failed")
    else:
        d = ctl.final_loss / base.final_loss - 1
        above = (sra is not None and sra.final_loss is not None
                 and all(c > s for c, s in zip(ctl.finals, sra.finals, strict=True)))
        stalls = d > LOSS_TARGET and above
        lines.append(f"- round-to-nearest control stalls (ends > {LOSS_TARGET:.0%} above fp32 AdamW and above "
                     f"INT8+SR AdamW in every seed): {'holds' if stalls else 'does not hold'} (final loss "
                     f"{ctl.final_loss:.4f}, {d * 100:+.2f}% vs fp32 AdamW"
                     + (f", {(ctl.final_loss / sra.final_loss - 1) * 100:+.2f}% vs INT8+SR AdamW)."
                        if sra is not None and sra.final_loss is not None else ").")
                     + ("" if stalls else f" Round-to-nearest loses an update lr * |m / sqrt(v)| only when it is under "
                        f"half a quantization step (a group's absmax / 254: about 2.2e-4 for tiny-llama's init, std "
                        f"0.02), so at lr {lr:g} every update with |m / sqrt(v)| above about {2.2e-4 / lr:.2g} "
                        f"survives and the control trains; it separates at a smaller lr (try `--lr 1e-4 --only "
                        f"memfit-int8sr-adamw,memfit-int8-nearest-adamw`)."))
    return lines


def report(results: list[Result], args, cfg: Config, wall_s: float) -> str:
    base = next(r for r in results if r.key == "adamw")
    json_rows, md_rows = [], []
    for r in results:
        note = r.error
        if note is None:
            bits = [r.peak_note] if r.peak_note else []
            if r.setup_s and statistics.median(r.setup_s) > 1:
                bits.append(f"setup {statistics.median(r.setup_s):.1f} s")
            note = "; ".join(bits) or None
        time_ratio = _ratio(r.median_s, base.median_s)
        peak_ratio = _ratio(r.peak_bytes, base.peak_bytes)
        rel = (r.final_loss / base.final_loss - 1) if r.final_loss is not None and base.final_loss else None
        row = dict(method=r.key, label=r.label, param_bytes=r.param_bytes, state_bytes=r.state_bytes,
                   peak_bytes=r.peak_bytes, peak_ratio=round(peak_ratio, 4) if peak_ratio is not None else None,
                   step_time_ratio=round(time_ratio, 4) if time_ratio is not None else None,
                   final_loss=round(r.final_loss, 4) if r.final_loss is not None else None,
                   final_loss_rel=round(rel, 4) if rel is not None else None,
                   final_loss_per_seed=[round(f, 4) for f in r.finals] if not r.error else None,
                   median_step_s=r.median_s, plan_param_bytes=r.plan_param_bytes)
        if note:
            row["note"] = note
        json_rows.append(row)
        md_rows.append(dict(
            method=r.key, label=r.label, note=note or "",
            params=fmt_bytes(r.param_bytes) if r.param_bytes is not None else "",
            state=fmt_bytes(r.state_bytes) if r.state_bytes is not None else "",
            peak=fmt_bytes(r.peak_bytes) if r.peak_bytes is not None else "",
            peak_ratio=_fmt(peak_ratio, ".2f"), time_ratio=_fmt(time_ratio, ".2f"),
            loss=_fmt(r.final_loss, ".4f"), rel=f"{rel * 100:+.2f}%" if rel is not None else "",
            seeds=" / ".join(f"{f:.4f}" for f in r.finals) if not r.error and len(r.finals) > 1 else ""))
    method = "CUDA max_memory_allocated" if cfg.device.type == "cuda" else "live bytes over tensor storages"
    seeds = ", ".join(str(x) for x in args.seeds)
    header = (
        f"### INT8 quantized-weight training on tiny-llama (4 layers, hidden 256), {cfg.device.type}: "
        f"{args.steps} steps, batch {args.batch} x seq {args.seq}, {len(args.seeds)} seed(s) ({seeds})\n\n"
        f"`{args.command}` ({wall_s / 60:.1f} min wall, {torch.get_num_threads()} intra-op thread(s)).\n\n"
        f"Same init, same stdlib byte batches, AdamW lr {cfg.lr:g}, betas {BETAS}, eps {EPS:g}, weight decay "
        f"{cfg.weight_decay:g} for every row. memfit INT8 rows: `quantize_weights` on its default targets (every "
        f"2-D weight but the embedding table and the LM head: the attention and MLP weights), INT8 codes with one "
        f"fp32 absmax scale per group of {cfg.group}, no fp32 master copy, stochastic rounding on write-back "
        f"(the control: round-to-nearest). GaLore: rank {cfg.rank}, SVD projector, refresh every {cfg.gap} "
        f"steps, scale {GALORE_SCALE:g}; APOLLO-Mini: rank 1, random projector, tensor-wise scaling, scale "
        f"{APOLLO_MINI_SCALE:g}; both on `{'`, `'.join(TARGETS)}` with 8-bit moments (`quantize_state`). torchao: "
        f"`int8_weight_only_quantized_training()` on every linear but the LM head (one scale per output row, "
        f"stochastic rounding), torch AdamW. Weights held: parameters (memfit: executor params + `::wscale` "
        f"scales), each storage once. Optimizer state: everything the optimizer holds, scales excluded. Peak: "
        f"one step after a warm-up step, `memfit.measure_peak` ({method}), counting parameters, buffers, "
        f"optimizer state and batch. Step time: median over every timed step of every seed, as a ratio to eager "
        f"AdamW's (methods stepped round-robin in one process). Final loss: mean of the last {LAST} steps, "
        f"averaged over the seeds; vs AdamW: relative difference.\n\nTargets:\n" + "\n".join(targets(results, cfg.lr)))
    columns = [("method", "method"), ("label", "what"), ("params", "weights held"), ("state", "optimizer state"),
               ("peak", "measured peak"), ("peak_ratio", "peak vs AdamW"), ("time_ratio", "step time vs AdamW"),
               ("loss", f"final loss (last {LAST})"), ("rel", "vs AdamW"), ("seeds", "final loss per seed"),
               ("note", "note")]
    md = write_table(args.name, md_rows, columns, header)
    # write_table wrote the display rows as JSON; the JSON holds the raw numbers, one object per method
    (RESULTS / f"{args.name}.json").write_text(json.dumps(json_rows, indent=2) + "\n")
    return md


def plot(results: list[Result], args) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no loss plot: {_err(e)} (pip install matplotlib)")
        return None
    window = max(1, min(LAST, args.steps // 10))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in results:
        if r.error or not r.runs:
            continue
        t = torch.tensor(r.curve, dtype=torch.float64)
        c = torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)])
        idx = torch.arange(1, len(t) + 1)
        lo = (idx - window).clamp(min=0)
        smooth = (c[idx] - c[lo]) / (idx - lo)  # trailing mean over the last `window` steps
        ax.plot(idx.numpy(), smooth.numpy(), label=f"{r.key}: {r.label}", linewidth=1.4,
                color=f"C{COLOR.get(r.key, 9)}", linestyle="-" if r.key.startswith("memfit") else "--")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (trailing mean of {window}, mean over {len(args.seeds)} seed(s))")
    ax.set_title(f"tiny-llama, batch {args.batch} x seq {args.seq}, lr {args.lr:g}: INT8 quantized-weight training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / f"{args.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def batches_of(batch: int, seq: int, steps: int, seed: int, device: torch.device) -> list:
    it: Iterator = iter(data.ByteBatches(data.stdlib_corpus(), batch, seq, seed=seed))
    return [tuple(t.to(device) for t in next(it)) for _ in range(steps)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=32, help="rank of the GaLore row (APOLLO-Mini: 1)")
    ap.add_argument("--gap", type=int, default=50, help="steps between subspace refreshes")
    ap.add_argument("--group", type=int, default=128, help="INT8 group size of the memfit rows (elements per scale)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each sets the init, the batches, the "
                    "rounding and the projectors' seeds, and every method runs once per seed (final loss: their mean)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default); on a shared "
                    "machine 1 keeps the step times steady")
    ap.add_argument("--only", default="", help=f"comma-separated methods from {', '.join(METHODS)} "
                                              "(adamw, the baseline, always runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default=NAME, help="results file name under bench/results (e.g. "
                    "quantized_training_control for the round-to-nearest control at a small lr)")
    args = ap.parse_args(argv)
    args.command = shlex.join(["python", "bench/quantized_training.py", *(sys.argv[1:] if argv is None else argv)])
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
        keys = ["adamw", *(k for k in keys if k in wanted and k != "adamw")]
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        ap.error("--seeds needs at least one seed")
    device = torch.device(args.device)
    cfg = Config(lr=args.lr, weight_decay=args.weight_decay, rank=args.rank, gap=args.gap, group=args.group,
                 device=device)
    results = [Result(k, METHODS[k][0]) for k in keys]
    t0 = time.perf_counter()
    for seed in args.seeds:
        base = models.build_llama("tiny-llama", seed=seed).to(device)
        batches = batches_of(args.batch, args.seq, args.steps, seed, device)
        cfg.seed = seed
        run_seed(results, base, batches, cfg)
        print(f"    seed {seed} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    wall = time.perf_counter() - t0
    print(report(results, args, cfg, wall))
    path = plot(results, args)
    if path:
        print(f"loss curves: {path}")
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()
