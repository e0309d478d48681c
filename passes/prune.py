"""prune: pruning masks applied to the weights and to their updates, on a schedule (memfit.sparsity).

Rewrites, per target weight: two state tensors, ``<fqn>::pruned`` (the mask as packed bits, 1 = pruned,
one bit per element) and ``<fqn>::prune_sched`` (events done, step of the last), and a
``memfit::prune_mask`` op between the weight's gradient and its update op. At a schedule event the op
prunes the weight to the scheduled sparsity by magnitude (or to an n:m pattern), for GraNet drops and
regrows a further fraction (regrown weights start at zero), zeroes the weight where pruned and its
optimizer moments where the mask changed; at every step it hands the update the gradient with the pruned
entries zeroed. AdamW and SGD then leave a pruned weight exactly zero (zero gradient, zero moments, decay
of zero), so the forward computes with the masked weight without a multiply.

The mask starts as the model's exact zeros: a dense model starts dense; a model pruned once by
``memfit.sparsity.prune_model`` (magnitude, Wanda, GBLM, n:m) keeps its mask with ``schedule="fixed"``.

Schedules: ``"fixed"`` (never changes), ``"oneshot"`` (prune once at step ``start``), ``"gradual"`` (Zhu &
Gupta's cubic schedule from ``initial`` to ``sparsity`` at ``start + k * every``, ``k = 0..events``),
``"granet"`` (gradual plus prune-and-regrow of ``regrow`` of the kept weights at each event, decayed by
a half cosine). ``initial = sparsity`` with ``"granet"`` is sparse-to-sparse training. ``scope``: ``"layer"``
(every target at ``sparsity``) or ``"erk"`` (layer-adaptive Erdős–Rényi-Kernel sparsities averaging
``sparsity``). ``total_steps``, when given, must cover the schedule.

Requires ``fused_update`` with AdamW or SGD (fp32 moments) on the targets; not with micro-steps when the
mask changes, nor with ``lowrank``, ``quantize_state`` or ``quantize_weights`` on a target.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import sparsity as sp
from ..errors import ConfigError, where_what_got
from ..graph import StateSpec, TrainGraph
from ..ops import PRUNE_SCHEDULES, args_of, op_call, prune_workspace, replace_args
from .base import MemoryEffect, Option, Pass, PassResult, register_pass
from .quantize_weights import default_targets

_WHERE = "passes['prune']"
_PLAIN_UPDATES = {torch.ops.memfit.adamw_update.default: ("exp_avg", "exp_avg_sq"),
                  torch.ops.memfit.sgd_update.default: ("momentum_buffer", None)}


@register_pass("prune")
@dataclass(frozen=True)
class Prune(Pass):
    sparsity: float = 0.5
    schedule: str = "gradual"
    initial: float = 0.0
    start: int = 1
    every: int = 100
    events: int = 10
    regrow: float = 0.3
    pattern: str | None = None
    scope: str = "layer"
    targets: tuple[str, ...] | None = None
    total_steps: int | None = None
    compress: bool = False
    compress_weights: bool = False  # with compress and schedule "fixed": the weight held as its kept values
    sparsities: tuple[tuple[str, float], ...] = ()  # (glob, sparsity) per target; the first match wins

    requires = ("fused_update",)
    lossless = False

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        items = self.sparsities.items() if isinstance(self.sparsities, dict) else self.sparsities
        object.__setattr__(self, "sparsities", tuple((str(gl), sp.check_sparsity(v, f"{_WHERE}.sparsities[{gl!r}]"))
                                                     for gl, v in items))
        if self.schedule not in PRUNE_SCHEDULES:
            raise ConfigError(where_what_got(f"{_WHERE}.schedule", f"one of {PRUNE_SCHEDULES}", repr(self.schedule),
                                             "pick one"))
        sp.check_sparsity(self.sparsity, _WHERE)
        sp.check_sparsity(self.initial, _WHERE, "initial")
        if self.scope not in ("layer", "erk"):
            raise ConfigError(where_what_got(f"{_WHERE}.scope", "'layer' or 'erk' while training",
                                             repr(self.scope), "one threshold over every weight ('global') or per "
                                             "row is for the one-shot memfit.sparsity.prune_model"))
        for name in ("start", "every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(where_what_got(f"{_WHERE}.{name}", "an int >= 1 (steps count from 1)", v,
                                                 f"pass e.g. {name}=100"))
        if isinstance(self.events, bool) or not isinstance(self.events, int) or self.events < 0:
            raise ConfigError(where_what_got(f"{_WHERE}.events", "an int >= 0 (pruning events after the first)",
                                             self.events, "pass e.g. events=10"))
        if not 0.0 <= float(self.regrow) < 1.0:
            raise ConfigError(where_what_got(f"{_WHERE}.regrow", "a fraction in [0, 1) of the kept weights",
                                             self.regrow, "GraNet's default is around 0.3-0.5"))
        if self.schedule in ("gradual", "granet") and self.initial > self.sparsity:
            raise ConfigError(where_what_got(_WHERE, "initial <= sparsity (the schedule prunes, never densifies)",
                                             f"initial={self.initial}, sparsity={self.sparsity}",
                                             "swap them, or set initial=sparsity for sparse-to-sparse GraNet"))
        pat = sp.parse_pattern(self.pattern, f"{_WHERE}.pattern")
        if pat is not None and self.schedule not in ("fixed", "oneshot"):
            raise ConfigError(where_what_got(f"{_WHERE}.pattern", "an n:m pattern with schedule 'oneshot' or 'fixed'",
                                             f"pattern={self.pattern!r}, schedule={self.schedule!r}",
                                             "an n:m mask has one sparsity: prune it once"))
        if self.compress and not self.constant_density:
            raise ConfigError(where_what_got(f"{_WHERE}.compress", "a mask whose kept count is fixed from the first "
                                             "update: schedule 'fixed', 'oneshot' with start=1, or sparse-to-sparse "
                                             "'granet' (initial = sparsity) with start=1",
                                             f"schedule={self.schedule!r}, start={self.start}, "
                                             f"initial={self.initial}, sparsity={self.sparsity}",
                                             "compress after the density stops changing (a second run with "
                                             "schedule='fixed'), or leave compress off"))
        if self.compress_weights and not (self.compress and self.schedule == "fixed"):
            raise ConfigError(where_what_got(f"{_WHERE}.compress_weights", "compress=True with schedule 'fixed'",
                                             f"compress={self.compress}, schedule={self.schedule!r}",
                                             "prune the model first (prune_model), then train it with "
                                             "schedule='fixed', compress=True, compress_weights=True"))
        if self.total_steps is not None and self.last_event > self.total_steps:
            raise ConfigError(where_what_got(_WHERE, f"a schedule ending by total_steps={self.total_steps}",
                                             f"its last event at step {self.last_event} (start {self.start} + "
                                             f"events {self.events} x every {self.every})",
                                             "start earlier, prune every fewer steps, or take fewer events"))

    @property
    def constant_density(self) -> bool:
        if self.schedule == "fixed":
            return True
        if self.start != 1:
            return False
        return self.schedule == "oneshot" or (self.schedule == "granet" and self.initial == self.sparsity)

    def kept(self, numel: int, sparsity: float) -> int:
        """Entries a target keeps after its first event (the compressed state's length)."""
        pat = sp.parse_pattern(self.pattern, f"{_WHERE}.pattern")
        if pat is not None:
            return numel // pat[1] * (pat[1] - pat[0])
        return numel - round(sparsity * numel)

    @property
    def last_event(self) -> int:
        if self.schedule in ("gradual", "granet"):
            return self.start + self.events * self.every
        return self.start if self.schedule == "oneshot" else 0

    def _targets(self, g: TrainGraph) -> list[str]:
        if self.targets is None:
            return [f for f in default_targets(g) if f in g.updates]
        g.check_globs(self.targets, f"{_WHERE}.targets")
        return g.match(self.targets, list(g.params))

    def _sparsities(self, g: TrainGraph, fqns: list[str]) -> dict[str, float]:
        if self.scope == "erk":
            dens = sp.erk_densities({f: tuple(g.params[f].meta["val"].shape) for f in fqns}, self.sparsity)
            return {f: 1 - d for f, d in dens.items()}
        return {f: next((v for gl, v in self.sparsities if fnmatch.fnmatchcase(f, gl)), float(self.sparsity))
                for f in fqns}

    # ---- the planner lever (opt-in: name "prune" in lever_passes) --------------------------------------

    LEVER_SPARSITIES: ClassVar[tuple[float, ...]] = (0.5, 0.75, 0.9)

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """At ``levers`` lossy: each AdamW-trained weight (the ``default_targets``) pruned by magnitude at the
        first step to 50%, 75% or 90%, its moments held for the kept entries only (``compress=True``): exact
        persistent bytes (moments, packed mask, schedule counter), the mask op's worst-step workspace and
        output as the transient. Taken alone on its target (it replaces the update op's state)."""
        if levers not in ("lossy", "adapters"):
            return []
        out = []
        for f in default_targets(g):
            upd = g.updates.get(f)
            if upd is None or upd.target is not torch.ops.memfit.adamw_update.default:
                continue
            a = args_of(upd)
            if a.wscale is not None or a.micro_steps > 1 or a.spike_threshold:
                continue
            val, grad = g.params[f].meta["val"], a.grad.meta["val"]
            numel, gb = val.numel(), grad.numel() * grad.element_size()
            for s in cls.LEVER_SPARSITIES:
                kept = numel - round(s * numel)
                persistent = 8 * (kept - numel) + sp.packed_bytes(numel) + 16
                work = gb + prune_workspace(numel, gb, "oneshot", False, 2)
                out.append(Option("prune", f, f"pruned {s:.0%}", (("sparsity", s),), persistent=persistent,
                                  transient=work, lossiness="lossy", degree=10 + int(10 * s), alone=True))
        return out

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        return "prune", {"schedule": "oneshot", "start": 1, "compress": True,
                         "targets": tuple(o.target for o in chosen),
                         "sparsities": tuple((o.target, dict(o.config)["sparsity"]) for o in chosen)}

    def _check(self, g: TrainGraph, fqns: list[str]) -> None:
        if not fqns:
            raise ConfigError(where_what_got(f"{_WHERE}.targets", "trainable weights of the step",
                                             list(self.targets or ["(default: every 2-D weight but embeddings and "
                                                                   "the head)"]),
                                             "name weights the step updates, e.g. 'model.layers.*.mlp.*.weight'"))
        pat = sp.parse_pattern(self.pattern, f"{_WHERE}.pattern")
        for f in fqns:
            upd = g.updates.get(f)
            if upd is None:
                raise ConfigError(where_what_got(f"{_WHERE}.targets", "weights that train (have an update op)",
                                                 f, "leave frozen weights out of the targets"))
            if upd.target not in _PLAIN_UPDATES or args_of(upd).wscale is not None:
                raise ConfigError(where_what_got(f"{_WHERE} on {f!r}", "an AdamW or SGD update on fp32 state",
                                                 f"{upd.target}" + (" on INT8 weights"
                                                                    if args_of(upd).wscale is not None else ""),
                                                 "leave this weight out of the prune targets, or of lowrank / "
                                                 "quantize_state / quantize_weights"))
            if self.compress and (upd.target is not torch.ops.memfit.adamw_update.default
                                  or args_of(upd).micro_steps > 1 or args_of(upd).spike_threshold):
                raise ConfigError(where_what_got(f"{_WHERE}.compress on {f!r}", "a plain AdamW update (no "
                                                 "micro-steps, no spike clipping)", str(upd.target),
                                                 "leave compress off for this optimizer"))
            if args_of(upd).micro_steps > 1 and self.schedule != "fixed":
                raise ConfigError(where_what_got(_WHERE, "micro_steps=1 with a mask that changes",
                                                 f"micro_steps={args_of(upd).micro_steps}",
                                                 "use schedule='fixed' with gradient accumulation"))
            if pat is not None:
                shape = tuple(g.params[f].meta["val"].shape)
                sp.check_pattern_fits(pat, (shape[0], math.prod(shape[1:])), f, _WHERE)

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        fqns = self._targets(g)
        target = self._sparsities(g, fqns)
        per = {}
        work = 0
        pattern = self.pattern is not None
        for f in fqns:
            val = g.params[f].meta["val"]
            per[f] = sp.packed_bytes(val.numel()) + 16
            if self.compress:  # AdamW's two moments shrink to the kept entries
                per[f] += 8 * (self.kept(val.numel(), target[f]) - val.numel())
            work = max(work, val.numel() * val.element_size() + prune_workspace(
                val.numel(), val.numel() * val.element_size(), self.schedule, pattern, 2 if self.compress else 0))
        return MemoryEffect(persistent=sum(per.values()), transient=work, per_param=per)

    def run(self, g: TrainGraph) -> PassResult:
        fqns = self._targets(g)
        self._check(g, fqns)
        target = self._sparsities(g, fqns)
        pat = sp.parse_pattern(self.pattern, f"{_WHERE}.pattern")
        step = g.hparams["step"]
        for f in fqns:
            upd = g.updates[f]
            a = args_of(upd)
            p = g.params[f]
            numel = p.meta["val"].numel()
            pruned = g.add_state(f"{f}::pruned", StateSpec((sp.packed_bytes(numel),), torch.uint8, f, "mask"))
            if self.compress_weights:
                self._compress_weight(g, f, upd, pruned, self.kept(numel, target[f]))
                continue
            sched = g.add_state(f"{f}::prune_sched", StateSpec((2,), torch.int64, f, "pass"))
            m1, m2 = (getattr(a, n) if n else None for n in _PLAIN_UPDATES[upd.target])
            # ERK scales the whole schedule per layer: its initial sparsity in proportion to its final one
            initial = self.initial * target[f] / self.sparsity if self.scope == "erk" and self.sparsity else \
                self.initial
            with g.graph.inserting_before(upd):
                node = op_call(g.graph, torch.ops.memfit.prune_mask.default, param=p, grad=a.grad, pruned=pruned,
                               sched=sched, moment1=m1, moment2=m2, step=step, schedule=self.schedule,
                               sparsity=float(target[f]), initial=float(initial), start=int(self.start),
                               every=int(self.every), events=int(self.events), regrow=float(self.regrow),
                               pattern_n=pat[0] if pat else 0, pattern_m=pat[1] if pat else 0)
            with g.fake_mode():
                node.meta["val"] = torch.empty_like(a.grad.meta["val"])
            upd.args, upd.kwargs = replace_args(upd, grad=node)
            kept = self.kept(numel, target[f]) if self.compress else None
            if self.compress:
                self._compress(g, f, upd, node, pruned, kept)
            g.inits.append(sp.MaskFromZeros(f, f"{f}::pruned", kept if self.schedule == "fixed" else None))
        g.info["prune"] = {"targets": fqns, "sparsity": target, "schedule": self.schedule, "compress": self.compress}
        # the weight copies compress_weights adds (and their re-made views) get their meta re-propagated
        return PassResult(g, True, {"targets": len(fqns), "schedule": self.schedule},
                          meta_ok=not self.compress_weights)

    def _compress(self, g: TrainGraph, fqn: str, upd, grad, pruned, kept: int) -> None:
        """AdamW on the kept entries only: the moments become ``kept``-long vectors (in flat order of the kept
        positions) and the update op ``memfit::sparse_adamw_update``."""
        a = args_of(upd)
        for name in ("exp_avg", "exp_avg_sq"):
            node = getattr(a, name)
            state = f"{fqn}::{name}"
            g.state_specs[state] = StateSpec((kept,), torch.float32, fqn, "optimizer")
            with g.fake_mode():
                node.meta["val"] = torch.empty((kept,), dtype=torch.float32, device=a.param.meta["val"].device)
        with g.graph.inserting_before(upd):
            new = op_call(g.graph, torch.ops.memfit.sparse_adamw_update.default, param=a.param, grad=grad,
                          pruned=pruned, exp_avg=a.exp_avg, exp_avg_sq=a.exp_avg_sq, lr=a.lr, step=a.step,
                          beta1=a.beta1, beta2=a.beta2, eps=a.eps, weight_decay=a.weight_decay)
        new.meta["val"] = None
        g.updates[fqn] = new
        g.graph.erase_node(upd)

    def _compress_weight(self, g: TrainGraph, fqn: str, upd, pruned, kept: int) -> None:
        """The weight held as its ``kept`` values: every reader reads a ``memfit::sparse_weight`` copy made just
        before it (one per reader, as ``quantize_weights``' copies), and AdamW steps the values with moments
        of their length. The mask never changes (schedule "fixed"), so no mask op runs."""
        from .quantize_weights import _rewire_to_dequant

        p = g.params[fqn]
        val = p.meta["val"]
        shape = list(val.shape)
        with g.fake_mode():
            p.meta["val"] = torch.empty((kept,), dtype=val.dtype, device=val.device)
        _rewire_to_dequant(g, p, lambda: g.graph.call_function(torch.ops.memfit.sparse_weight.default,
                                                               (p, pruned, shape)))
        self._compress(g, fqn, upd, args_of(upd).grad, pruned, kept)
        g.inits.append(sp.SparseValues(fqn, f"{fqn}::pruned", kept, tuple(shape), val.dtype))
