"""The Tiny Training Engine's scheme search for ``sparse_update``: contribution analysis, then evolution.

``search_sparse_update(model, train, held_out, loss_fn=..., budget=...)``:

1. **Layers.** Every Linear / Conv weight, in model order, with its companions (its bias and the norm module
   right after it in ``named_modules`` order: a BatchNorm after a Conv, say); ``layers(model)``.
2. **Contribution analysis** (short fine-tunes from the given weights, ``steps`` AdamW steps on ``train``,
   measured on ``held_out``; the gain is the drop in loss, or the rise in accuracy with
   ``metric="accuracy"``): ``bias[k]``, the gain of training the companions of the last ``k`` layers, for
   every ``k``; ``weight[i][r]``, the extra gain of training weight ``i`` at ratio ``r`` of its input channels
   on top of the biases of the layers from ``i`` to the last. Each fine-tune is eager PyTorch with the
   gradients cut exactly as ``sparse_update`` cuts them (the tests check the two train alike), which skips a
   capture per fine-tune.
3. **Evolutionary search** over schemes ``(k, r_1 .. r_L)``: fitness ``bias[k] + sum_i weight[i][r_i]``
   subject to the planner's predicted peak of the scheme (``sparse_update`` + ``remat`` + ``fused_update`` on
   one capture of the step, re-planned per scheme, cached) being at most ``budget``. A population seeded
   with the uniform "last k biases" schemes, mutation and uniform crossover, the best kept each generation.

Returns a ``SearchResult``: the scheme to pass to ``sparse_update``, the setting chosen per layer, the
predicted peak, the summed gain, the contribution tables, and how many fine-tunes and plans it took and how
long. ``result.report()`` is a table. A progress bar runs on stderr when it is a terminal.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BudgetError, ConfigError, where_what_got
from .frontends.export import capture
from .passes.base import make_pass
from .passes.fused_update import AdamW
from .passes.sparse_update import RATIOS
from .runtime.memory import fmt_bytes
from .runtime.planner import run_passes

_WHERE = "memfit.search_sparse_update"
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Layer:
    weight: str
    companions: tuple[str, ...]
    depthwise: bool = False


def layers(model: nn.Module) -> list[Layer]:
    """The layers a sparse-update scheme chooses for: Linear / Conv weights in order, each with its bias and the
    norm module right after it (or, for a norm with no such layer, the layer before it)."""
    mods = list(model.named_modules())
    out: list[Layer] = []
    for i, (name, mod) in enumerate(mods):
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        prefix = f"{name}." if name else ""
        comp = [f"{prefix}bias"] if getattr(mod, "bias", None) is not None else []
        nxt = next(((n, m) for n, m in mods[i + 1:] if not list(m.children())), None)
        if nxt is not None and (isinstance(nxt[1], _NORMS) or "norm" in type(nxt[1]).__name__.lower()):
            comp += [f"{nxt[0]}.{p}" for p, _ in nxt[1].named_parameters(recurse=False)]
        depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
        out.append(Layer(f"{prefix}weight", tuple(comp), depthwise))
    return out


@dataclass
class SearchResult:
    scheme: dict[str, float]
    per_layer: list[dict[str, Any]]
    gain: float
    peak_bytes: int
    budget_bytes: int
    metric: str
    base_value: float
    bias_gain: list[float]
    weight_gain: list[dict[float, float]]
    fine_tunes: int
    plans: int
    generations: int
    seconds: float
    history: list[float] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"sparse-update scheme: predicted peak {fmt_bytes(self.peak_bytes)} <= budget "
                 f"{fmt_bytes(self.budget_bytes)}; summed {self.metric} gain {self.gain:+.4f} "
                 f"(from {self.base_value:.4f}); {self.fine_tunes} fine-tunes, {self.plans} plans, "
                 f"{self.generations} generations, {self.seconds:.0f} s",
                 "", "| layer | setting | gain |", "|---|---|---|"]
        for row in self.per_layer:
            lines.append(f"| {row['layer']} | {row['setting']} | {row['gain']:+.4f} |")
        return "\n".join(lines)


def _evaluate(model: nn.Module, held_out: Sequence, loss_fn: Callable, metric: str) -> float:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            vals = []
            for batch in held_out:
                out = model(*batch[:-1])
                out = out.logits if hasattr(out, "logits") else out
                if metric == "accuracy":
                    vals.append(float((out.argmax(-1) == batch[-1]).float().mean()))
                else:
                    vals.append(float(loss_fn(out, batch[-1])))
        return statistics.fmean(vals)
    finally:
        model.train(was)


def _slices(lay: list[Layer], model: nn.Module, ratios: dict[str, float]) -> dict[str, tuple[int, int]]:
    params = dict(model.named_parameters())
    out = {}
    for layer in lay:
        r = ratios.get(layer.weight, 0.0)
        if 0 < r < 1:
            shape = params[layer.weight].shape
            dim = 0 if layer.depthwise else 1
            out[layer.weight] = (dim, math.ceil(r * shape[dim]))
    return out


def fine_tune(model: nn.Module, scheme: dict[str, float], lay: list[Layer], train: Sequence, held_out: Sequence,
              loss_fn: Callable, steps: int, lr: float, metric: str) -> float:
    """The metric on ``held_out`` after ``steps`` eager AdamW steps of a copy of ``model`` trained as
    ``sparse_update`` with ``scheme`` (FQN -> setting) trains it."""
    m = copy.deepcopy(model)
    m.train()
    params = dict(m.named_parameters())
    trained = {f for f, v in scheme.items() if v}
    cuts = _slices(lay, m, scheme)
    opt = torch.optim.AdamW([params[f] for f in trained], lr=lr, weight_decay=0.0) if trained else None
    for p in params.values():
        p.requires_grad_(False)
    for f in trained:
        params[f].requires_grad_(True)
    for i in range(steps if opt else 0):
        batch = train[i % len(train)]
        out = m(*batch[:-1])
        loss = loss_fn(out.logits if hasattr(out, "logits") else out, batch[-1])
        loss.backward()
        for f, (dim, k) in cuts.items():
            g = params[f].grad
            g.narrow(dim, k, g.shape[dim] - k).zero_()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _evaluate(m, held_out, loss_fn, metric)


def scheme_of(lay: list[Layer], k: int, ratios: Sequence[float]) -> dict[str, float]:
    """The ``sparse_update`` scheme: the companions of the last ``k`` layers (and of every layer whose weight
    trains) at 1, each weight at its ratio; everything else frozen (the pass's default)."""
    scheme: dict[str, float] = {}
    n = len(lay)
    for i, layer in enumerate(lay):
        if ratios[i] > 0:
            scheme[layer.weight] = float(ratios[i])
        if i >= n - k or ratios[i] > 0:
            for c in layer.companions:
                scheme[c] = 1.0
    return scheme


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="run", disable=not sys.stderr.isatty())


def search_sparse_update(model: nn.Module, train: Sequence[Sequence[Any]], held_out: Sequence[Sequence[Any]], *,
                         loss_fn: Callable, budget: int | float | str, lr: float = 1e-3, steps: int = 20,
                         ratios: Sequence[float] = (0.125, 0.25, 0.5, 1.0), metric: str = "loss",
                         population: int = 24, generations: int = 20, max_layers: int | None = None,
                         device: str | torch.device = "cpu", seed: int = 0) -> SearchResult:
    """Search the sparse-update scheme of ``model`` that gains most within ``budget`` (see the module doc).

    ``train`` and ``held_out`` are lists of batches ``(inputs..., target)``; ``max_layers`` limits the
    contribution analysis to the last layers (the rest stay frozen)."""
    t0 = time.perf_counter()
    if metric not in ("loss", "accuracy"):
        raise ConfigError(where_what_got(_WHERE, "metric 'loss' or 'accuracy'", repr(metric), "pick one"))
    bad = [r for r in ratios if r not in RATIOS or r == 0]
    if bad or not ratios:
        raise ConfigError(where_what_got(_WHERE, f"ratios from {RATIOS[1:]}", list(ratios), "e.g. (0.25, 0.5, 1)"))
    if not train or not held_out:
        raise ConfigError(where_what_got(_WHERE, "non-empty train and held_out batch lists",
                                         f"{len(train)} and {len(held_out)} batches", "pass a few batches of each"))
    from .api import parse_budget

    budget_bytes = parse_budget(budget, torch.device(device))
    lay = layers(model)
    if max_layers is not None:
        lay = lay[-max_layers:]
    if not lay:
        raise ConfigError(where_what_got(_WHERE, "a model with Linear or Conv layers", type(model).__name__,
                                         "sparse_update chooses among Linear / Conv weights"))
    n = len(lay)
    sign = 1.0 if metric == "accuracy" else -1.0
    base = _evaluate(model, held_out, loss_fn, metric)

    def gain(scheme: dict[str, float]) -> float:
        return sign * (fine_tune(model, scheme, lay, train, held_out, loss_fn, steps, lr, metric) - base)

    bar = _bar(n + n * len(ratios), "contributions")
    bias = [0.0]
    for k in range(1, n + 1):
        bias.append(gain(scheme_of(lay, k, [0.0] * n)))
        if bar is not None:
            bar.update()
    weight: list[dict[float, float]] = []
    for i in range(n):
        row = {0.0: 0.0}
        for r in ratios:
            rs = [0.0] * n
            rs[i] = r
            row[float(r)] = gain(scheme_of(lay, n - i, rs)) - bias[n - i]
            if bar is not None:
                bar.update()
        weight.append(row)
    if bar is not None:
        bar.close()
    fine_tunes = n + n * len(ratios)

    example = tuple(train[0])
    base_graph = capture(model, example, loss_fn)
    make = lambda spec: make_pass(spec, optimizer=AdamW(lr=lr, weight_decay=0.0))  # noqa: E731
    peaks: dict[tuple, int] = {}

    def peak(genome: tuple) -> int:
        if genome not in peaks:
            scheme = scheme_of(lay, genome[0], genome[1:])
            passes = [make(("sparse_update", {"scheme": scheme})), make("remat"), make("fused_update")]
            peaks[genome] = run_passes(base_graph, passes, None, device)[1].peak_bytes
        return peaks[genome]

    def score(genome: tuple) -> float:
        return bias[genome[0]] + sum(weight[i][r] for i, r in enumerate(genome[1:]))

    def fitness(genome: tuple) -> float:
        return score(genome) if peak(genome) <= budget_bytes else -math.inf

    rng = random.Random(seed)
    choices = [0.0, *map(float, ratios)]
    pop = [(k, *([0.0] * n)) for k in range(n + 1)]  # the uniform "last k biases" schemes
    pop.append(_greedy(pop, n, choices, score, peak, budget_bytes))
    while len(pop) < population:
        pop.append((rng.randint(0, n), *(rng.choice(choices) if rng.random() < 0.3 else 0.0 for _ in range(n))))
    history = []
    bar = _bar(generations, "evolution")
    for _ in range(generations):
        ranked = sorted(set(pop), key=fitness, reverse=True)
        history.append(fitness(ranked[0]))
        parents = ranked[:max(2, population // 2)]
        children = []
        while len(parents) + len(children) < population:
            a, b = rng.sample(parents, 2)
            child = [x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)]
            if rng.random() < 0.5:
                child[0] = min(n, max(0, child[0] + rng.choice((-1, 1))))
            else:
                child[1 + rng.randrange(n)] = rng.choice(choices)
            children.append(tuple(child))
        pop = parents + children
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    best = max(set(pop), key=fitness)
    if fitness(best) == -math.inf:
        smallest = min(peaks.values())
        raise BudgetError(where_what_got(_WHERE, f"a scheme whose predicted peak fits {fmt_bytes(budget_bytes)}",
                                         f"the smallest of {len(peaks)} planned at {fmt_bytes(smallest)}",
                                         "raise the budget or shrink the batch"))
    scheme = scheme_of(lay, best[0], best[1:])
    per_layer = []
    for i, layer in enumerate(lay):
        r = best[1 + i]
        if r > 0:
            setting = f"weight {r:g} of input channels" + (" + bias" if layer.companions else "")
        elif i >= n - best[0]:
            setting = "bias only" if layer.companions else "frozen (no bias)"
        else:
            setting = "frozen"
        per_layer.append({"layer": layer.weight, "setting": setting,
                          "gain": weight[i][r] if r > 0 else 0.0})
    per_layer.append({"layer": f"biases of the last {best[0]}", "setting": "", "gain": bias[best[0]]})
    return SearchResult(scheme, per_layer, score(best), peak(best), budget_bytes, metric, base, bias, weight,
                        fine_tunes, len(peaks), generations, time.perf_counter() - t0, history)


def _greedy(uniform: list[tuple], n: int, choices: list[float], score, peak, budget: int) -> tuple:
    """A seed for the evolution: the best uniform bias scheme that fits, then repeatedly the one-layer ratio
    change with the most gain per byte of predicted peak that still fits."""
    fits = [g for g in uniform if peak(g) <= budget]
    if not fits:
        return uniform[0]
    best = max(fits, key=score)
    while True:
        base_score, base_peak = score(best), peak(best)
        moves = []
        for i in range(n):
            for r in choices:
                if r <= best[1 + i]:
                    continue
                cand = (*best[:1 + i], r, *best[2 + i:])
                gain = score(cand) - base_score
                if gain > 0 and peak(cand) <= budget:
                    moves.append((gain / max(peak(cand) - base_peak, 1), cand))
        if not moves:
            return best
        best = max(moves)[1]


def uniform_scheme(model: nn.Module, k: int, *, weights: bool = False) -> dict[str, float]:
    """The last ``k`` layers trained: their biases only, or (``weights``) whole (what freezing all but the last
    ``k`` layers with ``requires_grad=False`` does)."""
    lay = layers(model)
    n = len(lay)
    return scheme_of(lay, k, [1.0 if weights and i >= n - k else 0.0 for i in range(n)])
