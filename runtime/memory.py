"""Memory accounting over a TrainGraph: bytes per storage, liveness in schedule order, predicted peak.

Each storage is owned by the node that allocates it (views share their base's storage; tuple
outputs own one storage per element, taken by the ``getitem`` that reads it). A storage is live from
its producer to the last node reading it or any of its views, which is exactly when the lowered code
drops it. Placeholders (parameters, buffers, optimizer/pass state, the batch) are live throughout.
The predicted peak is the persistent bytes plus the largest sum of live intermediates at any node.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from ..graph import TrainGraph, saved_activations, value_nbytes
from ..liveness import storages
from .lower import workspace_bytes

PERSISTENT = {"param": "parameters", "buffer": "buffers", "input": "batch", "hparam": "batch"}
INTERMEDIATE = ("gradients", "saved activations", "temporaries")


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted (and, once run, measured) memory of one training step."""

    peak_bytes: int
    persistent: dict[str, int]
    at_peak: dict[str, int]
    peak_node: str
    saved_activation_bytes: int
    gradient_bytes: int
    passes: tuple[str, ...]
    budget_bytes: int | None = None
    measured_peak_bytes: int | None = None
    largest_at_peak: tuple[tuple[str, int, str], ...] = ()  # (tensor, bytes, category), five largest
    by_layer: dict[str, int] = field(default_factory=dict)  # bytes live at the peak, per layer (node_layers)
    # bytes per category at every node of the schedule (persistent categories are constant lines)
    category_timeline: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    node_names: tuple[str, ...] = field(default=(), repr=False)
    backward_start: int | None = None  # index of the first node after the loss
    # (layers captured, layers planned) when the figures come from identical blocks replicated
    # (runtime.blocks): the timeline and node names are then those of the 2-layer capture
    replicated: tuple[int, int] | None = None
    # per parameter, the optimizer-state setting the planner chose (absent: fp32 state as captured)
    state_choice: dict[str, str] = field(default_factory=dict)
    # what was fused: graph.info["fused_cross_entropy"] and graph.info["fuse"] of the planned graph
    fusion: dict[str, dict] = field(default_factory=dict, repr=False)
    # data parallel: the process group's size, how state is sharded, and per rank planned (sharded state):
    # {"rank", "peak_bytes", "state_bytes", "state_bytes_all", "param_bytes", "parameters_owned"}; this plan is
    # rank ``rank``'s: the highest-peak rank's, or in optimize() the calling rank's
    world: int = 1
    shard: str = "none"
    ranks: tuple[dict, ...] = field(default=(), repr=False)
    rank: int | None = None

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """Draw the memory timeline of one step to ``path`` (needs matplotlib: pip install memfit[plot])."""
        from .plot import plot_memory  # lazy: plot imports this module

        return plot_memory(self, path, title=title)
    timeline: tuple[int, ...] = field(default=(), repr=False)

    def with_measured(self, peak_bytes: int) -> MemoryPlan:
        return dataclasses.replace(self, measured_peak_bytes=int(peak_bytes))

    def __str__(self) -> str:
        rows = [("category", "at peak")]
        for k, v in self.at_peak.items():
            rows.append((k, fmt_bytes(v)))
        rows.append(("predicted peak", fmt_bytes(self.peak_bytes)))
        if self.measured_peak_bytes is not None:
            err = (self.measured_peak_bytes - self.peak_bytes) / max(self.peak_bytes, 1)
            rows.append(("measured peak", f"{fmt_bytes(self.measured_peak_bytes)} ({err:+.1%} vs predicted)"))
        if self.budget_bytes is not None:
            rows.append(("budget", fmt_bytes(self.budget_bytes)))
        width = max(len(r[0]) for r in rows)
        lines = [f"MemoryPlan (passes: {', '.join(self.passes) or 'none'}; peak at node {self.peak_node})"]
        if self.replicated:
            lines.append(f"  (one block planned and replicated: {self.replicated[1]} layers from captures of "
                         f"{self.replicated[0] - 1} and {self.replicated[0]}; timeline and node names are the "
                         f"{self.replicated[0]}-layer step's)")
        lines += [f"  {a:<{width}}  {b:>12}" for a, b in rows]
        lines.append(f"  {'saved activations (all)':<{width}}  {fmt_bytes(self.saved_activation_bytes):>12}")
        lines.append(f"  {'gradients (all)':<{width}}  {fmt_bytes(self.gradient_bytes):>12}")
        if self.largest_at_peak:
            lines.append("  largest live at the peak: " + self.describe_largest())
        lines += self.describe_fusion()
        lines += self.describe_ranks()
        if self.by_layer:
            top = sorted(self.by_layer.items(), key=lambda kv: -kv[1])[:6]
            lines.append("  by layer at the peak: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in top)
                         + (f", ... ({len(self.by_layer)} layers)" if len(self.by_layer) > 6 else ""))
        return "\n".join(lines)

    def describe_ranks(self) -> list[str]:
        """Per-rank lines of a sharded data-parallel plan (none otherwise)."""
        if not self.ranks:
            return []
        what = "optimizer state and weights" if self.shard == "params" else "optimizer state"
        top = max(self.ranks, key=lambda r: r["peak_bytes"])["rank"]
        mine = top if self.rank is None else self.rank
        out = [f"  per rank (world size {self.world}, {what} sharded by parameter; this plan is rank {mine}'s"
               f"{', the highest peak' if mine == top else f'; rank {top} peaks highest'}):"]
        for r in self.ranks:
            out.append(f"    rank {r['rank']}: peak {fmt_bytes(r['peak_bytes'])}, optimizer state "
                       f"{fmt_bytes(r['state_bytes'])} of {fmt_bytes(r['state_bytes_all'])} "
                       f"({r['parameters_owned']} parameters owned)")
        return out

    def describe_fusion(self) -> list[str]:
        """What was fused, one line per pass that fused something (of the captured step when replicated)."""
        out = []
        ce = self.fusion.get("fused_cross_entropy", {})
        for site in ce.get("fused", []):
            out.append(f"  fused linear + cross-entropy on {site['weight']}: {site['tokens']} tokens x "
                       f"{site['vocab']} classes by chunks of {site['chunk']} rows; "
                       f"{fmt_bytes(site['logits_bytes'])} of fp32 logits never whole")
        for reason in ce.get("skipped", []):
            out.append(f"  cross-entropy left unfused: {reason}")
        f = self.fusion.get("fuse")
        if f:
            pro = f" and {f['prologues']} update prologues" if f.get("prologues") else ""
            out.append(f"  fused pointwise: {f['groups']} groups{pro}, {f['kernels']} generated kernels, "
                       f"{f['nodes_fused']} of {f['compute_nodes']} non-matmul nodes ({f['share']:.0%}); "
                       f"{fmt_bytes(f['bytes_not_materialised'])} of intermediates never materialised"
                       + (" (in the captured layers)" if self.replicated else ""))
        return out

    def describe_largest(self) -> str:
        return ", ".join(f"{name} {fmt_bytes(b)} ({cat})" for name, b, cat in self.largest_at_peak)


def fmt_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def layer_of_fqn(fqn: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; ``lm_head.weight`` -> ``lm_head``."""
    parts = fqn.split("::")[0].split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or parts[0]


def node_layers(g: TrainGraph) -> dict[fx.Node, str]:
    """A layer label for every node, from parameter FQNs (captured graphs carry no module stack).

    Parameters and their state take the layer of their FQN. A forward value takes the deepest layer
    feeding it (the layer order is that of first use in the forward); a backward value the shallowest
    layer it reads, since a layer's backward reads the gradient from the layer above and its own saved
    values. Values fed by no parameter are labelled "(inputs)".
    """
    labels: dict[fx.Node, str] = {}
    for fqn, n in g.params.items():
        labels[n] = layer_of_fqn(g.tied.get(fqn, fqn))
    for name, n in g.state.items():
        labels[n] = layer_of_fqn(g.state_specs[name].owner or name)
    forward = g.forward_nodes()
    order: dict[str, int] = {}
    for n in g.graph.nodes:
        if n in forward:
            for inp in n.all_input_nodes:
                if inp in labels and labels[inp] not in order and inp.op == "placeholder":
                    order[labels[inp]] = len(order)
    for n in g.graph.nodes:
        if n.op == "placeholder":
            labels.setdefault(n, "(inputs)")
            continue
        seen = [labels[i] for i in n.all_input_nodes if labels.get(i) in order]
        if not seen:
            labels[n] = "(inputs)" if n in forward else "(loss)"
        else:
            pick = max if n in forward else min
            labels[n] = pick(seen, key=order.__getitem__)
    return labels


def plan_memory(g: TrainGraph, budget_bytes: int | None = None,
                device: torch.device | str = "cpu") -> MemoryPlan:
    """Predicted peak of one step of ``g`` as it is scheduled now, lowered for ``device``."""
    nodes = list(g.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    persistent: dict[str, int] = {}
    resident: list[tuple[str, int, str]] = []
    for n in g.placeholders():
        role = n.meta.get("memfit.role")
        if role == "param" and n.meta.get("memfit.name") in g.tied:
            continue  # one tensor under two names: counted once, under the canonical FQN
        if role == "state":
            spec = g.state_specs[n.meta["memfit.name"]]
            cat = {"optimizer": "optimizer state", "accumulator": "gradient accumulators",
                   "weight": PERSISTENT["param"]}.get(spec.kind, "pass state")
        else:
            cat = PERSISTENT.get(role, "batch")
        persistent[cat] = persistent.get(cat, 0) + value_nbytes(n.meta.get("val"))
        resident.append((n.meta.get("memfit.name", n.name), value_nbytes(n.meta.get("val")), cat))
        if role == "buffer" and n.meta.get("memfit.name") in g.buffer_updates:
            # the Trainer snapshots every buffer the step writes, so a failed step can put it back
            persistent[cat] += value_nbytes(n.meta.get("val"))
            resident.append((f"{n.meta['memfit.name']} (step snapshot)", value_nbytes(n.meta.get("val")), cat))

    st = storages(g)  # the one memory model (memfit.liveness): owners, allocation and last use
    alloc = {i: [(o, st.nbytes[o]) for o in owners] for i, owners in st.by_alloc().items()}
    last_use = st.last
    grad_roots = {st.root(v) for v in g.grad_of.values()}
    saved = {st.root(k) for k in saved_activations(g)}
    category = {o: ("gradients" if o in grad_roots else "saved activations" if o in saved else "temporaries")
                for o in st.alloc}
    frees: dict[int, list[Any]] = {}
    for owner, i in last_use.items():
        frees.setdefault(i, []).append(owner)

    live = dict.fromkeys((*INTERMEDIATE, "kernel workspace"), 0)
    sizes = st.nbytes
    base = sum(persistent.values())
    best, best_at, best_node, best_i = -1, dict(live), "-", -1
    timeline = []
    per_cat: dict[str, list[int]] = {k: [] for k in live}
    for i, n in enumerate(nodes):
        for owner, nbytes in alloc.get(i, ()):
            live[category[owner]] += nbytes
        live["kernel workspace"] = workspace_bytes(n, device)
        total = sum(live.values())
        timeline.append(base + total)
        for k, v in live.items():
            per_cat[k].append(v)
        if total > best:
            best, best_at, best_node, best_i = total, dict(live), n.name, i
        live["kernel workspace"] = 0
        for owner in frees.get(i, ()):
            live[category[owner]] -= sizes[owner]
    # the storages live at the peak, in allocation order: allocated at or before it, not yet freed
    # (rebuilt once here rather than copied at every new maximum, which is quadratic on deep graphs)
    best_owners: dict[Any, int] = {}
    for i in sorted(k for k in alloc if k <= best_i):
        for owner, nbytes in alloc[i]:
            if owner not in last_use or last_use[owner] >= best_i:
                best_owners[owner] = nbytes
    best_live = [(o.name, b, category[o]) for o, b in best_owners.items()]
    at_peak = {**persistent, **best_at}
    labels = node_layers(g)
    by_layer: dict[str, int] = {}
    for n in g.placeholders():
        if n.meta.get("memfit.role") == "param" and n.meta.get("memfit.name") in g.tied:
            continue
        by_layer[labels[n]] = by_layer.get(labels[n], 0) + value_nbytes(n.meta.get("val"))
    for owner, nbytes in best_owners.items():
        by_layer[labels[owner]] = by_layer.get(labels[owner], 0) + nbytes
    grads_total = sum(sizes[o] for o in grad_roots if o in sizes)
    return MemoryPlan(peak_bytes=base + max(best, 0), persistent=persistent, at_peak=at_peak, peak_node=best_node,
                      saved_activation_bytes=sum(sizes.get(o, 0) for o in saved), gradient_bytes=grads_total,
                      passes=tuple(g.applied), budget_bytes=budget_bytes, timeline=tuple(timeline),
                      largest_at_peak=tuple(sorted(resident + best_live, key=lambda t: -t[1])[:5]),
                      by_layer=by_layer,
                      category_timeline={**{k: (v,) * len(nodes) for k, v in persistent.items()},
                                         **{k: tuple(v) for k, v in per_cat.items()}},
                      node_names=tuple(n.name for n in nodes), backward_start=index[g.loss] + 1,
                      fusion={k: g.info[k] for k in ("fused_cross_entropy", "fuse") if k in g.info})


@dataclass(frozen=True)
class SizeModel:
    """Predicted peak as a function of one size (batch or sequence length), fitted exactly from plans.

    Every node's live bytes are a polynomial in the size (affine in batch; at most quadratic in sequence
    length, for attention-shaped tensors), so plans at ``degree + 1`` sizes with the same schedule
    determine each node's polynomial; the peak is their maximum. ``expr`` is that maximum as a sympy
    expression (only the polynomials that are the maximum somewhere in ``[1, limit]`` are kept).
    """

    symbol: str
    expr: Any  # sympy expression in Symbol(symbol)
    polys: tuple[tuple[float, ...], ...]  # per node: coefficients (c0, c1, c2) of size**0, size**1, size**2
    limit: int

    def peak_at(self, size: int) -> int:
        return round(max(sum(c * size**k for k, c in enumerate(p)) for p in self.polys))

    def largest_fitting(self, budget_bytes: int) -> int:
        """The largest size in [1, limit] whose predicted peak fits; 0 if even size 1 does not."""
        if self.peak_at(1) > budget_bytes:
            return 0
        lo, hi = 1, self.limit
        if self.peak_at(hi) <= budget_bytes:
            return hi
        while hi - lo > 1:  # the peak is non-decreasing in the size: bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.peak_at(mid) <= budget_bytes else (lo, mid)
        return lo


def fit_size_model(symbol: str, sizes: list[int], plans: list[MemoryPlan], limit: int) -> SizeModel | None:
    """Fit per-node polynomials through plans at ``sizes`` (same schedule); None if the schedules differ."""
    import sympy

    names = plans[0].node_names
    if any(p.node_names != names for p in plans[1:]) or len(set(sizes)) != len(sizes):
        return None
    degree = len(sizes) - 1
    rows = [[float(s) ** k for k in range(degree + 1)] for s in sizes]
    inv = sympy.Matrix(rows).inv()
    columns = list(zip(*(p.timeline for p in plans), strict=True))
    polys = []
    for values in columns:
        coeffs = inv * sympy.Matrix(values)
        polys.append(tuple(float(c) for c in coeffs))
    # keep only the polynomials that are the maximum at some integer size (sampled densely), deduplicated
    samples = sorted({1, limit, *sizes, *range(1, limit + 1, max(1, limit // 256))})
    winners = {max(range(len(polys)), key=lambda i: sum(c * s**k for k, c in enumerate(polys[i]))) for s in samples}
    x = sympy.Symbol(symbol, positive=True, integer=True)
    terms = {tuple(round(c, 6) for c in polys[i]) for i in winners}
    expr = sympy.Max(*(sum(sympy.nsimplify(c, rational=False) * x**k for k, c in enumerate(t)) for t in terms))
    return SizeModel(symbol=symbol, expr=expr, polys=tuple(polys[i] for i in sorted(winners)), limit=limit)
