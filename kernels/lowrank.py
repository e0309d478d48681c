"""GaLore's weight update from a low-rank step: project back, decay and apply in one tiled matmul.

``lowrank_apply`` computes, in place on ``param`` (m, n),

* ``side="left"``:  ``param = param * (1 - lr * wd) - lr * scale * (proj @ update)``, proj (m, r), update (r, n);
* ``side="right"``: ``param = param * (1 - lr * wd) - lr * scale * (update @ proj.T)``, proj (n, r), update (m, r).

Each program owns a (BLOCK_M, BLOCK_N) tile of ``param``: it accumulates its tile of the rank-r product
in fp32 registers (``tl.dot`` with ``input_precision="ieee"``, so fp32 inputs are not rounded to TF32),
then loads the param tile, decays it and adds the scaled product, and stores it once. The full
(m, n) update matrix is never materialized; the decay factor is exactly 1.0 when ``weight_decay == 0``.

``lowrank_apply_ref`` is the plain-torch path: ``param.mul_(decay).addmm_(proj, update, alpha=-lr*scale)``
on fp32 params (torch materializes the product inside addmm), through one fp32 copy for bf16/fp16.
The two agree to fp32 matmul rounding (different summation orders), and within an ulp of the
stored dtype for bf16/fp16 params.
"""

from __future__ import annotations

import torch

from ..errors import KernelError, where_what_got
from ._checks import PARAM_DTYPES, check_same_device, check_tensor, require_gpu_or_interpreter, require_triton, to_f32

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (e.g. macOS); lowrank_apply_ref still works
    triton = None
    tl = None

_WHERE = "memfit.kernels.lowrank"
SIDES = ("left", "right")


if triton is not None:
    from .quant import round_to_bf16

    @triton.jit
    def _lowrank_apply_kernel(
        param_ptr,
        a_ptr,
        b_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        param_decay,
        alpha,
        PARAM_IS_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # param (M, N) += alpha * A (M, K) @ B (K, N), after param *= param_decay; A and B by strides.
        pid_m = tl.program_id(axis=0).to(tl.int64)  # int64 offsets: a weight can pass 2**31 elements
        pid_n = tl.program_id(axis=1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < M
        col_mask = cols < N

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = ks < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision="ieee")

        offsets = rows[:, None] * N + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        param_raw = tl.load(param_ptr + offsets, mask=mask, other=0.0)
        p = tl.fma(acc, alpha, param_raw.to(tl.float32) * param_decay)
        if PARAM_IS_BF16:
            param_out = round_to_bf16(p)
        else:
            param_out = p.to(param_raw.dtype)
        tl.store(param_ptr + offsets, param_out, mask=mask)

else:
    _lowrank_apply_kernel = None

# Launch constants. 64 x 64 param tiles (32 fp32 accumulators per thread across four warps); the
# rank is walked in steps of 16 to 64 (tl.dot needs 16 at least; a rank below that is masked).
# Not yet tuned on a GPU.
_BLOCK_M = 64
_BLOCK_N = 64
_MAX_BLOCK_K = 64
_NUM_WARPS = 4


def _check_tensors(param: object, proj: object, update: object, side: object) -> None:
    check_tensor(_WHERE, "param", param, PARAM_DTYPES, "keep other dtypes on the plain torch update")
    check_tensor(_WHERE, "proj", proj, (torch.float32,), "keep the projection in float32")
    check_tensor(_WHERE, "update", update, (torch.float32,), "keep the low-rank update in float32")
    if side not in SIDES:
        raise KernelError(where_what_got(_WHERE, "`side` 'left' or 'right'", repr(side),
                                         "pass 'left' when proj spans the rows of param (m, r), "
                                         "'right' when it spans the columns (n, r)"))
    for name, tensor in (("param", param), ("proj", proj), ("update", update)):
        if tensor.dim() != 2:
            raise KernelError(where_what_got(_WHERE, f"a 2-D `{name}`", tuple(tensor.shape),
                                             "reshape it to a matrix first"))
    m, n = param.shape
    r = proj.shape[1]
    if side == "left":
        want_proj, want_update = (m, r), (r, n)
    else:
        want_proj, want_update = (n, r), (m, r)
    if tuple(proj.shape) != want_proj:
        raise KernelError(where_what_got(_WHERE, f"`proj` of shape {want_proj} for side={side!r} and `param` "
                                                 f"{(m, n)}", tuple(proj.shape),
                                         "pass the projection of this param (or the other side)"))
    if tuple(update.shape) != want_update:
        raise KernelError(where_what_got(_WHERE, f"`update` of shape {want_update} for side={side!r}, `param` "
                                                 f"{(m, n)} and rank {r}", tuple(update.shape),
                                         "pass the low-rank step of this param"))
    check_same_device(_WHERE, {"param": param, "proj": proj, "update": update})


def lowrank_apply(
    param: torch.Tensor,
    proj: torch.Tensor,
    update: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
    side: str,
) -> None:
    """``param = param * (1 - lr * weight_decay) - lr * scale * back_projected(update)`` in place (one kernel).

    ``param`` (m, n) fp32/bf16/fp16; ``proj`` and ``update`` fp32: (m, r) and (r, n) for ``side="left"``,
    (n, r) and (m, r) for ``side="right"``. All contiguous. Scalars are rounded once to fp32 on the host.
    """
    require_triton(_WHERE, triton, "lowrank_apply_ref")
    _check_tensors(param, proj, update, side)
    require_gpu_or_interpreter(_WHERE, _lowrank_apply_kernel, param.device)

    m, n = param.shape
    r = proj.shape[1]
    if side == "left":  # A = proj (m, r), B = update (r, n)
        a, stride_am, stride_ak = proj, proj.stride(0), proj.stride(1)
        b, stride_bk, stride_bn = update, update.stride(0), update.stride(1)
    else:  # A = update (m, r), B = proj.T (r, n), read through proj's strides
        a, stride_am, stride_ak = update, update.stride(0), update.stride(1)
        b, stride_bk, stride_bn = proj, proj.stride(1), proj.stride(0)
    param_decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    block_k = min(max(16, triton.next_power_of_2(r)), _MAX_BLOCK_K)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _lowrank_apply_kernel[grid](
        param,
        a,
        b,
        m,
        n,
        r,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        to_f32(param_decay),
        to_f32(-lr * scale),
        PARAM_IS_BF16=param.dtype == torch.bfloat16,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )


@torch.no_grad()
def lowrank_apply_ref(
    param: torch.Tensor,
    proj: torch.Tensor,
    update: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
    side: str,
) -> None:
    """``lowrank_apply`` in plain torch: an in-place ``mul_`` and ``addmm_`` (bf16/fp16 via one fp32 copy)."""
    _check_tensors(param, proj, update, side)
    work = param if param.dtype == torch.float32 else param.float()
    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    if side == "left":
        work.addmm_(proj, update, alpha=-lr * scale)
    else:
        work.addmm_(update, proj.t(), alpha=-lr * scale)
    if work is not param:
        param.copy_(work)
