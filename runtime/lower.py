"""Lowering: a TrainGraph (or any ATen fx graph) -> a Python callable that frees at last use.

Each memfit op becomes its Triton launcher on CUDA (or when ``MEMFIT_TRITON_INTERPRET=1``, under
Triton's interpreter) and its plain-torch reference on CPU; every other ATen op runs as ATen. An op
with no kernel for the device raises UnsupportedGraph naming the op, the node and the model source
line it came from. The lowered graph uses FX's boxed calling convention (``fn(list_of_args)``, the
list cleared on entry) and FX's codegen, which drops every value at its last use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from .. import ops as memfit_ops
from ..errors import UnsupportedGraph, where_what_got
from ..graph import user_frame

log = logging.getLogger("memfit.lower")

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}
_COMPOSITE = ("CompositeExplicitAutograd", "CompositeImplicitAutograd", "CompositeExplicitAutogradNonFunctional")


@dataclass
class Lowered:
    """A runnable step: ``fn(args)`` with args in placeholder order; ``kernels`` says what each memfit op uses."""

    fn: Callable[[list], tuple]
    gm: fx.GraphModule
    kernels: dict[str, str] = field(default_factory=dict)

    def __call__(self, args: list):
        return self.fn(args)


def use_triton(device: torch.device) -> bool:
    if os.environ.get("MEMFIT_TRITON_INTERPRET") == "1":
        return True
    return device.type == "cuda" and os.environ.get("MEMFIT_DISABLE_TRITON") != "1"


def _kernel_impls(triton: bool) -> dict:
    """memfit op -> (callable with the op's signature, label)."""
    if triton:
        from ..kernels.adam8bit import adam8bit
        from ..kernels.adamw import adamw
        from ..kernels.lowrank import lowrank_apply
        from ..kernels.quant import dequantize_blockwise, pack_int4, quantize_blockwise, unpack_int4
        from ..kernels.sgd import sgd

        quant = memfit_ops.QuantKernels(quantize_blockwise, dequantize_blockwise, pack_int4, unpack_int4)
    else:
        from ..kernels.adam8bit import adam8bit_ref as adam8bit
        from ..kernels.adamw import adamw_ref as adamw
        from ..kernels.lowrank import lowrank_apply_ref as lowrank_apply
        from ..kernels.sgd import sgd_ref as sgd

        quant = memfit_ops.reference_quant_kernels()
    label = "triton" if triton else "reference"
    wk, dequant = _weight_kernels(triton)
    if triton:
        from ..kernels.cross_entropy import linear_cross_entropy as lce
        from ..kernels.pointwise import run_triton as fused_kernel
    else:
        lce = fused_kernel = None
    ops = torch.ops.memfit
    return {
        ops.adamw_update.default: (_bind(memfit_ops.run_adamw_update, label, ops.adamw_update.default, adamw,
                                         wk=wk, fused=fused_kernel), label),
        ops.sgd_update.default: (_bind(memfit_ops.run_sgd_update, label, ops.sgd_update.default, sgd, wk=wk,
                                       fused=fused_kernel), label),
        ops.adam8bit_update.default: (_bind(memfit_ops.run_adam8bit_update, label, ops.adam8bit_update.default,
                                            adam8bit, quant, wk=wk), label),
        ops.lowrank_update.default: (_bind(memfit_ops.run_lowrank_update, label, ops.lowrank_update.default,
                                           lowrank_apply, quant, wk=wk), label),
        ops.dequant_weight.default: (_bind(memfit_ops.run_dequant_weight, label, None, dequant), label),
        # the mask step mutates the weight, its mask and moments: the step hook journals it like an update; a
        # skipped one (a non-finite gradient) hands the gradient on unmasked, for the update op to skip as well
        ops.prune_mask.default: (_bind(memfit_ops.run_prune_mask, "reference", ops.prune_mask.default,
                                       on_skip=_argument(ops.prune_mask.default, "grad")), "reference"),
        ops.sparse_adamw_update.default: (_bind(memfit_ops.run_sparse_adamw_update, "reference",
                                                ops.sparse_adamw_update.default), "reference"),
        # plain-torch bodies called directly (not through the dispatcher), so a measured step sees their temporaries
        ops.pack_mask.default: (_bind(memfit_ops.run_pack_mask, "reference", None), "reference"),
        ops.mask_grad.default: (_bind(memfit_ops.run_mask_grad, "reference", None), "reference"),
        ops.sparse_weight.default: (_bind(memfit_ops.run_sparse_weight, "reference", None), "reference"),
        ops.fused.default: (_bind(memfit_ops.run_fused, label, None, fused_kernel), label),
        ops.linear_cross_entropy.default: (_bind(memfit_ops.run_linear_cross_entropy, label, None, lce), label),
        ops.lsq_quant.default: (_bind(memfit_ops.run_lsq_quant, "reference", None), "reference"),
        ops.lsq_quant_backward.default: (_bind(memfit_ops.run_lsq_quant_backward, "reference", None), "reference"),
    }


def _weight_kernels(triton: bool) -> tuple[memfit_ops.WeightKernels, dict | None]:
    """The INT8-weight update kernels and the dequantize launchers by codec (None: the references)."""
    if not triton:
        return memfit_ops.reference_weight_kernels(), None
    from ..kernels import wquant as wq

    def dequant(codes, scales, group):
        return wq.dequantize_int8_group(codes, scales, group, torch.float32)

    def requant(w, codes, scales, group, seed):
        if seed is None:
            c, s = wq.quantize_int8_group(w, group)
            codes.copy_(c)
            scales.copy_(s)
        else:
            wq.requantize_int8_sr(w, codes, scales, group, seed)

    def adamw_int8(codes, scales, grad, exp_avg, exp_avg_sq, **kw):
        wq.adamw_int8_sr(codes, scales, grad, exp_avg, exp_avg_sq, **kw)

    def lowrank_int8(codes, scales, proj, update, **kw):
        from ..kernels.lowrank import lowrank_apply_int8_sr

        lowrank_apply_int8_sr(codes, scales, proj, update, **kw)

    launchers = {
        "int8": lambda c, s, group, shape, dtype: wq.dequantize_int8_group(c, s, group, dtype).reshape(shape),
        "int4": lambda c, s, group, shape, dtype: wq.dequantize_int4_group(c, s, group, shape, dtype),
        "nf4": lambda c, s, group, shape, dtype: wq.dequantize_nf4(c, s, group, shape, dtype),
    }
    return memfit_ops.WeightKernels(dequant, requant, adamw_int8, lowrank_int8), launchers


_STEP_HOOK: contextvars.ContextVar = contextvars.ContextVar("memfit_step_hook", default=None)


@contextlib.contextmanager
def step_hook(hook):
    """Within this context every memfit update op first calls ``hook.before_op(op, args, kwargs)`` (False
    skips the op) and a loss guard calls ``hook.on_loss(loss)``: how the executor makes a step atomic."""
    token = _STEP_HOOK.set(hook)
    try:
        yield
    finally:
        _STEP_HOOK.reset(token)


def check_loss(loss: torch.Tensor) -> None:
    """The loss guard ``lower(..., loss_guard=True)`` places right after the loss is computed."""
    hook = _STEP_HOOK.get()
    if hook is not None:
        hook.on_loss(loss)


def _argument(op, name: str) -> Callable:
    """``(args, kwargs) -> `` the argument ``name`` of a call of ``op`` (by its schema position)."""
    index = [a.name for a in op._schema.arguments].index(name)
    return lambda args, kwargs: kwargs[name] if name in kwargs else args[index]


def _bind(runner: Callable, label: str, op, *kernels: Callable, on_skip: Callable | None = None,
          **fixed) -> Callable:
    """``runner`` with its kernels fixed, named so FX codegen can reference it; an update op (``op`` given)
    asks the step hook first (a skipped call returns ``on_skip(args, kwargs)``, else None)."""

    @functools.wraps(runner)
    def bound(*args, **kwargs):
        hook = _STEP_HOOK.get()
        if op is not None and hook is not None and hook.before_op(op, args, kwargs) is False:
            return on_skip(args, kwargs) if on_skip is not None else None
        return runner(*kernels, *args, **kwargs, **fixed)

    bound.__name__ = f"{runner.__name__}_{label}"
    bound.__qualname__ = bound.__name__
    return bound


def source_line(node: fx.Node) -> str:
    """The model source line a node was traced from (innermost model frame of its stack), or '?'."""
    return user_frame(node.meta.get("stack_trace") or "") or "?"


def check_lowerable(node: fx.Node, device: torch.device) -> None:
    target = node.target
    if node.op in ("placeholder", "output", "get_attr"):
        return
    if node.op != "call_function":
        raise UnsupportedGraph(where_what_got(f"memfit.lower: node {node.name!r}", "call_function nodes",
                                              f"{node.op} {target}", "capture at ATen level (frontends.export)"))
    if target is operator.getitem or getattr(target, "namespace", None) == "memfit":
        return
    if isinstance(target, torch._ops.OpOverload):
        name = target.name()
        key = _DISPATCH_KEYS.get(device.type, "CPU")
        if any(torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in (key, *_COMPOSITE)):
            return
        if target.py_kernels:  # python-registered decompositions/impls
            return
        raise UnsupportedGraph(where_what_got(
            f"memfit.lower: node {node.name!r} (from {source_line(node)})",
            f"an op with a {device.type} kernel", f"{name} with none",
            f"register a {device.type} implementation for {name} or keep that code out of the step"),
            op=name, node=node.name)
    if isinstance(target, torch._ops.HigherOrderOperator):
        raise UnsupportedGraph(where_what_got(
            f"memfit.lower: node {node.name!r} (from {source_line(node)})", "ATen ops",
            f"higher-order op {target}", "capture without control-flow operators"))
    if callable(target):
        return
    raise UnsupportedGraph(where_what_got(f"memfit.lower: node {node.name!r}", "a callable target", repr(target),
                                          "report this graph"))


def lower(gm: fx.GraphModule, device: torch.device | str = "cpu", *, loss_guard: bool = False) -> Lowered:
    """Copy ``gm``, swap memfit ops for kernels, check every op can run on ``device``, compile boxed.

    ``loss_guard`` places :func:`check_loss` right after the loss (the output's first value) so a step
    hook sees the loss before the backward's first update op runs."""
    device = torch.device(device)
    loss_node = None
    if loss_guard:
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        loss_node = out.args[0][0]
    triton = use_triton(device)
    impls = _kernel_impls(triton)
    fused = _weight_only_matmuls(gm) if triton else {}
    skip = {n for mm in fused.values() for n in mm[1:]}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kernels: dict[str, str] = {}
    for node in gm.graph.nodes:
        check_lowerable(node, device)
        if node in skip:  # a dequantized weight read only by one product: the product dequantizes in its tiles
            continue
        if node in fused:
            env[node] = _emit_weight_only_matmul(graph, node, fused[node], env)
            kernels[node.name] = "triton"
            continue
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in impls:
            fn, label = impls[node.target]
            new.target = fn
            kernels[node.name] = label
        env[node] = new
        if node is loss_node:
            graph.call_function(check_loss, (new,))
    graph.set_codegen(fx.graph._BoxedCodeGen())
    lowered = fx.GraphModule(gm, graph)
    log.debug("lowered %d nodes for %s; memfit ops: %s", len(graph.nodes), device, kernels)

    def run(args: list):
        with torch.no_grad():
            return lowered(args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return Lowered(run, lowered, kernels)


_MMS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


def _weight_only_matmuls(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]]:
    """Products ``X @ dequant(W)^T`` (``mm`` / ``addmm`` reading ``t(dequant_weight(...))``, an INT8 or NF4
    weight without double-quantized scales, each read by this product alone): product -> (product, t,
    dequant). On the Triton path they run as one weight-only-quantized matmul (W8A16 / NF4), the weight
    dequantized tile by tile inside it, never whole. The memory plan counts the whole dequantized copy, so
    on this path it over-states the peak by at most one weight."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _MMS:
            continue
        w = node.args[-1]
        if not (isinstance(w, fx.Node) and w.target is torch.ops.aten.t.default and len(w.users) == 1):
            continue
        dq = w.args[0]
        if not (isinstance(dq, fx.Node) and dq.target is torch.ops.memfit.dequant_weight.default
                and len(dq.users) == 1):
            continue
        a = memfit_ops.args_of(dq)
        x = node.args[-2]
        if a.codec not in ("int8", "nf4") or a.scales2 is not None or len(a.shape) != 2 or \
                a.shape[1] % a.group or x.meta.get("val") is None or x.meta["val"].dtype != a.dtype:
            continue
        out[node] = (node, w, dq)
    return out


def _emit_weight_only_matmul(graph: fx.Graph, node: fx.Node, match, env) -> fx.Node:
    _, _, dq = match
    a = memfit_ops.args_of(dq)
    x = env[node.args[-2]]
    n, k = a.shape
    mm = graph.call_function(weight_only_matmul, (x, env[a.codes], env[a.scales], a.codec, a.group, n, k))
    if node.target is torch.ops.aten.addmm.default:
        mm = graph.call_function(torch.ops.aten.add.Tensor, (mm, env[node.args[0]]))
    return mm


def weight_only_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, codec: str, group: int, n: int,
                       k: int) -> torch.Tensor:
    """``x @ W^T`` with ``W`` [n, k] held as INT8 or NF4 codes: the Triton weight-only-quantized matmul."""
    from ..kernels import wquant as wq

    if not x.is_contiguous():
        x = x.contiguous()
    if codec == "int8":
        return wq.matmul_int8w(x, codes, scales, group)
    return wq.matmul_nf4w(x, codes, scales, group, n, k)


def workspace_bytes(node: fx.Node, device: torch.device | str = "cpu") -> int:
    """Bytes a memfit op allocates and frees while it runs, for the implementation ``lower`` picks on
    ``device`` (Triton kernels or the CPU references): ``ops.workspace_bytes``, declared with each op."""
    return memfit_ops.workspace_bytes(node, use_triton(torch.device(device)))
