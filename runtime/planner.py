"""The planner: which rewrites, with which settings, make the step fit the budget.

Levers in order of cost (README, "the planner"): the lossless ones first (``remat`` free recomputation
and ``fused_update``), then recomputation of saved activations that costs FLOPs (``remat`` in
``"budget"`` mode, searched over the FLOP cap ``max_flops`` for the fewest FLOPs that fit). Each
trial is a Pipeline run on a clone of the captured graph plus the liveness plan of the result, so the
figure the planner compares with the budget is the one the runtime will run. Among the trials that
fit it keeps the one recomputing the fewest FLOPs; when none fits it raises BudgetError with the
smallest peak it reached and the five largest tensors live at it. An explicit ``passes=`` list is
planned as given, never changed.

When no recomputation fits, the optimizer-state levers follow, chosen per parameter as far as
``levers`` allows (``state_options``): every trainable parameter starts at fp32 AdamW state and may
step through its own settings, least lossy first: 8-bit moments (near-lossless); then, for 2-D
weights other than embeddings and the head, low-rank projection (SVD) at rank min(m, n)/4, /8, /16
with 8-bit low-rank moments, then APOLLO-Mini (lossy). Each setting is costed by its pass's own
``memory_effect`` on the lossless graph: the persistent bytes it saves and the transient of a
subspace refresh. ``_StateGreedy`` orders the steps: each advances the parameter whose next setting
saves the most bytes (ties: the larger parameter). The search walks that sequence forward to the
first step whose predicted parameters + state leave room for the overhead the last trial showed
above them (activations at full recomputation, kernel workspace) and for the largest refresh
transient, and runs it for real, as one ``lowrank`` pass with per-parameter ``overrides`` and one
``quantize_state`` pass with the 8-bit ``targets``, each with the recomputation sweep. A failed trial
raises the overhead and the walk goes on; once a step fits, the search backs off towards the last
step that did not (by the secant through their peaks), to keep as little lossy state as fits. At
most ``_STATE_ROUNDS`` such trials; the last, if none fit yet, takes every step, so the error names
the smallest peak the levers reach.
"""

from __future__ import annotations

import collections
import heapq
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


def run_passes(base: TrainGraph, passes: list[Pass], budget: int | None, device
               ) -> tuple[TrainGraph, MemoryPlan, Trial]:
    """``passes`` on a clone of ``base``, scheduled and planned: what the planner tries, and what a Trainer
    reruns on a new input shape with the passes chosen for the first (``g.info["passes"]``)."""
    g = Pipeline(passes)(base.clone())
    g.info["schedule"] = {"sunk": sink(g)}
    g.info["passes"] = list(passes)
    p = plan_memory(g, budget, device)
    flops = int(g.info.get("remat", {}).get("recomputed_flops", 0))
    trial = Trial(tuple(q.to_json() for q in passes), p.peak_bytes, flops, budget is None or p.peak_bytes <= budget)
    return g, p, trial


LEVELS = ("lossless", "near-lossless", "lossy")
_NOT_PROJECTED = ("embed", "wte", "wpe", "lm_head")  # embeddings and tied heads keep full Adam state
_STATE_ROUNDS = 6  # state-lever trials at most, each with its recomputation sweep
_BACKOFF_BYTES = 0.02  # stop backing off once a fitting and a failing step differ by less than this share of the budget
_GALORE = {"projector": "svd", "rule": "galore", "scaling": "channel", "scale": 0.25}
_APOLLO_MINI = {"rank": 1, "projector": "random", "rule": "apollo", "scaling": "tensor", "scale": 128.0}


@dataclass(frozen=True)
class StateOption:
    """One optimizer-state setting of one parameter: ``lowrank`` settings (None: full-shape 8-bit
    moments), the change in persistent bytes against fp32 AdamW and the refresh transient."""

    label: str
    lowrank: dict | None
    persistent: int
    transient: int = 0


def state_options(g: TrainGraph, levers: str, make: Callable[..., Pass] = make_pass) -> dict[str, list[StateOption]]:
    """Per parameter of ``g`` (the lossless graph, ``fused_update`` applied), the optimizer-state settings
    allowed at ``levers``, least lossy first, each costed by its pass's ``memory_effect``: 8-bit moments,
    then for 2-D weights (not embeddings or the head) SVD projection at rank min(m, n)/4, /8, /16
    with 8-bit low-rank moments, then APOLLO-Mini. A setting is kept only if it saves more than the
    ones before it; parameters with none are left out."""
    if levers == "lossless":
        return {}
    eight_bit = make(("quantize_state", {"bits": 8})).memory_effect(g).per_param
    costed: dict[str, list[StateOption]] = {f: [StateOption("8-bit", None, d)] for f, d in eight_bit.items()}
    if levers == "lossy":
        for fqn, node in g.params.items():
            shape = tuple(node.meta["val"].shape)
            if len(shape) != 2 or any(k in fqn for k in _NOT_PROJECTED):
                continue
            settings = [(f"svd r={min(shape) // d}", {"rank": min(shape) // d, **_GALORE}) for d in (4, 8, 16)
                        if min(shape) // d >= 2]
            for label, cfg in [*settings, ("apollo-mini", _APOLLO_MINI)]:
                eff = make(("lowrank", {**cfg, "state_bits": 8, "targets": (fqn,)})).memory_effect(g)
                if fqn in eff.per_param:
                    costed.setdefault(fqn, []).append(StateOption(label, cfg, eff.per_param[fqn], eff.transient))
    options = {}
    for fqn, opts in costed.items():
        kept: list[StateOption] = []
        for o in opts:
            if o.persistent < (kept[-1].persistent if kept else 0):
                kept.append(o)
        if kept:
            options[fqn] = kept
    return options


class _StateGreedy:
    """The greedy sequence of per-parameter steps: at each step the parameter whose next setting saves
    the most persistent bytes (ties: the larger parameter, then graph order) advances one setting.
    Step k's configuration holds the first k steps; level 0 of a parameter is fp32 AdamW, level i is
    ``options[fqn][i - 1]``. The sequence is extended lazily."""

    def __init__(self, g: TrainGraph, options: dict[str, list[StateOption]], persistent: int):
        self.options = options
        self.steps: list[str] = []
        self.persistent = [persistent]  # predicted parameters + state after k steps
        self._level = dict.fromkeys(options, 0)
        order = {f: i for i, f in enumerate(g.params)}
        self._numel = {f: g.params[f].meta["val"].numel() for f in options}
        self._heap = [self._entry(f, order[f]) for f in options]
        heapq.heapify(self._heap)

    def _entry(self, fqn: str, order: int) -> tuple[int, int, int, str]:
        level, opts = self._level[fqn], self.options[fqn]
        saving = (opts[level - 1].persistent if level else 0) - opts[level].persistent
        return (-saving, -self._numel[fqn], order, fqn)

    def _extend(self) -> bool:
        if not self._heap:
            return False
        neg_saving, _, order, fqn = heapq.heappop(self._heap)
        self._level[fqn] += 1
        self.steps.append(fqn)
        self.persistent.append(self.persistent[-1] + neg_saving)
        if self._level[fqn] < len(self.options[fqn]):
            heapq.heappush(self._heap, self._entry(fqn, order))
        return True

    def chosen(self, k: int) -> dict[str, StateOption]:
        levels = collections.Counter(self.steps[:k])
        return {f: self.options[f][levels[f] - 1] for f in self.options if levels[f]}

    def first_within(self, after: int, budget: int, overhead: int) -> int:
        """The first step after ``after`` whose persistent bytes plus ``overhead``, and plus its largest
        refresh transient (live on top of the persistent bytes at a refresh), are within ``budget``;
        the last step when none is."""
        levels = collections.Counter(self.steps[:after])
        k = after
        while k < len(self.steps) or self._extend():
            levels[self.steps[k]] += 1
            k += 1
            transient = max((self.options[f][lv - 1].transient for f, lv in levels.items()), default=0)
            if self.persistent[k] + max(overhead, transient) <= budget:
                return k
        return k

    def last(self) -> int:
        while self._extend():
            pass
        return len(self.steps)

    def passes(self, k: int) -> tuple[tuple[str, dict], ...]:
        """Step k as at most one ``lowrank`` pass (the commonest setting pass-wide, the others as
        ``overrides``) and one ``quantize_state`` pass (8-bit moments for its ``targets``)."""
        chosen = self.chosen(k)
        full = tuple(f for f, o in chosen.items() if o.lowrank is None)
        low = {f: o.lowrank for f, o in chosen.items() if o.lowrank is not None}
        out: list[tuple[str, dict]] = []
        if low:
            keys = [tuple(sorted(c.items())) for c in low.values()]
            common = dict(max(dict.fromkeys(keys), key=keys.count))  # the commonest, the first seen on a tie
            overrides = tuple((f, c) for f, c in low.items() if c != common)
            out.append(("lowrank", {**common, "state_bits": 8, "targets": tuple(low), "overrides": overrides}))
        if full:
            out.append(("quantize_state", {"bits": 8, "targets": full}))
        return tuple(out)


def choose(base: TrainGraph, budget_bytes: int | None, *, device: torch.device | str = "cpu",
           make: Callable[..., Pass] = make_pass, tail: tuple[str, ...] = ("fused_update",),
           head: tuple[str, ...] = (), explicit: list[Pass] | None = None, levers: str = "lossy") -> Choice:
    """Pick the passes for ``base`` (a freshly captured graph) so that its predicted peak fits.

    ``levers`` bounds what may change the training numerics: ``"lossless"`` (recomputation and the
    fused update only), ``"near-lossless"`` (also 8-bit optimizer state) or ``"lossy"`` (also
    low-rank projection and APOLLO-Mini); the state levers are chosen per parameter, as few as fit."""
    if explicit is not None:
        g, p, t = run_passes(base, explicit, budget_bytes, device)
        if not t.fits:
            raise _budget_error(p, budget_bytes, "with the passes given (passes= is respected as is)")
        return Choice(g, p, (t,))
    if levers not in LEVELS:
        raise ConfigError(where_what_got("memfit planner: levers", f"one of {LEVELS}", repr(levers), "pick one"))

    def ladder(remat: Pass, extra: tuple = ()) -> list[Pass]:
        return [*(make(h) for h in head), remat, *(make(t) for t in tail), *(make(e) for e in extra)]

    trials: list[Trial] = []

    def attempt(extra: tuple) -> tuple[tuple[TrainGraph, MemoryPlan] | None, tuple[TrainGraph, MemoryPlan, Trial]]:
        """(the fitting choice with the fewest recomputed FLOPs or None, the trial with the smallest peak)."""
        g, p, t = run_passes(base, ladder(make("remat"), extra), budget_bytes, device)
        trials.append(t)
        if t.fits:
            return (g, p), (g, p, t)
        if sum(p.persistent.values()) > budget_bytes:  # parameters + state alone: only a smaller state helps
            return None, (g, p, t)
        best, small = _remat_sweep(base, p, budget_bytes, device, make, lambda r: ladder(r, extra), trials)
        return (best[:2] if best is not None else None), small

    fit, small = attempt(())
    if fit is not None:
        return Choice(*fit, tuple(trials))
    g0, p0 = small[0], small[1]
    floor0 = sum(p0.persistent.values())
    options = state_options(g0, levers, make)
    smallest = small if floor0 <= budget_bytes else None
    floor_plan = p0 if floor0 > budget_bytes else None
    if floor0 > budget_bytes and options:  # how much room activations need at most recomputation
        small = _remat_sweep(base, p0, budget_bytes, device, make, ladder, trials)[1]
    overhead = small[2].peak_bytes - floor0  # above parameters + state at the smallest peak reached
    greedy = _StateGreedy(g0, options, floor0)
    lo, hi, best = 0, None, None  # the last step known not to fit, the first known to fit, its choice
    peak = {0: small[2].peak_bytes}  # the smallest peak reached at a step tried
    missed = False  # the last step backed off to did not fit either
    for round_ in range(_STATE_ROUNDS):
        pers = greedy.persistent
        if hi is None:  # forward: the first step that leaves room for the overhead (the last round: every step)
            k = greedy.last() if round_ == _STATE_ROUNDS - 1 else greedy.first_within(lo, budget_bytes, overhead)
            if k == lo:
                break
        else:  # back, by the secant through the peaks at lo and hi (halving the bytes after a miss)
            if pers[lo] - pers[hi] < _BACKOFF_BYTES * budget_bytes:
                break
            target = pers[hi] + (budget_bytes - peak[hi]) * (pers[lo] - pers[hi]) // max(peak[lo] - peak[hi], 1)
            if missed:
                target = min(target, (pers[lo] + pers[hi]) // 2)
            k = min(next(i for i in range(lo + 1, hi + 1) if pers[i] <= target), hi - 1)
            if k == lo:
                break
        fit, small = attempt(greedy.passes(k))
        if fit is not None:
            hi, best, peak[k], missed = k, fit, fit[1].peak_bytes, False
            continue
        lo, peak[k], missed = k, small[2].peak_bytes, hi is not None
        persistent = sum(small[1].persistent.values())
        if persistent > budget_bytes:
            if floor_plan is None or persistent < sum(floor_plan.persistent.values()):
                floor_plan = small[1]
            overhead = max(overhead, persistent - pers[k])  # memory_effect fell short
            continue
        if smallest is None or small[2].peak_bytes < smallest[2].peak_bytes:
            smallest = small
        overhead = small[2].peak_bytes - pers[k]
    if best is not None:
        return Choice(*best, tuple(trials))
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


def _remat_sweep(base, p: MemoryPlan, budget_bytes: int, device, make, ladder, trials: list[Trial]):
    """Budget-mode recomputation swept over the FLOP cap; (best fitting, smallest) trials.

    First with no cap: remat frees saved values while that lowers the predicted peak, the smallest peak
    it reaches. Then under FLOP caps (``max_flops``), bisected in log scale for the fewest FLOPs whose
    peak fits: the peak falls as the cap grows (remat extends one sequence of choices and never takes
    one that raises the peak), and every trial is kept, so a step out of order costs precision only.
    """
    def trial(cfg: dict) -> tuple[TrainGraph, MemoryPlan, Trial]:
        run = run_passes(base, ladder(make(("remat", {"mode": "budget", **cfg}))), budget_bytes, device)
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
