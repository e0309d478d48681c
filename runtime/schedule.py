"""Scheduling: a node order with a lower peak, for the plan and the runtime alike.

``sink(g)`` moves each pure node to just before its first reader whenever that extends no input's
lifetime (every input is persistent or read at or after that point anyway). The node's own output
then lives for a shorter span and nothing else lives longer, so no live set grows and the peak can
only fall. Impure nodes (memfit's in-place updates, anything with a mutable schema) never move, and
nothing moves across them out of order. Together with the update placement of ``fused_update`` and
freeing at last use (the lowering), this is the schedule the planner plans and the runtime runs.
"""

from __future__ import annotations

from torch import fx

from ..graph import TrainGraph, aliases, storage_root


def _pure(n: fx.Node) -> bool:
    return n.op == "call_function" and not n.is_impure()


def sink(g: TrainGraph) -> int:
    """Move pure nodes towards their first reader where that frees memory sooner; returns moves made."""
    moved = 0
    nodes = list(g.graph.nodes)
    for n in reversed(nodes):
        if not _pure(n) or not n.users:
            continue
        index = {m: i for i, m in enumerate(g.graph.nodes)}
        first = min(n.users, key=lambda u: index[u])
        if first.op == "output" or index[first] == index[n] + 1:
            continue
        # every input must stay live until `first` anyway (or be persistent), else sinking extends it
        ok = True
        for inp in n.all_input_nodes:
            root = storage_root(inp)
            if root.op == "placeholder":
                continue
            last = max((index[u] for a in aliases(root) for u in a.users), default=index[root])
            if last < index[first]:
                ok = False
                break
        # never move across an impure node (ordering of in-place updates and reads stays as it was)
        if ok and any(not _pure(m) and m.op == "call_function"
                      for m in nodes[index[n] + 1:index[first]]):
            ok = False
        if ok:
            first.prepend(n)
            moved += 1
            nodes = list(g.graph.nodes)
    if moved:
        g.graph.lint()
        g.recompile()
    return moved
