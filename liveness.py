"""The one memory model: which storage each node owns, when it is allocated and when it dies.

Every byte figure memfit predicts comes from here: ``runtime.memory.plan_memory`` (the plan the
runtime runs), ``passes.remat`` (which saved values to recompute) and the planner (the effect of a
choice before any pass runs). The rules:

- a node owns a storage unless it is a view, which shares its base's (``graph.storage_root``);
- a tuple-returning op's elements are owned by the ``getitem`` nodes reading them and exist from the
  moment the tuple op ran; elements nobody reads live as long as the tuple op's own storage;
- a storage is allocated at its owner and dies after the last node reading it or any of its views;
  one an output holds lives to the end of the step (``held_end``), except gradients the update
  consumes where they are made (``consumed``);
- placeholders (parameters, buffers, state, the batch) are persistent and not in this model.

``Storages`` holds those facts for a graph as it is ordered now, with per-node sizes and FLOPs
cached (the graph does not change while it is planned). ``Timeline`` is the live-byte curve in half
steps (node ``i`` at ``2i + 1``, anything inserted before it at ``2i``) with the incremental form the
levers use: the peak after adding or removing a few spans, without replanning the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import fx

from .graph import TrainGraph, node_flops, storage_root, value_nbytes


@dataclass
class Storages:
    """Storages of a graph's intermediates in schedule order (see the module docstring)."""

    nodes: list[fx.Node]
    index: dict[fx.Node, int]
    alloc: dict[fx.Node, int] = field(default_factory=dict)  # owner -> index of the node that allocates it
    last: dict[fx.Node, int] = field(default_factory=dict)  # owner -> index of its last reader (len(nodes): held)
    nbytes: dict[fx.Node, int] = field(default_factory=dict)  # owner -> bytes it owns
    _roots: dict[fx.Node, Any] = field(default_factory=dict, repr=False)
    _flops: dict[fx.Node, int] = field(default_factory=dict, repr=False)
    _size: dict[fx.Node, int] = field(default_factory=dict, repr=False)

    def root(self, n: fx.Node) -> fx.Node:
        r = self._roots.get(n)
        if r is None:
            r = self._roots[n] = storage_root(n)
        return r

    def flops(self, n: fx.Node) -> int:
        f = self._flops.get(n)
        if f is None:
            f = self._flops[n] = node_flops(n)
        return f

    def size(self, n: fx.Node) -> int:
        """Bytes of ``n``'s whole value (every element of a tuple)."""
        s = self._size.get(n)
        if s is None:
            s = self._size[n] = value_nbytes(n.meta.get("val"))
        return s

    @property
    def held_end(self) -> int:
        return len(self.nodes)

    def by_alloc(self) -> dict[int, list[fx.Node]]:
        out: dict[int, list[fx.Node]] = {}
        for owner, i in self.alloc.items():
            out.setdefault(i, []).append(owner)
        return out


def storages(g: TrainGraph, *, consumed: set[fx.Node] | frozenset = frozenset()) -> Storages:
    """The storages of ``g``'s intermediates as ordered now; ``consumed`` output roots are not held."""
    nodes = list(g.graph.nodes)
    s = Storages(nodes, {n: i for i, n in enumerate(nodes)})
    for i, n in enumerate(nodes):
        if n.op == "output":
            for inp in n.all_input_nodes:
                r = s.root(inp)
                if r in s.alloc and r not in consumed:
                    s.last[r] = len(nodes)
            continue
        if n.op != "call_function":
            continue
        owner = s.root(n)
        if owner is n and n not in s.alloc:
            val = n.meta.get("val")
            if n.target is operator.getitem:  # exists from the moment the tuple op ran
                s.alloc[n], s.nbytes[n] = s.index[n.args[0]], value_nbytes(val)
            elif isinstance(val, (tuple, list)):  # elements nobody reads live as long as the tuple
                read = {u.args[1] for u in n.users if u.target is operator.getitem}
                s.alloc[n] = i
                s.nbytes[n] = sum(value_nbytes(v) for k, v in enumerate(val) if k not in read)
            else:
                s.alloc[n], s.nbytes[n] = i, value_nbytes(val)
            s.last[n] = i
        for inp in n.all_input_nodes:
            r = s.root(inp)
            if r in s.alloc and s.last[r] < i:
                s.last[r] = i
    return s


class Timeline:
    """Live bytes of intermediates at every half step, as a difference array folded into a prefix sum.

    ``with_spans`` is the incremental form: the curve (and peak) after adding spans ``(lo, hi, bytes)``
    (negative bytes remove), costing one pass over the timeline and nothing over the graph."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.peak = int(values.max()) if len(values) else 0

    @classmethod
    def of(cls, s: Storages) -> Timeline:
        length = 2 * len(s.nodes) + 1
        spans = [(2 * s.alloc[o] + 1, half_end(s, o), b) for o, b in s.nbytes.items() if b]
        return cls(add_spans(np.zeros(length, dtype=np.int64), spans))

    def with_spans(self, spans: list[tuple[int, int, int]]) -> Timeline:
        return Timeline(add_spans(self.values, spans))

    def max_over(self, lo: int, hi: int) -> int:
        return int(self.values[lo:hi + 1].max()) if lo <= hi else 0

    def area_above(self, level: int) -> int:
        return int(np.maximum(self.values - level, 0).sum())


def half_end(s: Storages, owner: fx.Node) -> int:
    """The half step of ``owner``'s last reader (``2 * len(nodes)`` when an output holds it)."""
    last = s.last[owner]
    return 2 * len(s.nodes) if last >= len(s.nodes) else 2 * last + 1


def add_spans(timeline: np.ndarray, spans: list[tuple[int, int, int]]) -> np.ndarray:
    """``timeline`` plus ``bytes`` over every ``[lo, hi]`` of ``spans`` (a new array)."""
    if not spans:
        return timeline
    lo, hi, b = (np.fromiter((sp[k] for sp in spans), dtype=np.int64, count=len(spans)) for k in range(3))
    diff = np.zeros(len(timeline) + 1, dtype=np.int64)
    np.add.at(diff, lo, b)
    np.add.at(diff, hi + 1, -b)
    return timeline + np.cumsum(diff[:-1])
