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

``lowrank_apply_int8_sr`` is the same update on a weight held as INT8 group codes (``kernels.wquant``'s
format: flat row-major groups of ``group`` elements, one fp32 ``absmax / 127`` scale each) written back
with stochastic rounding, with no fp32 copy of the weight. Each tile dequantizes its codes, decays them,
adds the scaled rank-r product in registers and requantizes against the new group absmax:

* when ``group`` divides ``n`` (and is at most 512) a tile is ``BLOCK_M`` rows by exactly one group, so a
  program holds whole groups and one pass writes codes and scales in place;
* otherwise groups straddle rows and tiles, and two passes over the same tiles run: the first takes each
  group's new absmax with an integer ``atomic_max`` on the fp32 bits (non-negative floats order as their
  bits) into a ``4 * n_groups``-byte workspace, the second recomputes the tile (bit-identically) and
  writes the codes; a last small launch turns the absmaxes into the new scales. The product is computed
  twice (``2 * m * n * r`` more FLOPs), never stored.

``lowrank_apply_int8_sr_ref`` dequantizes to fp32, runs ``lowrank_apply_ref`` and requantizes with
``wquant.requantize_int8_sr_ref``; the uniforms are the same hash of (seed, flat index), so codes and
scales equal the kernel's bit for bit whenever the product is exact in fp32 (the tests use dyadic
inputs), and otherwise differ only where the two summation orders round ``p`` differently: a code by 1
where ``y - floor(y)`` lands within that rounding of ``u``, a scale by an ulp.
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
    from .wquant import _round_int8, _scaled

    @triton.jit
    def _product_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_am, stride_ak, stride_bk, stride_bn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (BLOCK_M, BLOCK_N) fp32 tile of A (M, K) @ B (K, N) at ``rows`` x ``cols``; 0 outside."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            k_mask = ks < K
            a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        return acc

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

        acc = _product_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_am, stride_ak, stride_bk,
                            stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
        offsets = rows[:, None] * N + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        param_raw = tl.load(param_ptr + offsets, mask=mask, other=0.0)
        p = tl.fma(acc, alpha, param_raw.to(tl.float32) * param_decay)
        if PARAM_IS_BF16:
            param_out = round_to_bf16(p)
        else:
            param_out = p.to(param_raw.dtype)
        tl.store(param_ptr + offsets, param_out, mask=mask)


    @triton.jit(do_not_specialize=["seed_mix"])
    def _lowrank_apply_int8_kernel(
        codes_ptr,
        scales_ptr,
        absmax_ptr,
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
        seed_mix,
        PHASE: tl.constexpr,  # 0: one pass (BLOCK_N == GROUP, GROUP | N); 1: group absmax; 2: codes
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(axis=0).to(tl.int64)
        pid_n = tl.program_id(axis=1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < M
        col_mask = cols < N
        acc = _product_tile(a_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_am, stride_ak, stride_bk,
                            stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
        offsets = rows[:, None] * N + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        groups = offsets // GROUP
        code = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.float32)
        old_scale = tl.load(scales_ptr + groups, mask=mask, other=0.0)
        # the weight as dequantize_int8_group gives it, decayed, plus the product: lowrank_apply's op order
        p = tl.fma(acc, alpha, (code * old_scale) * param_decay)
        if PHASE == 0:
            absmax = tl.max(tl.abs(p), axis=1)
            scale = tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
            new_code = _round_int8(_scaled(p, scale[:, None]), offsets, seed_mix, True)
            tl.store(codes_ptr + offsets, new_code.to(tl.int8), mask=mask)
            tl.store(scales_ptr + (rows * N + pid_n * BLOCK_N) // GROUP, scale, mask=row_mask)
        elif PHASE == 1:
            tl.atomic_max(absmax_ptr + groups, tl.abs(p).to(tl.int32, bitcast=True), mask=mask)
        else:
            absmax = tl.load(absmax_ptr + groups, mask=mask, other=0).to(tl.float32, bitcast=True)
            scale = tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
            new_code = _round_int8(_scaled(p, scale), offsets, seed_mix, True)
            tl.store(codes_ptr + offsets, new_code.to(tl.int8), mask=mask)

    @triton.jit
    def _scales_from_absmax_kernel(absmax_ptr, scales_ptr, n_groups, BLOCK: tl.constexpr):
        idx = tl.program_id(axis=0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n_groups
        absmax = tl.load(absmax_ptr + idx, mask=mask, other=0).to(tl.float32, bitcast=True)
        tl.store(scales_ptr + idx, tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32)), mask=mask)

else:
    _lowrank_apply_kernel = None
    _lowrank_apply_int8_kernel = None

# Launch constants. 64 x 64 param tiles (32 fp32 accumulators per thread across four warps); the
# rank is walked in steps of 16 to 64 (tl.dot needs 16 at least; a rank below that is masked).
# Not yet tuned on a GPU.
_BLOCK_M = 64
_BLOCK_N = 64
_MAX_BLOCK_K = 64
_NUM_WARPS = 4


def _check_tensors(param: object, proj: object, update: object, side: object) -> None:
    check_tensor(_WHERE, "param", param, PARAM_DTYPES, "keep other dtypes on the plain torch update")
    _check_factors(param, proj, update, side)


def _check_factors(param: object, proj: object, update: object, side: object, name: str = "param") -> None:
    check_tensor(_WHERE, "proj", proj, (torch.float32,), "keep the projection in float32")
    check_tensor(_WHERE, "update", update, (torch.float32,), "keep the low-rank update in float32")
    if side not in SIDES:
        raise KernelError(where_what_got(_WHERE, "`side` 'left' or 'right'", repr(side),
                                         "pass 'left' when proj spans the rows of param (m, r), "
                                         "'right' when it spans the columns (n, r)"))
    for label, tensor in ((name, param), ("proj", proj), ("update", update)):
        if tensor.dim() != 2:
            raise KernelError(where_what_got(_WHERE, f"a 2-D `{label}`", tuple(tensor.shape),
                                             "reshape it to a matrix first"))
    m, n = param.shape
    r = proj.shape[1]
    if side == "left":
        want_proj, want_update = (m, r), (r, n)
    else:
        want_proj, want_update = (n, r), (m, r)
    if tuple(proj.shape) != want_proj:
        raise KernelError(where_what_got(_WHERE, f"`proj` of shape {want_proj} for side={side!r} and `{name}` "
                                                 f"{(m, n)}", tuple(proj.shape),
                                         "pass the projection of this param (or the other side)"))
    if tuple(update.shape) != want_update:
        raise KernelError(where_what_got(_WHERE, f"`update` of shape {want_update} for side={side!r}, `{name}` "
                                                 f"{(m, n)} and rank {r}", tuple(update.shape),
                                         "pass the low-rank step of this param"))
    check_same_device(_WHERE, {name: param, "proj": proj, "update": update})


def _operands(proj: torch.Tensor, update: torch.Tensor, side: str) -> tuple[tuple, tuple, int]:
    """``(A, stride_am, stride_ak), (B, stride_bk, stride_bn)`` of the product ``A @ B`` (m, n) for ``side``,
    and the rank's block (tl.dot needs 16 at least; a smaller rank is masked)."""
    if side == "left":  # A = proj (m, r), B = update (r, n)
        a = (proj, proj.stride(0), proj.stride(1))
        b = (update, update.stride(0), update.stride(1))
    else:  # A = update (m, r), B = proj.T (r, n), read through proj's strides
        a = (update, update.stride(0), update.stride(1))
        b = (proj, proj.stride(1), proj.stride(0))
    return a, b, min(max(16, triton.next_power_of_2(proj.shape[1])), _MAX_BLOCK_K)


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
    (a, stride_am, stride_ak), (b, stride_bk, stride_bn), block_k = _operands(proj, update, side)
    param_decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    _lowrank_apply_kernel[grid](
        param,
        a,
        b,
        m,
        n,
        proj.shape[1],
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


# ---- on INT8 group codes, written back with stochastic rounding -------------------------------------------

_ONE_PASS_MAX_GROUP = 512  # a one-pass tile is (BLOCK_M >= 16) x group fp32 values in registers
_SCALES_BLOCK = 1024


def _check_int8(codes: object, scales: object, proj: object, update: object, group: object, seed: object,
                side: object) -> None:
    from . import wquant

    check_tensor(_WHERE, "codes", codes, (torch.int8,), "pass the int8 codes of the weight")
    _check_factors(codes, proj, update, side, name="codes")
    wquant._check_group("group", group, codes.numel(), "the number of elements of `codes`")
    wquant._check_scales("scales", scales, codes.numel() // group)
    wquant._check_seed(seed)
    check_same_device(_WHERE, {"codes": codes, "scales": scales, "proj": proj})


def lowrank_int8_workspace(shape: tuple[int, int], group: int) -> int:
    """Bytes ``lowrank_apply_int8_sr`` allocates: nothing in one pass, the groups' absmax bits in two."""
    m, n = shape
    return 0 if _one_pass(n, group) else 4 * (m * n // group)


def _one_pass(n: int, group: int) -> bool:
    return n % group == 0 and group <= _ONE_PASS_MAX_GROUP


def lowrank_apply_int8_sr(
    codes: torch.Tensor,
    scales: torch.Tensor,
    proj: torch.Tensor,
    update: torch.Tensor,
    *,
    group: int,
    seed: int,
    lr: float,
    weight_decay: float,
    scale: float,
    side: str,
) -> None:
    """``lowrank_apply`` on an INT8-group weight (``codes`` int8 (m, n), ``scales`` fp32 per group of
    ``group`` flat elements), requantized with stochastic rounding (``seed``: a fresh one per step), in place
    on ``codes`` and ``scales``. One kernel when ``group`` divides ``n`` (up to 512), else two passes plus a
    small one for the scales (``lowrank_int8_workspace`` bytes of absmax)."""
    from .wquant import _as_int32, _seed_mix

    require_triton(_WHERE, triton, "lowrank_apply_int8_sr_ref")
    _check_int8(codes, scales, proj, update, group, seed, side)
    require_gpu_or_interpreter(_WHERE, _lowrank_apply_int8_kernel, codes.device)

    m, n = codes.shape
    (a, stride_am, stride_ak), (b, stride_bk, stride_bn), block_k = _operands(proj, update, side)
    param_decay = 1 - lr * weight_decay if weight_decay != 0 else 1.0
    args = (m, n, proj.shape[1], stride_am, stride_ak, stride_bk, stride_bn, to_f32(param_decay),
            to_f32(-lr * scale), _as_int32(_seed_mix(seed)))
    if _one_pass(n, group):
        block_m = max(16, min(_BLOCK_M, 8192 // group))
        _lowrank_apply_int8_kernel[(triton.cdiv(m, block_m), n // group)](
            codes, scales, scales, a, b, *args, PHASE=0, GROUP=group, BLOCK_M=block_m, BLOCK_N=group,
            BLOCK_K=block_k, num_warps=_NUM_WARPS)
        return
    n_groups = codes.numel() // group
    absmax = torch.zeros(n_groups, dtype=torch.int32, device=codes.device)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
    for phase in (1, 2):
        _lowrank_apply_int8_kernel[grid](
            codes, scales, absmax, a, b, *args, PHASE=phase, GROUP=group, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
            BLOCK_K=block_k, num_warps=_NUM_WARPS)
    _scales_from_absmax_kernel[(triton.cdiv(n_groups, _SCALES_BLOCK),)](
        absmax, scales, n_groups, BLOCK=_SCALES_BLOCK, num_warps=_NUM_WARPS)


@torch.no_grad()
def lowrank_apply_int8_sr_ref(
    codes: torch.Tensor,
    scales: torch.Tensor,
    proj: torch.Tensor,
    update: torch.Tensor,
    *,
    group: int,
    seed: int,
    lr: float,
    weight_decay: float,
    scale: float,
    side: str,
) -> None:
    """``lowrank_apply_int8_sr`` in plain torch: dequantize to an fp32 copy, ``lowrank_apply_ref``, then
    ``wquant.requantize_int8_sr_ref`` into ``codes`` and ``scales``."""
    from .wquant import dequantize_int8_group_ref, requantize_int8_sr_ref

    _check_int8(codes, scales, proj, update, group, seed, side)
    p = dequantize_int8_group_ref(codes, scales, group)
    lowrank_apply_ref(p, proj, update, lr=lr, weight_decay=weight_decay, scale=scale, side=side)
    requantize_int8_sr_ref(p, codes, scales, group, seed)
