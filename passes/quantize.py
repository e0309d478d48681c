"""quantize_state: Adam's moments stored block-wise quantized, 8-bit (or 4-bit), as in 8-bit optimizers.

Rewrites: each ``memfit::adamw_update`` node of a selected parameter with at least ``min_numel``
elements into ``memfit::adam8bit_update``, whose moments are uint8 codes of a non-linear dynamic
map (signed for the first moment, unsigned for the second) with one fp32 absmax per block of 256
(128 at 4 bits, two codes packed per byte); the update dequantizes a block, steps and requantizes
it. Smaller tensors keep fp32 moments (their error costs more than their bytes save). Low-rank
moments of ``memfit::lowrank_update`` nodes (``lowrank`` ran first) are quantized the same way.

``overrides`` gives parameters their own ``bits``: ``{glob: {"bits": 4}}`` (or ``(glob, dict)`` pairs,
the first matching glob wins; the same form as ``lowrank``'s overrides); ``targets`` says which
parameters are quantized at all. The planner writes ``targets`` with the parameters it chose.

Requires ``fused_update``; runs after ``lowrank`` when both are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .. import projection as pj
from ..errors import ConfigError, where_what_got
from ..graph import NAME_KEY, StateSpec, TrainGraph
from ..ops import adam8bit_workspace, args_of, op_call, replace_args, state_block
from .base import MemoryEffect, Option, Pass, PassResult, refuse_spike_clipping, register_pass
from .lowrank import Overrides, normalize_overrides, override_for

_ADAMW = torch.ops.memfit.adamw_update.default
_LOWRANK = torch.ops.memfit.lowrank_update.default


def quantized_bytes(numel: int, bits: int) -> int:
    """Bytes of two moments of ``numel`` values at ``bits`` (codes plus one fp32 absmax per block each)."""
    per = numel if bits == 8 else (numel + 1) // 2
    return 2 * per + 2 * 4 * -(-numel // state_block(bits))


@register_pass("quantize_state")
@dataclass(frozen=True)
class QuantizeState(Pass):
    bits: Literal[8, 4] = 8
    min_numel: int = 4096
    targets: str | tuple[str, ...] = "*"
    overrides: Overrides = ()

    requires = ("fused_update",)
    before = ("quantize_weights",)
    lossless = False

    def __post_init__(self):
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        where = "passes['quantize_state']"
        object.__setattr__(self, "overrides", normalize_overrides(where, self.overrides, ("bits",)))
        bits = [(where, self.bits)] + [(f"{where}.overrides[{glob!r}]", dict(kv)["bits"])
                                       for glob, kv in self.overrides if kv]
        for here, value in bits:
            if value not in (8, 4) or isinstance(value, bool):
                raise ConfigError(where_what_got(f"{here}.bits", "8 or 4", repr(value), "pick one"))
        if not (isinstance(self.min_numel, int) and self.min_numel >= 1):
            raise ConfigError(where_what_got("passes['quantize_state'].min_numel", "an int >= 1",
                                             repr(self.min_numel), "tensors below it keep fp32 state; e.g. 4096"))

    def bits_for(self, fqn: str) -> int:
        """The bits parameter ``fqn`` is stored at: its first matching override's, else ``bits``."""
        return override_for(self.overrides, fqn).get("bits", self.bits)

    def _selected(self, g: TrainGraph) -> list[tuple[str, int]]:
        """(fqn, moment numel) of every update this pass rewrites."""
        g.check_globs(self.targets, "passes['quantize_state'].targets")
        g.check_globs([glob for glob, _ in self.overrides], "passes['quantize_state'].overrides")
        out = []
        for fqn in g.match(self.targets, list(g.updates)):
            node = g.updates[fqn]
            if node.target is _ADAMW:
                numel = g.params[fqn].meta["val"].numel()
            elif node.target is _LOWRANK and args_of(node).state_bits == 32:
                numel = math.prod(pj.low_shape(tuple(g.params[fqn].meta["val"].shape), args_of(node).rank))
            else:
                continue
            if numel >= self.min_numel:
                out.append((fqn, numel))
        return out

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        per_param = {f: quantized_bytes(n, self.bits_for(f)) - 8 * n for f, n in self._selected(g)}
        return MemoryEffect(persistent=sum(per_param.values()), per_param=per_param)

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """At ``levers`` near-lossless or lossy: 8-bit moments for every parameter with an fp32 AdamW update
        of at least ``min_numel`` elements (near-lossless), costed exactly (codes plus block absmax); the
        transient is the 8-bit op's workspace (``ops.adam8bit_workspace``)."""
        if levers not in ("near-lossless", "lossy", "adapters"):
            return []
        eff = cls(bits=8).memory_effect(g).per_param
        out = []
        for fqn, delta in eff.items():
            node = g.updates[fqn]
            if node.target is not _ADAMW or node.kwargs.get("spike_threshold"):
                continue
            param, grad = g.params[fqn].meta["val"], args_of(node).grad.meta["val"]
            copy = 0 if grad.is_contiguous() or args_of(node).micro_steps > 1 else param.numel() * 4
            work = adam8bit_workspace(param.numel(), param.dtype != torch.float32, copy, 8,
                                      bool(g.info.get("triton")))
            out.append(Option("quantize_state", fqn, "8-bit", (("bits", 8),), persistent=delta, transient=work,
                              lossiness="near-lossless"))
        return out

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        return "quantize_state", {"bits": 8, "targets": tuple(o.target for o in chosen)}

    def run(self, g: TrainGraph) -> PassResult:
        chosen = self._selected(g)
        saved = 0
        per_param = {}
        for fqn, numel in chosen:
            old = g.updates[fqn]
            refuse_spike_clipping(old, "quantize_state", fqn)
            bits = per_param[fqn] = self.bits_for(fqn)
            suffix = ("_q8" if bits == 8 else "_q4") if old.target is _ADAMW else \
                ("_lowrank_q8" if bits == 8 else "_lowrank_q4")
            per = numel if bits == 8 else (numel + 1) // 2
            kind = "optimizer"
            q_m = g.add_state(f"{fqn}::exp_avg{suffix}", StateSpec((per,), torch.uint8, fqn, kind))
            q_v = g.add_state(f"{fqn}::exp_avg_sq{suffix}", StateSpec((per,), torch.uint8, fqn, kind))
            absmax = g.add_state(f"{fqn}::absmax{suffix}",
                                 StateSpec((2, -(-numel // state_block(bits))), torch.float32, fqn, kind))
            a = args_of(old)
            with g.graph.inserting_before(old):
                if old.target is _ADAMW:
                    new = op_call(g.graph, torch.ops.memfit.adam8bit_update.default, param=a.param, grad=a.grad,
                                  q_m=q_m, q_v=q_v, absmax=absmax, grad_acc=a.grad_acc, lr=a.lr,
                                  step=a.step, micro_step=a.micro_step, beta1=a.beta1, beta2=a.beta2, eps=a.eps,
                                  weight_decay=a.weight_decay, micro_steps=a.micro_steps, bits=bits)
                else:
                    new = g.graph.call_function(_LOWRANK, *replace_args(old, exp_avg=q_m, exp_avg_sq=q_v,
                                                                        absmax=absmax, state_bits=bits))
            old_states = [a.exp_avg.meta[NAME_KEY], a.exp_avg_sq.meta[NAME_KEY]]
            old.replace_all_uses_with(new)
            g.graph.erase_node(old)
            g.updates[fqn] = new
            for name in old_states:
                g.remove_state(name)
            saved += 8 * numel - quantized_bytes(numel, bits)
        stats = {"quantized": [f for f, _ in chosen], "bits": self.bits, "per_param": per_param,
                 "state_bytes_saved": saved}
        g.info["quantize_state"] = stats
        return PassResult(g, bool(chosen), stats)
