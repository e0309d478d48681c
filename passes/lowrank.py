"""lowrank: low-rank gradient projection of 2-D weights (GaLore, APOLLO, Fira, FRUGAL; Q-GaLore options).

Rewrites: the ``memfit::adamw_update`` node of each selected 2-D weight (``fused_update`` placed it
where the gradient is produced) into one ``memfit::lowrank_update`` node. Its Adam moments shrink
from the weight's shape (m, n) to the projected shape, (r, n) when m < n or (m, r) otherwise; the
projector becomes pass state (the fp32 matrix, int4-packed with ``proj_bits=4``, r indices for
``dct``, nothing for ``random``, which regenerates it from a seed).

Settings (see ``projection.py`` for the math and the papers it follows):
  - ``projector``: ``svd`` (GaLore), ``randomized`` (range finder, no full SVD), ``dct`` (SVD-free,
    r indices), ``random`` (APOLLO's seeded Gaussian).
  - ``rule``: ``galore`` (W -= lr·scale·P·Adam(R)), ``apollo`` (the raw gradient scaled per channel,
    or per tensor with ``scaling="tensor"``, by ||Adam(R)|| / ||R||; APOLLO-Mini is rank 1 with
    tensor scaling and scale 128), ``fira`` (GaLore plus the residual G - P·R rescaled per channel,
    under the norm-growth limiter), ``frugal`` (GaLore plus signSGD on the residual).
  - ``moments``: what happens to Adam's moments when the subspace changes: ``keep`` (GaLore's
    choice), ``reset`` (zero them; FRUGAL's) or ``rotate`` (carry them into the new basis).
  - ``lazy_threshold`` (Q-GaLore): when the leading projection direction of the last 5 refreshes
    agrees (mean |cos| >= threshold) the refresh gap doubles; 0 turns it off.
  - ``stagger``: parameter i's refreshes are shifted by i·gap/N steps after the first, so no later
    step carries every SVD at once.
  - ``factored``: for a Linear weight under the ``galore`` rule, the projected gradient is computed
    from the backward's factors, P^T·dY^T·X, so the (m, n) weight gradient is never formed (except
    transiently by ``svd``/``dct`` refreshes); other rules need the full G and ignore it.
  - ``seed`` / ``seeds``: the random projector's seed; ``seeds="memfit"`` mixes it with each parameter's
    name, ``seeds="apollo-torch"`` draws exactly apollo-torch's CPU matrices for a per-parameter ``seed``
    (set in ``overrides``: apollo-torch uses the parameter's 1-based index in its optimizer), to
    reproduce an apollo-torch run or compare with it like for like.
  - ``store_projector`` (``random`` only): keep the drawn matrix between refreshes (rows x r fp32 of
    state, as apollo-torch does) instead of regenerating it from its seed every step (no state, a
    little more time per step).
  - ``state_bits``: 8 or 4 stores the low-rank moments block-wise quantized (``quantize_state`` sets
    it when it runs after this pass).
  - ``overrides``: per-parameter settings, ``{glob: {field: value}}`` (or ``(glob, dict)`` pairs) for
    the fields ``rank``, ``projector``, ``rule``, ``scaling``, ``scale``, ``proj_bits`` and ``seed``; the first
    glob that matches a parameter wins, the pass-wide value holds for every field it leaves out. Each
    override is checked like the pass-wide fields. Stored as a tuple of ``(glob, ((field, value), ...))``
    so the config stays hashable and its JSON form (``to_json``) is accepted back. The planner writes
    one ``lowrank`` pass with overrides to give each weight its own rank and projector.

Requires ``fused_update`` (it rewrites its nodes). Weights that are not 2-D, or whose smaller side is
not larger than their ``rank`` (after overrides), keep their AdamW update (listed in ``stats["skipped"]``).
``memory_effect``, ``stats`` and the state are per parameter: each projected weight's rank, projector
and rule are in ``stats["per_param"]``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

from .. import projection as pj
from ..errors import ConfigError, where_what_got
from ..graph import NAME_KEY, StateSpec, TrainGraph
from ..ops import SCHED_LEN, args_of, lowrank_workspace, op_call, state_block
from .base import MemoryEffect, Option, Pass, PassResult, refuse_spike_clipping, register_pass

_PROJECTORS = ("svd", "randomized", "dct", "random")
_RULES = ("galore", "apollo", "fira", "frugal")
_ADAMW = torch.ops.memfit.adamw_update.default
FULL_RANK_NAMES = ("embed", "wte", "wpe", "lm_head", "shared")  # the lever keeps these at full rank (by FQN)
GALORE_LEVER = {"projector": "svd", "rule": "galore", "scaling": "channel", "scale": 0.25}
APOLLO_MINI_LEVER = {"rank": 1, "projector": "random", "rule": "apollo", "scaling": "tensor", "scale": 128.0}


def _embedding_tables(g: TrainGraph) -> set[str]:
    """Parameters read by an embedding lookup (their rows are indexed, not multiplied)."""
    out = set()
    for fqn, node in g.params.items():
        if any(u.op == "call_function" and getattr(u.target, "overloadpacket", None) is torch.ops.aten.embedding
               for u in node.users):
            out.add(fqn)
    return out
_TRANSPOSES = (torch.ops.aten.t.default, torch.ops.aten.permute.default, torch.ops.aten.transpose.int)
OVERRIDABLE = ("rank", "projector", "rule", "scaling", "scale", "proj_bits", "seed")  # per-parameter fields

Overrides = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def normalize_overrides(where: str, value: Any, allowed: tuple[str, ...]) -> Overrides:
    """``{glob: {field: value}}`` or ``[(glob, {field: value}), ...]`` (also the JSON form, settings as
    ``[field, value]`` pairs) as a hashable ``((glob, ((field, value), ...)), ...)``, in the order given."""
    if value is None:
        return ()
    shape = "a dict {glob: {field: value}} or a sequence of (glob, dict) pairs"
    if isinstance(value, Mapping):
        entries = list(value.items())
    elif isinstance(value, (tuple, list)):
        entries = list(value)
    else:
        raise ConfigError(where_what_got(f"{where}.overrides", shape, repr(value), "e.g. {'*.mlp.*': {'rank': 64}}"))
    out, seen = [], set()
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ConfigError(where_what_got(f"{where}.overrides", shape, f"the entry {entry!r}",
                                             "give each glob (a string) its dict of settings"))
        glob, cfg = entry
        here = f"{where}.overrides[{glob!r}]"
        if glob in seen:
            raise ConfigError(where_what_got(f"{where}.overrides", "each glob once", f"{glob!r} twice",
                                             "merge the two entries (the first matching glob wins)"))
        seen.add(glob)
        try:
            cfg = dict(cfg)
        except (TypeError, ValueError):
            raise ConfigError(where_what_got(here, "a dict of settings", repr(cfg), "e.g. {'rank': 64}")) from None
        unknown = sorted(map(str, set(cfg) - set(allowed)))
        if unknown:
            raise ConfigError(where_what_got(here, f"keys among {list(allowed)}", unknown,
                                             "other settings are pass-wide; fix the keys"))
        out.append((glob, tuple(sorted(cfg.items(), key=lambda kv: kv[0]))))
    return tuple(out)


def override_for(overrides: Overrides, fqn: str) -> dict[str, Any]:
    """The settings of the first glob in ``overrides`` that matches ``fqn`` ({} when none does)."""
    for glob, pairs in overrides:
        if fnmatch.fnmatchcase(fqn, glob):
            return dict(pairs)
    return {}


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_settings(where: str, s: dict[str, Any], fields: tuple[str, ...]) -> None:
    """The checks of the per-parameter fields (those in ``fields``) and of their combinations."""
    checks = {
        "rank": (isinstance(s["rank"], int) and not isinstance(s["rank"], bool) and s["rank"] >= 1,
                 "an int >= 1", "e.g. 128"),
        "scale": (_is_num(s["scale"]) and s["scale"] > 0, "a positive float",
                  "GaLore uses 0.25, APOLLO 1, APOLLO-Mini 128"),
        "projector": (s["projector"] in _PROJECTORS, f"one of {_PROJECTORS}", "pick one"),
        "rule": (s["rule"] in _RULES, f"one of {_RULES}", "pick one"),
        "scaling": (s["scaling"] in ("channel", "tensor"), "'channel' or 'tensor'", "pick one"),
        "proj_bits": (s["proj_bits"] in (32, 4), "32 or 4", "4 packs the projector two values per byte"),
        "seed": (isinstance(s["seed"], int) and not isinstance(s["seed"], bool) and s["seed"] >= 0,
                 "an int >= 0", "e.g. 0"),
    }
    for field in OVERRIDABLE:
        ok, what, todo = checks[field]
        if field in fields and not ok:
            raise ConfigError(where_what_got(f"{where}.{field}", what, repr(s[field]), todo))
    if s["rule"] in ("fira", "frugal") and s["projector"] == "random":
        raise ConfigError(where_what_got(f"{where}.projector", f"an orthonormal projector for rule {s['rule']!r}",
                                         "'random'", "use 'svd', 'randomized' or 'dct' (the residual "
                                         "G - P P^T G needs P^T P = I)"))
    if s["proj_bits"] == 4 and s["projector"] not in ("svd", "randomized"):
        raise ConfigError(where_what_got(f"{where}.proj_bits", "4 only with a stored matrix projector",
                                         f"projector {s['projector']!r}", "use proj_bits=32 (dct stores indices, "
                                         "random stores a seed)"))


@register_pass("lowrank")
@dataclass(frozen=True)
class LowRank(Pass):
    rank: int = 128
    gap: int = 200
    scale: float = 0.25
    projector: Literal["svd", "randomized", "dct", "random"] = "svd"
    rule: Literal["galore", "apollo", "fira", "frugal"] = "galore"
    scaling: Literal["channel", "tensor"] = "channel"
    moments: Literal["keep", "reset", "rotate"] = "keep"
    lazy_threshold: float = 0.0
    proj_bits: Literal[32, 4] = 32
    state_bits: Literal[32, 8, 4] = 32
    stagger: bool = True
    factored: bool = True
    limiter: float = 1.01
    seed: int = 0
    seeds: Literal["memfit", "apollo-torch"] = "memfit"
    store_projector: bool = False
    targets: str | tuple[str, ...] = "*"
    overrides: Overrides = ()

    requires = ("fused_update",)
    before = ("quantize_state", "quantize_weights")
    lossless = False

    def __post_init__(self):
        where = "passes['lowrank']"
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "overrides", normalize_overrides(where, self.overrides, OVERRIDABLE))
        checks = [
            ("gap", isinstance(self.gap, int) and self.gap >= 1, "an int >= 1", "e.g. 200"),
            ("moments", self.moments in ("keep", "reset", "rotate"), "'keep', 'reset' or 'rotate'", "pick one"),
            ("lazy_threshold", 0 <= self.lazy_threshold <= 1, "a cosine in [0, 1]", "Q-GaLore uses 0.4; 0 = off"),
            ("state_bits", self.state_bits in (32, 8, 4), "32, 8 or 4", "pick one"),
            ("limiter", self.limiter == 0 or self.limiter >= 1, "0 (off) or a growth factor >= 1", "Fira uses 1.01"),
            ("store_projector", isinstance(self.store_projector, bool), "True or False",
             "True keeps a random projector as state instead of regenerating it"),
            ("seeds", self.seeds in pj.SEED_SCHEMES, f"one of {pj.SEED_SCHEMES}",
             "'apollo-torch' reproduces apollo-torch's projectors (give each parameter its seed in overrides)"),
        ]
        wide = {f: getattr(self, f) for f in OVERRIDABLE}
        _check_settings(where, wide, OVERRIDABLE)
        for field, ok, what, todo in checks:
            if not ok:
                raise ConfigError(where_what_got(f"{where}.{field}", what, repr(getattr(self, field)), todo))
        for glob, pairs in self.overrides:
            _check_settings(f"{where}.overrides[{glob!r}]", {**wide, **dict(pairs)}, tuple(k for k, _ in pairs))

    def for_param(self, fqn: str) -> LowRank:
        """The settings that hold for parameter ``fqn``: the pass-wide ones under its first matching override."""
        ov = override_for(self.overrides, fqn)
        return dataclasses.replace(self, overrides=(), **ov) if ov else self

    # ---- which parameters ----------------------------------------------------------------------
    def selected(self, g: TrainGraph) -> tuple[list[str], list[str]]:
        """(projected FQNs, matched-but-skipped FQNs) among the parameters with an AdamW update."""
        g.check_globs(self.targets, "passes['lowrank'].targets")
        g.check_globs([glob for glob, _ in self.overrides], "passes['lowrank'].overrides")
        with_update = [f for f, n in g.updates.items() if n.target is _ADAMW]
        chosen, skipped = [], []
        for fqn in g.match(self.targets, with_update):
            shape = tuple(g.params[fqn].meta["val"].shape)
            (chosen if len(shape) == 2 and min(shape) > self.for_param(fqn).rank else skipped).append(fqn)
        if not chosen and not skipped:
            other = [f for f in g.match(self.targets, list(g.updates)) if f not in with_update]
            if other:  # every target steps with another rule: projecting nothing would be a silent no-op
                raise ConfigError(where_what_got(
                    "passes['lowrank'].targets", "weights with an AdamW update (the low-rank rules are Adam's)",
                    f"{other[:3]} updated by {g.updates[other[0]].target}",
                    "use optimizer=memfit.AdamW(...), or drop the lowrank pass"))
        return chosen, skipped

    # ---- memory --------------------------------------------------------------------------------
    def state_bytes(self, shape: tuple[int, int]) -> int:
        """Persistent bytes for one projected (m, n) weight (moments, projector, schedule) under the
        pass-wide settings (``for_param(fqn).state_bytes(shape)`` for a parameter's own)."""
        low = math.prod(pj.low_shape(shape, self.rank))
        if self.state_bits == 32:
            moments = 2 * 4 * low
        else:
            per = low if self.state_bits == 8 else (low + 1) // 2
            moments = 2 * per + 2 * 4 * -(-low // state_block(self.state_bits))
        rows = pj.proj_shape(shape, self.rank)[0]
        if self.projector in ("svd", "randomized"):
            if self.proj_bits == 4:
                packed, meta = pj.int4_shapes((rows, self.rank))
                proj = packed[0] + 4 * 2 * meta[1]
            else:
                proj = 4 * rows * self.rank
        elif self.projector == "random":
            proj = 4 * rows * self.rank if self.store_projector else 0
        else:
            proj = 8 * self.rank
        return moments + proj + 8 * SCHED_LEN

    def refresh_transient(self, shape: tuple[int, int]) -> int:
        """Bytes a subspace refresh allocates on top of a normal step (the peak of its temporaries)."""
        return pj.refresh_bytes(shape, self.rank, self.projector)

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        per_param = {}
        transient = 0
        for fqn in self.selected(g)[0]:
            shape = tuple(g.params[fqn].meta["val"].shape)
            cfg = self.for_param(fqn)
            per_param[fqn] = cfg.state_bytes(shape) - 8 * shape[0] * shape[1]
            transient = max(transient, cfg.refresh_transient(shape))
        return MemoryEffect(persistent=sum(per_param.values()), transient=transient, per_param=per_param)

    # ---- as a planner lever --------------------------------------------------------------------
    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """At ``levers="lossy"``, per 2-D weight with an AdamW update (not an embedding table or the output
        head, which GaLore and APOLLO keep at full rank): GaLore (SVD projector) at rank min(m, n)/4, /8 and
        /16, then APOLLO-Mini (rank 1, random projector, tensor scaling), all with 8-bit low-rank moments;
        each costed by this pass's own state arithmetic; the transient is the op's workspace at a refresh
        (``ops.lowrank_workspace``, for Triton when ``g.info["triton"]``), less the weight gradient where the
        factored path never makes it. Lossy, degree in that order."""
        if levers not in ("lossy", "adapters"):
            return []
        out = []
        embedded = _embedding_tables(g)
        for fqn, node in g.updates.items():
            shape = tuple(g.params[fqn].meta["val"].shape)
            if (node.target is not _ADAMW or len(shape) != 2 or fqn in embedded or fqn in g.tied
                    or any(k in fqn for k in FULL_RANK_NAMES) or node.kwargs.get("spike_threshold")):
                continue
            settings = [(f"svd r={min(shape) // d}", {"rank": min(shape) // d, **GALORE_LEVER}) for d in (4, 8, 16)
                        if min(shape) // d >= 2]
            for degree, (label, cfg) in enumerate([*settings, ("apollo-mini", APOLLO_MINI_LEVER)]):
                one = cls(**cfg, state_bits=8)
                if min(shape) <= one.rank:
                    continue
                a = args_of(node)
                param, grad = g.params[fqn].meta["val"], a.grad.meta["val"]
                tokens = _factor_tokens(a.grad) if (one.factored and one.rule == "galore"
                                                    and a.micro_steps == 1) else None
                work = lowrank_workspace(shape, rank=one.rank, projector=one.projector, rule=one.rule,
                                         proj_bits=one.proj_bits, micro_steps=a.micro_steps,
                                         fp32_param_and_grad=param.dtype == grad.dtype == torch.float32,
                                         low_precision=param.dtype != torch.float32, factored_tokens=tokens or 0,
                                         triton=bool(g.info.get("triton")))
                if tokens is not None:  # the weight gradient is never made: its bytes are not live at the update
                    work -= grad.numel() * grad.element_size()
                out.append(Option("lowrank", fqn, label, tuple(sorted(cfg.items())),
                                  persistent=one.state_bytes(shape) - 8 * shape[0] * shape[1],
                                  transient=work, lossiness="lossy", degree=degree))
        return out

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        """One pass: the commonest setting pass-wide, the others as per-parameter ``overrides``."""
        keys = [o.config for o in chosen]
        common = max(dict.fromkeys(keys), key=keys.count)  # the commonest, the first seen on a tie
        overrides = tuple((o.target, dict(o.config)) for o in chosen if o.config != common)
        return "lowrank", {**dict(common), "state_bits": 8, "targets": tuple(o.target for o in chosen),
                           "overrides": overrides}

    # ---- rewrite -------------------------------------------------------------------------------
    def run(self, g: TrainGraph) -> PassResult:
        chosen, skipped = self.selected(g)
        if not chosen:
            return PassResult(g, False, {"projected": [], "skipped": skipped})
        dct = {}
        factored = []
        per_param = {}
        saved = 0
        for i, fqn in enumerate(chosen):
            old = g.updates[fqn]
            refuse_spike_clipping(old, "lowrank", fqn)
            shape = tuple(g.params[fqn].meta["val"].shape)
            cfg = self.for_param(fqn)
            offset = (i * self.gap) // len(chosen) if self.stagger else 0
            with g.graph.inserting_before(old):
                new, used_factors = cfg._replace(g, fqn, old, shape, offset, dct)
            old_states = [args_of(old).exp_avg.meta[NAME_KEY], args_of(old).exp_avg_sq.meta[NAME_KEY]]
            old.replace_all_uses_with(new)
            g.graph.erase_node(old)
            g.updates[fqn] = new
            for name in old_states:
                g.remove_state(name)
            if used_factors:
                factored.append(fqn)
            saved += 8 * shape[0] * shape[1] - cfg.state_bytes(shape)
            per_param[fqn] = {"rank": cfg.rank, "projector": cfg.projector, "rule": cfg.rule}
        stats = {"projected": chosen, "skipped": skipped, "factored": factored, "state_bytes_saved": saved,
                 "rank": self.rank, "projector": self.projector, "rule": self.rule, "per_param": per_param}
        g.info["lowrank"] = stats
        return PassResult(g, True, stats)

    def _replace(self, g: TrainGraph, fqn: str, old: fx.Node, shape, offset: int, dct: dict) -> tuple[fx.Node, bool]:
        a = args_of(old)
        grad, micro_steps = a.grad, a.micro_steps
        rows = pj.proj_shape(shape, self.rank)[0]
        low = pj.low_shape(shape, self.rank)

        def state(name, shp, dtype, kind="pass"):
            return g.add_state(f"{fqn}::{name}", StateSpec(tuple(shp), dtype, fqn, kind))

        proj = proj_meta = None
        if self.projector in ("svd", "randomized"):
            if self.proj_bits == 4:
                packed, meta = pj.int4_shapes((rows, self.rank))
                proj = state("proj_int4", packed, torch.uint8)
                proj_meta = state("proj_int4_scale", (2, meta[1]), torch.float32)
            else:
                proj = state("proj", (rows, self.rank), torch.float32)
        elif self.projector == "random" and self.store_projector:
            proj = state("proj", (rows, self.rank), torch.float32)
        elif self.projector == "dct":
            proj = state("dct_index", (self.rank,), torch.int64)
            if rows not in dct:
                dct[rows] = g.add_state(f"lowrank::dct{rows}", StateSpec((rows, rows), torch.float32, "", "pass"))
        numel = math.prod(low)
        if self.state_bits == 32:
            m = state("lowrank_exp_avg", low, torch.float32, "optimizer")
            v = state("lowrank_exp_avg_sq", low, torch.float32, "optimizer")
            absmax = None
        else:
            per = numel if self.state_bits == 8 else (numel + 1) // 2
            m = state(f"lowrank_exp_avg_q{self.state_bits}", (per,), torch.uint8, "optimizer")
            v = state(f"lowrank_exp_avg_sq_q{self.state_bits}", (per,), torch.uint8, "optimizer")
            blocks = -(-numel // state_block(self.state_bits))
            absmax = state(f"lowrank_absmax_q{self.state_bits}", (2, blocks), torch.float32, "optimizer")
        sched = state("sched", (SCHED_LEN,), torch.float64)
        grad_left, grad_right = grad, None
        factors = self._factors(g, grad) if (self.factored and self.rule == "galore" and micro_steps == 1) else None
        if factors is not None:
            grad_left, grad_right = factors
        new = op_call(g.graph, torch.ops.memfit.lowrank_update.default, param=a.param, grad=grad_left,
                      grad_right=grad_right, proj=proj, proj_meta=proj_meta, exp_avg=m, exp_avg_sq=v, absmax=absmax,
                      sched=sched, grad_acc=a.grad_acc, dct=dct.get(rows), lr=a.lr, step=a.step,
                      micro_step=a.micro_step, beta1=a.beta1, beta2=a.beta2, eps=a.eps, weight_decay=a.weight_decay,
                      micro_steps=micro_steps, rank=self.rank, gap=self.gap, offset=offset, scale=float(self.scale),
                      projector=self.projector, rule=self.rule, scaling=self.scaling, moments=self.moments,
                      lazy_threshold=float(self.lazy_threshold), proj_bits=int(self.proj_bits),
                      state_bits=int(self.state_bits), seed=self._node_seed(fqn), limiter=float(self.limiter),
                      seed_scheme=self.seeds)
        return new, factors is not None

    def _node_seed(self, fqn: str) -> int:
        """The projector seed of ``fqn``: ``seed`` itself under ``seeds="apollo-torch"`` (apollo-torch seeds
        a parameter with its 1-based index: set it per parameter in ``overrides``), else ``seed`` mixed
        with a hash of the name so that no two parameters share a projector."""
        if self.seeds == "apollo-torch":
            return int(self.seed)
        return int(self.seed) * 100_003 + _fqn_seed(fqn)

    @staticmethod
    def _factors(g: TrainGraph, grad: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """(L, R) with grad == L @ R when grad is a (possibly transposed) ``mm`` used only here."""
        flips = 0
        node = grad
        while node.op == "call_function" and node.target in _TRANSPOSES:
            if node.target is torch.ops.aten.permute.default and list(node.args[1]) != [1, 0]:
                return None
            flips += 1
            node = node.args[0]
            if len(node.users) != 1:
                return None
        if not (node.op == "call_function" and node.target is torch.ops.aten.mm.default):
            return None
        a, b = node.args
        if flips % 2 == 0:
            return a, b
        t = torch.ops.aten.t.default
        return g.graph.call_function(t, (b,)), g.graph.call_function(t, (a,))


def _factor_tokens(grad: fx.Node) -> int | None:
    """The inner dimension of the ``mm`` that ``grad`` is (through transposes, each used once), when the
    factored path can take it; None otherwise (``LowRank._factors`` without inserting anything)."""
    node = grad
    while node.op == "call_function" and node.target in _TRANSPOSES:
        if node.target is torch.ops.aten.permute.default and list(node.args[1]) != [1, 0]:
            return None
        node = node.args[0]
        if len(node.users) != 1:
            return None
    if not (node.op == "call_function" and node.target is torch.ops.aten.mm.default):
        return None
    return int(node.args[0].meta["val"].shape[1])


def _fqn_seed(fqn: str) -> int:
    """A stable per-parameter seed (Python's str hash is salted per process)."""
    h = 0
    for ch in fqn.encode():
        h = (h * 131 + ch) % 1_000_000_007
    return h
