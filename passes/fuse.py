"""fuse: chains of pointwise ops become one ``memfit::fused`` op each, planned and run as one kernel.

The pass walks the rewritten step backwards and grows groups: a pointwise node (one of
``ops.fusible_ops()``: arithmetic, activations and their backward, comparisons, ``where``, dtype casts)
joins the group of its users when every user is in that group, its shape broadcasts to what they read
and it sits on the same side (forward or backward) as the group's output. A view (``view``, ``unsqueeze``,
``expand``, ``permute``, ``transpose``, ``slice``, ``select``, ``squeeze``) joins the same way: it is no step
of the program but an index map. Every member is evaluated in the output's index space, so a member read
through views is evaluated at the indices those views map to, and the views are pushed down to the group's
inputs, where they are graph-level views of the input (no copy) read through their strides. Each member has
one *chain* (the views and broadcasts between it and the output) per way the output reads it; a member read
through two chains is two steps (computed twice in registers, never stored). A view joins only when its
chain applied to every input below it is a view (checked on the fake values: ``view`` of a broadcast input
may not be). A group of at least ``min_ops`` compute nodes is replaced by
``memfit::fused(inputs, program)`` at its output's place: the program (JSON, see
``memfit.kernels.pointwise``) lists the ops, the inputs are what the group reads from outside. A value read
outside its group ends that group (it is its output), so no value is stored twice. A sum or mean over
listed dimensions may end a group (never sit inside one): its members then broadcast to the reduction's
input, and the kernel reduces in registers. Other reductions, matmuls, convolutions, attention and
memfit's own ops are not fused. The output keeps the unfused op's strides (the program says them when its
inputs' views would lead ATen to another layout).

A group whose one reader is an AdamW or SGD update's gradient (``ops.PROLOGUE_OPS``) becomes that op's
prologue instead, even a group of one op (clipping's ``g * coef``): the op gets ``grad=None`` and the program
with its inputs (``grad_program``, ``grad_inputs``), and makes the gradient chunk by chunk as it steps the
weight (``ops.prologue_parts``), so the gradient never exists whole. Not when the program reads a tensor the
op writes (an L2 penalty's gradient reads the weight): chunk k could read an element an earlier chunk stepped,
so such a group stays a fused op before the update.

Memory: a group's intermediates never exist; its inputs live until the fused op runs. The plan reads the
op's declared workspace: 0 for the generated Triton kernel; on CPU the chunked evaluation's live
intermediates of one chunk (``kernels.pointwise.chunked_workspace``, exact). The chunk (``chunk`` elements,
0: ``CHUNK_ELEMENTS``) is written into each program; when a budget is missed with the peak at a fused op,
``refine`` quarters it (down to 1024 elements): a lossless lever of FLOPs 0, the same values.
``graph.info["fuse"]`` counts the groups, distinct kernels, nodes covered (and their share of the step's
non-matmul compute nodes) and the bytes no longer materialised.

Runs after every other rewrite (``last``), before the schedule.
"""

from __future__ import annotations

import json
import logging
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph, storage_root, value_nbytes
from ..ops import (
    PROLOGUE_OPS,
    args_of,
    fused_chunk,
    fused_layout,
    fused_with_chunk,
    fused_with_stride,
    fusible_ops,
    op_call,
    replace_args,
)
from .base import Pass, PassResult, register_pass

aten = torch.ops.aten
log = logging.getLogger("memfit.passes")
_WHERE = "passes['fuse']"
# no compute of their own (aliases, tuple items, run-time shape checks): not counted as nodes to cover
_FREE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default, aten.transpose.int,
         aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.alias.default,
         aten.detach.default, aten.slice.Tensor, aten.select.int, aten._assert_tensor_metadata.default,
         aten.split.Tensor, aten.lift_fresh_copy.default}
_LIBRARY = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.convolution.default,
            aten.convolution_backward.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_efficient_attention_backward.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_flash_attention_backward.default}
# views a group may hold (index maps), and the op that re-emits each on an input (``_unsafe_view`` is no alias)
_VIEWS = {aten.view.default: aten.view.default, aten._unsafe_view.default: aten.view.default,
          aten.unsqueeze.default: aten.unsqueeze.default, aten.squeeze.dim: aten.squeeze.dim,
          aten.squeeze.dims: aten.squeeze.dims, aten.squeeze.default: aten.squeeze.default,
          aten.expand.default: aten.expand.default, aten.permute.default: aten.permute.default,
          aten.t.default: aten.t.default, aten.transpose.int: aten.transpose.int, aten.slice.Tensor: aten.slice.Tensor,
          aten.select.int: aten.select.int, aten.alias.default: aten.alias.default}
_PASSIVE = aten._assert_tensor_metadata.default  # a user that checks metadata only: dropped with a fused value
_MAX_CHAINS = 4  # ways a member may be read through views (each one more step in registers)
_DROP = ("memory_format", "pin_memory")  # empty_like's defaults (checked in _fusible), not written to programs
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.bool)
_IN_DTYPES = (*_DTYPES, torch.int64, torch.int32)


def _op_name(n: fx.Node) -> str | None:
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or t.namespace != "aten":
        return None
    return f"{t._opname}.{t._overloadname}"


def _encodable(a) -> bool:
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        return isinstance(v, torch.Tensor) and v.dtype in _IN_DTYPES
    if isinstance(a, (list, tuple)):
        return all(_encodable(x) and not isinstance(x, fx.Node) for x in a)
    return a is None or isinstance(a, (bool, int, float, str, torch.dtype))


_REDUCTIONS = ("sum.dim_IntList", "mean.dim")
_REDUCTION_OPS = {aten.sum.dim_IntList, aten.mean.dim}


def _reduction_root(n: fx.Node, names: frozenset[str]) -> bool:
    """A sum or mean over listed dimensions, in its input's float dtype: it may end a group (never sit
    inside one)."""
    name = _op_name(n)
    if name not in _REDUCTIONS or name not in names or n.kwargs:
        return False
    v, x = n.meta.get("val"), n.args[0]
    dims = n.args[1] if len(n.args) > 1 else None
    return (isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor) and bool(dims)
            and all(isinstance(d, int) for d in dims) and len(n.args) <= 3)


def _fusible(n: fx.Node, names: frozenset[str]) -> bool:
    name = _op_name(n)
    if name not in names or name in _REDUCTIONS:
        return False
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.dtype not in _DTYPES:
        return False
    if name == "_to_copy.default" and (set(n.kwargs) - {"dtype"} or n.kwargs.get("dtype") not in _DTYPES):
        return False
    if name == "empty_like.default" and (set(n.kwargs) - {"memory_format", "pin_memory"}
                                         or n.kwargs.get("memory_format", torch.preserve_format)
                                         is not torch.preserve_format or n.kwargs.get("pin_memory")):
        return False
    return all(_encodable(a) for a in n.args) and all(_encodable(a) for k, a in n.kwargs.items() if k not in _DROP)


@register_pass("fuse")
@dataclass(frozen=True)
class Fuse(Pass):
    min_ops: int = 2  # smaller groups are left as their one ATen op
    chunk: int = 0  # elements per chunk of the CPU evaluation; 0: the kernels' default (CHUNK_ELEMENTS)

    last = True
    keeps_meta = True

    def __post_init__(self):
        if isinstance(self.min_ops, bool) or not isinstance(self.min_ops, int) or self.min_ops < 2:
            raise ConfigError(where_what_got(f"{_WHERE}.min_ops", "an int >= 2 (ops per fused kernel at least)",
                                             self.min_ops, "e.g. min_ops=2"))
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
            raise ConfigError(where_what_got(f"{_WHERE}.chunk", "an int >= 0 (elements per CPU chunk; 0: the "
                                             "default)", self.chunk, "e.g. chunk=16384"))

    def refine(self, g: TrainGraph, peak_node: str) -> Fuse | None:
        """When the step peaks at a fused op (or an update making its gradient): a quarter of the CPU chunk,
        whose intermediates are the op's workspace (the same values); None elsewhere or below 1024 elements."""
        node = next((n for n in g.graph.nodes if n.name == peak_node), None)
        if node is None:
            return None
        program = node.args[1] if node.target is torch.ops.memfit.fused.default else node.kwargs.get("grad_program")
        if not program:
            return None
        chunk = fused_chunk(program) // 4
        return Fuse(min_ops=self.min_ops, chunk=chunk) if chunk >= 1024 else None

    def run(self, g: TrainGraph) -> PassResult:
        names = fusible_ops()
        forward = g.forward_nodes()
        nodes = list(g.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        group_of: dict[fx.Node, fx.Node] = {}  # node -> its group's output (root)
        members: dict[fx.Node, list[fx.Node]] = {}
        chains: dict[fx.Node, set[tuple]] = {}  # member -> the view chains through which its group reads it
        for n in reversed(nodes):
            if _reduction_root(n, names):  # a reduction ends a group: it starts one, joins none
                group_of[n], members[n], chains[n] = n, [n], {()}
                continue
            view = _view_step(n)
            if view is None and not _fusible(n, names):
                continue
            roots = {group_of.get(u) for u in n.users if u.target is not _PASSIVE}
            root = roots.pop() if len(roots) == 1 else None
            cs = None
            if root is not None and (root in forward) == (n in forward):
                cs = _chains(n, view, chains)
            if cs is not None:
                group_of[n] = root
                members[root].append(n)
                chains[n] = cs
            elif view is None:  # a view never starts a group
                group_of[n], members[n], chains[n] = n, [n], {()}
        compute = [n for n in nodes if n.op == "call_function" and n.target not in _FREE
                   and n.target is not operator.getitem and n.target not in _LIBRARY
                   and getattr(n.target, "namespace", None) != "memfit"]
        groups, prologues, programs, covered, views, saved = 0, 0, set(), 0, 0, 0
        fused_names: set[fx.Node] = set()
        for root, group in members.items():
            ops_in = [m for m in group if m.target not in _VIEWS]
            update = _prologue_of(root)
            if len(ops_in) < self.min_ops and update is None:
                continue
            group.sort(key=order.__getitem__)
            program, slots = _program(root, set(group))
            if update is not None and _reads_what_it_writes(update, slots):
                update = None  # chunk k's gradient could read a weight element an earlier chunk stepped
                if len(ops_in) < self.min_ops:
                    continue
            if self.chunk:
                program = fused_with_chunk(program, self.chunk)
            if update is not None:  # the update op makes its gradient itself, chunk by chunk (root included)
                with g.graph.inserting_before(update):
                    inputs = [_emit_chain(g.graph, b, c) for b, c in slots]
                update.args, update.kwargs = replace_args(update, grad=None, grad_program=program,
                                                          grad_inputs=inputs)
                update.meta["fused"] = [m.name for m in ops_in]
                prologues += 1
            else:
                bases = list(dict.fromkeys(b for b, _ in slots))
                # as early as its inputs allow, not before its first member: the inputs die as soon as in the
                # unfused chain, the output lives a little longer
                at = max([group[0], *[i for i in bases if i.op != "placeholder"]], key=order.__getitem__)
                at = at if at in group else at.next
                with g.graph.inserting_before(at):
                    inputs = [_emit_chain(g.graph, b, c) for b, c in slots]
                    program = _keep_layout(program, inputs, root)
                    new = op_call(g.graph, torch.ops.memfit.fused.default, inputs=inputs, program=program)
                new.meta.update(root.meta)  # its value, its source line, its forward mark
                new.meta["fused"] = [m.name for m in ops_in]
                root.replace_all_uses_with(new)
                _retarget(g, root, new)
                groups += 1
            _erase(g, group)
            programs.add(program)
            covered += len(ops_in)
            views += len(group) - len(ops_in)
            fused_names.update(ops_in)
            saved += sum(value_nbytes(m.meta["val"]) for m in ops_in if update is not None or m is not root)
        if groups or prologues:
            _updates_after_readers(g)
        left: dict[str, int] = {}  # compute nodes left to ATen, by the reason
        for n in compute:
            if n in fused_names:
                continue
            why = ("alone (a group of one)" if n in group_of else
                   "a reduction the generator does not take" if _op_name(n) in _REDUCTIONS else
                   "not pointwise, or an op the generator does not know" if _op_name(n) not in names else
                   "a dtype or argument the generator does not take")
            key = f"{_op_name(n) or n.target}: {why}"
            left[key] = left.get(key, 0) + 1
        stats = {"groups": groups, "prologues": prologues, "kernels": len(programs), "nodes_fused": covered,
                 "views_fused": views,
                 "compute_nodes": len(compute), "share": round(covered / max(1, len(compute)), 3),
                 "bytes_not_materialised": saved, "left_to_aten": left}
        g.info["fuse"] = stats
        log.info("fuse: %d groups and %d update prologues, %d kernels, %d of %d non-matmul compute nodes (and %d "
                 "views); left to ATen: %s", groups, prologues, len(programs), covered, len(compute), views,
                 ", ".join(f"{k} x{v}" for k, v in sorted(left.items(), key=lambda kv: -kv[1])) or "none")
        return PassResult(g, bool(groups or prologues), stats, meta_ok=True)


def _erase(g: TrainGraph, group: list[fx.Node]) -> None:
    """Erase a fused group's members (last first), with the metadata checks that read them."""
    for m in reversed(group):
        for u in [u for u in m.users if u.target is _PASSIVE]:
            g.graph.erase_node(u)
        g.graph.erase_node(m)


def _prologue_of(root: fx.Node) -> fx.Node | None:
    """The update op whose gradient ``root`` is, when that op may make it itself chunk by chunk
    (``ops.PROLOGUE_OPS``): its only reader, the gradient of the weight's shape, every tensor the op walks
    with it contiguous, the weight not an encoded one; else None."""
    users = [u for u in root.users if u.target is not _PASSIVE]
    if len(users) != 1 or root.target in _REDUCTION_OPS:
        return None
    u = users[0]
    target = u.target
    if getattr(target, "namespace", None) != "memfit" or target._opname not in PROLOGUE_OPS:
        return None
    a = args_of(u)
    if a.grad is not root or a.wscale is not None or a.grad_program:
        return None
    if sum(x is root for x in torch.utils._pytree.tree_leaves((u.args, u.kwargs))) != 1:  # read once: as grad
        return None
    if tuple(root.meta["val"].shape) != tuple(a.param.meta["val"].shape):
        return None
    walked = [getattr(a, name) for name in PROLOGUE_OPS[target._opname]]
    return u if all(t is None or t.meta["val"].is_contiguous() for t in walked) else None


def _reads_what_it_writes(update: fx.Node, slots: list[tuple[fx.Node, tuple]]) -> bool:
    """Whether a prologue would read a tensor its update op writes (the weight, a moment, the accumulator)."""
    a = args_of(update)
    written = {storage_root(t) for t in (getattr(a, name) for name in PROLOGUE_OPS[update.target._opname])
               if t is not None}
    return any(storage_root(b) in written for b, _ in slots)


def _freeze(a):
    return tuple(_freeze(x) for x in a) if isinstance(a, (list, tuple)) else a


def _view_step(n: fx.Node) -> tuple | None:
    """A view node as one chain element (the op that re-emits it, its arguments after the tensor), when a group
    may hold it: a view of a dimensioned tensor, with plain int arguments."""
    if n.op != "call_function" or n.target not in _VIEWS or n.kwargs or not n.args:
        return None
    x, v = n.args[0], n.meta.get("val")
    if not isinstance(x, fx.Node) or not isinstance(v, torch.Tensor) or v.dtype not in _IN_DTYPES:
        return None
    xv = x.meta.get("val")
    if not isinstance(xv, torch.Tensor) or xv.dim() == 0:  # a 0-dim value's type promotion would change
        return None
    rest = _freeze(n.args[1:])
    ok = all(type(a) is int or (isinstance(a, tuple) and all(type(b) is int for b in a)) for a in rest)
    return (_VIEWS[n.target], rest) if ok else None


def _expand(shape) -> tuple:
    return (aten.expand.default, (tuple(shape),))


def _operand_chain(a: fx.Node, user_shape: tuple, chain: tuple) -> tuple:
    """The chain of ``a`` read by a pointwise member of ``user_shape`` evaluated through ``chain``. A member
    read through no view computes its own value, so its operands broadcast implicitly as in the unfused op;
    under a chain an operand is expanded to the member's shape first, so every step has its exact shape."""
    shape = tuple(a.meta["val"].shape)
    if not shape or not chain:  # 0-dim: read as itself (a scalar for type promotion, one value everywhere)
        return ()
    return ((_expand(user_shape),) if shape != tuple(user_shape) else ()) + chain


def _apply(t: torch.Tensor, chain: tuple) -> torch.Tensor:
    for op, args in chain:
        t = op(t, *args)
    return t


def _viewable(a, chain: tuple) -> bool:
    if not chain or not isinstance(a, fx.Node):
        return True
    try:
        _apply(a.meta["val"], chain)
        return True
    except Exception:  # a view the strides do not allow: the group ends here
        return False


def _chains(n: fx.Node, view: tuple | None, chains: dict) -> set[tuple] | None:
    """The chains through which ``n``'s group reads it (every user a member), or None when ``n`` may not join:
    its shape does not broadcast to a user's, too many chains, or a chain that is no view of an input below."""
    shape = tuple(n.meta["val"].shape)
    cs: set[tuple] = set()
    for u in n.users:
        if u.target is _PASSIVE:
            continue
        uview = _view_step(u) if u.target in _VIEWS else None
        for c in chains[u]:
            if uview is not None:
                cs.add((uview, *c))
            else:
                space = tuple(u.args[0].meta["val"].shape) if u.target in _REDUCTION_OPS else tuple(
                    u.meta["val"].shape)
                if not _broadcasts(n, space):
                    return None
                cs.add(_operand_chain(n, space, c))
    if len(cs) > _MAX_CHAINS:
        return None
    if view is not None:
        below = [(n.args[0], (view, *c)) for c in cs]
    else:
        below = [(a, _operand_chain(a, shape, c)) for a in n.all_input_nodes for c in cs
                 if isinstance(a.meta.get("val"), torch.Tensor)]
    return cs if all(_viewable(a, c) for a, c in below) else None


def _broadcasts(n: fx.Node, b: tuple[int, ...]) -> bool:
    a = tuple(n.meta["val"].shape)
    try:
        return tuple(torch.broadcast_shapes(a, b)) == b
    except RuntimeError:
        return False


def _program(root: fx.Node, group: set[fx.Node]) -> tuple[str, list[tuple[fx.Node, tuple]]]:
    """The group as a program: each (member, chain) one step, operands first, the root last; the inputs as
    (node read from outside, its chain) slots."""
    index: dict[tuple, int] = {}
    slots: list[tuple[fx.Node, tuple]] = []
    steps: list = []

    def visit(m: fx.Node, chain: tuple) -> list:
        """``m`` through ``chain`` as a program argument (a step, or an input slot)."""
        if m not in group:
            if (m, chain) not in slots:
                slots.append((m, chain))
            return ["in", slots.index((m, chain))]
        if m.target in _VIEWS:  # an index map, no step: read its input through one more view
            return visit(m.args[0], (_view_step(m), *chain))
        if (m, chain) in index:
            return ["v", index[(m, chain)]]
        shape = tuple(m.meta["val"].shape)
        space = tuple(m.args[0].meta["val"].shape) if m.target in _REDUCTION_OPS else shape

        def enc(a):
            if isinstance(a, fx.Node):
                return visit(a, () if m.target in _REDUCTION_OPS else _operand_chain(a, space, chain))
            if isinstance(a, torch.dtype):
                return ["dtype", str(a).removeprefix("torch.")]
            if isinstance(a, (list, tuple)):
                return [enc(x) for x in a]
            return a

        step = [_op_name(m), [enc(a) for a in m.args], {k: enc(v) for k, v in m.kwargs.items() if k not in _DROP}]
        index[(m, chain)] = len(steps)
        steps.append(step)
        return ["v", index[(m, chain)]]

    visit(root, ())
    return json.dumps({"steps": steps}, separators=(",", ":")), slots


def _emit_chain(graph: fx.Graph, base: fx.Node, chain: tuple) -> fx.Node:
    """``base`` read through ``chain``: graph-level view nodes (aliases, no bytes)."""
    node = base
    for op, args in chain:
        val = op(node.meta["val"], *args)
        node = graph.call_function(op, (node, *[list(a) if isinstance(a, tuple) else a for a in args]))
        node.meta["val"] = val
    return node


def _keep_layout(program: str, inputs: list[fx.Node], root: fx.Node) -> str:
    """``program`` with the root's strides written in when its inputs' views would give ATen another layout."""
    want = root.meta["val"]
    sig = tuple((tuple(x.meta["val"].shape), x.meta["val"].dtype, tuple(x.meta["val"].stride())) for x in inputs)
    if fused_layout(program, sig)[2] == tuple(want.stride()):
        return program
    return fused_with_stride(program, tuple(want.stride()))


def _updates_after_readers(g: TrainGraph) -> None:
    """A fused op sits at its group's inputs' latest, which may follow an in-place update of a weight one of its
    early members read: such an update moves to just after its last reader."""
    order = {n: i for i, n in enumerate(g.graph.nodes)}
    for fqn, upd in g.updates.items():
        readers = [u for u in g.param_readers(fqn) if u is not upd]
        last = max(readers, key=order.__getitem__, default=None)
        if last is not None and order[last] > order[upd]:
            last.append(upd)
            order = {n: i for i, n in enumerate(g.graph.nodes)}


def _retarget(g: TrainGraph, old: fx.Node, new: fx.Node) -> None:
    if g.loss is old:
        g.loss = new
    for f, n in list(g.grad_of.items()):
        if n is old:
            g.grad_of[f] = new
    for b, n in list(g.buffer_updates.items()):
        if n is old:
            g.buffer_updates[b] = new
