"""The Hugging Face Trainer door: ``MemfitTrainer``, a ``transformers.Trainer`` whose steps run in memfit.

    from memfit.integrations.hf import MemfitTrainer      # instead of: from transformers import Trainer

    trainer = MemfitTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                            data_collator=collator, memfit_budget="8GB")
    trainer.train()                                        # or .train(resume_from_checkpoint=...)

Everything around the step stays Hugging Face's: the data collator and padding, the sampler, gradient
accumulation windows, the lr scheduler, logging, evaluation, ``save_steps`` checkpoints (the model through
its own ``save_pretrained``, so ``model.safetensors``; ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) and ``resume_from_checkpoint``. What memfit takes over is the step itself: forward,
backward and the AdamW update run as one compiled graph (:func:`memfit.optimize`), planned under
``memfit_budget``. Extra keyword arguments: ``memfit_budget`` (bytes, ``"12GB"``, ``"80%"``; None: no budget),
``memfit_passes`` (explicit passes, as ``memfit.optimize(passes=)``), ``memfit_levers`` (``"lossless"``,
``"near-lossless"``, ``"lossy"``: optimizer-state levers only here, since ``model.safetensors`` holds the
model's own tensors and the weight passes ``quantize_weights``, ``lora`` and ``qat`` hold weights as codes
or adapters: those train through ``memfit.optimize``), ``memfit_nonfinite`` (``"skip"``, ``"raise"``, ``"ignore"``) and
``memfit_max_length`` (the longest sequence to plan for; see *Shapes*).

How Hugging Face's pieces map onto memfit's:

* **Optimizer.** ``create_optimizer`` returns a :class:`MemfitOptimizer`: one param group holding the
  trainable parameters with ``lr``/``betas``/``eps``/``weight_decay`` from ``TrainingArguments``. The
  scheduler mutates its ``param_groups[0]["lr"]`` as it would torch's AdamW's; each optimizer step reads it
  and hands it to memfit. Its ``step()``/``zero_grad()`` do nothing (the update ran inside the graph, no
  ``.grad`` is ever written). Its ``state_dict()`` is memfit's ``Trainer.state_dict()`` (step count, moments,
  buffers; the parameters themselves are left out, ``model.safetensors`` holds them) plus the param groups,
  so ``optimizer.pt`` holds memfit's state and a resumed run continues bit-identically (loaded with
  ``torch.load(weights_only=True)`` as Hugging Face does; applied when the step is built).
* **Building.** The memfit Trainer is built on the first ``training_step`` (the first batch says the keys
  and dtypes), with ``micro_steps = gradient_accumulation_steps``; each micro-batch is fed with
  ``Trainer.accumulate``, the last of a window applies the update.
* **Loss normalisation.** With a model that takes loss kwargs (``model_accepts_loss_kwargs``, true for
  ``*ForCausalLM``) Hugging Face divides each micro-batch's summed token loss by ``num_items_in_batch``,
  the token count of the whole window, so the update uses the exact token mean of the window. memfit
  averages its k micro-batch gradients, so each micro-batch is fed ``N / k`` as its divisor (a batch input,
  ``memfit_num_items``): ``(1/k) * sum_m grad(sum_m / (N/k)) = sum_m grad(sum_m) / N``, Hugging Face's
  gradient. The logged loss is divided by k, so ``log_history`` matches Hugging Face's. Without loss kwargs
  (a plain per-batch mean) the mean of the k micro-batch means is what Hugging Face computes too.
* **A short last window** (an epoch whose batch count is not a multiple of k) is completed with
  micro-batches whose labels are all ``-100``: they add exactly zero to the gradient, so the update is Hugging
  Face's. That needs the ``num_items_in_batch`` normalisation (a mean over no tokens is NaN): without it a short
  window raises ``ConfigError`` (use ``dataloader_drop_last`` and a batch count divisible by k).
* **Shapes.** memfit admits any batch no larger than the example it compiled for, in every dimension;
  each new smaller shape (a shorter padded batch, the last partial batch) is compiled once with the same
  passes and cached (8 shapes, least recently used dropped). The example is ``(per-device batch size,
  longest sequence)``, the longest sequence being, in this order: ``memfit_max_length``; the longest
  ``input_ids`` of a map-style ``train_dataset`` (scanned once, rounded up to the collator's
  ``pad_to_multiple_of``); the collator's ``max_length`` when it pads to it; ``min(tokenizer.model_max_length,
  config.max_position_embeddings)``; else the first batch's length (a longer batch later raises
  ``ConfigError``). A resumed run plans for the shape its checkpoint was planned for. Pad to a multiple
  (``pad_to_multiple_of=64`` in the collator) so few shapes are compiled; the Trainer warns when more distinct
  shapes come than it caches.
* **Evaluation** runs the model's own forward (Hugging Face's loop, ``no_grad``): memfit updates the
  model's parameter storages in place, so it sees the trained weights. The training steps after it run in
  train mode again (Hugging Face calls ``model.train()``), whose compiled steps are cached, so evaluation
  costs no recompilation.
* **Gradient clipping** (``max_grad_norm > 0``) becomes memfit's ``clip_grad_norm`` (``clip="global"``,
  exactly ``torch.nn.utils.clip_grad_norm_``) with ``gradient_accumulation_steps=1``. memfit cannot clip
  the accumulated gradient yet (``optimize`` refuses clipping with ``micro_steps > 1``), so
  ``max_grad_norm > 0`` with ``gradient_accumulation_steps > 1`` raises ``ConfigError``: set
  ``max_grad_norm=0``. No ``grad_norm`` is logged (memfit keeps no gradient to measure).
* **Weight decay.** Hugging Face decays every parameter but biases and norm weights
  (``get_decay_parameter_names``); memfit's fused AdamW update applies one ``weight_decay`` to every
  parameter it updates (no per-parameter setting today). ``weight_decay > 0`` is therefore refused with
  ``ConfigError`` when the model has parameters Hugging Face would not decay; set ``weight_decay=0`` (or
  train a model whose every parameter is decayed).
* **Skipped steps.** ``memfit_nonfinite="skip"`` undoes a window whose loss or gradient is NaN/inf: the
  rest of that window is not fed and its loss is logged as NaN (Hugging Face's ``logging_nan_inf_filter``
  then logs the running mean instead); the scheduler still steps, memfit's step count (Adam's bias
  correction) does not.

Refused at construction with ``ConfigError`` (each would be silently ignored otherwise): an optimizer
other than fp32 AdamW (``optim`` ``adamw_torch``/``adamw_torch_fused``/...; 8-bit state is memfit's
``quantize_state`` pass), ``optimizers=``/``optimizer_cls_and_kwargs=``, ``compute_loss_func``, label
smoothing, an overridden ``compute_loss``, fp16/bf16 autocast, DeepSpeed/FSDP/more than one process or GPU,
``torch_compile``, activation checkpointing (memfit plans recomputation itself) and NEFTune.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

try:
    import transformers
except ImportError as e:  # pragma: no cover - transformers is a memfit dependency
    raise ImportError("memfit.integrations.hf needs transformers (pip install 'transformers>=4.45' accelerate)") from e

from ..api import Trainer as _MemfitStep
from ..api import optimize, parse_budget
from ..errors import ConfigError, where_what_got
from ..passes.fused_update import AdamW
from ..runtime.executor import NONFINITE_MODES
from ..runtime.planner import LEVELS

__all__ = ["ITEMS_KEY", "MemfitOptimizer", "MemfitTrainer"]

# The weight levers hold weights as codes or adapters, which model.safetensors cannot carry: this door plans
# with the optimizer-state levers only.
WEIGHT_PASSES = ("quantize_weights", "lora", "qat")
STATE_LEVERS = ("quantize_state", "lowrank")

ITEMS_KEY = "memfit_num_items"  # the batch input carrying Hugging Face's loss divisor (N / k, one value per row)
STATE_FORMAT = "memfit.hf.optimizer/1"
# torch.optim.AdamW's math with fp32 state, whatever kernel Hugging Face would have picked
FP32_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adamw_apex_fused")
_LABEL_KEYS = ("labels", "shift_labels")
_UNSET_LENGTH = 10**6  # tokenizers without a model_max_length report a huge sentinel


class _ItemsScaled(nn.Module):
    """The Hugging Face model with its loss divisor as a tensor input: ``memfit_num_items`` (one value per row,
    all equal, so that it splits into micro-batches like every other input) becomes ``num_items_in_batch``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> Any:
        items = batch.pop(ITEMS_KEY, None)
        if items is not None:
            batch["num_items_in_batch"] = items[0]
        return self.model(**batch)


class MemfitOptimizer(torch.optim.Optimizer):
    """What ``transformers.Trainer`` holds as its optimizer: the hyperparameters its scheduler mutates, and
    memfit's state when it checkpoints. ``step()`` and ``zero_grad()`` do nothing: the AdamW update runs
    inside memfit's compiled step (:class:`MemfitTrainer` reads ``param_groups[0]["lr"]`` before each).

    ``state_dict()`` holds ``param_groups`` (hyperparameters only) and, once the step is built, ``memfit``:
    memfit's ``Trainer.state_dict()`` without the parameters (the model's checkpoint holds them) and
    ``example``, the shapes the step was planned for. ``load_state_dict()`` restores the hyperparameters at
    once and memfit's state as soon as the step exists (Hugging Face loads ``optimizer.pt`` before the
    first batch); the torch RNG stays Hugging Face's (``rng_state.pth``)."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.memfit: _MemfitStep | None = None
        self.example: dict[str, list[int]] | None = None
        self.pending: dict[str, Any] | None = None

    def step(self, closure=None):  # the update ran inside memfit's step
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # memfit writes no .grad
        return None

    def attach(self, trainer: _MemfitStep, example: dict[str, list[int]]) -> None:
        """Bind the built memfit Trainer; apply the state loaded before it existed."""
        self.memfit, self.example = trainer, example
        pending, self.pending = self.pending, None
        if pending is not None:
            self._apply(pending)

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"format": STATE_FORMAT,
                              "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                               for g in self.param_groups]}
        if self.memfit is not None:
            state = self.memfit.state_dict()
            del state["params"]  # model.safetensors holds them, next to optimizer.pt
            sd["memfit"] = state
            sd["example"] = self.example
        elif self.pending is not None:  # loaded, not applied yet: pass it on unchanged
            sd["memfit"], sd["example"] = self.pending["memfit"], self.pending.get("example")
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        where = "MemfitOptimizer.load_state_dict"
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != STATE_FORMAT:
            got = (f"a torch.optim state (keys {sorted(state_dict)[:4]})" if isinstance(state_dict, Mapping)
                   else type(state_dict).__name__)
            raise ConfigError(where_what_got(
                where, f"an optimizer.pt written by MemfitTrainer (format {STATE_FORMAT!r})", got,
                "resume from a MemfitTrainer checkpoint; a transformers.Trainer checkpoint's optimizer state cannot "
                "become memfit's (delete its optimizer.pt and scheduler.pt to restart the optimizer from the weights)"))
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ConfigError(where_what_got(where, f"{len(self.param_groups)} param group(s)", len(groups),
                                             "load a state saved by the same MemfitTrainer setup"))
        for mine, theirs in zip(self.param_groups, groups, strict=True):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        if "memfit" not in state_dict:
            return
        if self.memfit is None:
            self.pending = dict(state_dict)
        else:
            self._apply(state_dict)

    def _apply(self, sd: Mapping[str, Any]) -> None:
        trainer = self.memfit
        state = dict(sd["memfit"])
        # the parameters are the model's own tensors, which Hugging Face loaded from model.safetensors
        state["params"] = dict(trainer.executor.params)
        state["rng"] = state["rng"].cpu()  # accelerate may have moved it to the model's device
        rng = torch.get_rng_state()
        try:
            trainer.load_state_dict(state)
        finally:
            torch.set_rng_state(rng)  # the RNG is Hugging Face's to restore (rng_state.pth)


class MemfitTrainer(transformers.Trainer):
    """``transformers.Trainer`` with memfit's compiled step: use it in its place (see the module doc)."""

    def __init__(self, *args: Any, memfit_budget: int | float | str | None = None,
                 memfit_passes: list | None = None, memfit_levers: str = "lossy", memfit_nonfinite: str = "skip",
                 memfit_max_length: int | None = None, **kwargs: Any):
        if memfit_nonfinite not in NONFINITE_MODES:
            raise ConfigError(where_what_got("MemfitTrainer(memfit_nonfinite=)", f"one of {NONFINITE_MODES}",
                                             repr(memfit_nonfinite), "'skip' undoes a NaN/inf step and warns"))
        held = [p if isinstance(p, str) else p[0] if isinstance(p, tuple) else getattr(p, "name", "")
                for p in memfit_passes or ()]
        # a pruned weight held as its kept values (prune(compress_weights=True)) is not the model's tensor either
        held += ["prune(compress_weights=True)" for p in memfit_passes or ()
                 if (p[1] if isinstance(p, tuple) else vars(p) if hasattr(p, "compress_weights") else {}).get(
                     "compress_weights")]
        if set(held) & {*WEIGHT_PASSES, "prune(compress_weights=True)"}:
            raise ConfigError(where_what_got(
                "MemfitTrainer(memfit_passes=)", "passes that keep the model's weights as its own tensors",
                sorted(set(held) & {*WEIGHT_PASSES, "prune(compress_weights=True)"}),
                "Hugging Face saves the model's tensors (model.safetensors), and these passes hold weights as codes "
                "or adapters: train them with memfit.optimize (Trainer.export() / save_adapters() to save)"))
        if memfit_levers not in LEVELS or memfit_levers == "adapters":
            raise ConfigError(where_what_got("MemfitTrainer(memfit_levers=)", f"one of {LEVELS[:3]}",
                                             repr(memfit_levers), "e.g. 'lossless'"))
        if memfit_max_length is not None and not (isinstance(memfit_max_length, int) and memfit_max_length >= 1):
            raise ConfigError(where_what_got("MemfitTrainer(memfit_max_length=)", "an int >= 1 or None",
                                             repr(memfit_max_length), "the longest sequence a batch will have"))
        parse_budget(memfit_budget)  # a malformed budget fails here, not at the first step
        super().__init__(*args, **kwargs)
        self.memfit_budget = memfit_budget
        self.memfit_passes = memfit_passes
        self.memfit_levers = memfit_levers
        self.memfit_nonfinite = memfit_nonfinite
        self.memfit_max_length = memfit_max_length
        self._memfit_opt: MemfitOptimizer | None = None
        self._memfit_keys: tuple[str, ...] | None = None
        self._shapes_seen: set[tuple] = set()
        self._warned_shapes = False
        self._reset_window()
        self._check_supported()

    # ---- what memfit can take over ----------------------------------------------------------------
    def _check_supported(self) -> None:
        args = self.args
        k = args.gradient_accumulation_steps

        def refuse(what: str, got: Any, fix: str) -> None:
            raise ConfigError(where_what_got(f"MemfitTrainer: {what}", "a setting memfit's compiled step honours",
                                             got, fix))

        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            refuse("optimizers= / optimizer_cls_and_kwargs=", "a custom optimizer",
                   "drop it: memfit's AdamW takes lr/adam_beta1/adam_beta2/adam_epsilon/weight_decay from the args")
        if str(getattr(args.optim, "value", args.optim)) not in FP32_ADAMW:
            refuse("args.optim", repr(getattr(args.optim, "value", args.optim)),
                   f"use one of {FP32_ADAMW} (8-bit state: memfit_passes=[..., ('quantize_state', {{'bits': 8}})] "
                   "or memfit_budget)")
        if getattr(self, "compute_loss_func", None) is not None:
            refuse("compute_loss_func", "a custom loss function", "have the model return its loss (labels=...)")
        if getattr(args, "label_smoothing_factor", 0):
            refuse("args.label_smoothing_factor", args.label_smoothing_factor, "set it to 0")
        if type(self).compute_loss is not transformers.Trainer.compute_loss:
            refuse("compute_loss", f"overridden by {type(self).__name__}",
                   "the compiled step uses the model's own loss; have the model return it")
        if args.fp16 or args.bf16:
            refuse("args.fp16/bf16", "mixed-precision autocast", "train the model in its own dtype "
                   "(model.to(torch.bfloat16)) with fp16=bf16=False")
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False) \
                or args.world_size > 1 or args.n_gpu > 1:
            refuse("parallelism", f"world_size={args.world_size}, n_gpu={args.n_gpu}, deepspeed/fsdp",
                   "run one process on one device (CUDA_VISIBLE_DEVICES=0)")
        if getattr(args, "torch_compile", False):
            refuse("args.torch_compile", True, "drop it: memfit compiles the step itself")
        if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
            refuse("activation checkpointing", True, "drop it: memfit plans recomputation itself (memfit_budget)")
        if getattr(args, "neftune_noise_alpha", None):
            refuse("args.neftune_noise_alpha", args.neftune_noise_alpha, "drop it")
        if args.max_grad_norm and args.max_grad_norm > 0 and k > 1:
            refuse("args.max_grad_norm with gradient_accumulation_steps > 1", f"max_grad_norm={args.max_grad_norm}, "
                   f"gradient_accumulation_steps={k} (memfit would clip each micro-batch's gradient, Hugging Face "
                   "clips the window's)", "set max_grad_norm=0, or gradient_accumulation_steps=1 (then clipping is "
                   "exactly clip_grad_norm_)")
        self._check_weight_decay()

    def _check_weight_decay(self) -> None:
        """Checked at construction and again when the step is built (``model_init`` makes the model later)."""
        wd = self.args.weight_decay
        if not wd or self.model is None:
            return
        decay = set(self.get_decay_parameter_names(self.model))
        spared = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in decay]
        if spared:
            raise ConfigError(where_what_got(
                "MemfitTrainer: args.weight_decay", "a setting memfit's compiled step honours",
                f"weight_decay={wd}, which Hugging Face does not apply to {len(spared)} parameter(s) such as "
                f"{spared[:3]}; memfit's fused AdamW applies one weight_decay to every parameter",
                "set weight_decay=0"))

    # ---- optimizer ----------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            params = [p for p in opt_model.parameters() if p.requires_grad]
            args = self.args
            self._memfit_opt = MemfitOptimizer(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                               eps=args.adam_epsilon, weight_decay=args.weight_decay)
            self.optimizer = self._memfit_opt
        return self.optimizer

    @property
    def memfit_trainer(self) -> _MemfitStep | None:
        """The memfit Trainer running the steps (None before the first step): ``.plan``, ``.compiled_shapes``..."""
        return self._memfit_opt.memfit if self._memfit_opt is not None else None

    def _clip_grad_norm(self, model):  # clipping happens inside memfit's step
        return None

    def _get_grad_norm(self, model, grad_norm=None):  # no gradient is kept to measure
        return None

    # ---- the step -----------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._pos = 0  # micro-batches of Hugging Face's window seen
        self._fed = 0  # micro-batches fed to memfit's window
        self._logged: torch.Tensor | float = 0.0  # losses returned for this window so far
        self._skipping = False

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        k = self.args.gradient_accumulation_steps
        window = int(getattr(self, "current_gradient_accumulation_steps", k) or k)
        scaled = bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        batch = self._memfit_batch(inputs, num_items_in_batch if scaled else None, k)
        opt = self._memfit_opt
        if opt is None:
            raise ConfigError(where_what_got("MemfitTrainer.training_step", "the optimizer MemfitTrainer created",
                                             type(self.optimizer).__name__, "call it through trainer.train()"))
        if opt.memfit is None:
            self._build(batch)
        batch = self._ordered(batch)
        self._pos += 1
        last = self._pos >= window
        try:
            if window < k and not scaled and self._pos == 1:
                raise ConfigError(where_what_got(
                    "MemfitTrainer: a gradient accumulation window", f"{k} micro-batches (or Hugging Face's "
                    "num_items_in_batch normalisation, to complete it with empty ones)", f"{window} at the end of the "
                    "epoch", "make the number of batches per epoch a multiple of gradient_accumulation_steps "
                    "(dataloader_drop_last=True and the dataset size), or use a model that takes loss kwargs"))
            loss = self._nan(batch) if self._skipping else self._feed(batch, last, k)
        except BaseException:
            opt.memfit.discard_window()
            self._reset_window()
            raise
        if last:
            self._reset_window()
        return loss.detach()

    def _feed(self, batch: dict[str, torch.Tensor], last: bool, k: int) -> torch.Tensor:
        trainer = self._memfit_opt.memfit
        lr = float(self._memfit_opt.param_groups[0]["lr"])
        self._note_shape(batch)
        skipped = trainer.skipped_steps
        out = trainer.accumulate(batch, lr=lr)
        if trainer.skipped_steps != skipped:  # the window was undone (non-finite): feed nothing more of it
            self._skipping = not last
            return self._nan(batch)
        self._fed += 1
        if self._fed == k:  # memfit's last micro-batch returns the window's mean of k losses
            loss = out - self._logged
        else:
            loss = out / k
            self._logged = self._logged + loss
        if last and self._fed < k:  # a short last window: complete it with micro-batches that weigh nothing
            filler = {key: (torch.full_like(t, -100) if key in _LABEL_KEYS else t) for key, t in batch.items()}
            while self._fed < k:
                skipped = trainer.skipped_steps
                trainer.accumulate(filler, lr=lr)
                if trainer.skipped_steps != skipped:
                    return self._nan(batch)
                self._fed += 1
        return loss

    @staticmethod
    def _nan(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(iter(batch.values())).device
        return torch.tensor(math.nan, device=device)

    def _memfit_batch(self, inputs: Mapping[str, Any], items: torch.Tensor | int | None,
                      k: int) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        for key, v in inputs.items():
            if v is None:
                continue
            if not isinstance(v, torch.Tensor):
                raise ConfigError(where_what_got(f"MemfitTrainer: batch[{key!r}]", "a tensor (memfit compiles the "
                                                 "step for tensor inputs)", type(v).__name__,
                                                 "have the data collator return tensors only"))
            if key == ITEMS_KEY:
                raise ConfigError(where_what_got(f"MemfitTrainer: batch[{key!r}]", "a key other than memfit's own",
                                                 key, "rename the collator's output"))
            batch[key] = v
        if items is not None:
            rows = next((t.shape[0] for t in batch.values() if t.dim() > 0), 1)
            first = next(iter(batch.values()))
            value = float(items.item() if isinstance(items, torch.Tensor) else items) / k
            batch[ITEMS_KEY] = torch.full((rows,), value, dtype=torch.float32, device=first.device)
        return batch

    def _ordered(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keys = self._memfit_keys
        if keys is not None and tuple(batch) != keys and set(batch) == set(keys):
            return {key: batch[key] for key in keys}
        return batch

    def _note_shape(self, batch: dict[str, torch.Tensor]) -> None:
        trainer = self._memfit_opt.memfit
        self._shapes_seen.add(tuple(tuple(t.shape) for t in batch.values()))
        if not self._warned_shapes and len(self._shapes_seen) > trainer.max_shapes:
            self._warned_shapes = True
            warnings.warn(f"MemfitTrainer: {len(self._shapes_seen)} distinct batch shapes so far, more than the "
                          f"{trainer.max_shapes} compiled steps memfit caches: shapes are being recompiled. Pad "
                          "to a multiple (the collator's pad_to_multiple_of=64, say) so that fewer shapes occur.",
                          stacklevel=3)

    # ---- building the compiled step -----------------------------------------------------------------
    def _build(self, batch: dict[str, torch.Tensor]) -> None:
        args, opt = self.args, self._memfit_opt
        k = args.gradient_accumulation_steps
        self._check_weight_decay()
        example, shapes = self._example(batch, k, (opt.pending or {}).get("example"))
        adamw = AdamW(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                      weight_decay=args.weight_decay)
        clip = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        rng = torch.get_rng_state()  # building must not move Hugging Face's RNG (data order, resumption)
        try:
            trainer = optimize(_ItemsScaled(self.model), example_inputs=(example,), budget=self.memfit_budget,
                               passes=self.memfit_passes, optimizer=adamw, micro_steps=k, clip_grad_norm=clip,
                               levers=self.memfit_levers, nonfinite=self.memfit_nonfinite,
                               lever_passes=STATE_LEVERS)
        finally:
            torch.set_rng_state(rng)
        self._memfit_keys = tuple(example)
        self._shapes_seen = set()
        self._warned_shapes = False
        opt.attach(trainer, shapes)

    def _example(self, batch: dict[str, torch.Tensor], k: int, saved: dict[str, list[int]] | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
        """The largest batch to plan for (all of a window's micro-batches: ``rows * k``), zeros of the first
        batch's dtypes, and its micro-batch shapes (saved in the checkpoint for a resumed run)."""
        ids = batch.get("input_ids")
        seq = int(ids.shape[1]) if ids is not None and ids.dim() >= 2 else None
        longest = max(self._max_length(seq), seq) if seq is not None else None
        rows = max(int(self._train_batch_size), next((t.shape[0] for t in batch.values() if t.dim() > 0), 1))
        shapes: dict[str, list[int]] = {}
        for key, t in batch.items():
            shape = list(t.shape)
            if shape:
                shape[0] = max(shape[0], rows)
            for d in range(1, len(shape)):
                if longest is not None and shape[d] == seq:
                    shape[d] = longest
            if saved is not None and key in saved and len(saved[key]) == len(shape):
                shape = [max(a, int(b)) for a, b in zip(shape, saved[key], strict=True)]
            shapes[key] = shape
        example = {key: torch.zeros((shape[0] * k, *shape[1:]) if shape else (), dtype=batch[key].dtype,
                                    device=batch[key].device) for key, shape in shapes.items()}
        return example, shapes

    def _max_length(self, seq: int) -> int:
        """The longest sequence to plan for (see the module doc, *Shapes*)."""
        if self.memfit_max_length is not None:
            return self.memfit_max_length
        collator = self.data_collator
        multiple = getattr(collator, "pad_to_multiple_of", None)
        scanned = _longest_input_ids(self.train_dataset)
        if scanned is not None:
            return -(-scanned // multiple) * multiple if multiple else scanned
        if getattr(collator, "padding", None) == "max_length" and getattr(collator, "max_length", None):
            return int(collator.max_length)
        limits = [getattr(self.processing_class, "model_max_length", None),
                  getattr(getattr(self.model, "config", None), "max_position_embeddings", None)]
        limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < _UNSET_LENGTH]
        if limits:
            return min(limits)
        warnings.warn(f"MemfitTrainer: cannot tell the longest sequence of the training data; planning for the first "
                      f"batch's length {seq}. A longer batch will raise ConfigError: pass memfit_max_length=...",
                      stacklevel=4)
        return seq


def _longest_input_ids(dataset: Any) -> int | None:
    """The longest ``input_ids`` of a map-style dataset (a ``datasets.Dataset`` column, or items that are
    mappings), or None when it cannot be told without the collator (an iterable dataset, raw text)."""
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) \
            or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return None
    try:
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, (list, tuple)):
            return max((len(x) for x in dataset["input_ids"]), default=None) if "input_ids" in columns else None
        longest = None
        for i in range(len(dataset)):
            item = dataset[i]
            if not isinstance(item, Mapping) or "input_ids" not in item:
                return None
            n = len(item["input_ids"])
            longest = n if longest is None else max(longest, n)
        return longest
    except Exception:  # a dataset that cannot be read this way: fall back to the other sources
        return None
