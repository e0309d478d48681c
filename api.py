"""The user's doors: ``optimize()`` -> Trainer, and ``backend()`` for torch.compile (frontends.dynamo)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import (
    BudgetError,
    ConfigError,
    NonFiniteError,
    NonFiniteWarning,
    StepError,
    UnsupportedGraph,
    where_what_got,
)
from .frontends.export import capture, flatten_batch, locate_op_source
from .graph import TrainGraph
from .measure import PeakMeasurement, measure_peak
from .passes.base import PIPELINES, SCHEDULE_PASS, Pass, Pipeline, make_pass
from .passes.fused_update import SGD, AdamW
from .runtime.blocks import BASE_LAYERS, block_keys
from .runtime.executor import NONFINITE_MODES, CompiledStep, Executor, StepGuard
from .runtime.lower import lower
from .runtime.memory import MemoryPlan, fit_size_model, fmt_bytes, plan_memory
from .runtime.planner import Blocks, choose

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
log = logging.getLogger("memfit.api")
STATE_FORMAT = "memfit.trainer/1"


def parse_budget(budget: int | float | str | None, device: torch.device | None = None) -> int | None:
    """Bytes from ``12e9``, ``"12GB"``, ``"512MiB"`` or ``"80%"`` (of the device's memory)."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ConfigError(where_what_got("budget", "bytes, '12GB', '512MiB' or '80%'", budget, "fix the budget"))
    if isinstance(budget, (int, float)):
        return _whole_bytes(float(budget), budget)
    if isinstance(budget, str):
        s = budget.strip().lower().replace(" ", "")
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%", s)
        if m:
            frac = float(m.group(1)) / 100
            if not 0 < frac <= 1:
                raise ConfigError(where_what_got("budget", "a percentage in (0, 100]", budget, "e.g. '80%'"))
            return int(frac * device_memory_bytes(device))
        m = re.fullmatch(r"(\d+(?:\.\d+)?(?:e\d+)?)([kmgt]i?b|b)?", s)
        if m:
            return _whole_bytes(float(m.group(1)) * _UNITS[m.group(2) or ""], budget)
    raise ConfigError(where_what_got("budget", "bytes (12e9), a size ('12GB', '512MiB') or a share ('80%')",
                                     repr(budget), "fix the budget string"))


def _whole_bytes(value: float, given: object) -> int:
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(where_what_got("budget", "a finite size of at least 1 byte", repr(given),
                                         "e.g. 12e9, '12GB' or '80%'"))
    return int(value)


def device_memory_bytes(device: torch.device | None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Trainer:
    """One compiled training step of a model: ``step(*batch) -> loss``, with the plan and the state.

    Shapes: ``example_inputs`` (one micro-batch of it) is the largest batch admitted. A batch with every
    dimension at most that (a shorter padded sequence, the last partial batch) is captured and compiled
    once with the same passes and cached (``max_shapes`` of them, least recently used dropped); a larger
    one is refused with the largest shape admitted. The module modes (``model.train()`` / ``eval()`` on
    any submodule) are part of the cache key too, so a mode change after ``optimize()`` takes effect.

    Atomic steps: a step that raises leaves parameters, optimizer state, accumulators, buffers, the RNG
    and the step count as they were (see :mod:`memfit.runtime.executor`), except a failure after
    updates began without ``transactional=True``, which raises :class:`~memfit.errors.StepError`.
    ``nonfinite``: ``"skip"`` (default) undoes a step whose loss or gradient is NaN/inf and warns,
    ``"raise"`` undoes it and raises :class:`~memfit.errors.NonFiniteError`, ``"ignore"`` checks nothing.
    """

    def __init__(self, model: nn.Module, graph: TrainGraph, example: Sequence[Any], *, micro_steps: int,
                 optimizer: AdamW | SGD, lr_schedule: Callable[[int], float] | None, budget_bytes: int | None,
                 device: torch.device, plan: MemoryPlan | None = None, loss_fn: Callable | None = None,
                 nonfinite: str = "skip", transactional: bool = False, max_shapes: int = 8):
        if nonfinite not in NONFINITE_MODES:
            raise ConfigError(where_what_got("memfit.optimize(nonfinite=)", f"one of {NONFINITE_MODES}",
                                             repr(nonfinite), "'skip' undoes a NaN/inf step and warns"))
        if not (isinstance(max_shapes, int) and max_shapes >= 1):
            raise ConfigError(where_what_got("memfit.optimize(max_shapes=)", "an int >= 1", repr(max_shapes),
                                             "e.g. 8"))
        self.model = model
        self.graph = graph
        self.optimizer = optimizer
        self.lr_schedule = lr_schedule
        self.micro_steps = micro_steps
        self.device = device
        self.budget_bytes = budget_bytes
        self.nonfinite = nonfinite
        self.transactional = bool(transactional)
        self.max_shapes = max_shapes
        self.step_count = 0
        self.skipped_steps = 0
        self._loss_fn = loss_fn
        self._passes = graph.info.get("passes")
        self._dp_group: tuple[str, int] | None = None  # (process group name, size) when data parallel
        self._dp_flag: torch.Tensor | None = None  # data parallel: the ranks' "a loss is non-finite" flag
        flat, keys = flatten_batch(example, "memfit.optimize: example_inputs")
        self._keys = keys
        self._spec = [(tuple(t.shape), t.dtype, t.device) for t in flat]
        self.plan: MemoryPlan = plan if plan is not None else plan_memory(graph, budget_bytes, device)
        named_params = dict(model.named_parameters())
        named_buffers = dict(model.named_buffers(remove_duplicate=False))
        self._param_refs = {f: named_params[f] for r in graph.inits for f in r.sources}
        self._param_refs.update({f: named_params[f] for f in graph.params if f in named_params})
        self._requires_grad = {n: p.requires_grad for n, p in named_params.items()}
        made = self._made_from_model(graph, named_params)
        params = {f: made[f] if f in made else named_params[f].detach() for f in graph.params}
        buffers = {f: named_buffers[f] for f in graph.buffers}
        self.executor = Executor(graph, params, buffers, device)
        for name, t in made.items():
            if name in self.executor.state:
                self.executor.state[name].copy_(t)
        del made
        self._release_replaced()
        first = CompiledStep(graph, lower(graph.gm, device, loss_guard=True), self.plan)
        self._compiled: OrderedDict[tuple, CompiledStep] = OrderedDict()
        self._compiled[self._key(flat)] = first
        self.lowered = first.lowered
        self._window: tuple[StepGuard, list[torch.Tensor], float] | None = None
        self.last_micro_loss: torch.Tensor | None = None  # the loss of the last micro-batch run

    # ---- weights held otherwise than as the model's tensors (memfit.weights recipes) ------------------
    @staticmethod
    def _made_from_model(graph: TrainGraph, named_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph tensors the passes' recipes make from the model's weights (codes, scales, adapters)."""
        made: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for r in graph.inits:
                made.update(r.build({s: named_params[s].detach() for s in r.sources}))
        return made

    def _release_replaced(self) -> None:
        """Free the model's own storage of weights the step holds otherwise (INT8/NF4 codes): each keeps its
        shape, dtype and device as a zero-stride view of one element until ``sync_model`` writes it back."""
        named = dict(self.model.named_parameters())
        self._released = sorted({f for r in self.graph.inits for f in r.replaces})
        for f in self._released:
            p = named[f]
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)

    def _release_sharded(self) -> None:
        """``shard="params"``: free the model's storage of the parameters other ranks own (zero-stride views,
        as released encoded weights) until ``gather_parameters`` fills them."""
        owners = self.graph.info.get("data_parallel", {}).get("owners", {})
        named = dict(self.model.named_parameters())
        self._elsewhere = sorted(f for f in owners if f not in self.graph.params)
        self._gathered = False
        for f in self._elsewhere:
            p = named[f]
            p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)

    def gather_parameters(self) -> None:
        """``shard="params"``: every rank's model receives every trained weight from its owner (a collective:
        call it on every rank, e.g. before ``export``, ``evaluate`` or saving the model). The copies are
        released again by the next step."""
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        from .ops import _collective

        info = self.graph.info.get("data_parallel", {})
        if self._dp_group is None or info.get("shard") != "params":
            return
        pg = _resolve_process_group(self._dp_group[0])
        named = dict(self.model.named_parameters())
        for f, owner in sorted(info["owners"].items()):
            t = self.executor.params[f] if f in self.executor.params else torch.empty(
                named[f].shape, dtype=named[f].dtype, device=named[f].device)
            _collective("broadcast (gather_parameters)", f"the parameter {f}", self._dp_group[0],
                        lambda t=t, o=owner: dist.broadcast(t, src=dist.get_global_rank(pg, o), group=pg))
            if f not in self.executor.params:
                named[f].data = t
        self._gathered = True

    def _get(self, name: str) -> torch.Tensor:
        ex = self.executor
        if name in ex.params:
            return ex.params[name]
        if name in getattr(self, "_elsewhere", ()):
            if not self._gathered:
                raise ConfigError(where_what_got(f"Trainer weights: {name}", "a weight this rank holds",
                                                 "a parameter another rank owns (shard='params')",
                                                 "call trainer.gather_parameters() on every rank first"))
            return dict(self.model.named_parameters())[name].data
        return ex.state[name]

    def plain_weights(self, merge: bool = True) -> dict[str, torch.Tensor]:
        """The model weights the trained step holds, as plain tensors by FQN: encoded weights dequantized,
        adapters merged into their base (``W + scaling * B @ A``; with ``merge=False`` the base alone),
        fake-quantized weights quantized."""
        from .weights import Adapters, plain_weights

        names = list(dict(self.model.named_parameters()))
        recipes = self.graph.inits if merge else [r.base if isinstance(r, Adapters) else r for r in self.graph.inits
                                                   if not (isinstance(r, Adapters) and r.base is None)]
        with torch.no_grad():
            return plain_weights(recipes, self._get, names)

    @contextlib.contextmanager
    def _model_weights(self, merge: bool = True):
        """Within this context the model's parameters hold the trained weights (dequantized); adapters merged
        into them, or with ``merge=False`` added by a forward hook on their Linear, ``out + (x A^T) B^T * s``,
        as the training step and peft compute them. Released weights are released again afterwards."""
        from .weights import Adapters

        weights = self.plain_weights(merge)
        named = dict(self.model.named_parameters())
        saved = {f: named[f].data for f in weights}
        hooks = []
        try:
            for f, w in weights.items():
                named[f].data = w.to(named[f].dtype)
            if not merge:
                for r in self.graph.inits:
                    if isinstance(r, Adapters):
                        a, b, s = self._get(r.a), self._get(r.b), r.scaling

                        def hook(_m, inputs, out, a=a, b=b, s=s):
                            return out + torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b) * s

                        hooks.append(self.model.get_submodule(r.fqn.rsplit(".", 1)[0]).register_forward_hook(hook))
            yield self.model
        finally:
            for h in hooks:
                h.remove()
            for f, d in saved.items():
                named[f].data = d

    # ---- shapes and modes ----------------------------------------------------------------------
    def _modes(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self.model.modules())

    def _key(self, flat: Sequence[torch.Tensor]) -> tuple:
        return (tuple(tuple(t.shape) for t in flat), self._modes())

    def _check_batch(self, batch: Sequence[Any], split: bool = True) -> list[tuple[torch.Tensor, ...]]:
        """The batch as micro-batches of flat tensors, each checked against the largest planned shape
        (``split=False``: the batch is one micro-batch already)."""
        flat, keys = flatten_batch(batch, "Trainer.step")
        if keys != self._keys or len(flat) != len(self._spec):
            raise ConfigError(where_what_got("Trainer.step", f"a batch like example_inputs ({len(self._spec)} "
                                             f"tensors{', keys ' + str(self._keys) if self._keys else ''})",
                                             f"{len(flat)} tensors{', keys ' + str(keys) if keys else ''}",
                                             "pass the same structure as at optimize()"))
        k = self.micro_steps if split else 1
        for i, (t, (shape, dtype, device)) in enumerate(zip(flat, self._spec, strict=True)):
            name = f"batch[{keys[i]!r}]" if keys else f"batch[{i}]"
            largest = (shape[0] * k, *shape[1:]) if shape else shape
            if t.dtype != dtype or t.device != device or t.dim() != len(shape):
                raise ConfigError(where_what_got(f"Trainer.step: {name}", f"dtype {dtype}, device {device}, "
                                                 f"{len(shape)} dims", f"{t.dtype}, {t.device}, {t.dim()} dims",
                                                 "pass tensors like example_inputs"))
            if any(a > b for a, b in zip(t.shape, largest, strict=True)) or (shape and t.shape[0] < k):
                budget = f" (planned within the budget {fmt_bytes(self.budget_bytes)})" if self.budget_bytes else ""
                raise ConfigError(where_what_got(
                    f"Trainer.step: {name}", f"a shape of at most {largest} per dimension, the largest planned"
                    f"{budget}" + (f", and at least {k} rows for micro_steps={k}" if k > 1 else ""),
                    f"shape {tuple(t.shape)}",
                    "pad/trim the batch, or call memfit.optimize with example_inputs of the largest batch"))
        if k == 1:
            return [flat]
        pieces = [torch.tensor_split(t, k) if t.dim() else [t] * k for t in flat]
        return [tuple(p[m] for p in pieces) for m in range(k)]

    def _compiled_for(self, micro: Sequence[torch.Tensor]) -> CompiledStep:
        key = self._key(micro)
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            return hit
        where = f"Trainer.step: new input shape {[tuple(t.shape) for t in micro]}"
        if self._passes is None:
            raise ConfigError(where_what_got(where, "a Trainer built by memfit.optimize", "no recorded passes",
                                             "use memfit.optimize"))
        from .runtime.planner import run_passes

        batch = (dict(zip(self._keys, micro, strict=True)),) if self._keys else tuple(micro)
        base = capture(self.model, batch, self._loss_fn)
        g, p, _ = run_passes(base, list(self._passes), self.budget_bytes, self.device)
        if self.budget_bytes is not None and p.peak_bytes > self.budget_bytes:
            raise BudgetError(where_what_got(where, f"a predicted peak within {fmt_bytes(self.budget_bytes)}",
                                             fmt_bytes(p.peak_bytes), "send batches no larger than example_inputs"),
                              plan=p, budget_bytes=self.budget_bytes)
        self.executor.check_same_state(g, where)
        compiled = CompiledStep(g, lower(g.gm, self.device, loss_guard=True), p)
        self._compiled[key] = compiled
        while len(self._compiled) > self.max_shapes:
            self._compiled.popitem(last=False)
        return compiled

    @property
    def compiled_shapes(self) -> list[tuple]:
        """The (input shapes, module modes) compiled so far, least recently used first."""
        return list(self._compiled)

    def _check_model(self) -> None:
        """Parameters replaced or (un)frozen after optimize() would be silently ignored: refuse instead."""
        named = dict(self.model.named_parameters())
        replaced = [f for f, ref in self._param_refs.items() if named.get(f) is not ref]
        if replaced:
            raise ConfigError(where_what_got("Trainer.step", "the parameters memfit.optimize() compiled",
                                             f"{replaced[:3]} replaced by new tensors",
                                             "update them in place (param.data.copy_(...)) or call memfit.optimize "
                                             "again"))
        changed = [n for n, p in named.items() if self._requires_grad.get(n) != p.requires_grad]
        if changed:
            now = {n: named[n].requires_grad for n in changed[:3]}
            raise ConfigError(where_what_got(
                "Trainer.step", "requires_grad as at memfit.optimize()", f"changed since: {now}",
                "call memfit.optimize again to train another set of parameters (or pass frozen=[globs] there)"))

    # ---- running -------------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        return self._lr_at(self.step_count + 1)

    def _lr_at(self, step: int) -> float:
        base = self.lr_schedule(step) if self.lr_schedule else self.optimizer.lr
        scale = self.optimizer.lr_scale(step) if isinstance(self.optimizer, AdamW) else 1.0
        return base * scale

    def step(self, *batch: Any) -> torch.Tensor:
        """One optimizer step on ``batch`` (forward, backward and update); returns the mean loss.

        With ``micro_steps=k`` the batch is split into k micro-batches whose gradients are accumulated.
        A step that raises changes nothing (see the class doc); a skipped non-finite step returns a NaN
        loss, leaves ``step_count`` where it was and counts in ``skipped_steps``."""
        if self._window is not None:
            raise ConfigError(where_what_got("Trainer.step", "no accumulate() window open",
                                             f"{len(self._window[1])} of {self.micro_steps} micro-batches fed",
                                             "finish the window with accumulate() or call discard_window()"))
        micro = self._check_batch(batch)
        if self._dp_group is not None:
            self._broadcast_buffers()
        loss = None
        for i, mb in enumerate(micro):
            loss = self._micro(mb, None)
            if self._window is None and i < len(micro) - 1:
                return loss  # a skipped (non-finite) micro-batch undid the window
        return loss

    def _broadcast_buffers(self) -> None:
        """Data parallel: every rank starts the step from the group's first rank's buffers (BatchNorm running
        statistics), as PyTorch DDP does by default (``broadcast_buffers=True``); in place, nothing allocated."""
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        from .ops import _collective

        pg = _resolve_process_group(self._dp_group[0])
        src = dist.get_global_rank(pg, 0)
        for name, b in self.executor.buffers.items():
            _collective("broadcast (buffers, before the step)", f"the buffer {name}", self._dp_group[0],
                        lambda b=b: dist.broadcast(b, src=src, group=pg))

    def _any_rank_nonfinite(self, here: bool) -> bool:
        """Data parallel: whether any rank's loss is non-finite (``here``: this rank's), from one 1-element
        all-reduce (max) of a flag allocated with the Trainer, so every rank skips or raises together, where
        a rank leaving alone would leave the others waiting in the backward's collectives."""
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        from .ops import _collective

        if self._dp_flag is None:
            self._dp_flag = torch.zeros(1, device=self.device)
        from torch.utils._python_dispatch import _disable_current_modes

        flag, pg = self._dp_flag, _resolve_process_group(self._dp_group[0])
        with _disable_current_modes():  # the flag is the Trainer's, made before the step: not step memory
            flag.fill_(1.0 if here else 0.0)
            _collective("all_reduce (is a loss non-finite?)", "the loss", self._dp_group[0],
                        lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pg))
            return bool(flag.item() > 0)

    def accumulate(self, *batch: Any, lr: float | None = None) -> torch.Tensor:
        """Feed one micro-batch of the current optimizer step (loops that hand micro-batches over one at a
        time, such as ``transformers.Trainer``'s gradient accumulation). The ``micro_steps``-th call of a
        window applies the update and returns the window's mean loss; earlier calls return their own loss.
        ``lr`` overrides the learning rate of this step (read on the window's first call). A failure undoes
        the whole window, as ``step`` does."""
        (mb,) = self._check_batch(batch, split=False)
        if self._dp_group is not None and self._window is None:
            self._broadcast_buffers()
        return self._micro(mb, lr)

    def discard_window(self) -> None:
        """Drop the micro-batches fed since the last update (their accumulated gradients are zeroed)."""
        if self._window is not None:
            self._window[0].rollback()
            self._window = None

    def _micro(self, mb: tuple[torch.Tensor, ...], lr: float | None) -> torch.Tensor:
        if self._window is None:
            if getattr(self, "_gathered", False):  # the gathered copies go stale with this step: free them
                self._release_sharded()
            self._check_model()
            step = self.step_count + 1
            resets = isinstance(self.optimizer, AdamW) and self.optimizer.resets_before(step)
            guard = StepGuard(self.executor, nonfinite=self.nonfinite, transactional=self.transactional,
                              reset_moments=resets, buffers=self._all_mutated_buffers,
                              agree=self._any_rank_nonfinite if self._dp_group is not None else None,
                              owned_only=self.graph.info.get("data_parallel", {}).get("shard", "none") != "none")
            self._window = (guard, [], self._lr_at(step) if lr is None else float(lr))
        guard, losses, step_lr = self._window
        step = self.step_count + 1
        m = len(losses)
        try:
            compiled = self._compiled_for(mb)
            out = self.executor.run(compiled, mb, {"lr": step_lr, "step": step, "micro_step": m}, guard)
        except BaseException as e:
            self._window = None
            if self._dp_group is not None:  # collectives the step left running finish before anything is undone
                from .ops import drain_collectives

                drain_collectives()
            exact = guard.rollback()
            if not exact:
                raise StepError(where_what_got(
                    f"Trainer.step (step {step})", "a step that fails before any parameter changes, or a journal",
                    f"{type(e).__name__}: {e} after {guard.applied} update op(s) had started",
                    "those updates cannot be undone: reload the last checkpoint (Trainer.load_state_dict), or "
                    "build the Trainer with transactional=True so such failures are undone exactly"),
                    updated=guard.applied) from e
            if isinstance(e, NonFiniteError) and self.nonfinite == "skip":
                self.skipped_steps += 1
                warnings.warn(f"memfit: step {step} skipped: non-finite {e.what}; parameters, optimizer state and "
                              f"buffers are unchanged ({self.skipped_steps} step(s) skipped so far)",
                              NonFiniteWarning, stacklevel=3)
                return torch.tensor(math.nan, device=self.device)
            raise
        losses.append(out.loss)
        self.last_micro_loss = out.loss
        if len(losses) < self.micro_steps:
            return out.loss
        self._window = None
        guard.commit()
        if guard.skipped:
            warnings.warn(f"memfit: step {step}: non-finite gradients of {guard.skipped[:5]} after other parameters "
                          "were already updated; those parameters kept their values (transactional=True skips "
                          "such steps whole)", NonFiniteWarning, stacklevel=3)
        self.step_count = step
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    @property
    def _all_mutated_buffers(self) -> list[str]:
        return sorted({b for c in self._compiled.values() for b in c.graph.buffer_updates})

    def measure_step(self, *batch: Any) -> PeakMeasurement:
        """Run one step under memfit.measure_peak; records the measured peak in ``self.plan``."""
        micro = self._check_batch(batch)
        if getattr(self, "_gathered", False):  # gathered weights are released before, not during, the step
            self._release_sharded()
        flat = [t for mb in micro for t in mb]
        m = measure_peak(self.step, *batch, existing=iter([*self.executor.persistent_tensors(), *flat]),
                         device=self.device)
        self.plan = self.plan.with_measured(m.peak_bytes)
        return m

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inference with the trained weights: the model's own forward in eval mode, no gradient; every
        module's mode is restored afterwards. LoRA adapters are applied beside their weight, as in training and
        in peft (``export()`` merges them)."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), self._model_weights(merge=False) as model:
                return model(*args, **kwargs)
        finally:
            for m, was in modes:
                m.training = was

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything to resume bit-identically; only tensors, ints and strings (``weights_only=True`` loads it)."""
        ex = self.executor
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "passes": list(self.graph.applied),
            "params": {k: v.detach().clone() for k, v in ex.params.items()},
            "buffers": {k: v.clone() for k, v in ex.buffers.items()},
            "state": {k: v.clone() for k, v in ex.state.items()},
            "rng": torch.get_rng_state(),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        where = "Trainer.load_state_dict"
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            got = sd.get("format") if isinstance(sd, dict) else type(sd).__name__
            raise ConfigError(where_what_got(where, f"a dict with format {STATE_FORMAT!r}", got,
                                             "pass what Trainer.state_dict() returned"))
        missing = [k for k in ("step", "passes", "params", "buffers", "state", "rng") if k not in sd]
        if missing:
            raise ConfigError(where_what_got(where, "keys step, passes, params, buffers, state, rng",
                                             f"a dict missing {missing}", "pass what Trainer.state_dict() returned"))
        if not (isinstance(sd["step"], int) and sd["step"] >= 0):
            raise ConfigError(where_what_got(f"{where}['step']", "an int >= 0", repr(sd["step"]),
                                             "pass what Trainer.state_dict() returned"))
        rng = sd["rng"]
        if not (isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8 and rng.dim() == 1):
            raise ConfigError(where_what_got(f"{where}['rng']", "a 1-D uint8 tensor (torch.get_rng_state())",
                                             type(rng).__name__, "pass what Trainer.state_dict() returned"))
        if list(sd["passes"]) != list(self.graph.applied):
            raise ConfigError(where_what_got(where, f"state saved with passes {self.graph.applied}",
                                             sd["passes"], "build the Trainer with the same passes"))
        ex = self.executor
        for group, mine in (("params", ex.params), ("buffers", ex.buffers), ("state", ex.state)):
            theirs = sd[group]
            if not isinstance(theirs, dict) or not all(isinstance(t, torch.Tensor) for t in theirs.values()):
                raise ConfigError(where_what_got(f"{where}[{group!r}]", "a dict of tensors", type(theirs).__name__,
                                                 "pass what Trainer.state_dict() returned"))
            if set(theirs) != set(mine):
                diff = sorted(set(theirs) ^ set(mine))[:5]
                raise ConfigError(where_what_got(f"{where}[{group!r}]", "the same tensor names", f"differences {diff}",
                                                 "load a state saved from the same model and passes"))
            for k, t in theirs.items():
                if t.shape != mine[k].shape or t.dtype != mine[k].dtype:
                    coded = {torch.int8, torch.uint8} & {t.dtype, mine[k].dtype}
                    hint = ("the state holds this weight in other bits or another layout (quantize_weights, a lora "
                            "base, 8-bit state): build the Trainer with the same passes and settings"
                            if coded or k.endswith("::wscale") or ".lora_" in k else "load a matching state")
                    raise ConfigError(where_what_got(f"{where}[{group!r}][{k!r}]",
                                                     f"{tuple(mine[k].shape)} {mine[k].dtype}",
                                                     f"{tuple(t.shape)} {t.dtype}", hint))
        for group, mine in (("params", ex.params), ("buffers", ex.buffers), ("state", ex.state)):
            for k, t in sd[group].items():
                mine[k].copy_(t)
        self.step_count = sd["step"]
        self.skipped_steps = int(sd.get("skipped_steps", 0))
        torch.set_rng_state(rng)

    def export(self) -> nn.Module:
        """A plain nn.Module (a copy of the model) holding the trained weights: adapters merged into their
        weights, INT8/NF4 weights dequantized, fake-quantized (QAT) weights as their quantized values."""
        with self._model_weights() as model:
            return copy.deepcopy(model)

    def export_quantized(self) -> dict[str, dict[str, Any]]:
        """The low-bit weights of the step as real integers, by FQN: ``codes``, ``scales``, ``codec`` and
        ``group``. QAT weights (``qat``): int8 ``codes`` with values in [-qmax-1, qmax] (``codec`` "int4" or
        "int8") and fp32 ``scales`` (the learned step, one per ``group`` flattened elements), weight =
        codes * scales group by group: the weights ``export()`` holds. Encoded weights (``quantize_weights``,
        a ``lora`` base): the codes and the list of scale tensors as the step holds them (see
        ``memfit.weights``; ``memfit.weights.decode`` reads them back)."""
        from .weights import Adapters, Encoded, StepSizes

        ex = self.executor

        def get(name: str) -> torch.Tensor:
            return ex.params[name] if name in ex.params else ex.state[name]

        out: dict[str, dict[str, Any]] = {}
        with torch.no_grad():
            for r in self.graph.inits:
                if isinstance(r, StepSizes):
                    codes, scales = r.codes(get)
                    out[r.fqn] = {"codes": codes, "scales": scales, "codec": f"int{(r.qmax + 1).bit_length()}",
                                  "group": r.group}
                    continue
                enc = r.base if isinstance(r, Adapters) else r if isinstance(r, Encoded) else None
                if enc is not None:
                    out[enc.fqn] = {"codes": get(enc.fqn).clone(), "scales": [get(s).clone() for s in enc.scale_names],
                                    "codec": enc.codec, "group": enc.group}
        return out

    def save_adapters(self, directory: str | os.PathLike) -> None:
        """Write the LoRA adapters as peft does: ``adapter_model.safetensors`` (keys
        ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``) and ``adapter_config.json`` (the exact
        module names as ``target_modules``, per-module ranks and alphas in ``rank_pattern`` / ``alpha_pattern``),
        so that ``peft.PeftModel.from_pretrained(original_model, directory)`` reproduces the trained step's
        outputs. The adapters sit on the base the step trained on: with an NF4/INT4 base (QLoRA) load them on a
        model holding that base (``Trainer.base_weights()``)."""
        import json

        from safetensors.torch import save_file

        from .weights import Adapters, StepSizes

        where = "Trainer.save_adapters"
        adapters = [r for r in self.graph.inits if isinstance(r, Adapters)]
        if not adapters:
            merged = [r.fqn for r in self.graph.inits if isinstance(r, StepSizes) and r.adapters is not None]
            raise ConfigError(where_what_got(where, "a step trained with the lora pass", "no adapters" + (
                f" (QALoRA merges its adapters into the quantized weights of {merged[:2]}: use export())"
                if merged else ""), "add ('lora', {...}) to passes="))
        ex = self.executor
        tensors, modules, ranks, alphas = {}, [], {}, {}
        for r in adapters:
            module = r.fqn[: -len(".weight")]
            modules.append(module)
            ranks[module] = r.rank
            alphas[module] = r.scaling * r.rank
            for part, name in (("lora_A", r.a), ("lora_B", r.b)):
                tensors[f"base_model.model.{module}.{part}.weight"] = ex.params[name].detach().contiguous().clone()
        first = adapters[0]
        lora = self.graph.info.get("lora", {})
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM" if hasattr(self.model, "generate") else None,
            "r": first.rank, "lora_alpha": first.scaling * first.rank, "lora_dropout": float(lora.get("dropout", 0.0)),
            "target_modules": modules, "rank_pattern": ranks, "alpha_pattern": alphas, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "use_rslora": False, "use_dora": False, "base_model_name_or_path": None,
        }
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The frozen base weights under the adapters, as plain tensors (an NF4 base dequantized): what peft's
        ``from_pretrained`` should be given to reproduce the step's outputs."""
        from .weights import Adapters

        ex = self.executor

        def get(name: str) -> torch.Tensor:
            return ex.params[name] if name in ex.params else ex.state[name]

        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for r in self.graph.inits:
                if isinstance(r, Adapters):
                    if r.base is not None:
                        r.base.apply(get, out)
                    else:
                        out[r.fqn] = get(r.fqn).clone()
        return out

    def __repr__(self) -> str:
        return f"Trainer(step={self.step_count}, {self.graph}, predicted peak {fmt_bytes(self.plan.peak_bytes)})"


def _device_of(model: nn.Module, flat: Sequence[torch.Tensor]) -> torch.device:
    for p in model.parameters():
        return p.device
    return flat[0].device if flat else torch.device("cpu")


def build_graph(model: nn.Module, example_inputs: Sequence[Any], *, loss_fn: Callable | None = None,
                optimizer: AdamW | SGD | None = None, passes: Sequence[str | Pass | tuple[str, dict]] | None = None,
                frozen: Sequence[str] = (), clip_grad_norm: float | None = None, clip: str = "global",
                micro_steps: int = 1, budget_bytes: int | None = None,
                device: torch.device | str = "cpu", levers: str = "lossy",
                replicate: bool = False, lever_passes: Sequence[str] | None = None,
                fuse: bool = False, group: tuple[str, int] | None = None, group_rank: int = 0,
                shard: str = "none", ranks: Sequence[int] | None = None) -> tuple[TrainGraph, MemoryPlan]:
    """Capture one training step and let the planner rewrite it to fit ``budget_bytes`` (fake tensors
    throughout: nothing of the model's size is allocated). Returns the graph and its plan.

    ``replicate``: plan a model of identical layers from captures of 3 and 4 layers (``replicated_model``)
    and extrapolate; the graph returned is then the 2-layer one. When the model has no such layers, or the
    two captures do not differ by one block of ops, the whole step is captured instead."""
    optimizer = AdamW() if optimizer is None else optimizer
    if not isinstance(optimizer, (AdamW, SGD)):
        raise ConfigError(where_what_got("memfit.optimize(optimizer=)", "memfit.AdamW(...) or memfit.SGD(...)",
                                         type(optimizer).__name__, "memfit builds the update into the graph"))
    blocks = replicated_model(model) if replicate else None
    base: TrainGraph | Blocks | None = None
    if blocks is not None:
        small, layers = blocks
        one, two = (capture(m, example_inputs, loss_fn) for m in small)
        keys = block_keys(one, two)
        if keys is not None:  # else the layers are not op-for-op alike: plan the whole step
            base = Blocks(one, two, layers, keys)
    if base is None:
        base = capture(model, example_inputs, loss_fn)
    defaults = dict(optimizer=optimizer, clip_grad_norm=clip_grad_norm, clip=clip, micro_steps=micro_steps,
                    frozen=tuple(frozen))
    if group is not None:  # data parallel: the data_parallel pass's process group (name, size), this rank
        defaults.update(process_group=group[0], world=group[1], group_rank=group_rank)

    def make(spec):
        return make_pass(spec, **defaults)

    named = [p if isinstance(p, str) else p[0] if isinstance(p, (tuple, list)) else getattr(p, "name", None)
             for p in passes or ()]
    if fuse and passes is not None and "fuse" not in named:
        passes = [*passes, "fuse"]
    if group is not None and passes is not None and "data_parallel" not in named:
        passes = [*passes, "data_parallel"]
    explicit = [make(s) for s in passes] if passes is not None else None
    head = (("freeze",) if frozen else ()) + (("fuse",) if fuse else ()) + (("data_parallel",) if group else ())
    if group is not None and shard == "auto":
        if isinstance(base, Blocks):
            raise ConfigError(where_what_got("memfit.build_graph(shard='auto')", "one captured step", "replicate=True",
                                             "plan sharded steps on a full capture"))
        graph, plan_, choice = _auto_shard(base, budget_bytes, device, group[1], ranks, dict(
            device=device, make=make, head=head, explicit=explicit, lever_passes=lever_passes), levers,
            keep=None if ranks is not None else group_rank)
        graph.info["planner"] = {"trials": [t.__dict__ for t in choice.trials]}
        return graph, plan_
    choice = choose(base, budget_bytes, device=device, make=make, head=head,
                    explicit=explicit, levers=levers, lever_passes=lever_passes)
    graph, plan_ = choice.graph, choice.plan
    if group is not None and shard != "none":
        # The levers were chosen on the replicated data-parallel step, identically on every rank (their choices
        # must agree: a weight's encoding is every rank's); each rank's own step then drops the state it does
        # not own, and its plan is recomputed: never above the one the planner accepted.
        if isinstance(base, Blocks):
            raise ConfigError(where_what_got("memfit.build_graph(shard=)", "one captured step", "replicate=True",
                                             "plan sharded steps on a full capture"))
        graph, plan_ = _per_rank(base, graph.info["passes"], shard, [group_rank] if ranks is None else ranks,
                                 budget_bytes, device)
    graph.info["planner"] = {"trials": [t.__dict__ for t in choice.trials]}
    return graph, plan_


def _per_rank(base: TrainGraph, chosen: Sequence[Pass], shard: str, ranks: Sequence[int], budget_bytes: int | None,
              device, keep: int | None = None) -> tuple[TrainGraph, MemoryPlan]:
    """The sharded step of each of ``ranks``: the chosen passes up to ``data_parallel`` run once, then
    ``data_parallel`` (with ``shard``, as that rank) and the schedule per rank, each planned. Returns the graph
    and plan of the rank with the highest peak (the first ``ranks`` entry on a tie), or of rank ``keep``, the
    plan's ``ranks`` listing every rank planned."""
    prefix = [p for p in chosen if p.name not in ("data_parallel", SCHEDULE_PASS)]
    dp = next(p for p in chosen if p.name == "data_parallel")
    sched = next((p for p in chosen if p.name == SCHEDULE_PASS), None) or make_pass(SCHEDULE_PASS)
    common = Pipeline(prefix)(base.clone())
    best: tuple[TrainGraph, MemoryPlan, int] | None = None
    rows = []
    for r in ranks:
        mine = dataclasses.replace(dp, shard=shard, group_rank=r)
        g = Pipeline([mine, sched])(common.clone() if len(ranks) > 1 else common)
        g.info["passes"] = [mine if p is dp else p for p in chosen]
        p = plan_memory(g, budget_bytes, device)
        info = g.info["data_parallel"]
        rows.append({"rank": r, "peak_bytes": p.peak_bytes, "state_bytes": info["state_bytes_here"],
                     "param_bytes": p.persistent.get("parameters", 0),
                     "state_bytes_all": info["state_bytes_all"], "parameters_owned":
                     sum(1 for o in info["owners"].values() if o == r)})
        if r == keep:
            kept = (g, p, r)
        if best is None or p.peak_bytes > best[1].peak_bytes:
            best = (g, p, r)
    g, p, r = best if keep is None else kept
    return g, dataclasses.replace(p, ranks=tuple(rows), world=dp.world, shard=shard, rank=r)


def _auto_shard(base: TrainGraph, budget_bytes: int | None, device, world: int, ranks: Sequence[int] | None,
                common: dict, levers: str, keep: int | None = None):
    """``shard="auto"``: sharding as a lossless lever, taken before any lossy one. The replicated step with the
    lossless passes (or ``passes=``) when it fits; else the first of ``shard="state"``, ``"params"`` whose every
    rank fits with them (sharding costs communication, never numerics); else the levers of ``levers`` chosen
    on the replicated step against the budget plus what the most-saving sharding saved there, then every rank
    planned sharded (``"state"`` when the levers' encoded weights refuse ``"params"``), the saving lowered by
    twice any miss and the choice made again, the last time with no saving (it then fits if the replicated
    step does). Every rank is
    planned (their choice must agree), so this costs ``world`` plans per try. Returns (graph, plan, choice): rank
    ``keep``'s graph and plan when given, else the highest-peak rank's."""
    from .passes.data_parallel import SHARDS
    from .runtime.planner import _budget_error

    ranks = range(world) if ranks is None else ranks
    free = choose(base, None, levers="lossless" if common["explicit"] is None else levers, **common)
    if budget_bytes is None or free.plan.peak_bytes <= budget_bytes:
        return free.graph, free.plan, free
    best = None  # (plan, graph, shard) with the lowest peak
    for shard in SHARDS[1:]:
        try:
            g, p = _per_rank(base, free.graph.info["passes"], shard, ranks, budget_bytes, device, keep)
        except ConfigError:  # refused for this step (tied weights, micro-steps, clipping): the next level
            continue
        if _top(p) <= budget_bytes:
            return g, p, free
        if best is None or _top(p) < _top(best[0]):
            best = (p, g, shard)
    if best is None or common["explicit"] is not None:
        if best is None:  # nothing can be sharded: the replicated choice as without shard=
            choice = choose(base, budget_bytes, levers=levers, **common)
            return choice.graph, choice.plan, choice
        raise _budget_error(best[0], budget_bytes, f"with the passes given, sharded ({best[2]!r})")
    shard, saved = best[2], free.plan.peak_bytes - _top(best[0])
    most, last = saved, best[0]
    for attempt in range(4):  # the saving lowered by twice each miss; the last try counts none (as replicated)
        saved = saved if attempt < 3 else 0
        try:
            choice = choose(base, budget_bytes + saved, levers=levers, **common)
        except BudgetError as e:
            floor = e.smallest_peak_bytes
            if saved == 0 or (floor is not None and floor - most > budget_bytes):  # no sharding saves that much
                raise BudgetError(where_what_got(
                    f"memfit planner (shard='auto', {world} ranks)", f"a step that fits the budget "
                    f"{fmt_bytes(budget_bytes)} on every rank", f"a smallest replicated peak of "
                    f"{fmt_bytes(floor or 0)} with levers up to {levers!r}, and sharding ({shard!r}) saving "
                    f"{fmt_bytes(most)} per rank on the lossless step", "raise the budget, shrink the batch, add "
                    "ranks, or freeze parameters (frozen=...)"), plan=last, budget_bytes=budget_bytes) from e
            saved = saved // 2
            continue
        got = None
        for level in (shard, *(x for x in SHARDS[1:][::-1] if x != shard)):  # encoded weights: state only
            try:
                got = _per_rank(base, choice.graph.info["passes"], level, ranks, budget_bytes, device, keep)
                break
            except ConfigError:
                continue
        if got is None:
            break
        g, p = got
        if _top(p) <= budget_bytes:
            return g, p, choice
        last = p if _top(p) < _top(last) else last
        saved = max(saved - 2 * (_top(p) - budget_bytes), 0)
    raise _budget_error(last, budget_bytes, f"with levers up to {levers!r}, sharded ({shard!r}) over {world} ranks")


def _top(p: MemoryPlan) -> int:
    """The highest peak over the ranks a plan lists (its own peak when it lists none)."""
    return max((r["peak_bytes"] for r in p.ranks), default=p.peak_bytes) if p.ranks else p.peak_bytes


def _data_parallel_group(process_group: Any, model: nn.Module, batch: Sequence[Any], settings: dict
                         ) -> tuple[str, int]:
    """(name, size) of ``process_group`` after the ranks agreed on everything that shapes the step."""
    import torch.distributed as dist

    where = "memfit.optimize(process_group=)"
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(where_what_got(where, "torch.distributed initialised on every rank", "not initialised",
                                         "call torch.distributed.init_process_group first (torchrun sets it up)"))
    pg = dist.group.WORLD if process_group == "world" else process_group
    if not isinstance(pg, dist.ProcessGroup):
        raise ConfigError(where_what_got(where, "a torch.distributed ProcessGroup or 'world'",
                                         type(process_group).__name__, "pass dist.group.WORLD or a new_group()"))
    if settings.get("shard", "none") not in ("none", "auto") and (settings["micro_steps"] > 1
                                                    or settings["clip_grad_norm"] is not None):
        raise ConfigError(where_what_got(where, "no micro_steps and no clip_grad_norm with shard='state' or "
                                         "'params' (each rank would hold every gradient)",
                                         f"micro_steps={settings['micro_steps']}, "
                                         f"clip_grad_norm={settings['clip_grad_norm']}",
                                         "drop them, or use shard='none'"))
    flat, _ = flatten_batch(batch, where)
    group = (pg.group_name, dist.get_world_size(pg))
    _agree(group, "settings, parameters and batch", {
        **settings, "parameters": tuple((n, tuple(p.shape), str(p.dtype), p.requires_grad)
                                        for n, p in model.named_parameters()),
        "batch": tuple((tuple(t.shape), str(t.dtype)) for t in flat)})
    # as DDP at construction: every rank starts from the group's first rank's weights and buffers
    from .ops import _collective

    src = dist.get_global_rank(pg, 0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            _collective("broadcast (weights, at optimize)", name, group[0],
                        lambda t=t: dist.broadcast(t.data, src=src, group=pg))
    return group


def _agree(group: tuple[str, int], what: str, mine: dict) -> None:
    """Every rank of ``group`` holds the same ``mine``; else a ConfigError naming the first rank and key that
    differ from rank 0 (raised on every rank, so none waits on a collective the others never reach)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group[0])
    every: list = [None] * group[1]
    dist.all_gather_object(every, mine, group=pg)
    for rank, theirs in enumerate(every[1:], start=1):
        diff = [k for k in every[0] if every[0][k] != theirs.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(where_what_got(f"memfit.optimize(process_group=): {what}",
                                             f"every rank as rank 0 ({k}={str(every[0][k])[:120]})",
                                             f"rank {rank} with {k}={str(theirs.get(k))[:120]}",
                                             "give every rank the same model, settings and batch shape"))


def num_layers(model: nn.Module) -> int | None:
    """The layer count of a transformers-style model (``config.num_hidden_layers``), else None."""
    return getattr(getattr(model, "config", None), "num_hidden_layers", None)


def replicated_model(model: nn.Module) -> tuple[tuple[nn.Module, nn.Module], int] | None:
    """``((model at B layers, model at B + 1 layers), layers)`` (``B = runtime.blocks.BASE_LAYERS``, 3) for a
    transformers-style model of identical layers, built from its config on the device and in the dtype and
    mode of ``model``; None when the model has no such config, fewer than B + 2 layers, layers that differ
    (``layer_types`` with more than one kind), or when its parameter count is not exactly affine in the layer
    count."""
    layers = num_layers(model)
    base = BASE_LAYERS
    if not isinstance(layers, int) or layers < base + 2 or not hasattr(model, "config"):
        return None
    kinds = getattr(model.config, "layer_types", None)
    if isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1:
        return None
    first = next(iter(model.parameters()), None)
    if first is None:
        return None
    small = []
    for k in (base, base + 1):
        cfg = copy.deepcopy(model.config)
        cfg.num_hidden_layers = k
        if isinstance(kinds, (list, tuple)):
            cfg.layer_types = list(kinds[:k])
        try:
            with torch.device(first.device):
                m = type(model)(cfg)
        except Exception:  # a model whose constructor wants more than its config: plan it whole
            return None
        small.append(m.to(first.dtype).train(model.training))
    counts = [sum(p.numel() for p in m.parameters()) for m in (*small, model)]
    if counts[2] != counts[0] + (layers - base) * (counts[1] - counts[0]):
        return None
    return (small[0], small[1]), layers


def plan(model: nn.Module, *, example_inputs: Sequence[Any], budget: int | float | str | None = None,
         loss_fn: Callable | None = None, optimizer: AdamW | SGD | None = None,
         passes: Sequence[str | Pass | tuple[str, dict]] | None = None, frozen: Sequence[str] = (),
         device: torch.device | str | None = None, levers: str = "lossy",
         replicate: bool | str = "auto", fuse: bool = False, world_size: int = 1,
         shard: str = "state") -> MemoryPlan:
    """The memory plan of one training step, without running it or allocating the model's tensors.

    ``model`` and ``example_inputs`` may live on the ``meta`` device (build the model under
    ``torch.device("meta")``), which is how 7B-scale models are planned on a laptop; ``device`` says
    which runtime the plan is for (kernel workspaces differ), default the inputs' device or CPU.

    ``replicate``: a transformers-style model of identical layers is planned from captures of 3 and 4
    layers and every figure extrapolated (the plan is affine in the layer count past the first and last
    layers; the planner makes the same choice in every layer). ``"auto"`` (default) does so for models of 5
    or more layers on the ``meta`` device planned without ``passes=`` or ``frozen=``, and when that plan does
    not fit the budget, plans the whole step before saying so (its search is per value, not per layer class:
    it may fit where the replicated one does not); ``False`` captures the whole step. ``fuse=True`` plans
    the step with its pointwise chains fused (the ``fuse`` pass, as ``optimize(fuse=True)`` runs it).

    ``world_size=N`` plans one rank of N training data parallel (``optimize(process_group=...)``), each rank
    with ``example_inputs`` as its share of the batch: with ``shard="state"`` (default) every rank is planned
    with its own share of the optimizer state, the plan returned is the highest-peak rank's and its
    ``ranks`` lists them all; ``shard="none"`` plans the replicated step (every rank alike); ``shard="auto"`` the
    least sharding that fits ``budget`` (see ``optimize``). The whole step is
    captured (no replication: the owner table is the full model's).
    """
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(where_what_got("memfit.plan(example_inputs=)", "a tuple (one batch)",
                                         type(example_inputs).__name__, "wrap it: example_inputs=(x, y)"))
    from .passes.data_parallel import SHARDS

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(where_what_got("memfit.plan(world_size=)", "an int >= 1", repr(world_size), "e.g. 8"))
    if shard not in (*SHARDS, "auto"):
        raise ConfigError(where_what_got("memfit.plan(shard=)", f"one of {(*SHARDS, 'auto')}", repr(shard),
                                         "pick one"))
    if world_size > 1 and replicate is True:
        raise ConfigError(where_what_got("memfit.plan(world_size=)", "replicate=False or 'auto'", "replicate=True",
                                         "a sharded plan needs the whole step: drop replicate"))
    dp = dict(group=("plan", world_size), shard=shard, ranks=range(world_size)) if world_size > 1 else {}
    if dp:
        replicate = False
    flat, _ = flatten_batch(example_inputs, "memfit.plan: example_inputs")
    dev = torch.device(device) if device is not None else _device_of(model, flat)
    if dev.type == "meta":
        dev = torch.device("cpu")
    if replicate not in (True, False, "auto"):
        raise ConfigError(where_what_got("memfit.plan(replicate=)", "True, False or 'auto'", repr(replicate),
                                         "pick one"))
    auto = replicate == "auto"
    if auto:
        first = next(iter(model.parameters()), None)
        replicate = first is not None and first.device.type == "meta" and passes is None and not frozen
    elif replicate and (passes is not None or frozen):
        raise ConfigError(where_what_got("memfit.plan(replicate=True)", "no passes= and no frozen=",
                                         f"passes={passes!r}, frozen={frozen!r}",
                                         "these name the full model's parameters: plan it whole (replicate=False)"))
    budget_bytes = parse_budget(budget, dev)
    try:
        _, p = build_graph(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, passes=passes,
                           frozen=frozen, budget_bytes=budget_bytes, device=dev, levers=levers,
                           replicate=bool(replicate), fuse=fuse, **dp)
    except BudgetError:
        if not (auto and replicate):
            raise
        # The replicated search makes one choice for every layer and extrapolates it; a "does not fit" from it
        # is not the last word: the whole step, captured and searched per value, decides (slower).
        log.info("memfit.plan: the replicated plan does not fit %s; planning the whole step", budget)
        _, p = build_graph(model, example_inputs, loss_fn=loss_fn, optimizer=optimizer, passes=passes,
                           frozen=frozen, budget_bytes=budget_bytes, device=dev, levers=levers, replicate=False,
                           fuse=fuse)
    return p


def size_model(model: nn.Module, *, example_inputs: Sequence[Any], dim: str = "batch", loss_fn: Callable | None = None,
               optimizer: AdamW | SGD | None = None, passes: Sequence[str | Pass | tuple[str, dict]] | None = None,
               frozen: Sequence[str] = (), limit: int | None = None, device: torch.device | str | None = None):
    """The predicted peak as a function of the batch size (``dim="batch"``, dim 0 of every input) or the
    sequence length (``dim="seq"``, dim 1), as a :class:`~memfit.runtime.memory.SizeModel`.

    Plans the step (without running it) at 2 batch sizes or 3 sequence lengths with the same passes and
    fits each node's bytes exactly; ``.expr`` is the sympy expression, ``.largest_fitting(budget)`` the
    answer to "how large can it be". Returns None when the schedule changes with the size.
    """
    flat, keys = flatten_batch(example_inputs, "memfit.size_model: example_inputs")
    if dim not in ("batch", "seq"):
        raise ConfigError(where_what_got("memfit.size_model(dim=)", "'batch' or 'seq'", repr(dim), "pick one"))
    axis = 0 if dim == "batch" else 1
    if any(t.dim() <= axis for t in flat):
        raise ConfigError(where_what_got("memfit.size_model", f"every input with a dim {axis} ({dim})",
                                         [tuple(t.shape) for t in flat], "pass batch-first (batch, seq, ...) inputs"))
    base = flat[0].shape[axis]
    sizes = [base, 2 * base] if dim == "batch" else [base, 2 * base, 3 * base]
    dev = torch.device(device) if device is not None else _device_of(model, flat)
    dev = torch.device("cpu") if dev.type == "meta" else dev
    plans = []
    for size in sizes:
        resized = [_resize(t, axis, size) for t in flat]
        batch = (dict(zip(keys, resized, strict=True)),) if keys else tuple(resized)
        _, p = build_graph(model, batch, loss_fn=loss_fn, optimizer=optimizer,
                           passes=passes if passes is not None else list(PIPELINES["lossless"]), frozen=frozen,
                           device=dev)
        plans.append(p)
    default_limit = 4096 if dim == "batch" else int(getattr(getattr(model, "config", None),
                                                            "max_position_embeddings", 4 * sizes[-1]))
    return fit_size_model(dim, sizes, plans, limit or default_limit)


def _resize(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``t`` with dimension ``axis`` made ``size`` long (repeating it), on the same device."""
    reps = -(-size // t.shape[axis])
    return t.repeat_interleave(reps, dim=axis).narrow(axis, 0, size) if t.device.type != "meta" else \
        torch.empty((*t.shape[:axis], size, *t.shape[axis + 1:]), dtype=t.dtype, device="meta")


def optimize(model: nn.Module, *, example_inputs: Sequence[Any], budget: int | float | str | None = None,
             loss_fn: Callable | None = None, optimizer: AdamW | SGD | None = None,
             passes: Sequence[str | Pass | tuple[str, dict]] | None = None, frozen: Sequence[str] = (),
             clip_grad_norm: float | None = None, clip: str = "global", micro_steps: int = 1,
             lr_schedule: Callable[[int], float] | None = None, levers: str = "lossy", nonfinite: str = "skip",
             transactional: bool = False, max_shapes: int = 8, lever_passes: Sequence[str] | None = None,
             fuse: bool = False, process_group: Any = None, shard: str = "none") -> Trainer:
    """Compile ``model``'s whole training step under ``budget`` and return a :class:`Trainer`.

    ``example_inputs`` is one batch: ``(inputs..., target)`` with ``loss_fn(output, target)``, or the
    model's inputs when the model returns its loss (a single dict batch is passed as keywords).
    Without ``passes=`` memfit applies the lossless defaults: ``freeze`` (when ``frozen`` globs are
    given), ``remat`` (recompute what costs no memory) and ``fused_update``; when that does not fit
    ``budget`` the planner recomputes more, then shrinks the optimizer state and the weights as far as
    ``levers`` allows (``"lossless"``; ``"near-lossless"``: 8-bit moments; ``"lossy"``, the default: also
    low-rank projection and INT8 weights with stochastic rounding; ``"adapters"``: also LoRA over NF4 bases,
    which changes what trains, so only when asked). ``micro_steps`` splits each batch into that many
    micro-batches and accumulates their gradients before one update.

    ``example_inputs`` is also the largest batch the Trainer admits: smaller ones (shorter sequences,
    a last partial batch) are compiled on first sight with the same passes, at most ``max_shapes`` kept.
    ``nonfinite`` (``"skip"``, ``"raise"``, ``"ignore"``) says what a NaN/inf loss or gradient does;
    ``transactional=True`` keeps a journal so that a step failing after its updates began is undone
    too (up to one extra copy of parameters and optimizer state, outside the plan: not with ``budget``).
    ``lever_passes`` names the passes whose declared options the planner may take (default
    ``memfit.passes.base.LEVER_PASSES``: ``quantize_state``, ``lowrank``, ``quantize_weights`` and ``lora``); a
    pass of your own becomes a lever by declaring ``options`` and ``from_options`` and being named here.
    ``fuse=True`` adds the ``fuse`` pass after every other rewrite: each pointwise chain one generated Triton
    kernel on CUDA, a chunked evaluation on CPU, planned as such.
    ``process_group`` (a ``torch.distributed`` ProcessGroup, or ``"world"``) trains data parallel: call
    ``optimize`` on every rank with that rank's share of the batch; every rank starts from the first rank's
    weights and buffers (broadcast, as DDP does at construction); each gradient is averaged over the group
    inside the step (the ``data_parallel`` pass) before its update. The ranks' settings, parameter shapes and
    batch shapes are compared first: a rank that differs is named in a ConfigError on every rank.
    ``shard="state"`` (with ``process_group``) keeps each parameter's optimizer state on one rank, its owner
    (ZeRO stages 1 and 2): gradients are reduced onto the owner, which updates and broadcasts the parameter;
    each rank's plan counts its own share of the state. ``Trainer.state_dict`` then holds this rank's share:
    save and load across ranks with ``memfit.save_checkpoint`` / ``memfit.load_checkpoint``.
    ``shard="params"`` keeps each parameter itself on its owner only, sent to the other ranks just before each
    read (FSDP style). ``shard="auto"`` lets the planner choose with ``budget``: sharding is lossless, so it is
    tried before any lossy lever, least first: the replicated step if it fits, else ``"state"``, else
    ``"params"``, and only then the levers of ``levers`` (chosen for the sharded step). Gradients are
    all-reduced in buckets that overlap the backward (``passes=[..., ("data_parallel", {"bucket_bytes":
    n})]`` sets their size; 0 reduces each gradient alone).
    """
    optimizer = AdamW() if optimizer is None else optimizer
    if transactional and budget is not None:
        raise ConfigError(where_what_got("memfit.optimize(transactional=True)", "no budget (the journal is not "
                                         "planned yet)", f"budget={budget!r}",
                                         "drop the budget, or drop transactional (steps that fail before their "
                                         "first update are undone exactly without it)"))
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(where_what_got("memfit.optimize(example_inputs=)", "a tuple (one batch)",
                                         type(example_inputs).__name__, "wrap it: example_inputs=(x, y)"))
    flat, keys = flatten_batch(example_inputs, "memfit.optimize: example_inputs")
    device = _device_of(model, flat)
    budget_bytes = parse_budget(budget, device)
    if not (isinstance(micro_steps, int) and micro_steps >= 1):
        raise ConfigError(where_what_got("memfit.optimize(micro_steps=)", "an int >= 1", micro_steps,
                                         "e.g. 4"))
    if micro_steps > 1:
        if any(t.dim() and t.shape[0] % micro_steps for t in flat):
            raise ConfigError(where_what_got("memfit.optimize(micro_steps=)", "batch dim divisible by micro_steps",
                                             [tuple(t.shape) for t in flat], "pick a divisor of the batch size"))
        micro = [t.chunk(micro_steps)[0] if t.dim() else t for t in flat]  # 0-dim inputs go to every micro-batch
        capture_inputs = (dict(zip(keys, micro, strict=True)),) if keys else tuple(micro)
    else:
        capture_inputs = tuple(example_inputs)
    group, group_rank = None, 0
    from .passes.data_parallel import SHARDS

    if shard not in (*SHARDS, "auto"):
        raise ConfigError(where_what_got("memfit.optimize(shard=)", f"one of {(*SHARDS, 'auto')}", repr(shard),
                                         "'state' keeps each parameter's optimizer state on one rank"))
    if shard != "none" and process_group is None:
        raise ConfigError(where_what_got("memfit.optimize(shard=)", "a process_group to shard over",
                                         f"shard={shard!r} without process_group",
                                         "pass process_group=torch.distributed.group.WORLD (or 'world')"))
    if process_group is not None:
        group = _data_parallel_group(process_group, model, capture_inputs, dict(
            passes=repr(passes), frozen=tuple(frozen), optimizer=repr(optimizer), clip_grad_norm=clip_grad_norm,
            micro_steps=micro_steps, budget=budget_bytes, levers=levers, fuse=fuse,
            lever_passes=tuple(lever_passes or ()), shard=shard))
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        group_rank = dist.get_rank(_resolve_process_group(group[0]))
    g, plan_ = build_graph(model, capture_inputs, loss_fn=loss_fn, optimizer=optimizer, passes=passes,
                           frozen=frozen, clip_grad_norm=clip_grad_norm, clip=clip, micro_steps=micro_steps,
                           budget_bytes=budget_bytes, device=device, levers=levers, lever_passes=lever_passes,
                           fuse=fuse, group=group, group_rank=group_rank, shard=shard)
    if group is not None:
        info = g.info.get("data_parallel", {})
        updates = info.get("update_ops") or {f: str(n.target) for f, n in g.updates.items()}
        _agree(group, "the compiled step", {"passes": tuple(g.applied), "updates": tuple(sorted(updates.items())),
                                            "owners": tuple(sorted(info.get("owners", {}).items()))})
    try:
        trainer = Trainer(model, g, capture_inputs, micro_steps=micro_steps, optimizer=optimizer,
                          lr_schedule=lr_schedule, budget_bytes=budget_bytes, device=device, plan=plan_,
                          loss_fn=loss_fn, nonfinite=nonfinite, transactional=transactional, max_shapes=max_shapes)
    except UnsupportedGraph as e:
        where = locate_op_source(model, capture_inputs, loss_fn, e.op) if e.op else None
        if where is None:
            raise
        raise UnsupportedGraph(f"{e} [op called at {where}]", op=e.op, node=e.node) from e
    trainer._dp_group = group
    if group is not None:
        trainer._dp_flag = torch.zeros(1, device=device)  # allocated now: no step allocates it
    if g.info.get("data_parallel", {}).get("shard") == "params":  # asked for, or chosen by shard="auto"
        trainer._release_sharded()
    return trainer
