"""remat: activation recomputation. ``"free"``: what costs no memory; ``"budget"``: the cheapest rest too.

Rewrites: a forward value the backward reads (a saved activation) is recomputed in the backward, right
before its first backward reader, when it is cheap (a pointwise op, ``cat`` or a dtype copy) and every
input it needs is already there at that point: a placeholder (parameter, buffer, batch), a value the
backward reads at or after that point anyway, or another value recomputed the same way. The forward
copy then dies at its last forward use. Views of the value taken in the forward and read in the
backward are replayed on the recomputed copy. Nothing else's lifetime grows, so the peak can only
fall; the price is the recomputed elementwise FLOPs (reported in ``stats["recomputed_flops"]``).

Mode ``"budget"`` (chosen by the planner) frees at least ``free_bytes`` more: it adds saved values
greedily by recomputation FLOPs per byte freed, each with the closure of forward values it needs that
are not live at that point (recomputed too, e.g. a matmul and the norm feeding it), until the freed
bytes reach ``free_bytes`` or nothing recomputable is left.

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
from ..graph import TrainGraph, aliases, is_view_op, node_flops, saved_activations, storage_root, value_nbytes
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
    mode: Literal["free", "budget"] = "free"
    free_bytes: int = 0  # budget mode: saved bytes to free beyond the free recomputations
    before = ("fused_update",)
    joint_ok = True  # also runs on torch.compile's joint graphs

    def __post_init__(self):
        if self.mode not in ("free", "budget"):
            raise ConfigError(where_what_got("remat.mode", "'free' or 'budget'", repr(self.mode),
                                             "use 'free' (lossless, no memory cost) or 'budget' with free_bytes"))
        if not (isinstance(self.free_bytes, int) and self.free_bytes >= 0):
            raise ConfigError(where_what_got("remat.free_bytes", "an int >= 0", repr(self.free_bytes),
                                             "bytes of saved activations to free by recomputation"))

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
        if self.mode == "budget":
            self._extend(chosen, saved, forward, protected, last_use, first_bwd)
        _settle(chosen)
        return chosen

    def _extend(self, chosen, saved, forward, protected, last_use, first_bwd) -> None:
        """Budget mode: add the cheapest saved values (FLOPs per byte, closure included) until free_bytes."""

        def recomputable(n: fx.Node) -> bool:
            if n.op != "call_function" or n not in forward or n in protected:
                return False
            if n.target is operator.getitem:
                return True
            return isinstance(n.target, torch._ops.OpOverload) and \
                torch.Tag.nondeterministic_seeded not in n.target.tags and not n.target._schema.is_mutable

        def closure(v: fx.Node, point: int) -> list[fx.Node] | None:
            need: dict[fx.Node, None] = {}
            stack = [v]
            while stack:
                for inp in stack.pop().all_input_nodes:
                    r = storage_root(inp)
                    if r.op == "placeholder" or r in chosen or r in need or r is v:
                        continue
                    if r in saved and last_use[r] >= point:
                        continue  # live at that point anyway
                    if not recomputable(r):
                        return None
                    need[r] = None
                    stack.append(r)
            return list(need)

        def cost(v: fx.Node) -> float:
            need = closure(v, first_bwd[v])
            if need is None:
                return float("inf")
            return sum(node_flops(n) for n in (v, *need)) / max(saved[v], 1)

        freed = 0
        for v in sorted((v for v in saved if v not in chosen and recomputable(v)), key=lambda v: (cost(v), v.name)):
            if freed >= self.free_bytes:
                break
            point = first_bwd[v]
            need = closure(v, point)  # again: earlier picks may have made it cheaper
            if need is None:
                continue
            for n in (v, *need):
                chosen[n] = min(chosen.get(n, point), first_bwd.get(n, point), point)
                freed += saved.get(n, 0)
            for n in (v, *need):
                for inp in n.all_input_nodes:
                    root = storage_root(inp)
                    if root in chosen:
                        self._pull_earlier(root, chosen[n], chosen)

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
                flops += node_flops(n)
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


def _settle(chosen: dict[fx.Node, int]) -> None:
    """Every recomputed input must be ready no later than anything recomputed from it (fixpoint)."""
    changed = True
    while changed:
        changed = False
        for n, point in list(chosen.items()):
            for inp in n.all_input_nodes:
                root = storage_root(inp)
                if root in chosen and chosen[root] > point:
                    chosen[root] = point
                    changed = True


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
