"""fused_update: the optimizer update as graph nodes, placed where each gradient is produced.

Rewrites: every trainable parameter's gradient output into an in-place ``memfit::adamw_update`` or
``memfit::sgd_update`` node, placed right after the later of (a) the gradient's producer and (b) the
last read of the parameter or any view of it, so the gradient dies as soon as it is used and no two
full gradients need be live at once. Adds the optimizer state (fp32 moments) as TrainGraph state
and the per-step scalars ``lr``, ``step`` and ``micro_step`` as hparam placeholders.

Requires: a captured TrainGraph with gradient outputs. Guarantees: the same parameter trajectory as
``torch.optim.AdamW`` / ``SGD`` (single-tensor math order) with no gradient left as a graph output.

Gradient clipping by global norm (``clip_grad_norm`` with ``clip="global"``) needs every gradient
before the first update, so in that mode the updates are placed after the norm is known: exact
``torch.nn.utils.clip_grad_norm_`` semantics, but the full gradient set is live at once (no memory
saved on gradients). ``clip="per_param"`` clips each gradient by its own norm right where it is
produced and keeps the saving. Gradient accumulation over ``micro_steps`` adds each gradient into a
persistent accumulator inside the update op and updates on the last micro-step with the mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import StateSpec, TrainGraph
from ..ops import op_call
from .base import MemoryEffect, Pass, PassResult, register_pass

RAW_GRAD_KEY = "memfit.raw_grad_of"  # meta tag: the gradient as the backward made it, before clipping


@dataclass(frozen=True)
class AdamW:
    """AdamW settings (decoupled weight decay), as in ``torch.optim.AdamW``."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    kind: Literal["adamw"] = "adamw"
    # SPAM (spike-aware Adam with momentum reset); all off by default. See AdamW.spam().
    spike_threshold: float = 0.0  # clip g where g^2 > spike_threshold * v to sign(g) * sqrt(spike_threshold * v)
    reset_interval: int = 0  # zero both moments before every step t with t % reset_interval == 0
    reset_warmup: int = 0  # after a reset, scale lr by a cosine ramp 0 -> 1 over this many steps

    def __post_init__(self):
        _check_positive("memfit.AdamW", lr=self.lr, eps=self.eps)
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ConfigError(where_what_got("memfit.AdamW", "betas in [0, 1)", self.betas, "e.g. (0.9, 0.999)"))
        if self.weight_decay < 0:
            raise ConfigError(where_what_got("memfit.AdamW", "weight_decay >= 0", self.weight_decay, "use 0 or more"))
        if not (isinstance(self.spike_threshold, (int, float)) and self.spike_threshold >= 0):
            raise ConfigError(where_what_got("memfit.AdamW(spike_threshold=)", "a number >= 0 (0: off; SPAM uses "
                                             "5000)", self.spike_threshold, "e.g. 5000"))
        for name in ("reset_interval", "reset_warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(where_what_got(f"memfit.AdamW({name}=)", "an int >= 0 (0: off)", v,
                                                 "e.g. reset_interval=500, reset_warmup=150"))
        if self.reset_warmup and not self.reset_interval:
            raise ConfigError(where_what_got("memfit.AdamW(reset_warmup=)", "reset_interval > 0 with it",
                                             f"reset_warmup={self.reset_warmup}, reset_interval=0",
                                             "set reset_interval (the warmup follows each moment reset)"))

    @classmethod
    def spam(cls, lr: float = 1e-3, *, spike_threshold: float = 5000.0, reset_interval: int = 500,
             reset_warmup: int = 150, **kwargs) -> AdamW:
        """AdamW with SPAM's defaults: spike-aware clipping at threshold 5000, moments reset every 500
        steps, a 150-step cosine warmup after each reset (Huang et al., 2025)."""
        return cls(lr=lr, spike_threshold=spike_threshold, reset_interval=reset_interval,
                   reset_warmup=reset_warmup, **kwargs)

    def lr_scale(self, step: int) -> float:
        """SPAM's warmup factor for ``step`` (1-based): a cosine ramp after each moment reset, else 1."""
        if not (self.reset_interval and self.reset_warmup) or step <= self.reset_interval:
            return 1.0
        since = (step - 1) % self.reset_interval + 1  # 1 on the reset step itself
        if since > self.reset_warmup:
            return 1.0
        return 0.5 * (1.0 - math.cos(math.pi * since / (self.reset_warmup + 1)))

    def resets_before(self, step: int) -> bool:
        """Whether the moments are zeroed before ``step`` (never before the first)."""
        return bool(self.reset_interval) and step > 1 and (step - 1) % self.reset_interval == 0

    def state_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class SGD:
    """SGD with momentum / dampening / Nesterov / weight decay, as in ``torch.optim.SGD``."""

    lr: float = 1e-2
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    kind: Literal["sgd"] = "sgd"

    def __post_init__(self):
        _check_positive("memfit.SGD", lr=self.lr)
        if self.momentum < 0 or self.weight_decay < 0:
            raise ConfigError(where_what_got("memfit.SGD", "momentum >= 0 and weight_decay >= 0",
                                             (self.momentum, self.weight_decay), "use non-negative values"))
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError(where_what_got("memfit.SGD", "momentum > 0 and dampening == 0 with nesterov",
                                             (self.momentum, self.dampening), "as torch.optim.SGD requires"))

    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum != 0 else ()


def _check_positive(where: str, **values: float) -> None:
    for k, v in values.items():
        if not v > 0:
            raise ConfigError(where_what_got(where, f"{k} > 0", v, f"pass a positive {k}"))


Optimizer = AdamW | SGD


@register_pass("fused_update")
@dataclass(frozen=True)
class FusedUpdate(Pass):
    optimizer: AdamW | SGD = AdamW()
    clip_grad_norm: float | None = None
    clip: Literal["global", "per_param"] = "global"
    micro_steps: int = 1
    targets: str = "*"

    def __post_init__(self):
        if isinstance(self.optimizer, dict):  # from JSON
            kind = self.optimizer.get("kind", "adamw")
            cfg = {k: v for k, v in self.optimizer.items() if k != "kind"}
            if "betas" in cfg:
                cfg["betas"] = tuple(cfg["betas"])
            object.__setattr__(self, "optimizer", (AdamW if kind == "adamw" else SGD)(**cfg))
        if not isinstance(self.optimizer, (AdamW, SGD)):
            raise ConfigError(where_what_got("fused_update.optimizer", "memfit.AdamW(...) or memfit.SGD(...)",
                                             type(self.optimizer).__name__, "torch.optim objects are not accepted"))
        if self.clip not in ("global", "per_param"):
            raise ConfigError(where_what_got("fused_update.clip", "'global' or 'per_param'", self.clip, "pick one"))
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(where_what_got("fused_update.clip_grad_norm", "a positive float or None",
                                             self.clip_grad_norm, "e.g. 1.0"))
        if not (isinstance(self.micro_steps, int) and self.micro_steps >= 1):
            raise ConfigError(where_what_got("fused_update.micro_steps", "an int >= 1", self.micro_steps,
                                             "use 1 for no accumulation"))
        if self.clip_grad_norm is not None and self.micro_steps > 1:
            # The clip would see each micro-batch's gradient, not the accumulated one torch clips: refuse
            # rather than train with a different clip than the user asked for.
            raise ConfigError(where_what_got(
                "fused_update", "clip_grad_norm without gradient accumulation",
                f"clip_grad_norm={self.clip_grad_norm} with micro_steps={self.micro_steps}",
                "clipping the accumulated gradient is not supported yet: drop clip_grad_norm, or use "
                "micro_steps=1 with a smaller batch"))

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        per_param = {}
        for fqn in g.match(self.targets, g.grad_outputs):
            val = g.params[fqn].meta["val"]
            nbytes = val.numel() * 4
            state = nbytes * len(self.optimizer.state_names()) + (nbytes if self.micro_steps > 1 else 0)
            per_param[fqn] = state
        transient = 0
        if not (self.clip_grad_norm is not None and self.clip == "global"):
            grads = sorted((g.params[f].meta["val"].numel() * g.params[f].meta["val"].element_size()
                            for f in per_param), reverse=True)
            transient = -(sum(grads) - (grads[0] if grads else 0))
        return MemoryEffect(persistent=sum(per_param.values()), transient=transient, per_param=per_param)

    def run(self, g: TrainGraph) -> PassResult:
        g.check_globs(self.targets, "passes['fused_update'].targets")
        fqns = g.match(self.targets, g.grad_outputs)
        if not fqns:
            return PassResult(g, False)
        lr = g.add_hparam("lr", float(self.optimizer.lr))
        step = g.add_hparam("step", 1)
        micro = g.add_hparam("micro_step", 0)
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        grads = {f: g.grad_of[f] for f in fqns}
        if self.clip_grad_norm is not None:  # data_parallel reduces these before the clip reads them
            for f, gr in grads.items():
                gr.meta[RAW_GRAD_KEY] = f
        coef = None
        if self.clip_grad_norm is not None and self.clip == "global":
            coef = self._global_clip_coef(g, list(grads.values()), order)
            order = {n: i for i, n in enumerate(g.graph.nodes)}
        for fqn in fqns:
            grad = grads[fqn]
            anchor = max([grad, *g.param_readers(fqn)], key=lambda n: order[n])
            if coef is not None and order[coef] > order[anchor]:
                anchor = coef
            with g.graph.inserting_before(anchor.next):
                if coef is not None:
                    grad = g.graph.call_function(torch.ops.aten.mul.Tensor, (grad, coef))
                elif self.clip_grad_norm is not None:
                    grad = self._per_param_clip(g, grad)
                upd = self._update_node(g, fqn, grad, lr, step, micro)
            upd.meta["val"] = None  # the op returns nothing
            g.updates[fqn] = upd
            g.grad_outputs.remove(fqn)
            # nodes inserted after the anchor sit between it and its old successor: no re-indexing of the graph
            for n in (grad, upd):
                order.setdefault(n, order[anchor] + 0.5)
        # without clipping every node added is an update op (meta set above): nothing to re-propagate
        return PassResult(g, True, {"updates": len(fqns), "optimizer": self.optimizer.kind},
                          meta_ok=self.clip_grad_norm is None)

    def _update_node(self, g: TrainGraph, fqn: str, grad: fx.Node, lr, step, micro) -> fx.Node:
        p = g.params[fqn]
        shape = tuple(p.meta["val"].shape)
        if fqn in g.grad_slices:  # the gradient covers a leading slice: step that view, with state of its shape
            dim, length = g.grad_slices[fqn]
            p = g.graph.call_function(torch.ops.aten.slice.Tensor, (p, dim, 0, length))
            with g.fake_mode():
                p.meta["val"] = g.params[fqn].meta["val"].narrow(dim, 0, length)
            shape = tuple(p.meta["val"].shape)
        states = {name: g.add_state(f"{fqn}::{name}", StateSpec(shape, torch.float32, fqn, "optimizer"))
                  for name in self.optimizer.state_names()}
        acc = None
        if self.micro_steps > 1:
            acc = g.add_state(f"{fqn}::grad_acc", StateSpec(shape, p.meta["val"].dtype, fqn, "accumulator"))
        o = self.optimizer
        if isinstance(o, AdamW):
            extra = {"spike_threshold": float(o.spike_threshold)} if o.spike_threshold > 0 else {}
            return op_call(g.graph, torch.ops.memfit.adamw_update.default, param=p, grad=grad,
                           exp_avg=states["exp_avg"], exp_avg_sq=states["exp_avg_sq"], grad_acc=acc, lr=lr, step=step,
                           micro_step=micro, beta1=float(o.betas[0]), beta2=float(o.betas[1]), eps=float(o.eps),
                           weight_decay=float(o.weight_decay), micro_steps=self.micro_steps, **extra)
        return op_call(g.graph, torch.ops.memfit.sgd_update.default, param=p, grad=grad,
                       momentum_buffer=states.get("momentum_buffer"), grad_acc=acc, lr=lr, step=step, micro_step=micro,
                       momentum=float(o.momentum), dampening=float(o.dampening), nesterov=bool(o.nesterov),
                       weight_decay=float(o.weight_decay), micro_steps=self.micro_steps)

    def _global_clip_coef(self, g: TrainGraph, grads: list[fx.Node], order) -> fx.Node:
        """clip_grad_norm_'s coefficient: clamp(max_norm / (||(||g_i||)_i|| + 1e-6), max=1)."""
        aten = torch.ops.aten
        last = max(grads, key=lambda n: order[n])
        with g.graph.inserting_before(last.next):
            norms = [g.graph.call_function(aten.linalg_vector_norm.default, (gr, 2.0)) for gr in grads]
            stacked = g.graph.call_function(aten.stack.default, (norms,))
            total = g.graph.call_function(aten.linalg_vector_norm.default, (stacked, 2.0))
            coef = self._coef(g, total)
        return coef

    def _coef(self, g: TrainGraph, norm: fx.Node) -> fx.Node:
        aten = torch.ops.aten
        denom = g.graph.call_function(aten.add.Tensor, (norm, 1e-6))
        ratio = g.graph.call_function(aten.reciprocal.default, (denom,))
        scaled = g.graph.call_function(aten.mul.Tensor, (ratio, float(self.clip_grad_norm)))
        return g.graph.call_function(aten.clamp.default, (scaled, None, 1.0))

    def _per_param_clip(self, g: TrainGraph, grad: fx.Node) -> fx.Node:
        norm = g.graph.call_function(torch.ops.aten.linalg_vector_norm.default, (grad, 2.0))
        return g.graph.call_function(torch.ops.aten.mul.Tensor, (grad, self._coef(g, norm)))
