"""remat: activation recomputation. Mode ``"free"``: recompute what costs no memory to recompute.

Rewrites: a forward value the backward reads (a saved activation) is recomputed in the backward, right
before its first backward reader, when it is cheap (a pointwise op, ``cat`` or a dtype copy) and every
input it needs is already there at that point: a placeholder (parameter, buffer, batch), a value the
backward reads at or after that point anyway, or another value recomputed the same way. The forward
copy then dies at its last forward use. Views of the value taken in the forward and read in the
backward are replayed on the recomputed copy. Nothing else's lifetime grows, so the peak can only
fall; the price is the recomputed elementwise FLOPs (reported in ``stats["recomputed_flops"]``).

Requires: a captured TrainGraph; runs before ``fused_update`` (a recomputed node may read a parameter,
and the update must come after every read). Guarantees: bitwise-identical values (the same ops on the
same inputs). Budget-driven recomputation of expensive values (min-cut / knapsack) is the planner's
lever and builds on this pass's rewiring.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph, aliases, is_view_op, saved_activations, storage_root, value_nbytes
from .base import MemoryEffect, Pass, PassResult, register_pass

_CHEAP = {"aten::cat", "aten::_to_copy", "aten::clone"}


def is_cheap(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:  # dropout masks must not be redrawn
        return False
    return torch.Tag.pointwise in target.tags or target._schema.name in _CHEAP


@register_pass("remat")
@dataclass(frozen=True)
class Remat(Pass):
    mode: Literal["free"] = "free"
    before = ("fused_update",)
    joint_ok = True  # also runs on torch.compile's joint graphs

    def __post_init__(self):
        if self.mode != "free":
            raise ConfigError(where_what_got("remat.mode", "'free'", repr(self.mode),
                                             "budget-driven recomputation is chosen by the planner"))

    def select(self, g: TrainGraph) -> dict[fx.Node, int]:
        """The saved values to recompute, each with the graph index it must be ready by."""
        nodes = list(g.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        forward = g.forward_nodes()
        backward = g.backward_nodes()
        protected = {storage_root(v) for v in (g.loss, *g.buffer_updates.values(), *g.forward_outputs)}
        saved = saved_activations(g)

        def backward_readers(root: fx.Node) -> list[fx.Node]:
            return [u for a in aliases(root) for u in a.users if u in backward]

        last_use = {}
        first_bwd = {}
        for root in saved:
            readers = backward_readers(root)
            last_use[root] = max(index[u] for u in readers)
            first_bwd[root] = min(index[u] for u in readers)

        chosen: dict[fx.Node, int] = {}
        for n in nodes:  # forward order: inputs are decided before their users
            if n not in saved or n in protected or not is_cheap(n):
                continue
            point = first_bwd[n]
            ok = True
            for inp in n.all_input_nodes:
                root = storage_root(inp)
                if root.op == "placeholder" or root in chosen:
                    continue
                if root in forward and root in last_use and last_use[root] >= point:
                    continue
                ok = False
                break
            if ok:
                chosen[n] = point
                for inp in n.all_input_nodes:  # inputs recomputed too must be ready earlier
                    root = storage_root(inp)
                    if root in chosen:
                        self._pull_earlier(root, point, chosen)
        return chosen

    def _pull_earlier(self, n: fx.Node, point: int, chosen: dict[fx.Node, int]) -> None:
        if chosen[n] <= point:
            return
        chosen[n] = point
        for inp in n.all_input_nodes:
            root = storage_root(inp)
            if root in chosen:
                self._pull_earlier(root, point, chosen)

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        chosen = self.select(g)
        return MemoryEffect(transient=-sum(value_nbytes(n.meta.get("val")) for n in chosen))

    def run(self, g: TrainGraph) -> PassResult:
        chosen = self.select(g)
        if not chosen:
            return PassResult(g, False)
        nodes = list(g.graph.nodes)
        backward = g.backward_nodes()
        copies: dict[fx.Node, fx.Node] = {}
        flops = 0

        def recompute(n: fx.Node) -> fx.Node:
            """The backward copy of ``n`` (a chosen root or a view of one), made once."""
            nonlocal flops
            if n in copies:
                return copies[n]
            args = fx.map_arg((n.args, n.kwargs), lambda a: recompute(a) if storage_root(a) in chosen else a)
            if n in chosen:
                where = g.graph.inserting_before(nodes[chosen[n]])
            else:  # a view of a chosen root: replay it right after the copy it views (views cost nothing)
                assert is_view_op(n) or n.target is operator.getitem, n
                where = g.graph.inserting_after(args[0][0])
            with where:
                new = g.graph.call_function(n.target, args[0], args[1])
            new.meta.update({k: v for k, v in n.meta.items() if k in ("val", "stack_trace", "nn_module_stack")})
            new.meta["memfit.recomputed"] = n.name
            if n in chosen:
                flops += int(getattr(n.meta.get("val"), "numel", lambda: 0)())
            copies[n] = new
            return new

        rewired = 0
        for root in sorted(chosen, key=lambda r: chosen[r], reverse=True):
            for a in aliases(root):
                for u in list(a.users):
                    if u in backward and u not in copies.values():
                        u.replace_input_with(a, recompute(a))
                        rewired += 1
        _topo_fix(g)
        stats = {"recomputed": len(chosen), "rewired_reads": rewired, "recomputed_flops": flops,
                 "freed_bytes": sum(value_nbytes(n.meta.get("val")) for n in chosen)}
        g.info["remat"] = stats
        return PassResult(g, True, stats)


def _topo_fix(g: TrainGraph) -> None:
    """Move any recomputed node that landed before one of its inputs to just after the input (stable)."""
    changed = True
    while changed:
        changed = False
        index = {n: i for i, n in enumerate(g.graph.nodes)}
        for n in list(g.graph.nodes):
            if "memfit.recomputed" not in n.meta:
                continue
            late = max((index[i] for i in n.all_input_nodes), default=-1)
            if late > index[n]:
                pred = list(g.graph.nodes)[late]
                pred.append(n)
                changed = True
                break
