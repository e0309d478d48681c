"""AdamW with block-wise 8-bit state: dequantize, update and requantize both moments in registers.

``adam8bit`` keeps Adam's first moment as uint8 indices into a signed dynamic code map and the
second moment into an unsigned one (``memfit.kernels.quant.dynamic_code``), with one fp32 absmax
per block of ``block`` values. Each program takes a tile of whole blocks: it gathers each value's
code from the code table and scales it by its block's absmax, takes exactly the AdamW step of
``memfit.kernels.adamw`` in fp32 (param decay, ``lerp`` of m, ``v = beta2 v + (1 - beta2) g^2``,
``param -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``), then requantizes m and v against their new
block absmax (``quant.nearest_code_index``: a ``log2(len(code))``-step binary search with gathers).
The param step uses the fresh fp32 moments, before they are rounded to codes, as bitsandbytes does.

``adam8bit_ref`` is the same step in plain torch, 2**15 values at a time: it dequantizes with
``quant.dequantize_flat_ref``, steps with ``adamw_ref`` and requantizes with ``quant.quantize_flat_ref``.
The kernel rounds its fp32 moments op for op as torch's CPU ``lerp_`` and ``addcmul_`` do (fused
multiply-adds, see ``adamw``), so from the same state the new codes and absmax are bit-equal; the
param can differ by an ulp of the update (torch's vectorized CPU ``sqrt`` is not correctly rounded),
as in ``adamw``.

State bytes: 2 per value plus 8 per block (two fp32 absmax), against 8 per value in fp32.

A limit of the method, not of this code: the unsigned map's smallest nonzero value is 3.25e-7 of the
block absmax, so a v below ~1.6e-7 of its block's largest (a gradient ~2500x smaller than the block's
largest) is stored as 0, while m keeps ~1e-6 of its absmax. The next step then divides by a v made of
that step's ``(1 - beta2) g^2`` alone, and such elements take steps several times too large. Measured
on a quadratic whose curvatures span e^+-3 within a block, 50 steps at lr 1e-2: some values ended 3.5
away from fp32 AdamW's, which moved none by more than 0.5; each of the 10 worst had had its v stored
as 0. Gradients within a block of a weight matrix rarely span that much.
"""

from __future__ import annotations

import torch

from ..errors import KernelError, where_what_got
from ._checks import (
    check_same_device,
    check_tensor,
    check_update_tensors,
    require_gpu_or_interpreter,
    require_triton,
    to_f32,
)
from .adamw import adam_scalars, adamw_ref
from .quant import check_absmax, check_block, check_code, dequantize_flat_ref, quantize_flat_ref, tile_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (e.g. macOS); adam8bit_ref still works
    triton = None
    tl = None

_WHERE = "memfit.kernels.adam8bit"


if triton is not None:
    from .quant import nearest_code_index, round_to_bf16

    @triton.jit
    def _adam8bit_kernel(
        param_ptr,
        grad_ptr,
        q_m_ptr,
        absmax_m_ptr,
        q_v_ptr,
        absmax_v_ptr,
        code_m_ptr,
        code_v_ptr,
        n_elements,
        grad_scale,
        param_decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        neg_step_size,
        bias_correction2_sqrt,
        eps,
        LERP_FROM_END: tl.constexpr,
        PARAM_IS_BF16: tl.constexpr,
        LOG2_CODE_M: tl.constexpr,
        LOG2_CODE_V: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # A (ROWS, BLOCK) tile: ROWS consecutive state blocks, one per row.
        pid = tl.program_id(axis=0).to(tl.int64)  # int64 offsets: optimizer state can pass 2**31 elements
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_mask = rows * BLOCK < n_elements
        offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offsets < n_elements

        param_raw = tl.load(param_ptr + offsets, mask=mask, other=0.0)
        p = param_raw.to(tl.float32)
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * grad_scale
        # Dequantize: code[q] * absmax, one gather per moment.
        q_m = tl.load(q_m_ptr + offsets, mask=mask, other=0).to(tl.int32)
        q_v = tl.load(q_v_ptr + offsets, mask=mask, other=0).to(tl.int32)
        m = tl.load(code_m_ptr + q_m) * tl.load(absmax_m_ptr + rows, mask=row_mask, other=0.0)[:, None]
        v = tl.load(code_v_ptr + q_v) * tl.load(absmax_v_ptr + rows, mask=row_mask, other=0.0)[:, None]
        # Lanes past the end gathered code[0] (-1 in a signed map): zero them, so they stay out of the
        # new block absmax and their (unstored) update stays finite.
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)

        # The step of kernels/adamw.py, op for op (see there for why each fma).
        p = p * param_decay
        if LERP_FROM_END:
            m = tl.fma(lerp_weight, g - m, g)
        else:
            m = tl.fma(lerp_weight, g - m, m)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)

        # Requantize against the new block absmax.
        absmax_m = tl.max(tl.abs(m), axis=1)
        absmax_v = tl.max(tl.abs(v), axis=1)  # v >= 0; abs keeps the reference's bits for -0.0
        new_q_m = nearest_code_index(m, absmax_m[:, None], code_m_ptr, LOG2_CODE_M)
        new_q_v = nearest_code_index(v, absmax_v[:, None], code_v_ptr, LOG2_CODE_V)

        if PARAM_IS_BF16:
            param_out = round_to_bf16(p)
        else:
            param_out = p.to(param_raw.dtype)
        tl.store(param_ptr + offsets, param_out, mask=mask)
        tl.store(q_m_ptr + offsets, new_q_m.to(tl.uint8), mask=mask)
        tl.store(q_v_ptr + offsets, new_q_v.to(tl.uint8), mask=mask)
        tl.store(absmax_m_ptr + rows, absmax_m, mask=row_mask)
        tl.store(absmax_v_ptr + rows, absmax_v, mask=row_mask)

else:
    _adam8bit_kernel = None

# Launch constants. A tile of whole state blocks per program, about 1024 values (quant.tile_rows:
# eight per thread across four warps on a GPU; not yet tuned on one). The block size itself is part
# of the state format, so it is the caller's `block` argument, checked to be a power of two.
_NUM_WARPS = 4
# adam8bit_ref works through this many values at a time (a multiple of every legal block): its fp32
# temporaries stay under 1 MiB, where a whole-tensor pass would undo the 8-bit saving. On tiny-llama
# (bench/optimizers.py) 2**20 left the measured peak 2.6 MiB above bitsandbytes'; 2**15 puts it 0.7 MiB
# under, for a few more Python-level ops per large tensor (the CPU path; GPUs run the Triton kernel).
_REF_CHUNK = 1 << 15


def _check_tensors(param: object, grad: object, q_m: object, absmax_m: object, q_v: object, absmax_v: object,
                   code_m: object, code_v: object, step: object, block: object) -> None:
    check_update_tensors(_WHERE, "torch.optim.AdamW", param, grad, {})
    check_block(_WHERE, block)
    n_blocks = -(-param.numel() // block)
    for name, q, absmax, code in (("m", q_m, absmax_m, code_m), ("v", q_v, absmax_v, code_v)):
        check_tensor(_WHERE, f"q_{name}", q, (torch.uint8,), "store code indices as torch.uint8")
        if q.numel() != param.numel():
            raise KernelError(where_what_got(_WHERE, f"`q_{name}` of {param.numel()} elements, as many as `param`",
                                             q.numel(), "allocate it with torch.zeros(param.numel(), "
                                                        "dtype=torch.uint8)"))
        check_absmax(_WHERE, f"absmax_{name}", absmax, n_blocks)
        check_code(_WHERE, f"code_{name}", code)
    check_same_device(_WHERE, {"param": param, "q_m": q_m, "absmax_m": absmax_m, "q_v": q_v, "absmax_v": absmax_v,
                               "code_m": code_m, "code_v": code_v})
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise KernelError(where_what_got(_WHERE, "`step` an int >= 1 (the count after this update)", step,
                                         "pass 1 on the first update and increment it after each"))


def adam8bit(
    param: torch.Tensor,
    grad: torch.Tensor,
    q_m: torch.Tensor,
    absmax_m: torch.Tensor,
    q_v: torch.Tensor,
    absmax_v: torch.Tensor,
    code_m: torch.Tensor,
    code_v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    block: int = 256,
) -> None:
    """One AdamW step in place on ``param`` and the 8-bit state (one fused kernel).

    ``q_m`` / ``q_v``: uint8 code indices, ``param.numel()`` of them (any shape, contiguous);
    ``absmax_m`` / ``absmax_v``: fp32, one per block of the flattened param; ``code_m`` / ``code_v``:
    the code maps (``dynamic_code(True)`` and ``dynamic_code(False)``). Fresh state is any ``q`` with
    zero absmax (``torch.zeros``): it dequantizes to 0. ``grad`` is multiplied by ``grad_scale`` first;
    ``step`` counts updates including this one. Scalars are formed as in ``adamw``.
    """
    require_triton(_WHERE, triton, "adam8bit_ref")
    _check_tensors(param, grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, step, block)
    require_gpu_or_interpreter(_WHERE, _adam8bit_kernel, param.device)

    # Host-side scalars in double, in the order torch.optim computes them (as adamw does).
    step_size, bias_correction2_sqrt, param_decay, lerp_weight, lerp_from_end = adam_scalars(
        lr, beta1, beta2, weight_decay, step)

    n_elements = param.numel()
    rows = tile_rows(block)
    _adam8bit_kernel[(triton.cdiv(n_elements, rows * block),)](
        param,
        grad,
        q_m,
        absmax_m,
        q_v,
        absmax_v,
        code_m,
        code_v,
        n_elements,
        to_f32(grad_scale),
        to_f32(param_decay),
        to_f32(lerp_weight),
        to_f32(beta2),
        to_f32(1 - beta2),
        to_f32(-step_size),
        to_f32(bias_correction2_sqrt),
        to_f32(eps),
        LERP_FROM_END=lerp_from_end,
        PARAM_IS_BF16=param.dtype == torch.bfloat16,
        LOG2_CODE_M=code_m.numel().bit_length() - 1,
        LOG2_CODE_V=code_v.numel().bit_length() - 1,
        BLOCK=block,
        ROWS=rows,
        num_warps=_NUM_WARPS,
    )


@torch.no_grad()
def adam8bit_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    q_m: torch.Tensor,
    absmax_m: torch.Tensor,
    q_v: torch.Tensor,
    absmax_v: torch.Tensor,
    code_m: torch.Tensor,
    code_v: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
    block: int = 256,
) -> None:
    """``adam8bit`` in plain torch: dequantize, ``adamw_ref``, requantize, 2**15 values at a time."""
    _check_tensors(param, grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, step, block)
    flat_param, flat_grad = param.view(-1), grad.view(-1)
    flat_q_m, flat_q_v = q_m.view(-1), q_v.view(-1)
    chunk = max(_REF_CHUNK // block, 1) * block
    for start in range(0, flat_param.numel(), chunk):
        stop = min(start + chunk, flat_param.numel())
        blocks = slice(start // block, -(-stop // block))
        m = dequantize_flat_ref(flat_q_m[start:stop], absmax_m[blocks], code_m, block)
        v = dequantize_flat_ref(flat_q_v[start:stop], absmax_v[blocks], code_v, block)
        # adamw_ref updates a view of an fp32 param in place; a bf16/fp16 slice through an fp32 copy.
        adamw_ref(flat_param[start:stop], flat_grad[start:stop], m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, step=step, grad_scale=grad_scale)
        quantize_flat_ref(m, code_m, block, flat_q_m[start:stop], absmax_m[blocks])
        quantize_flat_ref(v, code_v, block, flat_q_v[start:stop], absmax_v[blocks])
