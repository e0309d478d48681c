"""TrainGraph: the one IR every part of memfit speaks.

An ATen-level ``torch.fx.GraphModule`` of one whole training step (forward, backward and, once
``fused_update`` has run, the optimizer update) plus its signature:

* placeholders, each tagged ``node.meta["memfit.role"]`` in {"param", "buffer", "input", "state",
  "hparam"} and ``node.meta["memfit.name"]`` (the parameter's FQN, the state's name, ...);
* ``grad_of[fqn]``: the node producing each parameter's gradient;
* ``grad_outputs``: the FQNs whose gradients are still graph outputs (the rest are consumed in-graph);
* ``buffer_updates[fqn]``: the new value of each buffer the step mutates (BatchNorm statistics);
* ``loss``: the loss node; ``meta["val"]`` FakeTensors on every node.

The output node is derived, never edited by hand: passes change the signature and call
:meth:`TrainGraph.sync_outputs`, which the Pipeline also does after every pass.
"""

from __future__ import annotations

import fnmatch
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from .errors import ConfigError, UnsupportedGraph, where_what_got

Role = Literal["param", "buffer", "input", "state", "hparam"]
ROLE_KEY = "memfit.role"
NAME_KEY = "memfit.name"
FORWARD_KEY = "memfit.forward"  # a node a pass added to the forward (see TrainGraph.forward_nodes)


@dataclass(frozen=True)
class StateSpec:
    """A persistent tensor a pass adds (optimizer moments, accumulators, projections, masks...)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    owner: str  # the parameter FQN it belongs to, or "" for global state
    kind: str  # "optimizer", "accumulator", "pass"
    init: Literal["zeros"] = "zeros"

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= int(s)
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class TrainGraph:
    gm: fx.GraphModule
    params: dict[str, fx.Node]
    buffers: dict[str, fx.Node]
    inputs: list[fx.Node]
    loss: fx.Node
    grad_of: dict[str, fx.Node]
    grad_outputs: list[str]
    buffer_updates: dict[str, fx.Node]
    state: dict[str, fx.Node] = field(default_factory=dict)
    state_specs: dict[str, StateSpec] = field(default_factory=dict)
    hparams: dict[str, fx.Node] = field(default_factory=dict)
    updates: dict[str, fx.Node] = field(default_factory=dict)  # fqn -> in-graph update node
    trainable: tuple[str, ...] = ()  # FQNs that receive updates (requires_grad at capture, minus frozen)
    applied: list[str] = field(default_factory=list)  # pass names run so far, in order
    info: dict[str, Any] = field(default_factory=dict)  # per-pass reports (e.g. freeze: dropped bytes)
    fake: Any = None  # the FakeTensorMode every meta["val"] belongs to
    tied: dict[str, str] = field(default_factory=dict)  # tied-weight FQN -> the canonical FQN it shares
    # A joint graph from torch.compile (AOTAutograd's partition hook): its output node is AOTAutograd's
    # (forward outputs, then one gradient slot per input) and is kept as is; the backward is seeded by
    # tangent inputs rather than by the loss.
    joint: bool = False
    forward_outputs: list[fx.Node] = field(default_factory=list)
    # How parameters and state that are not the model's own tensors are made from the model's weights, and how
    # the plain weights are read back (``memfit.weights.Recipe``: encoded weights, adapters, step sizes).
    inits: list[Any] = field(default_factory=list)
    # Parameters whose gradient covers only a leading slice: fqn -> (dim, length) (sparse_update's channel
    # subsets); the update steps ``param.narrow(dim, 0, length)`` and its state has that shape.
    grad_slices: dict[str, tuple[int, int]] = field(default_factory=dict)

    def clone(self) -> TrainGraph:
        """An independent copy (new graph and nodes; FakeTensor values and state specs shared)."""
        import copy as _copy

        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = graph.graph_copy(self.graph, env)
        graph.output(out)
        env_get = env.__getitem__
        gm = fx.GraphModule(self.gm, graph)
        new = _copy.copy(self)
        new.gm = gm
        new.params = {k: env_get(v) for k, v in self.params.items()}
        new.buffers = {k: env_get(v) for k, v in self.buffers.items()}
        new.inputs = [env_get(v) for v in self.inputs]
        new.loss = env_get(self.loss)
        new.grad_of = {k: env_get(v) for k, v in self.grad_of.items()}
        new.grad_outputs = list(self.grad_outputs)
        new.buffer_updates = {k: env_get(v) for k, v in self.buffer_updates.items()}
        new.state = {k: env_get(v) for k, v in self.state.items()}
        new.state_specs = dict(self.state_specs)
        new.hparams = {k: env_get(v) for k, v in self.hparams.items()}
        new.updates = {k: env_get(v) for k, v in self.updates.items()}
        new.applied = list(self.applied)
        new.info = _copy.deepcopy(self.info)
        new.tied = dict(self.tied)
        new.forward_outputs = [env_get(v) for v in self.forward_outputs]
        new.inits = list(self.inits)
        new.grad_slices = dict(self.grad_slices)
        return new

    def param_readers(self, fqn: str) -> list[fx.Node]:
        """Every node reading the parameter's storage: through its placeholder, its views or a tied alias."""
        names = [fqn, *(t for t, c in self.tied.items() if c == fqn and t in self.params)]
        return [u for n in names for u in alias_users(self.params[n])]

    # ---- queries -------------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def role(self, node: fx.Node) -> Role | None:
        return node.meta.get(ROLE_KEY)

    def match(self, pattern: str | Iterable[str], names: Iterable[str] | None = None) -> list[str]:
        """Parameter FQNs matching a glob (or any of several globs), in graph order."""
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        pool = list(self.params) if names is None else list(names)
        return [n for n in pool if any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    def check_globs(self, patterns: str | Iterable[str], where: str) -> None:
        """A ConfigError when a glob matches no parameter FQN of the model (a typo, or the FQNs of a wrapped
        model that start with another prefix): it would otherwise select nothing, silently."""
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [*self.params, *self.tied]
        for p in pats:
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                continue
            near = [n for n in names if fnmatch.fnmatchcase(n, "*" + p)]
            hint = (f"did you mean {'*' + p!r}? (matches {near[0]!r})" if near else
                    "use the FQNs of model.named_parameters()")
            raise ConfigError(where_what_got(where, "a glob matching at least one parameter FQN", repr(p),
                                             f"{hint}; the model has e.g. {names[:4]} ({len(names)} in all)"))

    def fake_mode(self):
        return self.fake

    def output_layout(self) -> list[tuple[str, str]]:
        """(kind, name) of each output, in order: ("loss", ""), ("buffer", fqn), ("grad", fqn)."""
        return ([("loss", "")] + [("buffer", b) for b in self.buffer_updates]
                + [("grad", p) for p in self.grad_outputs])

    def backward_nodes(self) -> set[fx.Node]:
        """Nodes that do not feed the loss or a buffer update: the backward and the update."""
        forward = self.forward_nodes()
        return {n for n in self.graph.nodes if n.op == "call_function" and n not in forward}

    def forward_nodes(self) -> set[fx.Node]:
        """Nodes the loss, a buffer update or a forward output reads, and nodes a pass placed in the forward
        for the backward (``meta[FORWARD_KEY]``: a narrowed copy or a bit mask saved in place of an activation)."""
        seen: set[fx.Node] = set()
        marked = [n for n in self.graph.nodes if n.meta.get(FORWARD_KEY)]
        stack = [self.loss, *self.buffer_updates.values(), *self.forward_outputs, *marked]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return {n for n in seen if n.op == "call_function"}

    # ---- edits ---------------------------------------------------------------------------------
    def _last_placeholder(self) -> fx.Node:
        return self.placeholders()[-1]

    def add_state(self, name: str, spec: StateSpec) -> fx.Node:
        """Add a persistent state placeholder (zeros at start; owned, saved and restored by the runtime)."""
        if name in self.state:
            raise UnsupportedGraph(where_what_got("TrainGraph.add_state", "a new state name", repr(name),
                                                  "two passes created the same state; rename one"))
        mode = self.fake_mode()
        with self.graph.inserting_after(self._last_placeholder()):
            node = self.graph.placeholder(_safe_name(name))
        node.meta[ROLE_KEY] = "state"
        node.meta[NAME_KEY] = name
        with mode:
            node.meta["val"] = torch.empty(spec.shape, dtype=spec.dtype,
                                           device=self.params[spec.owner].meta["val"].device
                                           if spec.owner in self.params else "cpu")
        self.state[name] = node
        self.state_specs[name] = spec
        return node

    def remove_state(self, name: str) -> None:
        """Drop a state placeholder nobody reads any more (a pass replaced the op that used it)."""
        node = self.state.pop(name)
        del self.state_specs[name]
        if node.users:
            raise UnsupportedGraph(where_what_got("TrainGraph.remove_state", f"state {name!r} with no readers",
                                                  f"readers {[u.name for u in node.users]}",
                                                  "rewire its readers before removing it"))
        self.graph.erase_node(node)

    def add_param(self, name: str, val: torch.Tensor, *, trainable: bool = True) -> fx.Node:
        """Add a parameter placeholder the model does not have (adapters, step sizes): its tensor is made by a
        recipe in ``inits``. A trainable one still needs its gradient (``grad_of``, ``grad_outputs``)."""
        if name in self.params:
            raise UnsupportedGraph(where_what_got("TrainGraph.add_param", "a new parameter name", repr(name),
                                                  "two passes created the same parameter; rename one"))
        with self.graph.inserting_after(self._last_placeholder()):
            node = self.graph.placeholder("p_" + "".join(c if c.isalnum() else "_" for c in name))
        node.meta[ROLE_KEY] = "param"
        node.meta[NAME_KEY] = name
        node.meta["val"] = val
        self.params[name] = node
        if trainable:
            self.trainable = (*self.trainable, name)
        return node

    def add_hparam(self, name: str, example: float | int) -> fx.Node:
        """A per-step scalar fed by the runtime (learning rate, step count, micro-step index)."""
        if name in self.hparams:
            return self.hparams[name]
        with self.graph.inserting_after(self._last_placeholder()):
            node = self.graph.placeholder("hp_" + "".join(c if c.isalnum() else "_" for c in name))
        node.meta[ROLE_KEY] = "hparam"
        node.meta[NAME_KEY] = name
        node.meta["val"] = example
        self.hparams[name] = node
        return node

    def sync_outputs(self) -> None:
        """Rewrite the output node from the signature (loss, buffer updates, remaining grads)."""
        if self.joint:
            return
        out = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        values = [self.loss, *self.buffer_updates.values(), *(self.grad_of[p] for p in self.grad_outputs)]
        out.args = (tuple(values),)

    def eliminate_dead_code(self) -> int:
        """Remove nodes whose values nobody uses (in-place memfit ops are impure and stay)."""
        before = len(self.graph.nodes)
        self.graph.eliminate_dead_code()
        return before - len(self.graph.nodes)

    def recompile(self) -> None:
        self.gm.recompile()

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "call_function":
                counts[str(n.target)] = counts.get(str(n.target), 0) + 1
        return (f"TrainGraph({len(self.params)} params, {len(self.buffers)} buffers, {len(self.inputs)} inputs, "
                f"{len(self.state)} state tensors, {sum(counts.values())} ops, "
                f"{len(self.updates)} in-graph updates, passes={self.applied})")


_UNTRACKED_VIEWS = {"aten::_unsafe_view", "aten::_reshape_alias"}


def is_view_op(node: fx.Node) -> bool:
    """Whether the node's output shares storage with its first input (schema alias info, plus _unsafe_view)."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None or node.op != "call_function":
        return False
    if schema.name in _UNTRACKED_VIEWS:
        return True
    alias = schema.returns[0].alias_info if schema.returns else None
    return alias is not None and not alias.is_write


def _views_input(node: fx.Node) -> bool:
    """``node`` is a view of its first argument: a view op, or an element of a view op's tuple (split)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target is operator.getitem:
        return is_view_op(node.args[0])
    return is_view_op(node)


def aliases(node: fx.Node) -> list[fx.Node]:
    """The node and every node that is a view of it (transitively)."""
    out, stack = [], [node]
    seen: set[fx.Node] = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        stack.extend(u for u in n.users if _views_input(u) and u.args[0] is n)
    return out


def alias_users(node: fx.Node) -> list[fx.Node]:
    """Every node that reads ``node`` or one of its views."""
    users: list[fx.Node] = []
    for a in aliases(node):
        users.extend(u for u in a.users if not (_views_input(u) and u.args[0] is a))
    return users


def detached(node: fx.Node) -> list[fx.Node]:
    """The ``aten.detach`` chain hanging off ``node`` (how autograd saves a value for the backward)."""
    out, stack = [], [node]
    while stack:
        for u in stack.pop().users:
            if u.target is torch.ops.aten.detach.default:
                out.append(u)
                stack.append(u)
    return out


def node_flops(node: fx.Node) -> int:
    """FLOPs to (re)compute a node: torch's FLOP formulas for matmuls, convolutions and attention, the
    output's element count for everything else (pointwise, reductions, copies); 0 for views."""
    from torch.utils.flop_counter import flop_registry

    target = node.target
    if node.op != "call_function" or _views_input(node) or target is operator.getitem:
        return 0
    val = node.meta.get("val")
    packet = getattr(target, "overloadpacket", None)
    if packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        q, k = node.args[0].meta["val"], node.args[1].meta["val"]
        b, h, s_q, d = q.shape
        return int(4 * b * h * s_q * k.shape[-2] * d)  # QK^T and PV, 2 FLOPs per multiply-add
    if packet in flop_registry:
        def meta(a):
            return a.meta.get("val") if isinstance(a, fx.Node) else a

        args = fx.map_arg(node.args, meta)
        kwargs = fx.map_arg(node.kwargs, meta)
        try:
            return int(flop_registry[packet](*args, **kwargs, out_val=val))
        except Exception:
            pass
    if isinstance(val, torch.Tensor):
        return int(val.numel())
    if isinstance(val, (tuple, list)):
        return int(sum(v.numel() for v in val if isinstance(v, torch.Tensor)))
    return 0


def storage_root(node: fx.Node) -> fx.Node:
    """The node that owns the storage ``node`` views (itself when it is no view)."""
    while _views_input(node):
        node = node.args[0]
    return node


def saved_activations(g: TrainGraph) -> dict[fx.Node, int]:
    """Forward-produced storages that the backward reads, with their bytes (activations saved for backward)."""
    fwd, bwd = g.forward_nodes(), g.backward_nodes()
    saved: dict[fx.Node, int] = {}
    for n in fwd:
        root = storage_root(n)
        if root.op != "call_function" or root in saved:
            continue
        if any(u in bwd for a in aliases(root) for u in a.users):
            saved[root] = value_nbytes(root.meta.get("val"))
    return saved


def value_nbytes(val: Any) -> int:
    """Bytes a node's value owns: a tensor's storage span, or the sum over a tuple of tensors."""
    if isinstance(val, torch.Tensor):
        try:
            return int(val.untyped_storage().nbytes())
        except Exception:
            return val.numel() * val.element_size()
    if isinstance(val, (tuple, list)):
        return sum(value_nbytes(v) for v in val)
    return 0


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_NOT_LIBRARY = ("tests", "examples", "bench")  # folders of the repository that are user code, not memfit's


def _memfit_file(path: str) -> bool:
    """Whether ``path`` is one of memfit's own modules (by location, not by name: a checkout may sit in a
    folder called memfit, and its tests and examples are user code)."""
    p = os.path.abspath(path)
    if not p.startswith(_PACKAGE_DIR + os.sep):
        return False
    return p[len(_PACKAGE_DIR) + 1:].split(os.sep)[0] not in _NOT_LIBRARY


def user_frame(stack_trace: str) -> str | None:
    """The innermost frame of a recorded stack that is model code (not torch, not memfit, not generated)."""
    lines = [ln.rstrip() for ln in stack_trace.splitlines() if ln.strip()]
    best = None
    for i, ln in enumerate(lines):
        s = ln.strip()
        path = s[len('File "'):].split('"', 1)[0] if s.startswith('File "') else ""
        if s.startswith("File ") and "<eval_with_key>" not in s and "/torch/" not in s and not _memfit_file(path):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else ""
            best = f"{s}: {code}" if code else s
    return best


def _safe_name(name: str) -> str:
    """A Python identifier for a placeholder (FX uniquifies clashes)."""
    return "s_" + "".join(c if c.isalnum() else "_" for c in name)
