"""The planner: which rewrites, with which settings, make the step fit the budget.

Levers in order of cost (shared/DESIGN.md, Planner): the lossless ones first (``remat`` free recomputation
and ``fused_update``), then recomputation of saved activations that costs FLOPs (``remat`` in
``"budget"`` mode, searched over how many bytes to free). Each trial is a Pipeline run on a clone
of the captured graph plus the liveness plan of the result, so the figure the planner compares with
the budget is the one the runtime will run. Among the trials that fit it keeps the one recomputing
the fewest FLOPs; when none fits it raises BudgetError with the smallest peak it reached and the five
largest tensors live at it. An explicit ``passes=`` list is planned as given, never changed.
Later levers (8-bit state, low-rank projection, quantized weights) join the ladder as their passes
gain ``memory_effect`` models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import BudgetError, where_what_got
from ..graph import TrainGraph
from ..passes.base import Pass, Pipeline, make_pass
from .memory import MemoryPlan, fmt_bytes, plan_memory
from .schedule import sink


@dataclass(frozen=True)
class Trial:
    passes: tuple[str, ...]
    peak_bytes: int
    recomputed_flops: int
    fits: bool


@dataclass(frozen=True)
class Choice:
    graph: TrainGraph
    plan: MemoryPlan
    trials: tuple[Trial, ...]


def _run(base: TrainGraph, passes: list[Pass], budget: int | None, device) -> tuple[TrainGraph, MemoryPlan, Trial]:
    g = Pipeline(passes)(base.clone())
    g.info["schedule"] = {"sunk": sink(g)}
    p = plan_memory(g, budget, device)
    flops = int(g.info.get("remat", {}).get("recomputed_flops", 0))
    trial = Trial(tuple(q.to_json() for q in passes), p.peak_bytes, flops, budget is None or p.peak_bytes <= budget)
    return g, p, trial


def choose(base: TrainGraph, budget_bytes: int | None, *, device: torch.device | str = "cpu",
           make: Callable[..., Pass] = make_pass, tail: tuple[str, ...] = ("fused_update",),
           head: tuple[str, ...] = (), explicit: list[Pass] | None = None) -> Choice:
    """Pick the passes for ``base`` (a freshly captured graph) so that its predicted peak fits."""
    if explicit is not None:
        g, p, t = _run(base, explicit, budget_bytes, device)
        if not t.fits:
            raise _budget_error(p, budget_bytes, "with the passes given (passes= is respected as is)")
        return Choice(g, p, (t,))

    def ladder(remat: Pass) -> list[Pass]:
        return [*(make(h) for h in head), remat, *(make(t) for t in tail)]

    g, p, t = _run(base, ladder(make("remat")), budget_bytes, device)
    trials = [t]
    if t.fits:
        return Choice(g, p, tuple(trials))
    persistent = sum(p.persistent.values())
    if persistent > budget_bytes:  # no lever on the ladder shrinks parameters or optimizer state (yet)
        at = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.persistent.items() if v)
        raise BudgetError(where_what_got(
            "memfit planner", f"a step that fits the budget {fmt_bytes(budget_bytes)}",
            f"a floor of {fmt_bytes(persistent)} that no lever reduces yet ({at}); without a budget the peak is "
            f"{fmt_bytes(p.peak_bytes)}; largest live at the peak: {p.describe_largest()}",
            "raise the budget above the floor, or freeze parameters (frozen=...) to drop their optimizer state"),
            plan=p, budget_bytes=budget_bytes, floor_only=True)
    best: tuple[TrainGraph, MemoryPlan, Trial] | None = None
    smallest = (g, p, t)
    saved = p.saved_activation_bytes
    # The peak is not monotone in the bytes freed (recomputed copies live in the backward), so sweep:
    # the excess itself, then growing shares of the saved activations, cheapest (fewest bytes) first.
    sweep = sorted({max(p.peak_bytes - budget_bytes, 1), *(int(saved * f) for f in (0.125, 0.25, 0.5, 0.75, 1.0))})
    for free in sweep:
        gi, pi, ti = _run(base, ladder(make(("remat", {"mode": "budget", "free_bytes": int(free)}))),
                          budget_bytes, device)
        trials.append(ti)
        if ti.peak_bytes < smallest[2].peak_bytes:
            smallest = (gi, pi, ti)
        if ti.fits and (best is None or ti.recomputed_flops < best[2].recomputed_flops):
            best = (gi, pi, ti)
    if best is None:
        raise _budget_error(smallest[1], budget_bytes, "after trying recomputation of up to every saved activation")
    return Choice(best[0], best[1], tuple(trials))


def _budget_error(p: MemoryPlan, budget: int, how: str) -> BudgetError:
    at = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.at_peak.items() if v)
    return BudgetError(where_what_got(
        "memfit planner", f"a step that fits the budget {fmt_bytes(budget)}",
        f"a smallest reachable peak of {fmt_bytes(p.peak_bytes)} {how} (at peak: {at}); "
        f"largest live at the peak: {p.describe_largest()}",
        "raise the budget, shrink the batch, or freeze parameters (frozen=...)"), plan=p, budget_bytes=budget)
