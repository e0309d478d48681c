"""Fused SGD step (momentum, dampening, Nesterov, weight decay): one elementwise pass.

``sgd`` updates ``param`` and ``momentum_buffer`` in place, reading and writing each once, with all
math in fp32 whatever the param dtype. ``sgd_ref`` is the same step in plain torch, following
``torch.optim.SGD(foreach=False)`` op for op, so on fp32 it is bit-identical to the optimizer.

torch's CPU ``add(other, alpha=a)`` rounds through a fused multiply-add (``fma(other, a, self)``),
so the kernel uses ``tl.fma`` in the same four places; every other op rounds once, as in torch.
"""


import torch

from ..errors import KernelError, where_what_got
from ._checks import check_update_tensors, to_f32

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (e.g. macOS); sgd_ref still works
    triton = None
    tl = None

_WHERE = "memfit.kernels.sgd"


if triton is not None:

    @triton.jit
    def _sgd_kernel(
        param_ptr,
        grad_ptr,
        buf_ptr,
        n_elements,
        grad_scale,
        weight_decay,
        momentum,
        one_minus_dampening,
        neg_lr,
        MAXIMIZE: tl.constexpr,
        HAS_WEIGHT_DECAY: tl.constexpr,
        HAS_MOMENTUM: tl.constexpr,
        FIRST_STEP: tl.constexpr,
        NESTEROV: tl.constexpr,
        PARAM_IS_BF16: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(axis=0).to(tl.int64)  # int64 offsets: optimizer state can pass 2**31 elements
        offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements

        param_raw = tl.load(param_ptr + offsets, mask=mask)
        p = param_raw.to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_scale
        if MAXIMIZE:
            g = -g
        if HAS_WEIGHT_DECAY:
            g = tl.fma(p, weight_decay, g)  # g.add(param, alpha=weight_decay)
        if HAS_MOMENTUM:
            if FIRST_STEP:
                buf = g  # torch clones the first (decayed) gradient into the buffer
            else:
                buf = tl.load(buf_ptr + offsets, mask=mask)
                buf = tl.fma(g, one_minus_dampening, buf * momentum)  # buf.mul_(m).add_(g, alpha=1 - d)
            tl.store(buf_ptr + offsets, buf, mask=mask)
            if NESTEROV:
                g = tl.fma(buf, momentum, g)  # g.add(buf, alpha=momentum)
            else:
                g = buf
        p = tl.fma(g, neg_lr, p)  # param.add_(g, alpha=-lr)

        if PARAM_IS_BF16:
            # Round to nearest even by hand: under TRITON_INTERPRET=1 (triton 3.9) `.to(tl.bfloat16)`
            # truncates (482 of 1000 randn values differ from torch), while GPUs and torch round to
            # nearest even. The integer form gives torch's bits on both; NaN stays a quiet NaN.
            bits = p.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(p != p, 0x7FC0, rounded)
            param_out = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            param_out = p.to(param_raw.dtype)
        tl.store(param_ptr + offsets, param_out, mask=mask)


# Launch constants. 1024 elements per program is eight per thread across four warps on a GPU (not
# yet tuned on one). Under TRITON_INTERPRET=1 each program costs ~2 ms of numpy on CPU.
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


def _check_tensors(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
                   momentum: float) -> None:
    named = {"param": param, "grad": grad}
    if momentum != 0:
        if momentum_buffer is None:
            raise KernelError(where_what_got(_WHERE, "a `momentum_buffer` tensor when momentum != 0", None,
                                             "pass torch.zeros_like(param, dtype=torch.float32)"))
        named["momentum_buffer"] = momentum_buffer
    state = {"momentum_buffer": momentum_buffer} if "momentum_buffer" in named else {}
    check_update_tensors(_WHERE, "torch.optim.SGD", param, grad, state)


def sgd(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
    grad_scale: float = 1.0,
    maximize: bool = False,
) -> None:
    """One SGD step in place on ``param`` and ``momentum_buffer`` (one fused kernel).

    ``grad`` is multiplied by ``grad_scale`` first (pass ``1 / loss_scale`` to unscale).
    ``first_step`` says the buffer holds nothing yet: it is overwritten with the gradient, as
    ``torch.optim.SGD`` does when ``state["momentum_buffer"]`` is None. ``momentum_buffer`` may be
    None when ``momentum == 0``; it is neither read nor written then.
    """
    if triton is None:
        raise KernelError(where_what_got(_WHERE, "triton to be importable", "ImportError",
                                         "install triton, or use sgd_ref / torch.optim.SGD on this platform"))
    _check_tensors(param, grad, momentum_buffer, momentum)
    if param.device.type == "cpu" and isinstance(_sgd_kernel, triton.runtime.JITFunction):
        raise KernelError(where_what_got(_WHERE, "tensors on a GPU", param.device,
                                         "set TRITON_INTERPRET=1 before importing triton to run on CPU"))

    has_momentum = momentum != 0
    n_elements = param.numel()
    grid = (triton.cdiv(n_elements, _BLOCK_SIZE),)
    _sgd_kernel[grid](
        param,
        grad,
        momentum_buffer if has_momentum else param,  # never dereferenced without momentum
        n_elements,
        to_f32(grad_scale),
        to_f32(weight_decay),
        to_f32(momentum),
        to_f32(1 - dampening),
        to_f32(-lr),
        MAXIMIZE=bool(maximize),
        HAS_WEIGHT_DECAY=weight_decay != 0,
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bool(first_step),
        NESTEROV=bool(nesterov),
        PARAM_IS_BF16=param.dtype == torch.bfloat16,
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )


@torch.no_grad()
def sgd_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
    grad_scale: float = 1.0,
    maximize: bool = False,
) -> None:
    """``sgd`` in plain torch: ``torch.optim.SGD``'s single-tensor step, op for op.

    bf16 / fp16 params are updated through an fp32 copy that is rounded back once at the end,
    which is what the kernel does.
    """
    work = param if param.dtype == torch.float32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    owned = g is not grad  # once g is our own temporary, later steps update it in place (same rounding)
    if grad_scale != 1.0:
        g = g.mul_(grad_scale) if owned else g * grad_scale
        owned = True
    if maximize:
        g = g.neg_() if owned else -g
        owned = True

    if weight_decay != 0:
        g = g.add_(work, alpha=weight_decay) if owned else g.add(work, alpha=weight_decay)
        owned = True
    if momentum != 0:
        if momentum_buffer is None:
            raise KernelError(where_what_got(_WHERE, "a `momentum_buffer` tensor when momentum != 0", None,
                                             "pass torch.zeros_like(param, dtype=torch.float32)"))
        if first_step:
            momentum_buffer.copy_(g)
        else:
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        if nesterov:
            g = g.add_(momentum_buffer, alpha=momentum) if owned else g.add(momentum_buffer, alpha=momentum)
        else:
            g = momentum_buffer
    work.add_(g, alpha=-lr)

    if work is not param:
        param.copy_(work)
