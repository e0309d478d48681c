"""Weight-only quantization for training: INT8 / INT4 / NF4 group formats, stochastic rounding, fused steps.

Every function comes twice: ``name`` validates its inputs and launches a Triton kernel, ``name_ref``
validates the same inputs and computes the same values in plain torch. Integer outputs and scales of
the two are bit-equal: both compute the same fp32 values op for op (IEEE division where a division is
written, ``tl.div_rn`` in the kernels). NaN or infinite inputs give unspecified codes.

Groups. A weight is quantized over its flattened (row-major, contiguous) elements in consecutive groups
of ``group`` elements, ``group`` a power of two from 16 to 4096 that divides ``numel``. Group ``j`` holds
flat elements ``j * group`` to ``(j + 1) * group - 1``. Inputs may be float32, bfloat16 or float16; they
are widened to fp32 first and all scale math is fp32. ``absmax_j = max |x|`` over group ``j``.

INT8 (``quantize_int8_group``): ``scales`` fp32 ``[numel // group]``, ``scale_j = absmax_j / 127``;
``y = x / scale_j`` (``y = 0`` where ``scale_j == 0``); ``code = clamp(floor(y + 0.5), -127, 127)``
stored as int8 in the shape of the weight (-128 is never produced). Dequantized:
``float(code) * scale_j``, one fp32 multiply, then cast (round to nearest even) to the output dtype.

Stochastic rounding (``quantize_int8_group_sr``): the same ``scale_j`` and ``y``, then
``code = clamp(floor(y) + (u_i < y - floor(y)), -127, 127)`` with ``u_i = sr_uniform(seed, i)`` for the
flat element index ``i``; ``E[code] = y`` to within ``2**-24`` (before the clamp, which only bites at
``|y| > 127``, a rounding artefact of ``absmax / 127``).

The hash (``sr_uniform``), all arithmetic mod ``2**32`` on unsigned 32-bit values:
``s = seed mod 2**32``; ``x = (i + s * 0x9E3779B9) mod 2**32``; ``x ^= x >> 16``;
``x = x * 0x7FEB352D``; ``x ^= x >> 15``; ``x = x * 0x846CA68B``; ``x ^= x >> 16``;
``u = float32(x >> 8) * 2**-24``, a multiple of ``2**-24`` in ``[0, 1)``. Only ``i mod 2**32`` matters.

INT4 (``quantize_int4_group``): ``scale_j = absmax_j / 7``, ``y`` as for INT8,
``code = clamp(floor(y + 0.5), -7, 7)``, stored as the nibble ``code + 8`` (1..15; 0 is never produced).
``packed`` is uint8 ``[numel // 2]``: ``packed[b] = nibble[2b] | nibble[2b + 1] << 4`` (low nibble: the
even flat index). Dequantized: ``float(nibble - 8) * scale_j``.

NF4 (``quantize_nf4``; QLoRA's 4-bit NormalFloat): ``block`` (default 64) plays the role of ``group``;
``absmax`` fp32 ``[numel // block]`` holds ``absmax_j`` itself. ``y = x / absmax_j`` (``y = 0`` where
``absmax_j == 0``); the index is the number of ``NF4_MIDPOINTS`` strictly below ``y`` (0..15), where
``NF4_MIDPOINTS[k] = (NF4_CODE[k] + NF4_CODE[k + 1]) / 2`` in fp32: the nearest code value, ties (``y``
exactly on a midpoint) to the lower index. Packed as INT4 (low nibble: even index). Dequantized:
``NF4_CODE[index] * absmax_j`` in fp32, then cast.

Double quantization (``double_quantize_ref``, QLoRA's, reference only): ``offset`` = the fp32 mean of the
``nb`` NF4 absmax values; ``absmax - offset`` is quantized with ``quant.quantize_blockwise_ref`` (signed
8-bit dynamic map ``quant.dynamic_code(True, 8)``, blocks of 256) into ``q`` uint8 ``[nb]`` and ``absmax2``
fp32 ``[ceil(nb / 256)]``. ``double_dequantize_ref`` returns ``dequantize_blockwise_ref(...) + offset``.

Fused AdamW on INT8 weights (``adamw_int8_sr``): per group, dequantize to fp32 ``p``; take exactly the
step of ``kernels.adamw`` on ``p`` (``adamw_ref`` in the reference, the same fma / ``div_rn`` / ``sqrt_rn``
order in the kernel); requantize ``p`` with stochastic rounding (new ``scale_j`` from the new
``max |p|``). ``codes``, ``scales``, ``exp_avg`` and ``exp_avg_sq`` are updated in place. The moments of
kernel and reference agree to an fp32 rounding; ``p`` can differ by an ulp of the update (torch's
vectorized CPU ``sqrt`` is not correctly rounded), so a few codes whose ``y - floor(y)`` lands within
that ulp of ``u`` differ by exactly 1, and scales by an ulp.

Weight-only-quantized matmuls: ``matmul_int8w(x, codes, scales, group)`` and
``matmul_nf4w(x, packed, absmax, block, n, k)`` compute ``x @ W^T`` for ``x`` ``[M, K]`` and the
``[N, K]`` weight ``W`` stored as above (flat, row-major, so groups lie within rows: ``group`` must divide
``K``), accumulating in fp32, output ``[M, N]`` in ``x``'s dtype. The kernels dequantize each
``[BLOCK_N, BLOCK_K]`` weight tile in registers, with ``BLOCK_K = min(group, 64)`` so that a tile column
range lies in one group (one scale per row of the tile). fp32 ``x``: the dot is fp32 with IEEE products
(``input_precision="ieee"``). bf16 / fp16 ``x``: the dequantized tile is rounded to ``x``'s dtype and the
dot runs in that dtype with fp32 accumulation (tensor cores on a GPU); the reference
(``x.float() @ W.float().T``) then differs by about one rounding of the output dtype. Under
TRITON_INTERPRET=1, whose ``tl.dot`` mishandles bf16 (triton 3.9), bf16 tiles are widened to fp32 instead.
"""

from __future__ import annotations

import functools

import torch

from ..errors import KernelError, where_what_got
from ._checks import PARAM_DTYPES, check_same_device, check_tensor, require_gpu_or_interpreter, require_triton, to_f32
from .adamw import adam_scalars, adamw_ref
from .quant import dequantize_blockwise_ref, dynamic_code, quantize_blockwise_ref, tile_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (e.g. macOS); the *_ref functions still work
    triton = None
    tl = None

_WHERE = "memfit.kernels.wquant"

# A group is one row of a Triton tile (tl.arange), so a power of two; the range of kernels/quant.py.
MIN_GROUP = 16
MAX_GROUP = 4096
# The plain-torch quantizers work through this many values at a time (a multiple of every legal group),
# so their fp32 / int64 temporaries stay at a few MiB whatever the weight size.
_REF_CHUNK = 1 << 20

_U32 = 0xFFFFFFFF
_HASH_SEED_MUL = 0x9E3779B9
_HASH_MUL1 = 0x7FEB352D
_HASH_MUL2 = 0x846CA68B

# The 16 NF4 values (QLoRA / bitsandbytes), sorted, 0.0 at index 7; each is exact in fp32.
_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_CODE = torch.tensor(_NF4_VALUES, dtype=torch.float32)
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # fp32, 15 values, sorted


@functools.cache
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code, midpoints padded to 16 with +inf) on ``device``, built once per device from the constants."""
    code = torch.tensor(_NF4_VALUES, dtype=torch.float32)
    mids = torch.cat([(code[:-1] + code[1:]) / 2, torch.full((1,), float("inf"))])
    return code.to(device), mids.to(device)


def _seed_mix(seed: int) -> int:
    """``(seed mod 2**32) * 0x9E3779B9 mod 2**32``, in [0, 2**32)."""
    return ((seed % (1 << 32)) * _HASH_SEED_MUL) & _U32


def _as_int32(value: int) -> int:
    """A value in [0, 2**32) as the int32 of the same bits (the kernels take it as int32 and view it as uint32)."""
    return value - (1 << 32) if value >= 1 << 31 else value


# ---- checks ----------------------------------------------------------------------------------------------


def _check_group(name: str, group: object, numel: int, of: str) -> None:
    """``group`` a power of two from MIN_GROUP to MAX_GROUP that divides ``numel`` (``of`` names that count)."""
    if (isinstance(group, bool) or not isinstance(group, int) or not MIN_GROUP <= group <= MAX_GROUP
            or group & (group - 1)):
        raise KernelError(where_what_got(_WHERE, f"`{name}` a power of two from {MIN_GROUP} to {MAX_GROUP}", group,
                                         "use 64 or 128"))
    if numel % group:
        raise KernelError(where_what_got(_WHERE, f"`{name}` dividing {of} ({numel})", group,
                                         f"pick a power of two from {MIN_GROUP} that divides {numel}"))


def _check_seed(seed: object) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KernelError(where_what_got(_WHERE, "`seed` an int", type(seed).__name__,
                                         "pass a fresh int per call, e.g. a counter"))


def _check_weight(name: str, w: object) -> None:
    check_tensor(_WHERE, name, w, PARAM_DTYPES, "cast it to float32 first")


def _check_int8_codes(name: str, codes: object) -> None:
    check_tensor(_WHERE, name, codes, (torch.int8,), "store INT8 group codes as torch.int8")


def _check_packed(name: str, packed: object, numel: int) -> None:
    check_tensor(_WHERE, name, packed, (torch.uint8,), "store packed 4-bit codes as torch.uint8")
    if packed.numel() != numel // 2:
        raise KernelError(where_what_got(_WHERE, f"`{name}` of {numel // 2} bytes (two codes per byte)",
                                         packed.numel(), "pass the packed tensor the quantizer returned"))


def _check_scales(name: str, scales: object, n_groups: int) -> None:
    check_tensor(_WHERE, name, scales, (torch.float32,), "keep group scales in float32")
    if tuple(scales.shape) != (n_groups,):
        raise KernelError(where_what_got(_WHERE, f"`{name}` of shape ({n_groups},), one value per group",
                                         tuple(scales.shape), "pass the scales the quantizer returned"))


def _check_dtype(dtype: object) -> None:
    if dtype not in PARAM_DTYPES:
        raise KernelError(where_what_got(_WHERE, "`dtype` float32, bfloat16 or float16", dtype,
                                         "dequantize to float32 and cast after"))


def _check_shape(shape: object, numel: int) -> tuple[int, ...]:
    try:
        out_shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        out_shape = None
    if out_shape is None or torch.Size(out_shape).numel() != numel:
        raise KernelError(where_what_got(_WHERE, f"`shape` of {numel} elements", shape,
                                         "pass the shape of the tensor that was quantized"))
    return out_shape


def _check_quantize(w: object, group: object, name: str = "group") -> None:
    _check_weight("w", w)
    _check_group(name, group, w.numel(), "the number of elements of `w`")


def _check_dequantize_int8(codes: object, scales: object, group: object, dtype: object) -> None:
    _check_int8_codes("codes", codes)
    _check_group("group", group, codes.numel(), "the number of elements of `codes`")
    _check_scales("scales", scales, codes.numel() // group)
    _check_dtype(dtype)
    check_same_device(_WHERE, {"codes": codes, "scales": scales})


def _check_dequantize_4bit(packed: object, scales: object, group: object, shape: object, dtype: object,
                           group_name: str, scales_name: str) -> tuple[int, ...]:
    check_tensor(_WHERE, "packed", packed, (torch.uint8,), "store packed 4-bit codes as torch.uint8")
    numel = 2 * packed.numel()
    out_shape = _check_shape(shape, numel)
    _check_group(group_name, group, numel, "the number of packed codes")
    _check_scales(scales_name, scales, numel // group)
    _check_dtype(dtype)
    check_same_device(_WHERE, {"packed": packed, scales_name: scales})
    return out_shape


def _check_requantize(w: object, codes_out: object, scales_out: object, group: object, seed: object) -> None:
    _check_weight("w_fp32", w)
    _check_group("group", group, w.numel(), "the number of elements of `w_fp32`")
    _check_int8_codes("codes_out", codes_out)
    if codes_out.numel() != w.numel():
        raise KernelError(where_what_got(_WHERE, f"`codes_out` of {w.numel()} elements, as many as `w_fp32`",
                                         codes_out.numel(), "allocate it with torch.empty_like(w, dtype=torch.int8)"))
    _check_scales("scales_out", scales_out, w.numel() // group)
    _check_seed(seed)
    check_same_device(_WHERE, {"w_fp32": w, "codes_out": codes_out, "scales_out": scales_out})


# ---- Triton ----------------------------------------------------------------------------------------------


if triton is not None:
    from .quant import round_to_bf16

    @triton.jit
    def sr_uniform_tl(idx, seed_mix):
        """The hash of the module docstring: fp32 ``u`` in [0, 1) for integer indices ``idx``.

        ``seed_mix`` is ``(seed mod 2**32) * 0x9E3779B9 mod 2**32`` as an int32 scalar (same bits).
        """
        x = idx.to(tl.uint32) + seed_mix.to(tl.uint32)
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return (x >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24

    @triton.jit
    def _scaled(x, scale):
        """``x / scale`` (IEEE) per element, 0 where ``scale`` is 0; ``scale`` broadcasts against ``x``."""
        zero = tl.zeros_like(x)
        scale_full = zero + scale
        y = tl.div_rn(x, tl.where(scale_full == 0.0, 1.0, scale_full))
        return tl.where(scale_full == 0.0, zero, y)

    @triton.jit
    def _round_int8(y, offsets, seed_mix, STOCHASTIC: tl.constexpr):
        """fp32 INT8 code of ``y``: nearest (floor(y + 0.5)) or stochastic with the hash of ``offsets``."""
        if STOCHASTIC:
            fl = tl.floor(y)
            u = sr_uniform_tl(offsets, seed_mix)
            code = fl + tl.where(u < y - fl, 1.0, 0.0)
        else:
            code = tl.floor(y + 0.5)
        return tl.minimum(tl.maximum(code, -127.0), 127.0)

    @triton.jit
    def _store_out(out_ptr, offsets, value, mask, OUT_IS_BF16: tl.constexpr):
        if OUT_IS_BF16:
            out = round_to_bf16(value)
        else:
            out = value.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, out, mask=mask)

    @triton.jit(do_not_specialize=["seed_mix"])
    def _quantize_int8_kernel(
        w_ptr,
        codes_ptr,
        scales_ptr,
        n_elements,
        seed_mix,
        STOCHASTIC: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # A (ROWS, GROUP) tile: ROWS consecutive groups, one per row.
        pid = tl.program_id(axis=0).to(tl.int64)  # int64 offsets: weights can pass 2**31 elements
        rows = pid * ROWS + tl.arange(0, ROWS)
        offsets = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offsets < n_elements
        x = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
        code = _round_int8(_scaled(x, scale[:, None]), offsets, seed_mix, STOCHASTIC)
        tl.store(codes_ptr + offsets, code.to(tl.int8), mask=mask)
        tl.store(scales_ptr + rows, scale, mask=rows * GROUP < n_elements)

    @triton.jit
    def _dequantize_int8_kernel(
        codes_ptr,
        scales_ptr,
        out_ptr,
        n_elements,
        OUT_IS_BF16: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(axis=0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        offsets = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offsets < n_elements
        code = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.float32)
        scale = tl.load(scales_ptr + rows, mask=rows * GROUP < n_elements, other=0.0)
        _store_out(out_ptr, offsets, code * scale[:, None], mask, OUT_IS_BF16)

    @triton.jit(do_not_specialize=["seed_mix"])
    def _sr_uniform_kernel(idx_ptr, out_ptr, n_elements, seed_mix, BLOCK: tl.constexpr):
        pid = tl.program_id(axis=0).to(tl.int64)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        idx = tl.load(idx_ptr + offsets, mask=mask, other=0)
        tl.store(out_ptr + offsets, sr_uniform_tl(idx, seed_mix), mask=mask)

    @triton.jit
    def _nf4_index(y, mids_ptr):
        """Number of NF4 midpoints strictly below ``y`` (int32, 0..15); ``mids_ptr``: 15 midpoints and +inf."""
        pos = tl.zeros(y.shape, dtype=tl.int32)
        for i in tl.static_range(4):
            step = 8 >> i
            below = tl.load(mids_ptr + pos + (step - 1))
            pos = tl.where(below < y, pos + step, pos)
        return pos

    @triton.jit
    def _quantize_4bit_kernel(
        w_ptr,
        packed_ptr,
        scales_ptr,
        mids_ptr,
        n_elements,
        NF4: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # Each group row is read as its even and its odd elements, (ROWS, GROUP // 2) each: the two
        # nibbles of one output byte sit in the same column.
        HALF: tl.constexpr = GROUP // 2
        pid = tl.program_id(axis=0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        pairs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        mask = pairs < n_elements // 2
        x_lo = tl.load(w_ptr + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
        x_hi = tl.load(w_ptr + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(x_lo), axis=1), tl.max(tl.abs(x_hi), axis=1))
        if NF4:
            scale = absmax
            nib_lo = _nf4_index(_scaled(x_lo, scale[:, None]), mids_ptr)
            nib_hi = _nf4_index(_scaled(x_hi, scale[:, None]), mids_ptr)
        else:
            scale = tl.div_rn(absmax, tl.full(absmax.shape, 7.0, tl.float32))
            code_lo = tl.floor(_scaled(x_lo, scale[:, None]) + 0.5)
            code_hi = tl.floor(_scaled(x_hi, scale[:, None]) + 0.5)
            nib_lo = (tl.minimum(tl.maximum(code_lo, -7.0), 7.0) + 8.0).to(tl.int32)
            nib_hi = (tl.minimum(tl.maximum(code_hi, -7.0), 7.0) + 8.0).to(tl.int32)
        tl.store(packed_ptr + pairs, (nib_lo | (nib_hi << 4)).to(tl.uint8), mask=mask)
        tl.store(scales_ptr + rows, scale, mask=rows * GROUP < n_elements)

    @triton.jit
    def _dequantize_4bit_kernel(
        packed_ptr,
        scales_ptr,
        code_ptr,
        out_ptr,
        n_elements,
        NF4: tl.constexpr,
        OUT_IS_BF16: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        HALF: tl.constexpr = GROUP // 2
        pid = tl.program_id(axis=0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        pairs = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        mask = pairs < n_elements // 2
        byte = tl.load(packed_ptr + pairs, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + rows, mask=rows * GROUP < n_elements, other=0.0)[:, None]
        nib_lo = byte & 0xF
        nib_hi = byte >> 4
        if NF4:
            value_lo = tl.load(code_ptr + nib_lo) * scale
            value_hi = tl.load(code_ptr + nib_hi) * scale
        else:
            value_lo = (nib_lo - 8).to(tl.float32) * scale
            value_hi = (nib_hi - 8).to(tl.float32) * scale
        _store_out(out_ptr, 2 * pairs, value_lo, mask, OUT_IS_BF16)
        _store_out(out_ptr, 2 * pairs + 1, value_hi, mask, OUT_IS_BF16)

    @triton.jit(do_not_specialize=["seed_mix"])
    def _adamw_int8_sr_kernel(
        codes_ptr,
        scales_ptr,
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        n_elements,
        seed_mix,
        grad_scale,
        param_decay,
        lerp_weight,
        beta2,
        one_minus_beta2,
        neg_step_size,
        bias_correction2_sqrt,
        eps,
        LERP_FROM_END: tl.constexpr,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # A (ROWS, GROUP) tile of whole groups; lanes past the end load 0 everywhere and stay finite.
        pid = tl.program_id(axis=0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_mask = rows * GROUP < n_elements
        offsets = rows[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = offsets < n_elements

        code = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.float32)
        p = code * tl.load(scales_ptr + rows, mask=row_mask, other=0.0)[:, None]
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * grad_scale
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)

        # The step of kernels/adamw.py, op for op (see there for why each fma).
        p = p * param_decay
        if LERP_FROM_END:
            m = tl.fma(lerp_weight, g - m, g)
        else:
            m = tl.fma(lerp_weight, g - m, m)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p + tl.div_rn(neg_step_size * m, denom)

        # Requantize against the new group absmax, stochastically.
        absmax = tl.max(tl.abs(p), axis=1)
        scale = tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
        new_code = _round_int8(_scaled(p, scale[:, None]), offsets, seed_mix, True)

        tl.store(codes_ptr + offsets, new_code.to(tl.int8), mask=mask)
        tl.store(scales_ptr + rows, scale, mask=row_mask)
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)

    @triton.jit
    def _matmul_qw_kernel(
        x_ptr,
        w_ptr,
        scales_ptr,
        code_ptr,
        out_ptr,
        M,
        N,
        K,
        NF4: tl.constexpr,
        DOT_IN_X_DTYPE: tl.constexpr,
        X_IS_BF16: tl.constexpr,
        OUT_IS_BF16: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # out[M, N] = x[M, K] @ W[N, K]^T; K is a multiple of GROUP, GROUP of BLOCK_K, so the columns
        # k0 .. k0 + BLOCK_K - 1 of a weight row lie in its group k0 // GROUP: one scale per tile row.
        pid_m = tl.program_id(axis=0)
        pid_n = tl.program_id(axis=1)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < M
        n_mask = rn < N
        groups_per_row = K // GROUP
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_mask[:, None], other=0.0)
            scale = tl.load(scales_ptr + rn * groups_per_row + k0 // GROUP, mask=n_mask, other=0.0)
            flat = rn[:, None] * K + (k0 + rk)[None, :]  # flat weight index, (BLOCK_N, BLOCK_K)
            if NF4:
                byte = tl.load(w_ptr + flat // 2, mask=n_mask[:, None], other=0).to(tl.int32)
                nibble = tl.where(flat % 2 == 0, byte & 0xF, byte >> 4)
                w = tl.load(code_ptr + nibble) * scale[:, None]
            else:
                w = tl.load(w_ptr + flat, mask=n_mask[:, None], other=0).to(tl.float32) * scale[:, None]
            if DOT_IN_X_DTYPE:
                if X_IS_BF16:
                    w_x = round_to_bf16(w)
                else:
                    w_x = w.to(x.dtype)
                acc = tl.dot(x, tl.trans(w_x), acc)
            else:
                acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        out_offsets = rm[:, None] * N + rn[None, :]
        _store_out(out_ptr, out_offsets, acc, m_mask[:, None] & n_mask[None, :], OUT_IS_BF16)

else:
    sr_uniform_tl = _quantize_int8_kernel = _dequantize_int8_kernel = _sr_uniform_kernel = None
    _quantize_4bit_kernel = _dequantize_4bit_kernel = _adamw_int8_sr_kernel = _matmul_qw_kernel = None

# Launch constants. Quantize / dequantize / the AdamW step take a (rows, group) tile of whole groups per
# program, about 1024 values (quant.tile_rows); sr_uniform 1024 indices per program; the matmuls a
# (BLOCK_M <= 64) x 64 output tile with BLOCK_K = min(group, 64). Not yet tuned on a GPU.
_NUM_WARPS = 4
_HASH_BLOCK = 1024
_MATMUL_BLOCK_N = 64
_MATMUL_MAX_BLOCK_K = 64


def _interpreted(kernel: object) -> bool:
    """Whether ``kernel`` runs under TRITON_INTERPRET=1 (there it is not a compiled JITFunction)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


# ---- the hash ----------------------------------------------------------------------------------------------


def _mul_u32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in [0, 2**32), in two 16-bit halves so no product passes 2**48."""
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (high + x * (constant & 0xFFFF)) & _U32


def _hash_uniform_ref(seed_mix: int, idx: torch.Tensor) -> torch.Tensor:
    """fp32 ``u`` of the hash for int64 indices ``idx`` and a premixed seed (``_seed_mix``)."""
    x = ((idx & _U32) + seed_mix) & _U32
    x ^= x >> 16
    x = _mul_u32(x, _HASH_MUL1)
    x ^= x >> 15
    x = _mul_u32(x, _HASH_MUL2)
    x ^= x >> 16
    return (x >> 8).to(torch.float32) * 2.0**-24


def _check_sr_uniform(seed: object, idx: object) -> None:
    _check_seed(seed)
    check_tensor(_WHERE, "idx", idx, (torch.int32, torch.int64), "pass element indices as torch.int64")


def sr_uniform(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """The stochastic-rounding uniforms ``u`` (fp32, ``idx``'s shape) of the hash, for int32 / int64 indices."""
    require_triton(_WHERE, triton, "sr_uniform_ref")
    _check_sr_uniform(seed, idx)
    require_gpu_or_interpreter(_WHERE, _sr_uniform_kernel, idx.device)
    out = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
    n_elements = idx.numel()
    _sr_uniform_kernel[(triton.cdiv(n_elements, _HASH_BLOCK),)](
        idx, out, n_elements, _as_int32(_seed_mix(seed)), BLOCK=_HASH_BLOCK, num_warps=_NUM_WARPS
    )
    return out


@torch.no_grad()
def sr_uniform_ref(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """``sr_uniform`` in plain torch: the hash in int64 with 32-bit masks, bit-equal to the kernel."""
    _check_sr_uniform(seed, idx)
    return _hash_uniform_ref(_seed_mix(seed), idx.to(torch.int64))


# ---- INT8 groups -------------------------------------------------------------------------------------------


def _scaled_ref(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``groups / scale[:, None]`` (IEEE), 0 in groups whose scale is 0."""
    zero = scale == 0
    y = groups / torch.where(zero, torch.ones_like(scale), scale)[:, None]
    return y.masked_fill_(zero[:, None], 0.0)


def _quantize_int8_flat_ref(values: torch.Tensor, group: int, seed_mix: int | None,
                            start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 codes (flat) and scales of fp32 ``values`` beginning at flat index ``start`` (a group boundary).

    ``seed_mix`` None rounds to nearest; an int rounds stochastically with the hash.
    """
    groups = values.view(-1, group)
    absmax = groups.abs().amax(dim=1)
    # A tensor divisor: CUDA turns division by a Python scalar into a multiplication by its reciprocal.
    scale = absmax / torch.full_like(absmax, 127.0)
    y = _scaled_ref(groups, scale)
    if seed_mix is None:
        code = torch.floor(y + 0.5)
    else:
        idx = torch.arange(start, start + values.numel(), dtype=torch.int64, device=values.device)
        u = _hash_uniform_ref(seed_mix, idx).view_as(y)
        floor = torch.floor(y)
        code = floor + (u < y - floor)
    return code.clamp_(-127, 127).to(torch.int8).view(-1), scale


def _quantize_int8_into_ref(w: torch.Tensor, group: int, seed_mix: int | None, codes_out: torch.Tensor,
                            scales_out: torch.Tensor) -> None:
    flat, flat_codes = w.reshape(-1), codes_out.view(-1)
    chunk = max(_REF_CHUNK // group, 1) * group
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        codes, scales = _quantize_int8_flat_ref(flat[start:stop].float(), group, seed_mix, start)
        flat_codes[start:stop] = codes
        scales_out[start // group: stop // group] = scales


def _launch_quantize_int8(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int,
                          seed: int | None) -> None:
    n_elements = w.numel()
    rows = tile_rows(group)
    _quantize_int8_kernel[(triton.cdiv(n_elements // group, rows),)](
        w, codes, scales, n_elements, 0 if seed is None else _as_int32(_seed_mix(seed)),
        STOCHASTIC=seed is not None, GROUP=group, ROWS=rows, num_warps=_NUM_WARPS,
    )


def quantize_int8_group(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT8 per group, rounding to nearest: ``(codes int8 of w's shape, scales fp32)``."""
    require_triton(_WHERE, triton, "quantize_int8_group_ref")
    _check_quantize(w, group)
    require_gpu_or_interpreter(_WHERE, _quantize_int8_kernel, w.device)
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.numel() // group, dtype=torch.float32, device=w.device)
    _launch_quantize_int8(w, codes, scales, group, None)
    return codes, scales


@torch.no_grad()
def quantize_int8_group_ref(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8_group`` in plain torch, bit-equal to the kernel; works in 2**20-value chunks."""
    _check_quantize(w, group)
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.numel() // group, dtype=torch.float32, device=w.device)
    _quantize_int8_into_ref(w, group, None, codes, scales)
    return codes, scales


def quantize_int8_group_sr(w: torch.Tensor, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 per group with stochastic rounding (``sr_uniform(seed, flat index)``): ``(codes, scales)``."""
    require_triton(_WHERE, triton, "quantize_int8_group_sr_ref")
    _check_quantize(w, group)
    _check_seed(seed)
    require_gpu_or_interpreter(_WHERE, _quantize_int8_kernel, w.device)
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.numel() // group, dtype=torch.float32, device=w.device)
    _launch_quantize_int8(w, codes, scales, group, seed)
    return codes, scales


@torch.no_grad()
def quantize_int8_group_sr_ref(w: torch.Tensor, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8_group_sr`` in plain torch, bit-equal to the kernel."""
    _check_quantize(w, group)
    _check_seed(seed)
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.numel() // group, dtype=torch.float32, device=w.device)
    _quantize_int8_into_ref(w, group, _seed_mix(seed), codes, scales)
    return codes, scales


def requantize_int8_sr(w_fp32: torch.Tensor, codes_out: torch.Tensor, scales_out: torch.Tensor, group: int,
                       seed: int) -> None:
    """``quantize_int8_group_sr(w_fp32, group, seed)`` written into ``codes_out`` (int8, as many elements as
    ``w_fp32``, any shape) and ``scales_out`` (fp32 ``[numel // group]``) in place; one kernel launch.

    ``w_fp32`` may also be bfloat16 or float16 (widened to fp32 in registers).
    """
    require_triton(_WHERE, triton, "requantize_int8_sr_ref")
    _check_requantize(w_fp32, codes_out, scales_out, group, seed)
    require_gpu_or_interpreter(_WHERE, _quantize_int8_kernel, w_fp32.device)
    _launch_quantize_int8(w_fp32, codes_out, scales_out, group, seed)


@torch.no_grad()
def requantize_int8_sr_ref(w_fp32: torch.Tensor, codes_out: torch.Tensor, scales_out: torch.Tensor, group: int,
                           seed: int) -> None:
    """``requantize_int8_sr`` in plain torch, bit-equal to the kernel."""
    _check_requantize(w_fp32, codes_out, scales_out, group, seed)
    _quantize_int8_into_ref(w_fp32, group, _seed_mix(seed), codes_out, scales_out)


def dequantize_int8_group(codes: torch.Tensor, scales: torch.Tensor, group: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``float(code) * scale`` per group, cast to ``dtype``, in ``codes``' shape; one kernel launch."""
    require_triton(_WHERE, triton, "dequantize_int8_group_ref")
    _check_dequantize_int8(codes, scales, group, dtype)
    require_gpu_or_interpreter(_WHERE, _dequantize_int8_kernel, codes.device)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    n_elements = codes.numel()
    rows = tile_rows(group)
    _dequantize_int8_kernel[(triton.cdiv(n_elements // group, rows),)](
        codes, scales, out, n_elements, OUT_IS_BF16=dtype == torch.bfloat16, GROUP=group, ROWS=rows,
        num_warps=_NUM_WARPS,
    )
    return out


@torch.no_grad()
def dequantize_int8_group_ref(codes: torch.Tensor, scales: torch.Tensor, group: int,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize_int8_group`` in plain torch, bit-equal to the kernel."""
    _check_dequantize_int8(codes, scales, group, dtype)
    values = codes.reshape(-1, group).float() * scales[:, None]
    return values.view(codes.shape).to(dtype)


# ---- INT4 and NF4 groups ---------------------------------------------------------------------------------


def _quantize_4bit_flat_ref(values: torch.Tensor, group: int, nf4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes and scales (INT4: absmax / 7; NF4: absmax) of fp32 ``values`` starting at a group boundary."""
    groups = values.view(-1, group)
    absmax = groups.abs().amax(dim=1)
    if nf4:
        scale = absmax
        mids = _nf4_tables(values.device)[1][:-1]
        nibbles = torch.searchsorted(mids, _scaled_ref(groups, scale).view(-1))  # count of mids < y
    else:
        scale = absmax / torch.full_like(absmax, 7.0)
        nibbles = torch.floor(_scaled_ref(groups, scale) + 0.5).clamp_(-7, 7).add_(8).view(-1)
    pairs = nibbles.to(torch.uint8).view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), scale


def _quantize_4bit_ref(w: torch.Tensor, group: int, nf4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    flat = w.reshape(-1)
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(flat.numel() // group, dtype=torch.float32, device=w.device)
    chunk = max(_REF_CHUNK // group, 1) * group
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        packed[start // 2: stop // 2], scales[start // group: stop // group] = _quantize_4bit_flat_ref(
            flat[start:stop].float(), group, nf4)
    return packed, scales


def _quantize_4bit(w: torch.Tensor, group: int, nf4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n_elements = w.numel()
    packed = torch.empty(n_elements // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n_elements // group, dtype=torch.float32, device=w.device)
    rows = tile_rows(group)
    mids = _nf4_tables(w.device)[1]
    _quantize_4bit_kernel[(triton.cdiv(n_elements // group, rows),)](
        w, packed, scales, mids, n_elements, NF4=nf4, GROUP=group, ROWS=rows, num_warps=_NUM_WARPS,
    )
    return packed, scales


def _dequantize_4bit_ref(packed: torch.Tensor, scales: torch.Tensor, group: int, shape: tuple[int, ...],
                         dtype: torch.dtype, nf4: bool) -> torch.Tensor:
    flat = packed.view(-1)
    nibbles = torch.stack([flat & 0xF, flat >> 4], dim=1).view(-1)
    if nf4:
        values = _nf4_tables(packed.device)[0].index_select(0, nibbles.to(torch.int32))
    else:
        values = (nibbles.to(torch.int32) - 8).float()
    return (values.view(-1, group) * scales[:, None]).view(shape).to(dtype)


def _dequantize_4bit(packed: torch.Tensor, scales: torch.Tensor, group: int, shape: tuple[int, ...],
                     dtype: torch.dtype, nf4: bool) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_elements = out.numel()
    rows = tile_rows(group)
    code = _nf4_tables(packed.device)[0]
    _dequantize_4bit_kernel[(triton.cdiv(n_elements // group, rows),)](
        packed, scales, code, out, n_elements, NF4=nf4, OUT_IS_BF16=dtype == torch.bfloat16, GROUP=group,
        ROWS=rows, num_warps=_NUM_WARPS,
    )
    return out


def quantize_int4_group(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax INT4 per group: ``(packed uint8 [numel // 2], scales fp32 [numel // group])``."""
    require_triton(_WHERE, triton, "quantize_int4_group_ref")
    _check_quantize(w, group)
    require_gpu_or_interpreter(_WHERE, _quantize_4bit_kernel, w.device)
    return _quantize_4bit(w, group, nf4=False)


@torch.no_grad()
def quantize_int4_group_ref(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int4_group`` in plain torch, bit-equal to the kernel; works in 2**20-value chunks."""
    _check_quantize(w, group)
    return _quantize_4bit_ref(w, group, nf4=False)


def dequantize_int4_group(packed: torch.Tensor, scales: torch.Tensor, group: int,
                          shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``float(nibble - 8) * scale`` per group as a new tensor of ``shape`` and ``dtype``; one kernel launch."""
    require_triton(_WHERE, triton, "dequantize_int4_group_ref")
    out_shape = _check_dequantize_4bit(packed, scales, group, shape, dtype, "group", "scales")
    require_gpu_or_interpreter(_WHERE, _dequantize_4bit_kernel, packed.device)
    return _dequantize_4bit(packed, scales, group, out_shape, dtype, nf4=False)


@torch.no_grad()
def dequantize_int4_group_ref(packed: torch.Tensor, scales: torch.Tensor, group: int,
                              shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize_int4_group`` in plain torch, bit-equal to the kernel."""
    out_shape = _check_dequantize_4bit(packed, scales, group, shape, dtype, "group", "scales")
    return _dequantize_4bit_ref(packed, scales, group, out_shape, dtype, nf4=False)


def quantize_nf4(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 per block of ``block`` values: ``(packed uint8 [numel // 2], absmax fp32 [numel // block])``."""
    require_triton(_WHERE, triton, "quantize_nf4_ref")
    _check_quantize(w, block, name="block")
    require_gpu_or_interpreter(_WHERE, _quantize_4bit_kernel, w.device)
    return _quantize_4bit(w, block, nf4=True)


@torch.no_grad()
def quantize_nf4_ref(w: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_nf4`` in plain torch (``searchsorted`` over ``NF4_MIDPOINTS``), bit-equal to the kernel."""
    _check_quantize(w, block, name="block")
    return _quantize_4bit_ref(w, block, nf4=True)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, block: int, shape: tuple[int, ...] | torch.Size,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``NF4_CODE[index] * absmax`` per block as a new tensor of ``shape`` and ``dtype``; one kernel launch."""
    require_triton(_WHERE, triton, "dequantize_nf4_ref")
    out_shape = _check_dequantize_4bit(packed, absmax, block, shape, dtype, "block", "absmax")
    require_gpu_or_interpreter(_WHERE, _dequantize_4bit_kernel, packed.device)
    return _dequantize_4bit(packed, absmax, block, out_shape, dtype, nf4=True)


@torch.no_grad()
def dequantize_nf4_ref(packed: torch.Tensor, absmax: torch.Tensor, block: int, shape: tuple[int, ...] | torch.Size,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize_nf4`` in plain torch, bit-equal to the kernel."""
    out_shape = _check_dequantize_4bit(packed, absmax, block, shape, dtype, "block", "absmax")
    return _dequantize_4bit_ref(packed, absmax, block, out_shape, dtype, nf4=True)


# ---- double quantization (reference only) ----------------------------------------------------------------

_DOUBLE_QUANT_BLOCK = 256


def _check_nf4_absmax(absmax: object) -> None:
    check_tensor(_WHERE, "absmax", absmax, (torch.float32,), "keep block absmax in float32")
    if absmax.dim() != 1:
        raise KernelError(where_what_got(_WHERE, "`absmax` a 1-D tensor of one value per block",
                                         tuple(absmax.shape), "pass the absmax quantize_nf4 returned"))


@torch.no_grad()
def double_quantize_ref(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """QLoRA's double quantization of NF4 block absmax: ``(q uint8 [nb], absmax2 fp32 [ceil(nb / 256)], offset)``.

    ``offset`` is the fp32 mean of ``absmax`` (as a Python float, exact in fp32); ``absmax - offset`` is
    quantized with ``quant.quantize_blockwise_ref`` against ``quant.dynamic_code(True, 8)`` in blocks of 256.
    """
    _check_nf4_absmax(absmax)
    offset = float(absmax.mean())
    code = dynamic_code(True, 8).to(absmax.device)
    q, absmax2 = quantize_blockwise_ref(absmax - offset, code, _DOUBLE_QUANT_BLOCK)
    return q, absmax2, offset


@torch.no_grad()
def double_dequantize_ref(q: torch.Tensor, absmax2: torch.Tensor, offset: float, nb: int) -> torch.Tensor:
    """The ``nb`` fp32 NF4 absmax values back: ``dequantize_blockwise_ref(q, absmax2, code, 256) + offset``."""
    if isinstance(nb, bool) or not isinstance(nb, int) or nb < 1:
        raise KernelError(where_what_got(_WHERE, "`nb` an int >= 1 (the number of NF4 blocks)", nb,
                                         "pass absmax.numel() of the absmax that was double-quantized"))
    check_tensor(_WHERE, "q", q, (torch.uint8,), "pass the q double_quantize_ref returned")
    if q.numel() != nb:
        raise KernelError(where_what_got(_WHERE, f"`q` of {nb} elements, one per NF4 block", q.numel(),
                                         "pass the q double_quantize_ref returned"))
    code = dynamic_code(True, 8).to(q.device)
    values = dequantize_blockwise_ref(q, absmax2, code, _DOUBLE_QUANT_BLOCK, shape=(nb,))
    return values + to_f32(float(offset))


# ---- fused AdamW on INT8 weights ---------------------------------------------------------------------------


def _check_adamw(codes: object, scales: object, grad: object, exp_avg: object, exp_avg_sq: object, group: object,
                 seed: object, step: object) -> None:
    _check_int8_codes("codes", codes)
    _check_group("group", group, codes.numel(), "the number of elements of `codes`")
    _check_scales("scales", scales, codes.numel() // group)
    check_tensor(_WHERE, "grad", grad, PARAM_DTYPES, "cast the gradient to float32")
    check_tensor(_WHERE, "exp_avg", exp_avg, (torch.float32,), "keep optimizer state in float32")
    check_tensor(_WHERE, "exp_avg_sq", exp_avg_sq, (torch.float32,), "keep optimizer state in float32")
    for name, tensor in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tensor.shape != codes.shape:
            raise KernelError(where_what_got(_WHERE, f"`{name}` of the shape of `codes` {tuple(codes.shape)}",
                                             tuple(tensor.shape), "pass tensors shaped like the weight"))
    check_same_device(_WHERE, {"codes": codes, "scales": scales, "grad": grad, "exp_avg": exp_avg,
                               "exp_avg_sq": exp_avg_sq})
    _check_seed(seed)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise KernelError(where_what_got(_WHERE, "`step` an int >= 1 (the count after this update)", step,
                                         "pass 1 on the first update and increment it after each"))


def adamw_int8_sr(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    group: int,
    seed: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step on an INT8-group weight, in place on ``codes``, ``scales`` and both fp32 moments.

    Dequantize, ``kernels.adamw``'s step in fp32, requantize with stochastic rounding (``seed``: use a
    fresh one each step); one fused kernel. ``grad`` (fp32 / bf16 / fp16, ``codes``' shape) is multiplied
    by ``grad_scale`` first; ``step`` counts updates including this one. Scalars are formed as in ``adamw``.
    """
    require_triton(_WHERE, triton, "adamw_int8_sr_ref")
    _check_adamw(codes, scales, grad, exp_avg, exp_avg_sq, group, seed, step)
    require_gpu_or_interpreter(_WHERE, _adamw_int8_sr_kernel, codes.device)

    # Host-side scalars in double, in the order torch.optim computes them (as adamw does).
    step_size, bias_correction2_sqrt, param_decay, lerp_weight, lerp_from_end = adam_scalars(
        lr, beta1, beta2, weight_decay, step)

    n_elements = codes.numel()
    rows = tile_rows(group)
    _adamw_int8_sr_kernel[(triton.cdiv(n_elements // group, rows),)](
        codes,
        scales,
        grad,
        exp_avg,
        exp_avg_sq,
        n_elements,
        _as_int32(_seed_mix(seed)),
        to_f32(grad_scale),
        to_f32(param_decay),
        to_f32(lerp_weight),
        to_f32(beta2),
        to_f32(1 - beta2),
        to_f32(-step_size),
        to_f32(bias_correction2_sqrt),
        to_f32(eps),
        LERP_FROM_END=lerp_from_end,
        GROUP=group,
        ROWS=rows,
        num_warps=_NUM_WARPS,
    )


@torch.no_grad()
def adamw_int8_sr_ref(
    codes: torch.Tensor,
    scales: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    group: int,
    seed: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float = 1.0,
) -> None:
    """``adamw_int8_sr`` in plain torch: ``dequantize_int8_group_ref``, ``adamw_ref`` on the fp32 weight, then
    ``quantize_int8_group_sr_ref(p, group, seed)`` written back into ``codes`` and ``scales``."""
    _check_adamw(codes, scales, grad, exp_avg, exp_avg_sq, group, seed, step)
    p = dequantize_int8_group_ref(codes, scales, group)
    adamw_ref(p, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              step=step, grad_scale=grad_scale)
    _quantize_int8_into_ref(p, group, _seed_mix(seed), codes, scales)


# ---- weight-only-quantized matmuls -------------------------------------------------------------------------


def _check_x(x: object) -> None:
    check_tensor(_WHERE, "x", x, PARAM_DTYPES, "cast it to float32 first")
    if x.dim() != 2:
        raise KernelError(where_what_got(_WHERE, "`x` of 2 dimensions [M, K]", tuple(x.shape),
                                         "flatten the leading dimensions with x.reshape(-1, K)"))


def _check_matmul_int8w(x: object, codes: object, scales: object, group: object) -> None:
    _check_x(x)
    _check_int8_codes("codes", codes)
    if codes.dim() != 2 or codes.shape[1] != x.shape[1]:
        raise KernelError(where_what_got(_WHERE, f"`codes` of shape [N, {x.shape[1]}] (K = x.shape[1])",
                                         tuple(codes.shape), "pass the codes of the [N, K] weight"))
    _check_group("group", group, x.shape[1], "K = x.shape[1]")
    _check_scales("scales", scales, codes.numel() // group)
    check_same_device(_WHERE, {"x": x, "codes": codes, "scales": scales})


def _check_matmul_nf4w(x: object, packed: object, absmax: object, block: object, n: object, k: object) -> None:
    _check_x(x)
    for name, value in (("n", n), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KernelError(where_what_got(_WHERE, f"`{name}` an int >= 1", value,
                                             "pass the [N, K] shape of the weight"))
    if k != x.shape[1]:
        raise KernelError(where_what_got(_WHERE, f"`k` equal to x.shape[1] ({x.shape[1]})", k,
                                         "pass the [N, K] shape of the weight"))
    _check_group("block", block, k, "K = x.shape[1]")
    _check_packed("packed", packed, n * k)
    _check_scales("absmax", absmax, n * k // block)
    check_same_device(_WHERE, {"x": x, "packed": packed, "absmax": absmax})


def _launch_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, group: int, n: int,
                   nf4: bool) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_k = min(group, _MATMUL_MAX_BLOCK_K)
    x_is_bf16 = x.dtype == torch.bfloat16
    # The interpreter's tl.dot multiplies bf16 bit patterns as integers (triton 3.9): widen bf16 there.
    dot_in_x_dtype = x.dtype != torch.float32 and not (x_is_bf16 and _interpreted(_matmul_qw_kernel))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, _MATMUL_BLOCK_N))
    _matmul_qw_kernel[grid](
        x, w, scales, _nf4_tables(x.device)[0], out, m, n, k, NF4=nf4, DOT_IN_X_DTYPE=dot_in_x_dtype,
        X_IS_BF16=x_is_bf16, OUT_IS_BF16=x_is_bf16, GROUP=group, BLOCK_M=block_m, BLOCK_N=_MATMUL_BLOCK_N,
        BLOCK_K=block_k, num_warps=_NUM_WARPS,
    )
    return out


def matmul_int8w(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ W^T`` for ``x`` [M, K] and the INT8-group weight ``W`` [N, K] (``codes`` int8 [N, K], ``scales``
    fp32 [N * K // group], ``group`` dividing K); fp32 accumulation, [M, N] in ``x``'s dtype; one kernel."""
    require_triton(_WHERE, triton, "matmul_int8w_ref")
    _check_matmul_int8w(x, codes, scales, group)
    require_gpu_or_interpreter(_WHERE, _matmul_qw_kernel, x.device)
    return _launch_matmul(x, codes, scales, group, codes.shape[0], nf4=False)


@torch.no_grad()
def matmul_int8w_ref(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``matmul_int8w`` in plain torch: ``(x.float() @ dequantize_int8_group_ref(codes, scales, group).T)``
    cast to ``x``'s dtype."""
    _check_matmul_int8w(x, codes, scales, group)
    return (x.float() @ dequantize_int8_group_ref(codes, scales, group).T).to(x.dtype)


def matmul_nf4w(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block: int, n: int,
                k: int) -> torch.Tensor:
    """``x @ W^T`` for ``x`` [M, K] and the NF4 weight ``W`` [N, K] (``packed`` uint8 [N * K // 2], ``absmax``
    fp32 [N * K // block], ``block`` dividing K); fp32 accumulation, [M, N] in ``x``'s dtype; one kernel."""
    require_triton(_WHERE, triton, "matmul_nf4w_ref")
    _check_matmul_nf4w(x, packed, absmax, block, n, k)
    require_gpu_or_interpreter(_WHERE, _matmul_qw_kernel, x.device)
    return _launch_matmul(x, packed, absmax, block, n, nf4=True)


@torch.no_grad()
def matmul_nf4w_ref(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, block: int, n: int,
                    k: int) -> torch.Tensor:
    """``matmul_nf4w`` in plain torch: ``(x.float() @ dequantize_nf4_ref(packed, absmax, block, (n, k)).T)``
    cast to ``x``'s dtype."""
    _check_matmul_nf4w(x, packed, absmax, block, n, k)
    return (x.float() @ dequantize_nf4_ref(packed, absmax, block, (n, k)).T).to(x.dtype)
