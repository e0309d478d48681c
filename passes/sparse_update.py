"""sparse_update: the Tiny Training Engine's sparse update (Lin et al., On-Device Training Under 256KB Memory).

A ``scheme`` maps parameter FQN globs to a setting; every parameter it does not name takes ``default``
(a ratio as ``default`` applies to weights; the other parameters then train, at 1):

* a weight (two or more dimensions): ``0`` (frozen), or a ratio ``r`` in {1/8, 1/4, 1/2, 1} of its input
  channels that train: the weight gradient is computed for the first ``ceil(r * C_in)`` input channels only
  (``W[:, :k]`` of a Linear or a Conv; for a depthwise Conv, whose input channels are its output channels,
  ``W[:k]``), from a narrowed copy of the layer's input made in the forward, so only those channels of the
  input are saved for the backward; the update steps that slice of the weight, with optimizer state of its
  size;
* any other parameter (a bias, a norm's affine): ``0`` (frozen) or ``1`` (trains). "Bias-only" is the
  weight at 0 and its bias (or the BatchNorm after it) at 1.

Frozen parameters are removed as ``freeze`` does, and the backward is dead-code-eliminated: nothing below the
lowest trained layer is computed, and activations saved only for frozen weights are dropped. With
``relu_masks`` (default on) the derivative of a ReLU or ReLU6 (``hardtanh``) is saved as a 1-bit mask
(``memfit::pack_mask`` in the forward, ``memfit::mask_grad`` in the backward) instead of the activation,
when the activation is not otherwise needed by the backward.

``stats`` (and ``graph.info["sparse_update"]``) report the saved-activation bytes before, after the frozen
parameters' dead code is gone, after the channel subsets and after the 1-bit masks: the three savings apart.

Runs before ``remat`` and ``fused_update``.

As a planner lever (opt-in: name ``"sparse_update"`` in ``lever_passes``, at ``levers="adapters"``, since it
changes what trains) it offers, per AdamW-trained weight, a frozen weight or an update of 1/2, 1/4 or 1/8 of
its input channels, each with the exact change in optimizer-state bytes. The activations the rewrite also
drops are left out of the option (they depend on which other layers train and on the recomputation
prefix): the planner's verified plan counts them, so a choice can only fit with room to spare, never miss.
The contribution-aware choice of a scheme is ``memfit.search_sparse_update``.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import FORWARD_KEY, TrainGraph, detached, saved_activations
from ..ops import args_of
from .base import Option, Pass, PassResult, register_pass

aten = torch.ops.aten
RATIOS = (0.0, 0.125, 0.25, 0.5, 1.0)
_WHERE = "passes['sparse_update']"
_VIEWS = {aten.t.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.permute.default, aten.transpose.int}


def _setting(value: object, fqn: str, weight: bool) -> float:
    allowed = RATIOS if weight else (0.0, 1.0)
    if value == "full":
        value = 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in allowed:
        what = (f"a ratio of input channels in {RATIOS} (0 freezes)" if weight else "0 (frozen) or 1 (trains)")
        raise ConfigError(where_what_got(f"{_WHERE}.scheme[{fqn!r}]", what, value,
                                         "e.g. scheme={'features.6.weight': 0.25, 'features.7.*': 1}"))
    return float(value)


def _channels(g: TrainGraph, fqn: str, grad: fx.Node | None = None) -> tuple[int, int]:
    """(dim, count) of the channels a ratio of ``fqn``'s weight narrows: a Linear's or Conv's input channels
    (dim 1), a depthwise Conv's channels (dim 0). A ConfigError when its gradient is neither."""
    shape = tuple(g.params[fqn].meta["val"].shape)
    grad = _strip(g.grad_of[fqn] if grad is None else grad)
    if grad.target is operator.getitem and grad.args[0].target is aten.convolution_backward.default:
        groups = grad.args[0].args[9]
        return (0, shape[0]) if groups > 1 else (1, shape[1])
    if grad.target is aten.mm.default:
        return 1, shape[1]
    raise ConfigError(where_what_got(f"{_WHERE}.scheme[{fqn!r}]", "a channel ratio on the weight of a Linear "
                                     "or Conv (its gradient one matmul or convolution_backward)",
                                     f"a gradient made by {grad.target}", "use 0 or 1 for this parameter"))


def _strip(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target in _VIEWS and len(n.all_input_nodes) == 1:
        n = n.all_input_nodes[0]
    return n


@register_pass("sparse_update")
@dataclass(frozen=True)
class SparseUpdate(Pass):
    scheme: tuple[tuple[str, float], ...] = ()  # (glob, setting); a dict is accepted; the first match wins
    default: float = 0.0
    relu_masks: bool = True

    before = ("remat", "fused_update")
    lossless = False

    def __post_init__(self):
        items = self.scheme.items() if isinstance(self.scheme, dict) else self.scheme
        try:
            object.__setattr__(self, "scheme", tuple((str(gl), v) for gl, v in items))
        except (TypeError, ValueError):
            raise ConfigError(where_what_got(f"{_WHERE}.scheme", "a dict of FQN glob -> setting",
                                             type(self.scheme).__name__, "e.g. {'classifier.*': 1}")) from None

    def settings(self, g: TrainGraph) -> dict[str, float]:
        """Each trainable parameter's setting (the first matching glob of ``scheme`` wins, else ``default``)."""
        g.check_globs([pat for pat, _ in self.scheme], f"{_WHERE}.scheme")
        out = {}
        for f in g.grad_outputs:
            weight = g.params[f].meta["val"].dim() >= 2
            value = next((v for pat, v in self.scheme if fnmatch.fnmatchcase(f, pat)), None)
            if value is None:
                value = self.default if weight or self.default in (0, 1) else 1.0
            out[f] = _setting(value, f, weight)
        return out

    # ---- the planner lever (opt-in: name "sparse_update" in lever_passes) -----------------------------------

    LEVER_RATIOS = (0.5, 0.25, 0.125, 0.0)

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """At ``levers="adapters"``: each weight with an fp32 AdamW update frozen, or updated on 1/2, 1/4 or
        1/8 of its input channels. ``persistent`` is the exact change in its optimizer state (moments of the
        trained slice only; none when frozen); the saved activations it also drops are not claimed. Taken
        alone on its target."""
        if levers != "adapters":
            return []
        out = []
        for f, upd in g.updates.items():
            val = g.params[f].meta["val"]
            if (upd is None or upd.target is not torch.ops.memfit.adamw_update.default or val.dim() < 2
                    or f in g.tied):
                continue
            a = args_of(upd)
            if a.wscale is not None or a.micro_steps > 1 or a.spike_threshold:
                continue
            state = [n.meta["val"] for n in upd.all_input_nodes if n.meta.get("memfit.role") == "state"]
            moments = sum(v.numel() * v.element_size() for v in state if v.numel() == val.numel())
            every = sum(v.numel() * v.element_size() for v in state)
            try:
                dim, c = _channels(g, f, a.grad)
            except ConfigError:
                dim, c = None, 0
            for degree, r in enumerate(cls.LEVER_RATIOS):
                if r:
                    k = math.ceil(r * c)
                    if dim is None or k >= c:
                        continue
                    persistent = (moments // c) * k - moments
                    label = f"update {k}/{c} input channels"
                else:
                    persistent, label = -every, "frozen"
                out.append(Option("sparse_update", f, label, (("ratio", r),), persistent=persistent,
                                  lossiness="adapters", degree=20 + degree, group="weights", alone=True))
        return out

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        return "sparse_update", {"scheme": tuple((o.target, dict(o.config)["ratio"]) for o in chosen),
                                 "default": 1.0}

    def run(self, g: TrainGraph) -> PassResult:
        settings = self.settings(g)
        before = sum(saved_activations(g).values())
        frozen = [f for f, v in settings.items() if v == 0]
        for f in frozen:
            g.grad_outputs.remove(f)
            del g.grad_of[f]
        g.trainable = tuple(p for p in g.trainable if p not in frozen)
        g.sync_outputs()
        g.eliminate_dead_code()
        after_freeze = sum(saved_activations(g).values())
        narrowed = {}
        for f, r in settings.items():
            if 0 < r < 1:
                narrowed[f] = self._narrow(g, f, r)
        g.eliminate_dead_code()
        after_channels = sum(saved_activations(g).values())
        masks = self._relu_masks(g) if self.relu_masks else 0
        g.eliminate_dead_code()
        after_masks = sum(saved_activations(g).values())
        stats = {"frozen": len(frozen), "trained": {f: v for f, v in settings.items() if v}, "narrowed": narrowed,
                 "relu_masks": masks, "saved_bytes_before": before, "saved_bytes_after_freeze": after_freeze,
                 "saved_bytes_after_channels": after_channels, "saved_bytes_after_masks": after_masks}
        g.info["sparse_update"] = stats
        return PassResult(g, True, stats)

    # ---- channel subsets ----------------------------------------------------------------------------------

    def _narrow(self, g: TrainGraph, fqn: str, r: float) -> int:
        _channels(g, fqn)  # a Linear's or Conv's weight, else a ConfigError
        grad = _strip(g.grad_of[fqn])
        shape = tuple(g.params[fqn].meta["val"].shape)
        if grad.target is aten.mm.default:
            return self._narrow_linear(g, fqn, grad, r, shape)
        return self._narrow_conv(g, fqn, grad, r, shape)

    def _in_forward(self, g: TrainGraph, x: fx.Node, forward: set[fx.Node]) -> fx.Node:
        """``x`` itself when the forward makes it, else the views that make it from a forward value replayed
        right after that value (so the narrowed copy can be taken in the forward)."""
        chain = []
        while x not in forward and x.op == "call_function" and x.target in _VIEWS:
            chain.append(x)
            x = x.args[0]
        if x not in forward and x.op != "placeholder":
            raise ConfigError(where_what_got(_WHERE, "a layer input the forward computes", x.format_node()[:120],
                                             "use 0 or 1 for this parameter"))
        for v in reversed(chain):
            with g.graph.inserting_after(x):
                x = g.graph.call_function(v.target, (x, *v.args[1:]), dict(v.kwargs))
            x.meta[FORWARD_KEY] = True
        return x

    def _forward_copy(self, g: TrainGraph, x: fx.Node, dim: int, k: int) -> fx.Node:
        """``x.narrow(dim, 0, k)`` copied (contiguous) right after ``x`` is made: what the backward saves."""
        with g.graph.inserting_after(g.placeholders()[-1] if x.op == "placeholder" else x):
            view = g.graph.call_function(aten.slice.Tensor, (x, dim, 0, k))
        with g.graph.inserting_after(view):
            copy = g.graph.call_function(aten.clone.default, (view,), {"memory_format": torch.contiguous_format})
        view.meta[FORWARD_KEY] = copy.meta[FORWARD_KEY] = True
        return copy

    def _narrow_linear(self, g: TrainGraph, fqn: str, mm: fx.Node, r: float, shape) -> int:
        c_in = shape[1]
        k = math.ceil(r * c_in)
        forward_inputs = set()  # the storages the forward products with this weight read as their input
        forward = g.forward_nodes()
        for u in g.param_readers(fqn):
            for prod in ([u] if u.target in (aten.mm.default, aten.addmm.default) else list(u.users)):
                if prod not in forward:  # the input gradient's product, mm(dY, W)
                    continue
                if prod.target is aten.mm.default:
                    forward_inputs.add(_strip(prod.args[0]))
                elif prod.target is aten.addmm.default:
                    forward_inputs.add(_strip(prod.args[1]))
        for i, a in enumerate(mm.args[:2]):
            transposed = a.target is aten.t.default
            x2d = a.args[0] if transposed else a
            val = x2d.meta["val"]
            if _strip(x2d) not in forward_inputs or val.dim() != 2 or val.shape[1] != c_in:
                continue
            x_k = self._forward_copy(g, self._in_forward(g, x2d, forward), 1, k)
            new = x_k
            if transposed:
                with g.graph.inserting_before(mm):
                    new = g.graph.call_function(aten.t.default, (x_k,))
            args = list(mm.args)
            args[i] = new
            mm.args = tuple(args)
            g.grad_slices[fqn] = (1, k)
            return k
        raise ConfigError(where_what_got(f"{_WHERE}.scheme[{fqn!r}]", "a weight gradient mm(dY^T, X) of a Linear",
                                         mm.format_node()[:120], "use 0 or 1 for this parameter"))

    def _narrow_conv(self, g: TrainGraph, fqn: str, item: fx.Node, r: float, shape) -> int:
        bwd = item.args[0]
        grad_out, x, w, _bias_sizes, stride, padding, dilation, transposed, out_pad, groups, mask = bwd.args
        if transposed:
            raise ConfigError(where_what_got(f"{_WHERE}.scheme[{fqn!r}]", "a Conv (not transposed)",
                                             "a transposed convolution", "use 0 or 1 for this parameter"))
        depthwise = groups > 1
        if depthwise and (groups != shape[0] or shape[1] != 1):
            raise ConfigError(where_what_got(f"{_WHERE}.scheme[{fqn!r}]", "a Conv with groups 1 or depthwise",
                                             f"groups={groups}", "use 0 or 1 for this parameter"))
        c = shape[0] if depthwise else shape[1]
        k = math.ceil(r * c)
        x_k = self._forward_copy(g, self._in_forward(g, x, g.forward_nodes()), 1, k)
        with g.graph.inserting_before(bwd):
            w_k = g.graph.call_function(aten.slice.Tensor, (w, 0 if depthwise else 1, 0, k))
            dy = grad_out
            if depthwise:  # input channel c feeds output channel c only
                dy = g.graph.call_function(aten.slice.Tensor, (grad_out, 1, 0, k))
            new = g.graph.call_function(aten.convolution_backward.default,
                                        (dy, x_k, w_k, None, stride, padding, dilation, False, out_pad,
                                         k if depthwise else 1, [False, True, False]))
            dw = g.graph.call_function(operator.getitem, (new, 1))
        item.replace_all_uses_with(dw)
        if g.grad_of[fqn] is item:
            g.grad_of[fqn] = dw
        # the original keeps the input and bias gradients; it no longer reads the saved input: a zero-stride
        # stand-in of its shape (no storage) replaces it
        if mask[0] or mask[2]:
            with g.graph.inserting_before(bwd):
                zero = g.graph.call_function(aten.zeros.default, ([],), {"dtype": x.meta["val"].dtype,
                                                                         "device": x.meta["val"].device})
                stand_in = g.graph.call_function(aten.expand.default, (zero, list(x.meta["val"].shape)))
            args = list(bwd.args)
            args[1] = stand_in
            args[10] = [mask[0], False, mask[2]]
            bwd.args = tuple(args)
        g.grad_slices[fqn] = (0 if depthwise else 1, k)
        return k

    # ---- 1-bit ReLU masks ---------------------------------------------------------------------------------

    def _relu_masks(self, g: TrainGraph) -> int:
        bwd = g.backward_nodes()
        count = 0
        for n in list(g.graph.nodes):
            if n.target is aten.threshold_backward.default and n.args[2] == 0:
                grad, act = n.args[0], n.args[1]
                lo, hi = 0.0, math.inf
            elif n.target is aten.hardtanh_backward.default:
                grad, act, lo, hi = n.args
            else:
                continue
            src = act  # the activation (autograd saves a detached alias of it)
            while src.target is aten.detach.default:
                src = src.args[0]
            others = [u for a in [src, *detached(src)] for u in a.users if u in bwd and u is not n
                      and u.target is not aten.detach.default]
            if others:  # the activation is saved anyway: a mask would only add bytes
                continue
            with g.graph.inserting_after(src):
                bits = g.graph.call_function(torch.ops.memfit.pack_mask.default, (src, float(lo), float(hi)))
            bits.meta[FORWARD_KEY] = True
            with g.graph.inserting_before(n):
                new = g.graph.call_function(torch.ops.memfit.mask_grad.default, (grad, bits))
            n.replace_all_uses_with(new)
            count += 1
        return count
