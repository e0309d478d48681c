"""The planner: which rewrites, with which settings, make the step fit the budget.

Levers in order of cost (shared/DESIGN.md, Planner): the lossless ones first (``remat`` free recomputation
and ``fused_update``), then recomputation of saved activations that costs FLOPs (``remat`` in
``"budget"`` mode, searched over the FLOP cap ``max_flops`` for the fewest FLOPs that fit). Each
trial is a Pipeline run on a clone of the captured graph plus the liveness plan of the result, so the
figure the planner compares with the budget is the one the runtime will run. Among the trials that
fit it keeps the one recomputing the fewest FLOPs; when none fits it raises BudgetError with the
smallest peak it reached and the five largest tensors live at it. An explicit ``passes=`` list is
planned as given, never changed.

When no recomputation fits, the optimizer-state levers follow, as far as ``levers`` allows
(``state_ladder``): 8-bit moments (near-lossless), then low-rank projection at falling rank with
8-bit low-rank moments, then APOLLO-Mini (lossy). Each is first costed by its passes'
``memory_effect`` against the lossless plan (a lower bound on the state it leaves), and only run
when that bound fits; each runs with the recomputation sweep again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import BudgetError, ConfigError, where_what_got
from ..graph import TrainGraph
from ..passes.base import Pass, Pipeline, make_pass
from .memory import MemoryPlan, fmt_bytes, plan_memory
from .schedule import sink

_CAP_STEPS = 6  # bisection steps over the FLOP cap: the cap found is within ~1.4x of the fewest FLOPs that fit


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


LEVELS = ("lossless", "near-lossless", "lossy")
_NOT_PROJECTED = ("embed", "wte", "wpe", "lm_head")  # embeddings and tied heads keep full Adam state


def state_ladder(base: TrainGraph, levers: str) -> list[tuple[tuple[str, dict], ...]]:
    """The optimizer-state levers allowed at ``levers``, least lossy first: 8-bit moments, then
    GaLore-style projection of the 2-D weights (not embeddings or the head) at falling rank with
    8-bit low-rank moments, then APOLLO-Mini (rank 1, a seed for a projector)."""
    if levers == "lossless":
        return []
    ladder: list[tuple[tuple[str, dict], ...]] = [(("quantize_state", {"bits": 8}),)]
    if levers != "lossy":
        return ladder
    weights = {f: tuple(n.meta["val"].shape) for f, n in base.params.items()
               if f in base.grad_outputs and n.meta["val"].dim() == 2 and not any(k in f for k in _NOT_PROJECTED)}
    if not weights:
        return ladder
    targets = tuple(sorted(weights))
    dims = sorted(min(s) for s in weights.values())
    typical = dims[len(dims) // 2]
    for div in (4, 8, 16):
        rank = typical // div
        if rank >= 2:
            ladder.append((("lowrank", {"rank": rank, "targets": targets}), ("quantize_state", {"bits": 8})))
    ladder.append((("lowrank", {"rank": 1, "projector": "random", "rule": "apollo", "scaling": "tensor",
                                "scale": 128.0, "targets": targets}), ("quantize_state", {"bits": 8})))
    return ladder


def choose(base: TrainGraph, budget_bytes: int | None, *, device: torch.device | str = "cpu",
           make: Callable[..., Pass] = make_pass, tail: tuple[str, ...] = ("fused_update",),
           head: tuple[str, ...] = (), explicit: list[Pass] | None = None, levers: str = "lossy") -> Choice:
    """Pick the passes for ``base`` (a freshly captured graph) so that its predicted peak fits.

    ``levers`` bounds what may change the training numerics: ``"lossless"`` (recomputation and the
    fused update only), ``"near-lossless"`` (also 8-bit optimizer state) or ``"lossy"`` (also
    low-rank projection, rank chosen from the largest that fits)."""
    if explicit is not None:
        g, p, t = _run(base, explicit, budget_bytes, device)
        if not t.fits:
            raise _budget_error(p, budget_bytes, "with the passes given (passes= is respected as is)")
        return Choice(g, p, (t,))
    if levers not in LEVELS:
        raise ConfigError(where_what_got("memfit planner: levers", f"one of {LEVELS}", repr(levers), "pick one"))

    def ladder(remat: Pass, extra: tuple = ()) -> list[Pass]:
        return [*(make(h) for h in head), remat, *(make(t) for t in tail), *(make(e) for e in extra)]

    trials: list[Trial] = []
    smallest: tuple[TrainGraph, MemoryPlan, Trial] | None = None
    floor_plan = None
    first: tuple[TrainGraph, MemoryPlan] | None = None
    for extra in [(), *state_ladder(base, levers if budget_bytes is not None else "lossless")]:
        if first is not None and _floor_bound(first, extra, make) > budget_bytes:
            continue  # even the state this lever leaves (a lower bound) is over the budget
        g, p, t = _run(base, ladder(make("remat"), extra), budget_bytes, device)
        first = first or (g, p)
        trials.append(t)
        if t.fits:
            return Choice(g, p, tuple(trials))
        if sum(p.persistent.values()) > budget_bytes:  # parameters + state alone: only a smaller state helps
            if floor_plan is None or sum(p.persistent.values()) < sum(floor_plan.persistent.values()):
                floor_plan = p
            continue
        best, small = _remat_sweep(base, p, budget_bytes, device, make, lambda r, e=extra: ladder(r, e), trials)
        if best is not None:
            return Choice(best[0], best[1], tuple(trials))
        if smallest is None or small[2].peak_bytes < smallest[2].peak_bytes:
            smallest = small
    if smallest is None:
        p = floor_plan
        persistent = sum(p.persistent.values())
        at = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.persistent.items() if v)
        raise BudgetError(where_what_got(
            "memfit planner", f"a step that fits the budget {fmt_bytes(budget_bytes)}",
            f"a floor of {fmt_bytes(persistent)} that no lever reduces yet ({at}; levers={levers!r}); without a "
            f"budget the peak is {fmt_bytes(p.peak_bytes)}; largest live at the peak: {p.describe_largest()}",
            "raise the budget above the floor, allow lossier levers, or freeze parameters (frozen=...) to drop "
            "their optimizer state"), plan=p, budget_bytes=budget_bytes, floor_only=True)
    raise _budget_error(smallest[1], budget_bytes, "after trying recomputation of up to every saved activation"
                        f" with every optimizer-state lever allowed (levers={levers!r})")


def _floor_bound(first: tuple[TrainGraph, MemoryPlan], extra: tuple, make) -> int:
    """Parameters + state after the levers in ``extra``, from their ``memory_effect`` on the lossless
    graph (each lever's saving counted on full-size state, so this is a lower bound)."""
    g, p = first
    return sum(p.persistent.values()) + sum(make(e).memory_effect(g).persistent for e in extra)


def _remat_sweep(base, p: MemoryPlan, budget_bytes: int, device, make, ladder, trials: list[Trial]):
    """Budget-mode recomputation swept over the FLOP cap; (best fitting, smallest) trials.

    First with no cap: remat frees saved values while that lowers the predicted peak, the smallest peak
    it reaches. Then under FLOP caps (``max_flops``), bisected in log scale for the fewest FLOPs whose
    peak fits: the peak falls as the cap grows (remat extends one sequence of choices and never takes
    one that raises the peak), and every trial is kept, so a step out of order costs precision only.
    """
    def trial(cfg: dict) -> tuple[TrainGraph, MemoryPlan, Trial]:
        run = _run(base, ladder(make(("remat", {"mode": "budget", **cfg}))), budget_bytes, device)
        trials.append(run[2])
        return run

    runs = [trial({"free_bytes": int(p.saved_activation_bytes)})]
    lo, hi = 1.0, float(max(runs[0][2].recomputed_flops, 1))
    if runs[0][2].fits:
        for _ in range(_CAP_STEPS):
            cap = int(math.sqrt(lo * hi))
            runs.append(trial({"max_flops": cap}))
            lo, hi = (lo, cap) if runs[-1][2].fits else (cap, hi)
    fitting = [r for r in runs if r[2].fits]
    best = min(fitting, key=lambda r: (r[2].recomputed_flops, r[2].peak_bytes), default=None)
    return best, min(runs, key=lambda r: r[2].peak_bytes)


def _budget_error(p: MemoryPlan, budget: int, how: str) -> BudgetError:
    at = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.at_peak.items() if v)
    return BudgetError(where_what_got(
        "memfit planner", f"a step that fits the budget {fmt_bytes(budget)}",
        f"a smallest reachable peak of {fmt_bytes(p.peak_bytes)} {how} (at peak: {at}); "
        f"largest live at the peak: {p.describe_largest()}",
        "raise the budget, shrink the batch, or freeze parameters (frozen=...)"), plan=p, budget_bytes=budget)
