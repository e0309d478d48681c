"""fuse: chains of pointwise ops become one ``memfit::fused`` op each, planned and run as one kernel.

The pass walks the rewritten step backwards and grows groups: a pointwise node (one of
``ops.fusible_ops()``: arithmetic, activations and their backward, comparisons, ``where``, dtype casts)
joins the group of its users when every user is in that group, its shape broadcasts to the group's output
and it sits on the same side (forward or backward) as the group's output. A group of at least ``min_ops``
nodes is replaced by ``memfit::fused(inputs, program)`` at its output's place: the program (JSON, see
``memfit.kernels.pointwise``) lists the ops, the inputs are what the group reads from outside (views
included, read through their strides). A value read outside its group ends that group (it is its output),
so no value is computed twice. A sum or mean over listed dimensions may end a group (never sit inside one):
its members then broadcast to the reduction's input, and the kernel reduces in registers. Views, other
reductions, matmuls, convolutions, attention and memfit's own ops are not fused.

Memory: a group's intermediates never exist; its inputs live until the fused op runs. The plan reads the
op's declared workspace: 0 for the generated Triton kernel; on CPU the chunked evaluation's live
intermediates of one chunk (``kernels.pointwise.chunked_workspace``, exact). ``graph.info["fuse"]`` counts
the groups, distinct kernels, nodes covered (and their share of the step's non-matmul compute nodes) and
the bytes no longer materialised.

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
from ..graph import TrainGraph, value_nbytes
from ..ops import fusible_ops, op_call
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

    last = True
    keeps_meta = True

    def __post_init__(self):
        if isinstance(self.min_ops, bool) or not isinstance(self.min_ops, int) or self.min_ops < 2:
            raise ConfigError(where_what_got(f"{_WHERE}.min_ops", "an int >= 2 (ops per fused kernel at least)",
                                             self.min_ops, "e.g. min_ops=2"))

    def run(self, g: TrainGraph) -> PassResult:
        names = fusible_ops()
        forward = g.forward_nodes()
        nodes = list(g.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        group_of: dict[fx.Node, fx.Node] = {}  # node -> its group's output (root)
        members: dict[fx.Node, list[fx.Node]] = {}
        space: dict[fx.Node, tuple[int, ...]] = {}  # a group's shape: its output's, or its reduction's input's
        for n in reversed(nodes):
            if _reduction_root(n, names):  # a reduction ends a group: it starts one, joins none
                group_of[n], members[n] = n, [n]
                space[n] = tuple(n.args[0].meta["val"].shape)
                continue
            if not _fusible(n, names):
                continue
            roots = {group_of.get(u) for u in n.users}
            root = roots.pop() if len(roots) == 1 else None
            if root is not None and (root in forward) == (n in forward) and _broadcasts(n, space[root]):
                group_of[n] = root
                members[root].append(n)
            else:
                group_of[n] = n
                members[n] = [n]
                space[n] = tuple(n.meta["val"].shape)
        compute = [n for n in nodes if n.op == "call_function" and n.target not in _FREE
                   and n.target is not operator.getitem and n.target not in _LIBRARY
                   and getattr(n.target, "namespace", None) != "memfit"]
        groups, programs, covered, saved = 0, set(), 0, 0
        for root, group in members.items():
            if len(group) < self.min_ops:
                continue
            group.sort(key=order.__getitem__)
            program, inputs = _program(group)
            # as early as its inputs allow, not before its first member: the inputs die as soon as in the
            # unfused chain, the output lives a little longer
            at = max([group[0], *[i for i in inputs if i.op != "placeholder"]], key=order.__getitem__)
            at = at if at in group else at.next
            with g.graph.inserting_before(at):
                new = op_call(g.graph, torch.ops.memfit.fused.default, inputs=inputs, program=program)
            new.meta.update(root.meta)  # its value, its source line, its forward mark
            new.meta["fused"] = [m.name for m in group]
            root.replace_all_uses_with(new)
            _retarget(g, root, new)
            for m in reversed(group):
                g.graph.erase_node(m)
            groups += 1
            programs.add(program)
            covered += len(group)
            saved += sum(value_nbytes(m.meta["val"]) for m in group if m is not root)
        left: dict[str, int] = {}  # compute nodes left to ATen, by the reason
        fused_names = {m for grp in members.values() if len(grp) >= self.min_ops for m in grp}
        for n in compute:
            if n in fused_names:
                continue
            why = ("alone (a group of one)" if n in group_of else
                   "a reduction the generator does not take" if _op_name(n) in _REDUCTIONS else
                   "not pointwise, or an op the generator does not know" if _op_name(n) not in names else
                   "a dtype or argument the generator does not take")
            key = f"{_op_name(n) or n.target}: {why}"
            left[key] = left.get(key, 0) + 1
        stats = {"groups": groups, "kernels": len(programs), "nodes_fused": covered,
                 "compute_nodes": len(compute), "share": round(covered / max(1, len(compute)), 3),
                 "bytes_not_materialised": saved, "left_to_aten": left}
        g.info["fuse"] = stats
        log.info("fuse: %d groups, %d kernels, %d of %d non-matmul compute nodes; left to ATen: %s", groups,
                 len(programs), covered, len(compute),
                 ", ".join(f"{k} x{v}" for k, v in sorted(left.items(), key=lambda kv: -kv[1])) or "none")
        return PassResult(g, bool(groups), stats, meta_ok=True)


def _broadcasts(n: fx.Node, b: tuple[int, ...]) -> bool:
    a = tuple(n.meta["val"].shape)
    try:
        return tuple(torch.broadcast_shapes(a, b)) == b
    except RuntimeError:
        return False


def _program(group: list[fx.Node]) -> tuple[str, list[fx.Node]]:
    index = {m: j for j, m in enumerate(group)}
    inputs: list[fx.Node] = []

    def enc(a):
        if isinstance(a, fx.Node):
            if a in index:
                return ["v", index[a]]
            if a not in inputs:
                inputs.append(a)
            return ["in", inputs.index(a)]
        if isinstance(a, torch.dtype):
            return ["dtype", str(a).removeprefix("torch.")]
        if isinstance(a, (list, tuple)):
            return [enc(x) for x in a]
        return a

    steps = [[_op_name(m), [enc(a) for a in m.args], {k: enc(v) for k, v in m.kwargs.items() if k not in _DROP}]
             for m in group]
    return json.dumps({"steps": steps}, separators=(",", ":")), inputs


def _retarget(g: TrainGraph, old: fx.Node, new: fx.Node) -> None:
    if g.loss is old:
        g.loss = new
    for f, n in list(g.grad_of.items()):
        if n is old:
            g.grad_of[f] = new
    for b, n in list(g.buffer_updates.items()):
        if n is old:
            g.buffer_updates[b] = new
