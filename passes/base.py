"""Pass infrastructure: Pass, PassResult, the registry and the Pipeline.

A pass is a frozen, JSON-serializable config dataclass with ``run(g) -> PassResult`` and
``memory_effect(g) -> MemoryEffect``. The Pipeline orders passes by their ``requires``, runs each,
then re-derives the graph outputs, lints, refreshes FakeTensor ``meta["val"]`` and verifies the
TrainGraph; a failure names the pass and the ones that ran before it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, MemfitError, UnsupportedGraph, where_what_got
from ..graph import ROLE_KEY, TrainGraph, alias_users, aliases, is_view_op  # noqa: F401 (re-exported)

_REGISTRY: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class PassResult:
    graph: TrainGraph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    meta_ok: bool = False  # every node this run added carries a correct meta["val"]: no re-propagation


@dataclass(frozen=True)
class MemoryEffect:
    """What a pass would change, in bytes, without running it (read by the planner).

    ``persistent`` is the change in state that lives across steps (negative = saved),
    ``transient`` the change in the step's peak of intermediates, ``per_param`` the same split by FQN.
    """

    persistent: int = 0
    transient: int = 0
    per_param: dict[str, int] = field(default_factory=dict)


# A lever's class: how far it may move the training numerics. "adapters" goes furthest: it changes what trains
# (LoRA adapters beside frozen weights), so the planner takes it only when levers="adapters" allows it.
LOSSINESS = ("lossless", "near-lossless", "lossy", "adapters")

# The one written pipeline: every door and the planner read their pass sequences from here.
PIPELINES: dict[str, tuple[str, ...]] = {
    # memfit.optimize / memfit.plan without a budget, the planner's starting point, size_model's default
    "lossless": ("fused_cross_entropy", "remat", "fused_update"),
    # torch.compile's joint graphs keep gradients as outputs: no fused update there
    "compile": ("remat",),
}
SCHEDULE_PASS = "sink"  # the last pass of every pipeline, explicit passes= lists included
# passes whose options() the planner may take
LEVER_PASSES: tuple[str, ...] = ("quantize_state", "lowrank", "quantize_weights", "lora")
RECOMPUTE_PASS = "remat"  # the pass whose recomputation sequence the planner cuts (see Pass.options)


@dataclass(frozen=True)
class Option:
    """One setting a lever pass offers for one target, with what it costs: the planner's table row.

    ``persistent`` is the change in bytes that live across steps (negative saves), ``transient`` the
    extra bytes live while the target's op runs (a subspace refresh, a dequantized tile), ``flops`` the
    FLOPs added per step, ``lossiness`` one of LOSSINESS and ``degree`` the order among one target's
    options of the same class (higher: further from the exact step; lower is preferred on a tie). At
    most one option of a ``group`` is taken per target (one optimizer-state setting per parameter).
    ``config`` is what ``from_options`` needs to build the pass that applies it."""

    pass_name: str
    target: str
    label: str
    config: tuple[tuple[str, Any], ...]
    persistent: int
    transient: int = 0
    flops: int = 0
    lossiness: str = "lossless"
    degree: int = 0
    group: str = "state"
    alone: bool = False  # taken with no option of another group on its target (it replaces what they change)
    parts: tuple = ()  # a combination the planner made of options of several groups (each applied by its pass)

    @property
    def rank(self) -> int:
        return LOSSINESS.index(self.lossiness)


@dataclass(frozen=True)
class Pass(abc.ABC):
    """Base class: subclasses are frozen dataclasses registered with :func:`register_pass`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()  # passes this one must precede when both are present
    joint_ok: ClassVar[bool] = False  # runs on torch.compile joint graphs (keeps the output structure)
    lossless: ClassVar[bool] = True
    last: ClassVar[bool] = False  # runs after every other pass (the schedule)
    keeps_meta: ClassVar[bool] = False  # every node it adds carries a correct meta["val"]: no re-propagation

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        """The settings this pass offers the planner on ``g`` within ``levers`` (a LOSSINESS level), each
        with its exact bytes, FLOPs and lossiness class. A pass that declares options is a lever: list it
        in LEVER_PASSES (or pass it to the planner) and the planner may pick it; it never names passes."""
        return []

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        """The pass spec ``(name, config)`` applying ``chosen`` (this pass's options, one per target)."""
        raise ConfigError(where_what_got(f"pass {cls.name!r}.from_options", "a pass that declares options",
                                         f"{len(chosen)} option(s) for a pass whose options() offers none",
                                         "override options() and from_options() together, or drop the pass "
                                         "from lever_passes"))

    def refine(self, g: TrainGraph, peak_node: str) -> Pass | None:
        """A lossless setting of this pass (the same numerics, FLOPs 0) that lowers the peak of ``g`` when the
        peak is at ``peak_node``, one of this pass's ops; None when it has none. The planner asks the
        pipeline's passes before any lossy lever and again while the peak stays at a node they refine."""
        return None

    @abc.abstractmethod
    def run(self, g: TrainGraph) -> PassResult:
        """Rewrite ``g`` (in place or into a new TrainGraph) and say whether anything changed."""

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        return MemoryEffect()

    def to_json(self) -> str:
        return json.dumps({"pass": self.name, "config": _jsonable(dataclasses.asdict(self))}, sort_keys=True)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x)
    return x


def register_pass(name: str):
    """Class decorator: make a Pass available by name (``passes=["name"]``)."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise ConfigError(where_what_got(f"register_pass({name!r})", "a subclass of memfit.Pass",
                                             repr(cls), "derive your pass from memfit.Pass"))
        if "__dataclass_fields__" not in cls.__dict__:  # its own fields too, not only Pass's
            cls = dataclass(frozen=True)(cls)
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ConfigError(where_what_got("register_pass", f"a new pass name (taken: {sorted(_REGISTRY)})",
                                             repr(name), "choose another name"))
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def refuse_spike_clipping(update: torch.fx.Node, pass_name: str, fqn: str) -> None:
    """A pass replacing an fp32 AdamW update would drop SPAM's spike clipping (a keyword of that op): refuse."""
    if update.kwargs.get("spike_threshold"):
        raise ConfigError(where_what_got(
            f"passes[{pass_name!r}] on {fqn!r}", "an AdamW update without SPAM spike clipping",
            f"spike_threshold={update.kwargs['spike_threshold']}",
            "spike clipping runs in the fp32 AdamW update only: drop spike_threshold, or exclude the parameter "
            "from this pass's targets"))


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def make_pass(spec: str | Pass | tuple[str, dict], **defaults: Any) -> Pass:
    """A Pass from a name, ``(name, config dict)`` or an instance; ``defaults`` fill fields the class has."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, tuple):
        name, cfg = spec
    elif isinstance(spec, str):
        name, cfg = spec, {}
    else:
        raise ConfigError(where_what_got("passes", "a pass name, (name, config) or memfit.Pass instance",
                                         type(spec).__name__, "see memfit.registered_passes()"))
    if name not in _REGISTRY:
        raise ConfigError(where_what_got("passes", f"one of {sorted(_REGISTRY)}", repr(name),
                                         "register it with @memfit.register_pass or fix the spelling"))
    cls = _REGISTRY[name]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - names
    if unknown:
        raise ConfigError(where_what_got(f"passes[{name!r}]", f"config keys among {sorted(names)}",
                                         sorted(unknown), "fix the keys"))
    kwargs = {k: v for k, v in defaults.items() if k in names}
    kwargs.update(cfg)
    return cls(**kwargs)


class Pipeline:
    """Runs passes in dependency order with lint, meta refresh and verification after each."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = _order(list(passes))

    def __call__(self, g: TrainGraph) -> TrainGraph:
        check_graph(g, "capture")
        done: list[str] = []
        stale = False  # the module's Python code lags the graph: recompiled once, at the end (planning never runs it)
        for p in self.passes:
            missing = [r for r in p.requires if r not in g.applied]
            if missing:
                raise ConfigError(where_what_got(f"Pipeline: pass {p.name!r}", f"{missing} to run first",
                                                 f"passes so far {g.applied}", "add them to passes="))
            try:
                result = p.run(g)
                g = result.graph
                g.sync_outputs()
                g.eliminate_dead_code()
                g.graph.lint()
                stale = True
                if result.modified and not (p.keeps_meta or result.meta_ok):
                    refresh_meta(g)
                check_graph(g, p.name)
            except MemfitError as e:  # same error, same attributes (op/node, plan), plus where it happened
                e.args = (f"{e} [in pass {p.name!r}, after {done or 'capture'}]",)
                raise
            except Exception as e:
                raise UnsupportedGraph(where_what_got(
                    f"Pipeline: pass {p.name!r} (after {done or 'capture'})",
                    "a graph that lints, re-propagates FakeTensor meta and passes the TrainGraph checks",
                    f"{type(e).__name__}: {e}", "fix the pass, or drop it from passes= and report the model")) from e
            g.applied.append(p.name)
            g.info.setdefault("pass_stats", {})[p.name] = {"modified": result.modified, **result.stats}
            done.append(p.name)
        if stale:
            g.recompile()
        return g


def _order(passes: list[Pass]) -> list[Pass]:
    """Stable topological order: after what it ``requires``, before what it names in ``before``."""
    names = [p.name for p in passes]
    after = {p.name: set(p.requires) for p in passes}
    for p in passes:  # last passes (the schedule) follow every other one
        if p.last:
            after[p.name] |= {q.name for q in passes if not q.last}
    for p in passes:
        for q in p.before:
            after.setdefault(q, set()).add(p.name)
    if len(set(names)) != len(names):
        raise ConfigError(where_what_got("passes", "each pass once", names, "remove the duplicates"))
    ordered: list[Pass] = []
    pending = list(passes)
    while pending:
        for p in pending:
            if all(r not in names or r in [q.name for q in ordered] for r in after[p.name]):
                ordered.append(p)
                pending.remove(p)
                break
        else:
            raise ConfigError(where_what_got("passes", "acyclic requires", [p.name for p in pending],
                                             "break the cycle"))
    return ordered


def refresh_meta(g: TrainGraph) -> None:
    """Re-propagate FakeTensor ``meta["val"]`` through the whole graph."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = g.fake_mode()
    vals = [n.meta["val"] for n in g.placeholders()]
    FakeTensorProp(g.gm, mode).propagate_dont_convert_inputs(*vals)


def check_graph(g: TrainGraph, after: str) -> None:
    """The TrainGraph's invariants; cheap enough to run after every pass."""
    where = f"TrainGraph check after {after!r}"
    g.graph.lint()
    for n in g.placeholders():
        if n.meta.get(ROLE_KEY) is None:
            raise UnsupportedGraph(where_what_got(where, "every placeholder tagged with a memfit role",
                                                  f"untagged placeholder {n.name!r}", "tag it (graph.add_state)"))
        if "val" not in n.meta:
            raise UnsupportedGraph(where_what_got(where, "meta['val'] on every placeholder",
                                                  f"none on {n.name!r}", "set meta['val'] when adding it"))
    for fqn in g.trainable:
        if fqn not in g.grad_outputs and fqn not in g.updates:
            raise UnsupportedGraph(where_what_got(where, f"a gradient output or an update for {fqn!r}",
                                                  "neither", "a pass dropped a gradient without consuming it"))
    for fqn, node in g.updates.items():
        if node.graph is not g.graph:
            raise UnsupportedGraph(where_what_got(where, f"the update of {fqn!r} in the graph", "a stale node",
                                                  "keep g.updates in sync"))
    if os.environ.get("MEMFIT_VERIFY_ALIASING", "1") != "0":
        _check_updates_after_param_uses(g, where)


def _check_updates_after_param_uses(g: TrainGraph, where: str) -> None:
    """An in-place update must follow every read of its parameter (and of the parameter's views)."""
    order = {n: i for i, n in enumerate(g.graph.nodes)}
    for fqn, upd in g.updates.items():
        for user in g.param_readers(fqn):
            if user is not upd and order[user] > order[upd]:
                raise UnsupportedGraph(where_what_got(
                    where, f"the update of {fqn!r} after every read of it",
                    f"{user.name} ({user.target}) reads it after {upd.name}", "place the update later"))
