"""Fused AdamW step: one elementwise pass over param, grad and both moments.

``adamw`` updates ``param``, ``exp_avg`` and ``exp_avg_sq`` in place, reading each once and writing
each once, with all math in fp32 whatever the param dtype. ``adamw_ref`` is the same step in plain
torch, following ``torch.optim.AdamW(foreach=False, capturable=False)`` op for op, so on fp32 it is
bit-identical to the optimizer.

The kernel mirrors the rounding of torch's CPU kernels where that is cheap: ``lerp_`` and
``addcmul_`` round through a fused multiply-add there, so the kernel uses ``tl.fma`` in the same
places, and it divides and takes square roots with IEEE rounding (``div_rn``, ``sqrt_rn``). One
residual difference is documented in the tests: torch's vectorized CPU ``sqrt`` is not correctly
rounded (off by one ulp on ~17% of inputs with AVX512), so ``param`` can differ from the reference
by an ulp of the update.
"""


import torch

from ..errors import KernelError, where_what_got
from ._checks import check_update_tensors, to_f32

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (e.g. macOS); adamw_ref still works
    triton = None
    tl = None

_WHERE = "memfit.kernels.adamw"


if triton is not None:

    @triton.jit
    def _adamw_kernel(
        param_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        n_elements,
        grad_scale,
        param_decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        neg_step_size,
        bias_correction2_sqrt,
        eps,
        spike_threshold,
        MAXIMIZE: tl.constexpr,
        SPIKE_CLIP: tl.constexpr,
        LERP_FROM_END: tl.constexpr,
        PARAM_IS_BF16: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
    ):
        pid = tl.program_id(axis=0).to(tl.int64)  # int64 offsets: optimizer state can pass 2**31 elements
        offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offsets < n_elements

        param_raw = tl.load(param_ptr + offsets, mask=mask)
        p = param_raw.to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_scale
        m = tl.load(exp_avg_ptr + offsets, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
        if MAXIMIZE:
            g = -g
        if SPIKE_CLIP:
            # SPAM: an element whose g^2 exceeds threshold * v (the second moment before this step) is a
            # spike; it keeps its sign at magnitude sqrt(threshold * v). Elements with v == 0 are left alone.
            limit_sq = spike_threshold * v
            spike = (g * g > limit_sq) & (v > 0)
            limit = tl.sqrt_rn(limit_sq)
            g = tl.where(spike, tl.where(g > 0, limit, -limit), g)

        # param.mul_(1 - lr * weight_decay); param_decay is exactly 1.0 when weight_decay == 0.
        p = p * param_decay
        # exp_avg.lerp_(g, 1 - beta1): torch's CPU lerp is fma(w, g - m, m) for w < 0.5,
        # else fma(w - 1, g - m, g); lerp_weight already holds w or w - 1.
        if LERP_FROM_END:
            m = tl.fma(lerp_weight, g - m, g)
        else:
            m = tl.fma(lerp_weight, g - m, m)
        # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        # param.addcdiv_(exp_avg, denom, value=-step_size)
        p = p + tl.div_rn(neg_step_size * m, denom)

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
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)


# Launch constants. 1024 elements per program is eight per thread across four warps on a GPU (not
# yet tuned on one). Under TRITON_INTERPRET=1 each program costs ~2 ms of numpy on CPU.
_BLOCK_SIZE = 1024
_NUM_WARPS = 4


def _check_tensors(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int
) -> None:
    check_update_tensors(_WHERE, "torch.optim.AdamW", param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise KernelError(where_what_got(_WHERE, "`step` an int >= 1 (the count after this update)", step,
                                         "pass 1 on the first update and increment it after each"))



def adam_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step: int
                 ) -> tuple[float, float, float, float, bool]:
    """The host-side scalars of one Adam step, in double and in the order torch.optim computes them:
    (step size lr / (1 - beta1**t), sqrt(1 - beta2**t), the decoupled decay factor, lerp's weight and
    whether lerp works from the end). torch's lerp rounds its weight to fp32, then picks its formula on
    |w| < 0.5; from the end the weight is w - 1, exact in fp32 for 0.5 <= w <= 1 (Sterbenz). Shared by
    every Adam kernel (fp32, 8-bit moments, INT8 weights)."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    param_decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    lerp_weight = to_f32(1 - beta1)
    lerp_from_end = not abs(lerp_weight) < 0.5
    if lerp_from_end:
        lerp_weight = lerp_weight - 1.0
    return lr / bias_correction1, bias_correction2**0.5, param_decay, lerp_weight, lerp_from_end

def adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    maximize: bool = False,
    spike_threshold: float = 0.0,
) -> None:
    """One AdamW step in place on ``param``, ``exp_avg`` and ``exp_avg_sq`` (one fused kernel).

    ``grad`` is multiplied by ``grad_scale`` first (pass ``1 / loss_scale`` to unscale).
    ``spike_threshold > 0`` clips gradient spikes as SPAM does (``g^2 > threshold * exp_avg_sq`` ->
    ``sign(g) * sqrt(threshold * exp_avg_sq)``, the second moment read before it is updated).
    ``step`` counts updates including this one, as ``torch.optim``'s ``state["step"]`` does after
    its increment. Scalars are formed in double on the host and rounded once to fp32.
    """
    if triton is None:
        raise KernelError(where_what_got(_WHERE, "triton to be importable", "ImportError",
                                         "install triton, or use adamw_ref / torch.optim.AdamW on this platform"))
    _check_tensors(param, grad, exp_avg, exp_avg_sq, step)
    if param.device.type == "cpu" and isinstance(_adamw_kernel, triton.runtime.JITFunction):
        raise KernelError(where_what_got(_WHERE, "tensors on a GPU", param.device,
                                         "set TRITON_INTERPRET=1 before importing triton to run on CPU"))

    # Host-side scalars in double, in the order torch.optim computes them.
    step_size, bias_correction2_sqrt, param_decay, lerp_weight, lerp_from_end = adam_scalars(
        lr, beta1, beta2, weight_decay, step)

    n_elements = param.numel()
    grid = (triton.cdiv(n_elements, _BLOCK_SIZE),)
    _adamw_kernel[grid](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        n_elements,
        to_f32(grad_scale),
        to_f32(param_decay),
        to_f32(lerp_weight),
        to_f32(beta2),
        to_f32(1 - beta2),
        to_f32(-step_size),
        to_f32(bias_correction2_sqrt),
        to_f32(eps),
        to_f32(spike_threshold),
        MAXIMIZE=bool(maximize),
        SPIKE_CLIP=spike_threshold > 0,
        LERP_FROM_END=lerp_from_end,
        PARAM_IS_BF16=param.dtype == torch.bfloat16,
        BLOCK_SIZE=_BLOCK_SIZE,
        num_warps=_NUM_WARPS,
    )


@torch.no_grad()
def adamw_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    maximize: bool = False,
    spike_threshold: float = 0.0,
) -> None:
    """``adamw`` in plain torch: ``torch.optim.AdamW``'s single-tensor step, op for op.

    bf16 / fp16 params are updated through an fp32 copy that is rounded back once at the end,
    which is what the kernel does. SPAM's spike clipping (``spike_threshold > 0``) works on an owned
    fp32 copy of the gradient in chunks of ``SPIKE_CHUNK`` values (see ``spike_workspace_bytes``).
    """
    work = param if param.dtype == torch.float32 else param.float()
    g = grad if grad.dtype == torch.float32 else grad.float()
    if grad_scale != 1.0:
        g = g * grad_scale
    if maximize:
        g = -g
    if spike_threshold > 0:
        if g is grad:
            g = grad.clone()
        clip_spikes_(g, exp_avg_sq, spike_threshold)

    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = exp_avg_sq.sqrt()  # the one param-sized temporary; the in-place div/add round as torch's do
    denom.div_(bias_correction2_sqrt).add_(eps)
    work.addcdiv_(exp_avg, denom, value=-step_size)

    if work is not param:
        param.copy_(work)


SPIKE_CHUNK = 2**15


def clip_spikes_(g: torch.Tensor, exp_avg_sq: torch.Tensor, threshold: float) -> None:
    """SPAM's spike-aware clipping of ``g`` in place: where ``g^2 > threshold * exp_avg_sq`` (and the
    moment is non-zero) ``g`` becomes ``sign(g) * sqrt(threshold * exp_avg_sq)``; the kernel's math, in
    chunks so the temporaries stay at ``9 * min(numel, SPIKE_CHUNK)`` bytes."""
    flat_g, flat_v = g.view(-1), exp_avg_sq.view(-1)
    thr = torch.tensor(threshold, dtype=torch.float32).item()  # the fp32 value the kernel sees
    for start in range(0, flat_g.numel(), SPIKE_CHUNK):
        g_c = flat_g[start:start + SPIKE_CHUNK]
        v_c = flat_v[start:start + SPIKE_CHUNK]
        limit = v_c * thr
        spike = (g_c * g_c) > limit
        spike &= v_c > 0
        limit.sqrt_().copysign_(g_c)
        g_c.copy_(torch.where(spike, limit, g_c))


def spike_workspace_bytes(numel: int) -> int:
    """Peak temporaries of :func:`clip_spikes_` (fp32 limit + fp32 square or where-result + bool mask)."""
    return 9 * min(numel, SPIKE_CHUNK)
