"""The planner: which rewrites, with which settings, make the step fit the budget.

It is a policy over a table the passes write, and it names none of them:

- the **recomputation sequence** of the recompute pass (``RECOMPUTE_PASS``, ``remat``): the saved values
  to recompute, best first, computed once on the captured graph (``remat.recompute_sequence``) with the
  predicted peak of intermediates and the FLOPs after every step; a choice is a prefix of it;
- the **options** of the lever passes (``LEVER_PASSES``, or ``lever_passes=``): per target (a parameter),
  settings with their exact persistent bytes, transient bytes, FLOPs and lossiness class
  (``Pass.options``); at most one per target and group.

Policy (lossiness first, recomputed FLOPs second): the named pipeline ``"lossless"`` runs first; if it
fits, that is the plan. Otherwise, with every recomputation step taken, the bytes still missing are
covered by state options, choosing the set with the fewest parameter elements on lossy settings, then
on near-lossless ones (ties: the lower degree) (a knapsack solved by dynamic programming over the bytes, in
``_UNITS`` steps, rounding savings down so that a chosen set never saves less than the table says);
then the shortest recomputation prefix that fits with that state. The predicted peak of a choice is
``persistent + intermediates(k) + gap``, where the intermediates come from the one memory model
(``memfit.liveness``) on the captured graph and ``gap`` (kernel workspaces, the update's placement,
the schedule) is measured: every choice is run once through the Pipeline and planned, and that plan's
peak, the one the runtime runs, decides. A miss raises ``gap`` by the shortfall and the choice is made
again (at most ``_ROUNDS`` times). An explicit ``passes=`` list is planned as given, never changed.

A model of identical layers may be planned from two small captures (``Blocks``: ``BASE_LAYERS`` and one more):
recomputation steps then free the same value in every block (``runtime.blocks.block_keys``), state
options are taken per parameter class (every layer's ``q_proj`` alike), and every plan is the affine
extrapolation of the two small plans (``runtime.blocks.extrapolate``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import BudgetError, ConfigError, where_what_got
from ..graph import TrainGraph
from ..passes.base import (
    LEVER_PASSES,
    LOSSINESS,
    PIPELINES,
    RECOMPUTE_PASS,
    SCHEDULE_PASS,
    Option,
    Pass,
    Pipeline,
    make_pass,
    registered_passes,
)
from .blocks import BASE_LAYERS, block_keys, extrapolate, param_class
from .lower import use_triton
from .memory import MemoryPlan, fmt_bytes, plan_memory

LEVELS = LOSSINESS
_ROUNDS = 6  # verified choices at most
_UNITS = 2048  # resolution of the state knapsack: the bytes to save in this many steps


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


@dataclass(frozen=True)
class Blocks:
    """A model of ``layers`` identical layers, captured at ``base`` and ``base + 1`` layers (``one``, ``two``)."""

    one: TrainGraph
    two: TrainGraph
    layers: int
    keys: tuple | None = None  # block_keys(one, two) when the caller already has them
    base: int = BASE_LAYERS


def run_passes(base: TrainGraph, passes: list[Pass], budget: int | None, device
               ) -> tuple[TrainGraph, MemoryPlan, Trial]:
    """``passes`` (and the schedule, last) on a clone of ``base``, planned: what the planner verifies, and
    what a Trainer reruns on a new input shape with the passes chosen for the first (``g.info["passes"]``)."""
    passes = list(passes)
    if not any(p.name == SCHEDULE_PASS for p in passes):
        passes.append(make_pass(SCHEDULE_PASS))
    g = Pipeline(passes)(base.clone())
    g.info["passes"] = passes
    p = plan_memory(g, budget, device)
    flops = int(g.info.get("pass_stats", {}).get(RECOMPUTE_PASS, {}).get("recomputed_flops", 0))
    trial = Trial(tuple(q.to_json() for q in passes), p.peak_bytes, flops, budget is None or p.peak_bytes <= budget)
    return g, p, trial


@dataclass
class _Class:
    """One planner target: a parameter, or a class of parameters (one per identical block)."""

    name: str
    members: list[list[str]]  # FQNs in each graph planned
    mult: int  # parameters of the class in the model planned
    numel: int  # elements of one member
    options: list[Option] = field(default_factory=list)


@dataclass
class _Decision:
    k: int  # recomputation steps taken
    state: dict[str, Option]  # class -> option
    steps: list = field(default_factory=list)  # the recomputation sequence it cuts (names per graph, per step)
    reserve: list = field(default_factory=list)  # per graph, each update's transient under this state


class _Subject:
    """The graph(s) planned and how their plans combine: one graph as captured, or Blocks extrapolated."""

    def __init__(self, base: TrainGraph | Blocks):
        self.blocks = base if isinstance(base, Blocks) else None
        self.graphs = [base.one, base.two] if self.blocks else [base]

    def combine(self, plans: list[MemoryPlan]) -> MemoryPlan:
        return extrapolate(plans[0], plans[1], self.blocks.layers, self.blocks.base) if self.blocks else plans[0]

    def run(self, per_graph: Callable[[int], list[Pass]], budget: int | None, device, trials: list[Trial]
            ) -> tuple[TrainGraph, MemoryPlan]:
        runs = [run_passes(g, per_graph(i), budget, device) for i, g in enumerate(self.graphs)]
        self.last_runs = [(r[0], r[1]) for r in runs]
        plan = self.combine([r[1] for r in runs])
        plan = _with_budget(plan, budget)
        flops = runs[0][2].recomputed_flops if not self.blocks else \
            runs[0][2].recomputed_flops + (self.blocks.layers - self.blocks.base) * (runs[1][2].recomputed_flops
                                                                     - runs[0][2].recomputed_flops)
        trials.append(Trial(runs[-1][2].passes, plan.peak_bytes, flops, budget is None or plan.peak_bytes <= budget))
        return runs[-1][0], plan

    def classes(self, lossless: list[TrainGraph]) -> dict[str, _Class]:
        g = lossless[-1]
        if not self.blocks:
            return {f: _Class(f, [[f]], 1, g.params[f].meta["val"].numel()) for f in g.params if f not in g.tied}
        out: dict[str, _Class] = {}
        for f in g.params:
            if f in g.tied:
                continue
            c = param_class(f)
            if c not in out:
                members = [[m for m in gi.params if param_class(m) == c and m not in gi.tied] for gi in lossless]
                mult = self.blocks.layers if c != f else 1
                out[c] = _Class(c, members, mult, g.params[f].meta["val"].numel())
        return out


def _with_budget(plan: MemoryPlan, budget: int | None) -> MemoryPlan:
    return dataclasses.replace(plan, budget_bytes=budget)


def choose(base: TrainGraph | Blocks, budget_bytes: int | None, *, device: torch.device | str = "cpu",
           make: Callable[..., Pass] = make_pass, head: tuple[str, ...] = (), explicit: list[Pass] | None = None,
           levers: str = "lossy", lever_passes: Sequence[str] | None = None) -> Choice:
    """Pick the passes for ``base`` (a freshly captured graph, or ``Blocks``) so that its predicted peak fits.

    ``levers`` bounds what may change the training numerics: ``"lossless"`` (recomputation and the fused
    update only), ``"near-lossless"`` (also options of that class: 8-bit optimizer state) or ``"lossy"``
    (also low-rank projection and APOLLO-Mini); options are chosen per parameter, as few as fit."""
    subject = _Subject(base)
    trials: list[Trial] = []
    if explicit is not None:
        if subject.blocks:
            raise ConfigError(where_what_got("memfit planner", "one captured graph with passes=", "Blocks",
                                             "plan the full graph (replicate=False) with explicit passes"))
        g, p = subject.run(lambda i: explicit, budget_bytes, device, trials)
        if not trials[-1].fits:
            raise _budget_error(p, budget_bytes, "with the passes given (passes= is respected as is)")
        return Choice(g, p, tuple(trials))
    if levers not in LEVELS:
        raise ConfigError(where_what_got("memfit planner: levers", f"one of {LEVELS}", repr(levers), "pick one"))
    lever_passes = LEVER_PASSES if lever_passes is None else tuple(lever_passes)
    unknown = [n for n in lever_passes if n not in registered_passes()]
    if unknown:
        raise ConfigError(where_what_got("memfit planner: lever_passes",
                                         f"registered passes ({sorted(registered_passes())})", unknown,
                                         "register the pass or fix the name"))

    pipeline = [*head, *PIPELINES["lossless"]]
    refined: dict[str, Pass] = {}  # pipeline passes at a lossless setting their refine() gave

    def passes(i: int, d: _Decision | None = None) -> list[Pass]:
        out = []
        for name in pipeline:
            if name == RECOMPUTE_PASS and d is not None and d.k:
                cut = registered_passes()[name].cut(tuple(n for s in d.steps[:d.k] for n in s[i]), d.reserve[i])
                out.append(make(cut))
            else:
                out.append(refined.get(name) or make(name))
        if d is not None:
            by_pass: dict[str, list[Option]] = {}
            for c, o in d.state.items():
                for part in o.parts or (o,):
                    for fqn in classes[c].members[i]:
                        by_pass.setdefault(part.pass_name, []).append(_retarget(part, fqn))
            out += [make(registered_passes()[n].from_options(opts)) for n, opts in by_pass.items()]
        return out

    classes: dict[str, _Class] = {}
    g0, p0 = subject.run(lambda i: passes(i), budget_bytes, device, trials)
    # lossless settings of the pipeline's own passes, asked while the peak sits at one of their ops
    for _ in range(_ROUNDS):
        if budget_bytes is None or p0.peak_bytes <= budget_bytes:
            return Choice(g0, p0, tuple(trials))
        better = {name: q for name in pipeline if name != RECOMPUTE_PASS
                  for q in [(refined.get(name) or make(name)).refine(g0, p0.peak_node)] if q is not None}
        if not better:
            break
        refined.update(better)
        g0, p0 = subject.run(lambda i: passes(i), budget_bytes, device, trials)
    lossless_plan = p0

    # the table: every lever's options and the recomputation sequence, on the lossless graph(s)
    lossless_runs = subject.last_runs
    lossless = [r[0] for r in lossless_runs]
    for g in lossless:  # which op implementations the options' workspaces are for
        g.info["triton"] = use_triton(torch.device(device))
    classes = subject.classes(lossless)
    for name in lever_passes:
        for o in registered_passes()[name].options(lossless[-1], levers):
            c = param_class(o.target) if subject.blocks else o.target
            if c in classes and (not subject.blocks or o.target == classes[c].members[-1][0]):
                classes[c].options.append(o)
    for cl in classes.values():
        cl.options = _combined(cl.options)
    # Two readings of the table, tried in this order: "tight", the sequence on the captured graph with each
    # chosen option's transient checked on top of what is live at its update; and, if its choice misses,
    # "safe", the sequence with every update's largest option transient reserved where its gradient is
    # made (no recomputed copy is then planned alive across an update's peak), the passes run the same way.
    worst = [{f: max(o.transient for o in cl.options) for cl in classes.values() if cl.options
              for f in cl.members[i]} for i in range(len(subject.graphs))]
    steps0, curve0, at_k = _recompute_table(subject, [{} for _ in subject.graphs])
    tables = {"tight": (steps0, curve0, [{} for _ in subject.graphs]), "safe": None}
    live_u = _live_at_updates(subject, lossless_runs, classes)
    live_k = {c: at_k.get(c, live_u.get(c, 0)) for c in live_u}  # with every recomputation step taken
    banned: set[tuple[str, str]] = set()
    persistent0 = sum(p0.persistent.values())
    gaps = {"tight": p0.peak_bytes - persistent0 - tables["tight"][1][0]}
    floor = persistent0 + sum(min([0] + [o.persistent * cl.mult for o in cl.options]) for cl in classes.values())
    mode = "tight"

    def table(m: str) -> tuple[list, list[int], list[dict[str, int]]]:
        if tables[m] is None:
            tables[m] = (*_recompute_table(subject, worst)[:2], worst)
            gaps[m] = p0.peak_bytes - persistent0 - tables[m][1][0]
        return tables[m]

    def everything() -> _Decision:
        state = {c: min(cl.options, key=lambda o: o.persistent) for c, cl in classes.items() if cl.options}
        steps, _, res = table("safe")
        return _Decision(len(steps), state, steps, res)

    def decide(m: str) -> _Decision | None:
        steps, curve, res = table(m)
        d = _decide(classes, curve, persistent0, gaps[m], budget_bytes, live_u if m == "tight" else {},
                    live_k if m == "tight" else {}, banned)
        if d is not None:
            d.steps, d.reserve = steps, res
        return d

    if floor > budget_bytes:  # parameters + the smallest state: no recomputation helps
        d = everything()
        g, p = subject.run(lambda i: passes(i, d), budget_bytes, device, trials)
        raise _floor_error(_state_labelled(p, d), budget_bytes, levers, lossless_plan, floor)
    best: tuple[TrainGraph, MemoryPlan, _Decision] | None = None
    smallest: tuple[TrainGraph, MemoryPlan, _Decision] | None = None
    tried: set[tuple] = set()
    for round_ in range(_ROUNDS):
        d = decide(mode)
        if d is None and mode == "tight":
            mode = "safe"
            d = decide(mode)
        if d is None or round_ == _ROUNDS - 1:  # every lever at its most: the smallest peak there is
            d = everything()
        key = (mode, d.k, tuple(sorted((c, o.label) for c, o in d.state.items())))
        if key in tried:
            break
        tried.add(key)
        g, p = subject.run(lambda i, d=d: passes(i, d), budget_bytes, device, trials)
        if smallest is None or p.peak_bytes < smallest[1].peak_bytes:
            smallest = (g, p, d)
        if p.peak_bytes <= budget_bytes:
            best = (g, p, d)
            break
        at = _update_at_peak(g, p, subject)
        if at is not None and at in d.state and mode == "safe":  # the peak is that option's own op: not it
            banned.add((at, d.state[at].label))
            continue
        if mode == "tight":
            mode = "safe"
            continue
        predicted = persistent0 + sum(o.persistent * classes[c].mult for c, o in d.state.items()) + \
            table(mode)[1][d.k]
        gaps[mode] = max(gaps[mode] + 1, p.peak_bytes - predicted)  # the table missed by this much here
    if best is not None:
        g, p, d = best
        return Choice(g, _state_labelled(p, d), tuple(trials))
    g, p, d = smallest
    how = (f"after recomputing {d.k} of {len(d.steps)} steps of saved values and with optimizer-state options on "
           f"{len(d.state)} of {len(classes)} parameter{'s' if not subject.blocks else ' classes'} "
           f"(levers={levers!r}); the lossless plan ({', '.join(lossless_plan.passes)}) peaks at "
           f"{fmt_bytes(lossless_plan.peak_bytes)}")
    raise _budget_error(_state_labelled(p, d), budget_bytes, how)


def _combined(options: list[Option]) -> list[Option]:
    """One target's options as single choices: each option alone, and every combination of options of
    different groups (one state setting and one weight setting) that no ``alone`` option is part of; a
    combination adds its parts' bytes and FLOPs and is as lossy as its lossiest part."""
    groups: dict[str, list[Option]] = {}
    for o in options:
        groups.setdefault(o.group, []).append(o)
    if len(groups) < 2:
        return options
    out = list(options)
    for pick in itertools.product(*([None, *opts] for opts in groups.values())):
        parts = [o for o in pick if o is not None]
        if len(parts) < 2 or any(o.alone for o in parts):
            continue
        out.append(Option("+".join(o.pass_name for o in parts), parts[0].target, " + ".join(o.label for o in parts),
                          (), persistent=sum(o.persistent for o in parts), transient=sum(o.transient for o in parts),
                          flops=sum(o.flops for o in parts), lossiness=LOSSINESS[max(o.rank for o in parts)],
                          degree=sum(o.degree for o in parts), group="+".join(sorted(groups)), parts=tuple(parts)))
    return out


def _retarget(o: Option, fqn: str) -> Option:
    return o if o.target == fqn else dataclasses.replace(o, target=fqn)


def _recompute_table(subject: _Subject, reserve: list[dict[str, int]]
                     ) -> tuple[list[list[tuple[str, ...]]], list[int], dict[str, int]]:
    """The recomputation sequence (per step, the names it frees in each graph), the predicted peak of
    intermediates after k steps (k = 0: the free choice), and with every step taken the bytes live where
    each parameter's gradient is made, extrapolated for Blocks (keyed by FQN, or by class for Blocks)."""
    lever = registered_passes()[RECOMPUTE_PASS]
    if not subject.blocks:
        start, seq, at = lever.sequence(subject.graphs[0], reserve=reserve[0])
        return [[s.names] for s in seq], [start] + [s.peak for s in seq], at
    g1, g2 = subject.graphs
    keys = subject.blocks.keys or block_keys(g1, g2, subject.blocks.base)
    if keys is None:
        raise ConfigError(where_what_got("memfit planner: Blocks", "captures of B and B + 1 identical layers",
                                         "forwards that differ by more than one block of ops",
                                         "plan the full graph (replicate=False)"))
    k1, k2 = keys
    start2, seq, at2 = lever.sequence(g2, families=k2, reserve=reserve[1])
    by_key1: dict[object, list[str]] = {}
    for n, key in k1.items():
        by_key1.setdefault(key, []).append(n.name)
    steps = [[tuple(by_key1.get(s.key, ())), s.names] for s in seq]
    peaks1, at1 = lever.replay(g1, [s[0] for s in steps], reserve=reserve[0])
    peaks2 = [start2] + [s.peak for s in seq]
    layers = subject.blocks.layers
    at: dict[str, int] = {}
    for f, a in at1.items():  # the first layer's parameter in both captures stands for its class
        c = param_class(f)
        if c not in at and f in at2:
            at[c] = a + (layers - subject.blocks.base) * (at2[f] - a)
    k = layers - subject.blocks.base
    return steps, [a + k * (b - a) for a, b in zip(peaks1, peaks2, strict=True)], at


def _live_at_updates(subject: _Subject, runs: list[tuple[TrainGraph, MemoryPlan]], classes: dict[str, _Class]
                     ) -> dict[str, int]:
    """Per class, the intermediates live where its update runs in the lossless plan (kernel workspace and
    persistent bytes left out): what an option's transient comes on top of. Extrapolated for Blocks."""
    per_graph = []
    for i, (g, p) in enumerate(runs):
        index = {name: j for j, name in enumerate(p.node_names)}
        base = sum(p.persistent.values())
        work = p.category_timeline.get("kernel workspace", ())
        out = {}
        for c, cl in classes.items():
            fqn = cl.members[i][0] if cl.members[i] else None
            node = g.updates.get(fqn) if fqn else None
            if node is not None and node.name in index:
                j = index[node.name]
                out[c] = p.timeline[j] - base - (work[j] if work else 0)
        per_graph.append(out)
    if not subject.blocks:
        return per_graph[0]
    k = subject.blocks.layers - subject.blocks.base
    return {c: a + k * (per_graph[1].get(c, a) - a) for c, a in per_graph[0].items()}


def _update_at_peak(g: TrainGraph, p: MemoryPlan, subject: _Subject) -> str | None:
    """The class whose update op is the plan's peak node, if the peak is at an update."""
    for fqn, node in g.updates.items():
        if node.name == p.peak_node:
            return param_class(fqn) if subject.blocks else fqn
    return None


def _decide(classes: dict[str, _Class], curve: list[int], persistent0: int, gap: int, budget: int,
            live_u: dict[str, int], live_k: dict[str, int], banned: set[tuple[str, str]]) -> _Decision | None:
    """The least lossy state that fits with every recomputation step, then the fewest steps that fit with it.

    An option's transient comes on top of the state and what is live at its update (``live_k`` with every
    recomputation step taken, ``live_u`` in the lossless plan; at most the intermediates' peak): it *wants*
    the state to save that much. At a need N only options wanting at most
    N are admissible; needs are tried in increasing order (the base need, then each option's want above
    it); of the answers, the least lossy is taken (fewest elements on lossy options, then on near-lossless
    ones, then the lower need)."""
    base = persistent0 + curve[-1] + gap - budget
    want = {(c, o.label): persistent0 + min(live_k.get(c, 0), curve[-1]) + o.transient - budget
            for c, cl in classes.items() for o in cl.options if o.transient} if live_u else {}
    levels = sorted({base, *(w for w in want.values() if w > base)})
    if len(levels) > 64:  # many distinct wants: a spread of them (the largest kept)
        levels = [levels[round(i * (len(levels) - 1) / 63)] for i in range(64)]
    best_key, state = None, None
    for need in levels:
        out = banned | {k for k, w in want.items() if w > need}
        got = _knapsack(classes, need, out) if need > 0 else {}
        if got is None:
            continue
        key = (*_lossiness(got, classes), need)
        if best_key is None or key < best_key:
            best_key, state = key, got
        if need <= 0:
            break  # nothing needed: nothing is less lossy
    if state is None:
        return None
    after = persistent0 + sum(o.persistent * classes[c].mult for c, o in state.items()) + gap

    def fits(k: int) -> bool:  # the step's peak and every chosen option's transient, at k steps
        return after + curve[k] <= budget and all(
            after - gap + min(live_u.get(c, 0), curve[k]) + o.transient <= budget for c, o in state.items())

    k = next((i for i in range(len(curve)) if fits(i)), len(curve) - 1)
    return _Decision(k, state)


def _lossiness(state: dict[str, Option], classes: dict[str, _Class]) -> tuple[int, ...]:
    """Parameter elements on each lossiness class, the lossiest first (the planner's order of preference)."""
    out = [0] * len(LOSSINESS)
    for c, o in state.items():
        out[o.rank] += classes[c].numel * classes[c].mult
    return tuple(reversed(out))


def _floor(classes: dict[str, _Class], banned: set[tuple[str, str]]) -> int:
    """The change in persistent bytes with every class at its largest saving (not banned): the most saved."""
    return sum(min([0] + [o.persistent * cl.mult for o in cl.options if (c, o.label) not in banned])
               for c, cl in classes.items())


def _knapsack(classes: dict[str, _Class], need: int, banned: set[tuple[str, str]] = frozenset()
              ) -> dict[str, Option] | None:
    """Options saving at least ``need`` bytes with the fewest parameter elements on lossy options, then on
    near-lossless ones (lossless options are free); None when all of them together save less."""
    by_rank: dict[int, dict[str, list[Option]]] = {}
    for c, cl in classes.items():
        for o in cl.options:
            if o.persistent < 0 and (c, o.label) not in banned:
                by_rank.setdefault(o.rank, {}).setdefault(c, []).append(o)
    chosen: dict[str, Option] = {}
    remaining = need
    for c, cl in classes.items():  # lossless options: take the best saving of each, at no cost
        free = [o for o in by_rank.get(0, {}).get(c, [])]
        if free:
            chosen[c] = min(free, key=lambda o: o.persistent)
            remaining += chosen[c].persistent * cl.mult
    if remaining <= 0:
        return chosen
    ranks = sorted(r for r in by_rank if r > 0)
    for level, r in enumerate(ranks):  # the lowest class that can cover the need on top of those below it
        below = {c: min(opts, key=lambda o: o.persistent) for rr in ranks[:level] for c, opts in by_rank[rr].items()}
        below_saving = {c: -o.persistent * classes[c].mult for c, o in below.items()}
        extra = {}
        for c, opts in by_rank[r].items():
            for o in opts:
                gain = -o.persistent * classes[c].mult - below_saving.get(c, 0)
                if gain > 0:
                    extra.setdefault(c, []).append((o, gain))
        if sum(below_saving.values()) + sum(max(g for _, g in v) for v in extra.values()) < remaining:
            continue
        # fewest elements at this class covering what the classes below cannot; then the classes below
        # cover the rest, as few elements as possible, level by level
        top = _min_cost_cover(extra, classes, remaining - sum(below_saving.values()))
        if top is None:
            continue
        left = remaining - sum(g for _, g in top.values())
        for c, (o, _) in top.items():
            chosen[c] = o
        for rr in reversed(ranks[:level]):
            if left <= 0:
                break
            cand = {c: [(o, -o.persistent * classes[c].mult) for o in opts]
                    for c, opts in by_rank[rr].items() if c not in chosen}
            sub = _min_cost_cover(cand, classes, left) or {c: max(v, key=lambda t: t[1]) for c, v in cand.items()}
            for c, (o, g) in sub.items():
                chosen[c] = o
                left -= g
        return chosen
    return None


def _min_cost_cover(items: dict[str, list[tuple[Option, int]]], classes: dict[str, _Class], need: int
                    ) -> dict[str, tuple[Option, int]] | None:
    """At most one (option, bytes saved) per class, saving at least ``need``, with the fewest parameter
    elements on these options (ties: the lower degree, e.g. rank n/4 before n/16): a multiple-choice
    knapsack by dynamic programming over the bytes in
    ``_UNITS`` steps, each saving rounded down (a chosen set saves at least what the table says)."""
    if need <= 0:
        return {}
    unit = max(1, math.ceil(need / _UNITS))
    size = _UNITS + 1
    cost = np.full(size, np.inf)  # cost[u]: fewest elements saving at least u units with the classes so far
    cost[0] = 0.0
    picks: list[tuple[str, np.ndarray, list[tuple[Option, int]]]] = []
    for c, opts in items.items():
        new = cost.copy()
        arg = np.full(size, -1, dtype=np.int16)  # the option that reached each cell (-1: this class skipped)
        for j, (o, gain) in enumerate(opts):
            u = min(gain // unit, size - 1)
            if u <= 0:
                continue
            w = classes[c].numel * classes[c].mult * (1.0 + 0.01 * o.degree)
            shifted = np.concatenate([np.full(u, cost[0]), cost[:size - u]]) + w
            better = shifted < new
            new[better] = shifted[better]
            arg[better] = j
        picks.append((c, arg, opts))
        cost = new
    at = math.ceil(need / unit)
    if not np.isfinite(cost[at]):
        return None
    out: dict[str, tuple[Option, int]] = {}
    for c, arg, opts in reversed(picks):
        j = int(arg[at])
        if j >= 0:
            o, gain = opts[j]
            out[c] = (o, gain)
            at = max(0, at - min(gain // unit, size - 1))
    return out


def _state_labelled(p: MemoryPlan, d: _Decision) -> MemoryPlan:
    """``p`` with the state setting chosen per parameter (or layer class) recorded."""
    choice = {c: o.label for c, o in d.state.items()}
    return dataclasses.replace(p, state_choice=choice)


def _floor_error(p: MemoryPlan, budget: int, levers: str, lossless: MemoryPlan, floor: int) -> BudgetError:
    at = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.persistent.items() if v)
    return BudgetError(where_what_got(
        "memfit planner", f"a step that fits the budget {fmt_bytes(budget)}",
        f"a floor of {fmt_bytes(floor)} that no lever reduces yet ({at}, with every option levers={levers!r} "
        f"allows taken); the smallest peak reachable is {fmt_bytes(p.peak_bytes)} (that plan: "
        f"{', '.join(p.passes)}); the lossless plan ({', '.join(lossless.passes)}) peaks at "
        f"{fmt_bytes(lossless.peak_bytes)}; largest live at the peak (of the smallest plan): {p.describe_largest()}",
        "raise the budget above the floor, allow lossier levers, or freeze parameters (frozen=...) to drop "
        "their optimizer state"), plan=p, budget_bytes=budget, floor_only=True)


def _budget_error(p: MemoryPlan, budget: int, how: str) -> BudgetError:
    at = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.at_peak.items() if v)
    return BudgetError(where_what_got(
        "memfit planner", f"a step that fits the budget {fmt_bytes(budget)}",
        f"a smallest reachable peak of {fmt_bytes(p.peak_bytes)} {how} (that plan: {', '.join(p.passes)}; at its "
        f"peak: {at}); largest live at the peak: {p.describe_largest()}",
        "raise the budget, shrink the batch, or freeze parameters (frozen=...)"), plan=p, budget_bytes=budget)
