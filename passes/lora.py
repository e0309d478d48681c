"""lora: low-rank adapters beside frozen weights (LoRA), the frozen base optionally 4-bit (QLoRA, LQ-LoRA).

Rewrites, per targeted Linear weight ``W`` [out, in] (read in the forward as ``X @ W^T``, an ``mm`` or
``addmm`` of the captured step): two new trainable parameters ``<module>.lora_A.weight`` [r, in] and
``<module>.lora_B.weight`` [out, r] (peft's names) and, after the forward product, ``Y += s * (drop(X) @ A^T)
@ B^T`` with ``s = alpha / r``; in the backward, from the gradient ``dY`` the step already makes,
``dB = s * dY^T H`` (``H = drop(X) A^T``, saved: N x r), ``dA = s * (dY B)^T drop(X)`` and ``dX += s * drop'(dY B A)``
(the dropout's mask applied). ``W`` is frozen: its gradient, the weight-gradient matmul and every activation
saved only for it go (as ``freeze`` does); with ``freeze_rest`` (the default, as peft) so do every other
parameter's. ``base`` holds the frozen weight as ``nf4`` (QLoRA's NormalFloat, block ``group``, optionally
double-quantized scales), ``int4`` or ``int8`` codes dequantized just in time (``quantize_weights``'
mechanism), or as it is (``"fp"``).

``init="lora"``: A Kaiming-uniform, B zero (peft's default: the step starts at the base model).
``init="lq"``: LQ-LoRA, W ≈ Q + s·B A by alternating quantization and rank-r SVD, so the adapters start
holding what quantization loses (with ``base="fp"`` the adapters take W's top-r part and the base keeps
W).

The adapters save as peft's ``adapter_model.safetensors`` + ``adapter_config.json``
(``Trainer.save_adapters``); ``Trainer.export()`` merges them into plain weights.
Requires a captured step with the targets' gradients; runs before ``remat`` and ``fused_update``.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from .. import weights as wt
from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph, aliases, is_view_op
from .base import Option, Pass, PassResult, register_pass
from .quantize_weights import default_targets, encode_param, refuse_tied

aten = torch.ops.aten
_MM = (aten.mm.default, aten.addmm.default)


@dataclass(frozen=True)
class LinearSite:
    """Where a Linear weight meets the step: the forward product and its input, the backward's ``dY``."""

    forward: fx.Node  # mm(X, W^T) or addmm(b, X, W^T)
    x: fx.Node  # [N, in]
    dy: fx.Node | None  # [N, out]
    grad_input: fx.Node | None  # mm(dY, W): the gradient of X, when the step makes it


def linear_site(g: TrainGraph, fqn: str, where: str) -> LinearSite:
    """The forward product reading weight ``fqn`` and the backward's ``dY``; a ConfigError unless ``fqn`` is a
    Linear weight read by exactly one 2-D product in the forward."""
    p = g.params[fqn]
    forward = g.forward_nodes()
    readers: list[tuple[fx.Node, fx.Node]] = []
    for a in aliases(p):
        readers += [(u, a) for u in a.users if not (is_view_op(u) and u.args[0] is a)]
    fwd = [(u, a) for u, a in readers if u in forward]
    shape = tuple(p.meta["val"].shape)

    def refuse(got: str) -> ConfigError:
        return ConfigError(where_what_got(f"{where}: {fqn!r}", "the weight of an nn.Linear (read once in the "
                                          "forward as X @ W^T)", got, "target Linear weights only (e.g. "
                                          "'*.q_proj.weight'); embeddings, convolutions and norms keep training "
                                          "or stay frozen"))

    if len(shape) != 2:
        raise refuse(f"a {len(shape)}-D parameter of shape {shape}")
    if len(fwd) != 1 or fwd[0][0].target not in _MM:
        raise refuse(f"read by {[str(u.target) for u, _ in fwd] or 'nothing'} in the forward")
    node, alias = fwd[0]
    wpos = 1 if node.target is aten.mm.default else 2
    if node.args[wpos] is not alias or tuple(alias.meta["val"].shape) != (shape[1], shape[0]):
        raise refuse(f"read by {node.target} as another operand than the transposed weight")
    x = node.args[wpos - 1]
    bwd = [(u, a) for u, a in readers if u not in forward and u.target is aten.mm.default and u.args[1] is a
           and tuple(a.meta["val"].shape) == shape]
    grad_input = bwd[0][0] if len(bwd) == 1 else None
    dy = grad_input.args[0] if grad_input is not None else None
    if dy is None and fqn in g.grad_of:  # no gradient for X: dY from the weight-gradient product
        n = g.grad_of[fqn]
        while n.op == "call_function" and is_view_op(n):
            n = n.args[0]
        if n.target is aten.mm.default:
            lhs = n.args[0]
            cand = lhs.args[0] if is_view_op(lhs) and lhs.target is aten.t.default else None
            if cand is not None and tuple(cand.meta["val"].shape) == (x.meta["val"].shape[0], shape[0]):
                dy = cand
    if dy is None:
        raise refuse("no gradient flowing through its output in the captured step")
    return LinearSite(node, x, dy, grad_input)


def add_adapters(g: TrainGraph, fqn: str, rank: int, scaling: float, dropout: float, where: str
                 ) -> tuple[str, str, LinearSite]:
    """Add LoRA adapters to Linear weight ``fqn`` (forward branch and its hand-written backward); returns the
    names of A and B."""
    site = linear_site(g, fqn, where)
    w = g.params[fqn].meta["val"]
    out_f, in_f = w.shape
    module = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
    a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    with g.fake_mode():
        a_val = torch.empty(rank, in_f, dtype=w.dtype, device=w.device)
        b_val = torch.empty(out_f, rank, dtype=w.dtype, device=w.device)
    A = g.add_param(a_name, a_val)
    B = g.add_param(b_name, b_val)
    G = g.graph
    y = site.forward
    with G.inserting_before(y.next):
        mask = None
        xd = site.x
        if dropout > 0:
            drop = G.call_function(aten.native_dropout.default, (site.x, float(dropout), True))
            xd = G.call_function(operator.getitem, (drop, 0))
            mask = G.call_function(operator.getitem, (drop, 1))
        h = G.call_function(aten.mm.default, (xd, G.call_function(aten.t.default, (A,))))
        z = G.call_function(aten.mm.default, (h, G.call_function(aten.t.default, (B,))))
        y_new = G.call_function(aten.add.Tensor, (y, z), {"alpha": float(scaling)})
    y.replace_all_uses_with(y_new, delete_user_cb=lambda u: u is not y_new)
    anchor = site.grad_input if site.grad_input is not None else site.dy
    with G.inserting_before(anchor.next):
        dys = G.call_function(aten.mul.Tensor, (site.dy, float(scaling)))
        db = G.call_function(aten.mm.default, (G.call_function(aten.t.default, (dys,)), h))
        dh = G.call_function(aten.mm.default, (dys, B))
        da = G.call_function(aten.mm.default, (G.call_function(aten.t.default, (dh,)), xd))
        if site.grad_input is not None:
            dxl = G.call_function(aten.mm.default, (dh, A))
            if mask is not None:
                dxl = G.call_function(aten.native_dropout_backward.default, (dxl, mask, 1.0 / (1.0 - dropout)))
            dx_new = G.call_function(aten.add.Tensor, (site.grad_input, dxl))
    if site.grad_input is not None:
        site.grad_input.replace_all_uses_with(dx_new, delete_user_cb=lambda u: u is not dx_new)
    for name, grad in ((a_name, da), (b_name, db)):
        g.grad_of[name] = grad
        g.grad_outputs.append(name)
    return a_name, b_name, site


def freeze_params(g: TrainGraph, fqns) -> None:
    """Drop the gradients of ``fqns`` (the backward that only fed them goes at the next dead-code pass)."""
    for f in fqns:
        if f in g.grad_outputs:
            g.grad_outputs.remove(f)
        g.grad_of.pop(f, None)
    drop = set(fqns)
    g.trainable = tuple(p for p in g.trainable if p not in drop)


def _rank_for(overrides, fqn: str, rank: int) -> int:
    for glob, r in overrides:
        if fnmatch.fnmatchcase(fqn, glob):
            return int(r)
    return rank


@register_pass("lora")
@dataclass(frozen=True)
class Lora(Pass):
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] | None = None  # Linear weight globs; None: every Linear weight but the head
    base: Literal["fp", "int8", "int4", "nf4"] = "fp"
    group: int = 64
    double_quant: bool = False
    init: Literal["lora", "lq"] = "lora"
    lq_iters: int = 10
    freeze_rest: bool = True  # as peft: only the adapters train
    seed: int = 0
    ranks: tuple[tuple[str, int], ...] = ()  # (glob, rank) per-weight ranks; the first match wins

    before = ("remat", "fused_update", "quantize_weights")
    lossless = False

    def __post_init__(self):
        where = "passes['lora']"
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ranks", tuple((str(gl), int(r)) for gl, r in
                                                (self.ranks.items() if isinstance(self.ranks, dict) else self.ranks)))
        for name, r in (("rank", self.rank), *((f"ranks[{gl!r}]", r) for gl, r in self.ranks)):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ConfigError(where_what_got(f"{where}.{name}", "an int >= 1", repr(r), "e.g. 8 or 16"))
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(where_what_got(f"{where}.alpha", "a number > 0", repr(self.alpha), "e.g. 16"))
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(where_what_got(f"{where}.dropout", "a number in [0, 1)", repr(self.dropout), "e.g. 0.05"))
        if self.base not in ("fp", "int8", "int4", "nf4"):
            raise ConfigError(where_what_got(f"{where}.base", "'fp', 'int8', 'int4' or 'nf4'", repr(self.base),
                                             "'nf4' is QLoRA's"))
        if self.base != "fp":
            wt.check_codec(where, self.base, self.group)
        if self.init not in ("lora", "lq"):
            raise ConfigError(where_what_got(f"{where}.init", "'lora' or 'lq'", repr(self.init),
                                             "'lq' is LQ-LoRA's initialisation"))

    def scaling(self, rank: int) -> float:
        return float(self.alpha) / rank

    def selected(self, g: TrainGraph) -> list[str]:
        if self.targets is None:
            return [f for f in default_targets(g) if g.params[f].meta["val"].dim() == 2]
        g.check_globs(self.targets, "passes['lora'].targets")
        chosen = g.match(self.targets)
        refuse_tied(g, self.targets, chosen, "passes['lora'].targets")
        return chosen

    def run(self, g: TrainGraph) -> PassResult:
        chosen = self.selected(g)
        where = "passes['lora'].targets"
        for f in chosen:  # every target checked before the graph changes: a refusal leaves it as it was
            linear_site(g, f, where)
        made = []
        for fqn in chosen:
            r = _rank_for(self.ranks, fqn, self.rank)
            a, b, _ = add_adapters(g, fqn, r, self.scaling(r), float(self.dropout), where)
            made.append((fqn, a, b, r))
        adapters = {n for _, a, b, _ in made for n in (a, b)}
        frozen = [f for f in g.trainable if f not in adapters and (self.freeze_rest or f in chosen)]
        freeze_params(g, frozen)
        g.sync_outputs()
        g.eliminate_dead_code()
        for fqn, a, b, r in made:
            base = None
            if self.base != "fp":
                base = encode_param(g, fqn, self.base, self.group, self.double_quant and self.base != "int8",
                                    register=False)
            g.inits.append(wt.Adapters(fqn, a, b, r, self.scaling(r), self.seed + len(g.inits), self.init, base,
                                       self.lq_iters))
        stats = {"targets": chosen, "rank": self.rank, "alpha": self.alpha, "dropout": float(self.dropout),
                 "base": self.base, "init": self.init,
                 "frozen": len(frozen), "adapters": [a for _, a, _, _ in made] + [b for _, _, b, _ in made]}
        g.info["lora"] = stats
        return PassResult(g, bool(chosen), stats)

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """At ``levers="adapters"`` only: per Linear weight with an update, LoRA at rank 16 and 8 over an NF4
        base; exact bytes: the adapters and their AdamW moments, the base's codes and scales, minus the weight
        and the state its update holds. Offered alone (no other option on that weight)."""
        if levers != "adapters":
            return []
        out = []
        for fqn in default_targets(g):
            upd = g.updates.get(fqn)
            val = g.params[fqn].meta["val"]
            if upd is None or val.dim() != 2 or val.numel() % 64:
                continue
            state = sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in upd.all_input_nodes
                        if n.meta.get("memfit.role") == "state")
            own = val.numel() * val.element_size()
            base = wt.encoded_bytes(val.numel(), "nf4", 64)
            for degree, r in enumerate((16, 8)):
                if r >= min(val.shape):
                    continue
                adapters = r * sum(val.shape)
                delta = adapters * (val.element_size() + 8) + base - own - state
                out.append(Option("lora", fqn, f"lora r={r} nf4", (("rank", r),), persistent=delta,
                                  transient=4 * adapters, lossiness="adapters", degree=5 + degree, group="weights",
                                  alone=True))
        return out

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        ranks = tuple((o.target, dict(o.config)["rank"]) for o in chosen)
        return "lora", {"targets": tuple(o.target for o in chosen), "ranks": ranks, "base": "nf4",
                        "freeze_rest": False}
