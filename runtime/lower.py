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
import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from .. import ops as memfit_ops
from ..errors import UnsupportedGraph, where_what_got
from ..graph import user_frame
from ..ops import args_of

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
    ops = torch.ops.memfit
    return {
        ops.adamw_update.default: (_bind(memfit_ops.run_adamw_update, label, ops.adamw_update.default, adamw),
                                   label),
        ops.sgd_update.default: (_bind(memfit_ops.run_sgd_update, label, ops.sgd_update.default, sgd), label),
        ops.adam8bit_update.default: (_bind(memfit_ops.run_adam8bit_update, label, ops.adam8bit_update.default,
                                            adam8bit, quant), label),
        ops.lowrank_update.default: (_bind(memfit_ops.run_lowrank_update, label, ops.lowrank_update.default,
                                           lowrank_apply, quant), label),
    }


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


def _bind(runner: Callable, label: str, op, *kernels: Callable) -> Callable:
    """``runner`` with its kernels fixed, named so FX codegen can reference it; asks the step hook first."""

    @functools.wraps(runner)
    def bound(*args, **kwargs):
        hook = _STEP_HOOK.get()
        if hook is not None and hook.before_op(op, args, kwargs) is False:
            return None
        return runner(*kernels, *args, **kwargs)

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
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kernels: dict[str, str] = {}
    for node in gm.graph.nodes:
        check_lowerable(node, device)
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


def workspace_bytes(node: fx.Node, device: torch.device | str = "cpu") -> int:
    """Bytes a memfit op allocates and frees while it runs, for the implementation ``lower`` picks.

    Update ops copy a non-contiguous gradient (e.g. a transposed weight gradient) to a contiguous
    one; the CPU references add their own param-sized temporaries (AdamW's ``denom``; SGD's first
    owned gradient temporary when it scales, decays or uses Nesterov; an fp32 working copy of a
    low-precision parameter). The Triton kernels keep everything else in registers. The low-rank
    update is costed at its worst step, a subspace refresh.
    """
    target = node.target
    if target is torch.ops.memfit.lowrank_update.default:
        return _lowrank_workspace(node, use_triton(torch.device(device)))
    if target is torch.ops.memfit.adam8bit_update.default:
        return _adam8bit_workspace(node, use_triton(torch.device(device)))
    if target not in (torch.ops.memfit.adamw_update.default, torch.ops.memfit.sgd_update.default):
        return 0
    a = args_of(node)
    param, grad = a.param.meta["val"], a.grad.meta["val"]
    micro_steps = a.micro_steps
    fp32 = param.numel() * 4
    total = 0
    if micro_steps <= 1 and not grad.is_contiguous():
        total += grad.numel() * grad.element_size()
    if use_triton(torch.device(device)):
        return total
    if param.dtype != torch.float32:
        total += fp32
    if target is torch.ops.memfit.adamw_update.default:
        spike = node.kwargs.get("spike_threshold", 0.0) > 0
        if not spike:
            return total + fp32 + (fp32 if micro_steps > 1 else 0)
        from ..kernels.adamw import spike_workspace_bytes

        # an owned fp32 gradient (the scaled sum, a cast, or a copy), then the chunked clip, then denom
        return total + fp32 + max(spike_workspace_bytes(param.numel()), fp32)
    momentum, nesterov, weight_decay = a.momentum, a.nesterov, a.weight_decay
    owns_temp = micro_steps > 1 or weight_decay != 0 or (momentum != 0 and nesterov)
    return total + (fp32 if owns_temp else 0)


def _adam8bit_workspace(node: fx.Node, triton: bool) -> int:
    a = args_of(node)
    param = a.param.meta["val"]
    bits, micro_steps = a.bits, a.micro_steps
    numel = param.numel()
    grad_copy = 0 if a.grad.meta["val"].is_contiguous() or micro_steps > 1 else numel * 4
    if triton and bits == 8:
        return grad_copy
    if bits == 8:  # the reference works in chunks of _REF_CHUNK values: fp32 m, v, update and the code search
        from ..kernels.adam8bit import _REF_CHUNK

        return grad_copy + 7 * 4 * min(numel, _REF_CHUNK) + 8192
    # 4-bit: whole fp32 m and v, unpacked codes, AdamW's denom, one fp32 param copy when low precision
    return grad_copy + 5 * numel * 4 + (numel * 4 if param.dtype != torch.float32 else 0)


def _lowrank_workspace(node: fx.Node, triton: bool) -> int:
    from .. import projection as pj

    a = args_of(node)
    param = a.param.meta["val"]
    m, n = param.shape
    rank, projector, rule, proj_bits = a.rank, a.projector, a.rule, a.proj_bits
    rows = pj.proj_shape((m, n), rank)[0]
    low = 4 * math.prod(pj.low_shape((m, n), rank))
    full = 4 * m * n
    step = 4 * low  # R, N and two moment-sized temporaries
    if a.grad_right is not None:  # factored: P^T L (rank x tokens) first
        step += 4 * rank * a.grad.meta["val"].shape[1]
    if a.micro_steps > 1:
        step += full  # the accumulated gradient, scaled, in fp32
    if rule == "apollo" and param.dtype == a.grad.meta["val"].dtype == torch.float32:
        step += 4 * max(m, n)  # W += G ∘ ratio in place (ops._apollo_in_place): G's per-channel norms only
    elif rule != "galore":
        step += 2 * full  # the fp32 gradient and the projected-back update
    elif not triton:
        step += full if param.dtype != torch.float32 else 0
    if projector == "random" or proj_bits == 4:
        step += 4 * rows * rank
    k = min(m, n)
    refresh = {"svd": full + 4 * (rows * k + k * (m + n - rows) + rows * rank),
               "randomized": 4 * (3 * (m + n) * min(rank + 8, k) + min(rank + 8, k) ** 2),
               "dct": 2 * full, "random": 4 * rows * rank}[projector]
    return step + refresh
