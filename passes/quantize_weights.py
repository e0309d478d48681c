"""quantize_weights: weights held as low-bit codes, no full-precision copy kept (Q-GaLore's INT8 weights).

Rewrites, per selected weight: the parameter placeholder becomes the codes (``int8`` codes shaped as the
weight for trainable weights; ``int8``, ``int4`` or ``nf4`` for frozen ones) plus its scales as state (one
fp32 absmax-derived scale per group of ``group`` flattened elements; NF4 optionally double-quantized).
Every op that read the weight reads ``memfit::dequant_weight`` instead: a copy made just before that op
and freed after it (one per reader: the forward's product, the backward's recomputed product and input
gradient), so the dequantized weight is a transient of one op, never saved across the step (the memory
plan shows each). A trainable weight's update op (AdamW, 8-bit AdamW, SGD or the
low-rank update: whatever ran before) gets the scales: it dequantizes the codes to fp32, steps, and writes
new codes and scales with stochastic rounding, ``floor(x) + (u < frac(x))`` with ``u`` from a counter hash
of (seed, parameter, step, element), so a resumed run is bit-identical (``rounding="nearest"`` is the
control that stalls: updates smaller than half a step are lost).

The model's own tensors for these weights are freed by the Trainer (the codes are made from them once);
``Trainer.export()`` and inference read the weights back dequantized.

Default targets: every weight of two or more dimensions except embedding tables and the output head (by
the same rule as ``lowrank``), whose elements split into whole groups. Requires ``fused_update``; runs after
``lowrank`` and ``quantize_state``.
"""

from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from .. import weights as wt
from ..errors import ConfigError, where_what_got
from ..graph import StateSpec, TrainGraph, aliases, is_view_op
from ..ops import replace_args
from .base import Option, Pass, PassResult, register_pass
from .lowrank import FULL_RANK_NAMES, _embedding_tables

_DEQUANT = torch.ops.memfit.dequant_weight.default
_UPDATES = {torch.ops.memfit.adamw_update.default, torch.ops.memfit.adam8bit_update.default,
            torch.ops.memfit.sgd_update.default, torch.ops.memfit.lowrank_update.default}


def default_targets(g: TrainGraph) -> list[str]:
    """Weights of two or more dimensions, not embedding tables nor the head (FQN rule of ``lowrank``)."""
    emb = _embedding_tables(g)
    return [f for f, n in g.params.items() if n.meta["val"].dim() >= 2 and f not in emb and f not in g.tied
            and not any(k in f for k in FULL_RANK_NAMES) and n.meta["val"].is_floating_point()]


def encode_param(g: TrainGraph, fqn: str, codec: str, group: int, double_quant: bool = False,
                 register: bool = True) -> wt.Encoded:
    """Hold parameter ``fqn`` encoded: its placeholder becomes the codes, its scales become state (kind
    "weight", counted with the parameters), and every reader reads a ``dequant_weight`` copy (one for the
    forward, one for the backward). Returns the recipe (added to ``g.inits`` unless ``register`` is False)."""
    node = g.params[fqn]
    val = node.meta["val"]
    shape, dtype = tuple(val.shape), val.dtype
    wt.check_codec(f"passes['quantize_weights'] on {fqn!r}", codec, group, val.numel(), fqn)
    scale_names = []
    for i, (s_shape, s_dtype) in enumerate(wt.scale_shapes(val.numel(), codec, group, double_quant)):
        name = f"{fqn}::wscale" + (f"{i}" if i else "")
        g.add_state(name, StateSpec(s_shape, s_dtype, fqn, "weight"))
        scale_names.append(name)
    with g.fake_mode():
        node.meta["val"] = torch.empty(wt.codes_shape(shape, codec), dtype=torch.int8 if codec == "int8"
                                       else torch.uint8, device=val.device)
    scales = [g.state[n] for n in scale_names]
    _rewire_to_dequant(g, node, lambda: g.graph.call_function(
        _DEQUANT, (node, scales[0], scales[1] if len(scales) > 1 else None, codec, group, list(shape), dtype)))
    recipe = wt.Encoded(fqn, codec, group, double_quant, tuple(scale_names), shape, dtype)
    if register:
        g.inits.append(recipe)
    return recipe


def _rewire_to_dequant(g: TrainGraph, p: fx.Node, make) -> None:
    """Point every reader of ``p`` (but its update op) at a copy made by ``make()`` just before that reader
    (views re-made on it): a transient living for one op, never saved across the step. A weight the forward
    reads once and the backward twice (a recomputed product, the input gradient) gets three copies: each
    costs one pass over the codes, where one shared copy would live from the first read to the last."""
    readers: list[tuple[fx.Node, fx.Node, list[fx.Node]]] = []  # (reader, alias it reads, view chain from p)

    def walk(a: fx.Node, chain: list[fx.Node]) -> None:
        for u in list(a.users):
            if u.target in _UPDATES:
                continue
            if is_view_op(u) and u.args[0] is a:
                walk(u, [*chain, u])
            else:
                readers.append((u, a, chain))

    walk(p, [])
    copies: dict[fx.Node, dict[fx.Node, fx.Node]] = {}  # reader -> (p or a view of it) -> its copy
    for reader, alias, chain in readers:
        made = copies.get(reader)
        if made is None:
            with g.graph.inserting_before(reader):
                made = copies[reader] = {p: make()}
        src = made[p]
        for view in chain:
            if view not in made:
                with g.graph.inserting_before(reader):
                    made[view] = g.graph.call_function(view.target, (src, *view.args[1:]), dict(view.kwargs))
            src = made[view]
        reader.replace_input_with(alias, src)
    for a in reversed(aliases(p)):  # views of p nobody reads any more
        if a is not p and not a.users:
            g.graph.erase_node(a)


def refuse_tied(g: TrainGraph, patterns, chosen: list[str], where: str) -> None:
    """A ConfigError when the targets name a weight tied to another (the embedding shared with the head):
    one tensor read under two names cannot change its representation for one of them."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    for alias, canonical in g.tied.items():
        hit = alias if any(fnmatch.fnmatchcase(alias, p) for p in pats) else canonical if canonical in chosen else None
        if hit is not None:
            raise ConfigError(where_what_got(f"{where}: {hit!r}", "a parameter with one name",
                                             f"{alias!r} tied to {canonical!r} (one tensor)",
                                             "leave tied weights (an embedding shared with the head) out of targets"))


def _seed(seed: int, fqn: str) -> int:
    return (zlib.crc32(fqn.encode()) ^ (int(seed) * 0x27D4EB2F)) & 0xFFFFFFFF


@register_pass("quantize_weights")
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    codec: Literal["int8"] = "int8"  # trainable weights: INT8 codes updated with stochastic rounding
    group: int = 128
    targets: str | tuple[str, ...] | None = None  # FQN globs; None: default_targets
    rounding: Literal["stochastic", "nearest"] = "stochastic"
    seed: int = 0
    frozen_codec: Literal["int8", "int4", "nf4"] | None = None  # weights without an update (None: codec)
    frozen_group: int | None = None  # None: group (64 for nf4)
    double_quant: bool = False  # nf4 / int4 frozen weights: 8-bit scales

    requires = ("fused_update",)
    lossless = False

    def __post_init__(self):
        where = "passes['quantize_weights']"
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.codec != "int8":
            raise ConfigError(where_what_got(f"{where}.codec", "'int8' (trainable weights are INT8 with stochastic "
                                             "rounding)", repr(self.codec),
                                             "4-bit weights train through adapters: use the lora pass with "
                                             "base='nf4', or frozen_codec= for frozen weights"))
        wt.check_codec(where, self.codec, self.group)
        if self.frozen_codec is not None:
            wt.check_codec(where, self.frozen_codec, self.frozen_group or 64)
        if self.rounding not in ("stochastic", "nearest"):
            raise ConfigError(where_what_got(f"{where}.rounding", "'stochastic' or 'nearest'", repr(self.rounding),
                                             "'stochastic' (Q-GaLore); 'nearest' only as a control"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(where_what_got(f"{where}.seed", "an int", repr(self.seed), "e.g. 0"))

    def _frozen(self) -> tuple[str, int]:
        codec = self.frozen_codec or self.codec
        group = self.frozen_group or (64 if codec == "nf4" else self.group)
        return codec, group

    def selected(self, g: TrainGraph) -> list[str]:
        where = "passes['quantize_weights'].targets"
        if self.targets is None:
            chosen = [f for f in default_targets(g) if g.params[f].meta["val"].numel() % self.group == 0]
        else:
            g.check_globs(self.targets, where)
            chosen = g.match(self.targets)
            refuse_tied(g, self.targets, chosen, where)
            for f in chosen:
                if not g.params[f].meta["val"].is_floating_point():
                    raise ConfigError(where_what_got(f"{where}: {f!r}", "a floating-point weight",
                                                     str(g.params[f].meta["val"].dtype),
                                                     "it is encoded already (quantize_weights or lora ran)"))
        return chosen

    def run(self, g: TrainGraph) -> PassResult:
        chosen = self.selected(g)
        done, frozen = [], []
        for fqn in chosen:
            upd = g.updates.get(fqn)
            if upd is None and fqn in g.grad_outputs:
                raise ConfigError(where_what_got(f"passes['quantize_weights'] on {fqn!r}", "an in-graph update",
                                                 "a gradient returned to the caller",
                                                 "run fused_update (the INT8 weight is updated in the graph)"))
            if upd is None:
                codec, group = self._frozen()
                encode_param(g, fqn, codec, group, self.double_quant and codec != "int8")
                frozen.append(fqn)
                continue
            encode_param(g, fqn, self.codec, self.group)
            args, kwargs = replace_args(upd, wscale=g.state[f"{fqn}::wscale"], wgroup=self.group,
                                        wseed=_seed(self.seed, fqn), wround=self.rounding)
            upd.args, upd.kwargs = args, kwargs
            done.append(fqn)
        stats = {"trainable": done, "frozen": frozen, "codec": self.codec, "group": self.group,
                 "rounding": self.rounding}
        g.info["quantize_weights"] = stats
        return PassResult(g, bool(chosen), stats)

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """At ``levers`` lossy or beyond: INT8 codes with stochastic rounding for every default target with an
        update (its bytes: codes plus one fp32 scale per 128 elements, minus the weight's own) and, one degree
        further, for the embedding tables and the head (not tied), and NF4 for default targets without an
        update (frozen). The transient is the fp32 copy the update steps plus, on the CPU reference,
        the write-back's working values (none in the fused Triton AdamW kernel)."""
        if levers not in ("lossy", "adapters"):
            return []
        triton = bool(g.info.get("triton"))
        out = []
        tables = [f for f, n in g.params.items() if f not in g.tied and f not in g.tied.values()
                  and n.meta["val"].dim() == 2 and n.meta["val"].is_floating_point() and f not in default_targets(g)]
        for fqn in [*default_targets(g), *tables]:
            val = g.params[fqn].meta["val"]
            numel, own = val.numel(), val.numel() * val.element_size()
            upd = g.updates.get(fqn)
            if upd is not None and numel % 128 == 0:
                fused = triton and upd.target is torch.ops.memfit.adamw_update.default
                # the fp32 copy the update steps and, on the CPU reference, the write-back's working values
                work = 0 if fused else numel * 4 + (0 if triton else wt.requant_workspace(numel, 128))
                out.append(Option("quantize_weights", fqn, "int8 sr", (("codec", "int8"),),
                                  persistent=wt.encoded_bytes(numel, "int8", 128) - own,
                                  transient=work, flops=4 * numel, lossiness="lossy",
                                  degree=4 if fqn not in tables else 6, group="weights"))
            elif upd is None and fqn not in g.grad_outputs and numel % 64 == 0:
                out.append(Option("quantize_weights", fqn, "nf4", (("codec", "nf4"),),
                                  persistent=wt.encoded_bytes(numel, "nf4", 64) - own, lossiness="lossy", degree=4,
                                  group="weights"))
        return out

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        return "quantize_weights", {"targets": tuple(o.target for o in chosen), "frozen_codec": "nf4"}
