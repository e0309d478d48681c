"""sink: the schedule, a node order with a lower peak, for the plan and the runtime alike.

Registered as the pass ``"sink"``: every named pipeline ends with it (``passes.base.PIPELINES``) and the
planner appends it to an explicit ``passes=`` list, so it runs inside the Pipeline (linted, re-checked)
like every other rewrite. Lossless: only the order changes, never a value.

``sink(g)`` moves each pure node to just before its first reader whenever that extends no input's
lifetime (every input is persistent or read at or after that point anyway). The node's own output
then lives for a shorter span and nothing else lives longer, so no live set grows and the peak can
only fall. Impure nodes (memfit's in-place updates, anything with a mutable schema) never move, and
nothing moves across them out of order. Together with the update placement of ``fused_update`` and
freeing at last use (the lowering), this is the schedule the planner plans and the runtime runs.
"""

from __future__ import annotations

import bisect

from torch import fx

from ..graph import TrainGraph, aliases, storage_root
from .base import Pass, PassResult, register_pass


def _pure(n: fx.Node) -> bool:
    return n.op == "call_function" and not n.is_impure()


_GAP = 1 << 64  # room between neighbouring order keys: 64 halvings before a relabel


def sink(g: TrainGraph) -> int:
    """Move pure nodes towards their first reader where that frees memory sooner; returns moves made.

    Nodes are visited once, in reverse of the order they had on entry. Positions are integer order keys
    kept in step with each move (a moved node takes a key between its new neighbours; the whole graph is
    relabelled, order unchanged, when two neighbours run out of room) and impure nodes are found by
    bisection, so a node costs O(log N) plus a scan of its inputs' readers, where re-indexing the graph and
    re-testing purity per node made the pass quadratic (15 s of a 4x64 LSTM's 50 s optimize()). The moves,
    and so the schedule, are the same as before.
    """
    moved = 0
    nodes = list(g.graph.nodes)
    key: dict[fx.Node, int] = {}
    pure = {n: _pure(n) for n in nodes}  # a call_function's purity depends on its target only
    # impure call_functions never move, and nothing moves across them: their keys, sorted
    barriers: list[int] = []

    def relabel() -> None:
        key.clear()
        barriers.clear()
        for i, m in enumerate(g.graph.nodes):
            key[m] = i * _GAP
            if m.op == "call_function" and not pure[m]:
                barriers.append(key[m])

    relabel()
    readers: dict[fx.Node, list[fx.Node]] = {}  # storage root -> every node reading it or one of its views

    def last_read(root: fx.Node) -> int:
        if root not in readers:
            readers[root] = [u for a in aliases(root) for u in a.users]
        return max((key[u] for u in readers[root]), default=key[root])

    for n in reversed(nodes):
        if not pure[n] or not n.users:
            continue
        first = min(n.users, key=key.__getitem__)
        if first.op == "output" or first.prev is n:
            continue
        # every input must stay live until `first` anyway (or be persistent), else sinking extends it
        ok = True
        for inp in n.all_input_nodes:
            root = storage_root(inp)
            if root.op == "placeholder":
                continue
            if last_read(root) < key[first]:
                ok = False
                break
        # never move across an impure node (ordering of in-place updates and reads stays as it was)
        if ok:
            i = bisect.bisect_right(barriers, key[n])
            if i < len(barriers) and barriers[i] < key[first]:
                ok = False
        if ok:
            before = first.prev
            first.prepend(n)
            moved += 1
            lo, hi = key[before], key[first]
            if hi - lo >= 2:
                key[n] = (lo + hi) // 2
            else:
                relabel()
    if moved:
        g.graph.lint()
        g.recompile()
    return moved


@register_pass("sink")
class Sink(Pass):
    """The schedule as a pass: ``sink(g)``; always the last pass (the planner and ``Pipeline`` put it there)."""

    joint_ok = True
    last = True
    keeps_meta = True  # only the order changes

    def run(self, g: TrainGraph) -> PassResult:
        moved = sink(g)
        g.info["schedule"] = {"sunk": moved}
        return PassResult(g, bool(moved), {"sunk": moved})
