"""Block-wise dynamic quantization (8-bit optimizer state, Q-GaLore projections) and int4 packing.

``dynamic_code(signed, bits)`` builds the sorted code map of dynamic tree quantization (Dettmers et
al., "8-bit Optimizers via Block-wise Quantization"). A code is a sign bit (signed maps only), then a
run of ``k`` zero bits giving the decade ``10**-k``, then an indicator 1 bit, then the remaining bits
as a linear fraction: ``2**f`` values at the midpoints of ``f`` equal steps of [0.1, 1], times
``10**-k``. All-zero magnitude bits are 0. The code word left over (``-0`` in a signed map, the
``k = bits - 1`` decade of an unsigned one) holds 1.0, as in bitsandbytes' ``create_dynamic_map``.
One deliberate difference: the signed map also holds -1.0, in the slot of its smallest negative
value (-0.55 * 10**-(bits - 2), i.e. -5.5e-7 at 8 bits), so a block whose largest magnitude is
negative maps that element exactly (bitsandbytes maps it to -0.99297, an error of half a step).

``quantize_blockwise`` splits the flattened tensor into blocks of ``block`` values, stores each
block's absmax in fp32 and, for every value, the index of the code nearest to ``x / absmax``
(computed in fp32 with IEEE division; an all-zero block divides by 1). The nearest code is found by
a binary search for the two neighbours bracketing the value (torch's ``searchsorted``, left side;
the value clamped to the table's range first), then ``|x - code[lo]| <= |code[hi] - x|`` picks
``lo``: ties go to the lower index. The kernel and the reference compute the same fp32 values op for
op, so their indices and absmax are bit-equal. NaN or infinite inputs give unspecified codes.

``pack_int4`` stores two 4-bit codes per byte (low nibble: even index, high nibble: odd index);
``unpack_int4`` inverts it. Q-GaLore's reference keeps one INT4 value per byte; this halves that.

Shared with the other kernels of this family (``adam8bit``, ``lowrank``): the Triton helpers
``nearest_code_index`` and ``round_to_bf16``, their torch twins ``nearest_code_index_ref``,
``quantize_flat_ref`` and ``dequantize_flat_ref``, ``tile_rows``, and the ``check_*`` / ``require_*``
validators (which raise ``KernelError`` in the house shape; they could move to ``_checks``).
"""

from __future__ import annotations

import functools

import torch

from ..errors import KernelError, where_what_got
from ._checks import PARAM_DTYPES, check_same_device, check_tensor, require_gpu_or_interpreter, require_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform (e.g. macOS); the *_ref functions still work
    triton = None
    tl = None

_WHERE = "memfit.kernels.quant"

# Blocks are one Triton program each, so a power of two (tl.arange); 4096 fp32 values is 16 KiB of
# registers per program, the most bitsandbytes uses too.
MIN_BLOCK = 16
MAX_BLOCK = 4096
# The plain-torch paths work through this many values at a time (a multiple of every legal block),
# so their fp32 / int32 temporaries stay at a few MiB whatever the tensor size.
_REF_CHUNK = 1 << 20


# ---- code maps -------------------------------------------------------------------------------------------


@functools.cache
def _dynamic_code_values(signed: bool, bits: int) -> tuple[float, ...]:
    # Decades 10**0 .. 10**-(bits - 2). A code in decade k is [sign bit] + k zero bits + an indicator 1
    # bit + the rest as fraction bits. The two codes left over (signed: -0; unsigned: k = bits - 1, whose
    # fraction is empty) are 0 (all-zero magnitude) and 1.0.
    values: list[float] = [0.0, 1.0]
    for k in range(bits - 1):
        fraction_bits = bits - 1 - k - (1 if signed else 0)
        steps = 2**fraction_bits
        # midpoints of `steps` equal steps of [0.1, 1], in double, then scaled to the decade
        magnitudes = [10.0**-k * (0.1 + 0.9 * (j + 0.5) / steps) for j in range(steps)]
        values += magnitudes
        if signed:
            # the smallest negative magnitude (decade bits - 2 holds one value) gives its slot to -1.0
            values += [-1.0] if k == bits - 2 else [-value for value in magnitudes]
    rounded = sorted({float(torch.tensor(v, dtype=torch.float32)) for v in values})
    assert len(rounded) == 2**bits, (signed, bits, len(rounded))  # internal invariant: no collisions in fp32
    return tuple(rounded)


def dynamic_code(signed: bool, bits: int = 8) -> torch.Tensor:
    """The ``2**bits`` code values of dynamic tree quantization, fp32, sorted ascending, unique (CPU).

    ``signed``: values in [-1, 1] holding -1, 0 and 1 (for Adam's first moment). Unsigned: values in
    [0, 1] holding 0 and 1, every bit spent on magnitude (for the second moment). ``bits`` from 2 to 8;
    the values are computed once per ``(signed, bits)`` and each call returns a fresh tensor.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise KernelError(where_what_got(_WHERE, "`bits` an int from 2 to 8", bits,
                                         "use 8 for optimizer state, 4 for Q-GaLore projections"))
    return torch.tensor(_dynamic_code_values(bool(signed), bits), dtype=torch.float32)


# ---- checks shared by the block-quantized kernels ---------------------------------------------------


def check_block(where: str, block: object) -> None:
    """``block`` is a power of two from MIN_BLOCK to MAX_BLOCK."""
    if (isinstance(block, bool) or not isinstance(block, int) or not MIN_BLOCK <= block <= MAX_BLOCK
            or block & (block - 1)):
        raise KernelError(where_what_got(where, f"`block` a power of two from {MIN_BLOCK} to {MAX_BLOCK}", block,
                                         "use 256, the block size of 8-bit optimizer state"))


def check_code(where: str, name: str, code: object) -> None:
    """``code`` is a 1-D fp32 code map of 2 to 256 values, a power of two (see ``dynamic_code``).

    Its values must be sorted ascending; that is not checked (it would read the tensor back).
    """
    check_tensor(where, name, code, (torch.float32,), "build it with memfit.kernels.quant.dynamic_code")
    size = code.numel()
    if code.dim() != 1 or not 2 <= size <= 256 or size & (size - 1):
        raise KernelError(where_what_got(where, f"`{name}` a 1-D code map of 2, 4, ..., 256 values",
                                         tuple(code.shape), "build it with memfit.kernels.quant.dynamic_code"))


def check_absmax(where: str, name: str, absmax: object, n_blocks: int) -> None:
    """``absmax`` is a contiguous fp32 vector of one value per block."""
    check_tensor(where, name, absmax, (torch.float32,), "keep block absmax in float32")
    if tuple(absmax.shape) != (n_blocks,):
        raise KernelError(where_what_got(where, f"`{name}` of shape ({n_blocks},), one value per block",
                                         tuple(absmax.shape), "allocate it with torch.zeros(ceil(numel / block))"))


def _check_codes_tensor(where: str, name: str, q: object) -> None:
    check_tensor(where, name, q, (torch.uint8,), "store code indices as torch.uint8")


# ---- Triton ----------------------------------------------------------------------------------------------


if triton is not None:

    @triton.jit
    def nearest_code_index(x, absmax, code_ptr, LOG2_CODE: tl.constexpr):
        """Index (int32) of the code nearest to ``x / absmax``; ties to the lower index.

        ``code_ptr`` points at ``2**LOG2_CODE`` sorted fp32 values; an ``absmax`` of 0 divides by 1.
        """
        scale = tl.where(absmax == 0.0, 1.0, absmax)
        xn = tl.div_rn(x, tl.zeros_like(x) + scale)
        # Within the table's range (a no-op after absmax scaling): past the last code, fp32 rounding
        # can make both distances equal for a huge xn and send it to the second-to-last code.
        xn = tl.minimum(tl.maximum(xn, tl.load(code_ptr)), tl.load(code_ptr + (1 << LOG2_CODE) - 1))
        # Branchless lower bound: pos ends as the number of codes < xn, capped at 2**LOG2_CODE - 1.
        pos = tl.zeros(x.shape, dtype=tl.int32)
        for i in tl.static_range(LOG2_CODE):
            step = 1 << (LOG2_CODE - 1 - i)
            below = tl.load(code_ptr + pos + (step - 1))
            pos = tl.where(below < xn, pos + step, pos)
        hi = tl.maximum(pos, 1)
        lo = hi - 1
        code_lo = tl.load(code_ptr + lo)
        code_hi = tl.load(code_ptr + hi)
        return tl.where(tl.abs(xn - code_lo) <= tl.abs(code_hi - xn), lo, hi)

    @triton.jit
    def round_to_bf16(x):
        """fp32 -> bf16, round to nearest even.

        Under TRITON_INTERPRET=1 (triton 3.9) ``.to(tl.bfloat16)`` truncates (482 of 1000 randn values
        differ from torch), while GPUs and torch round to nearest even. The integer form gives torch's
        bits on both; NaN stays a quiet NaN.
        """
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _quantize_blockwise_kernel(
        x_ptr,
        code_ptr,
        q_ptr,
        absmax_ptr,
        n_elements,
        LOG2_CODE: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        # A (ROWS, BLOCK) tile: ROWS consecutive quantization blocks, one per row.
        pid = tl.program_id(axis=0).to(tl.int64)  # int64 offsets: tensors can pass 2**31 elements
        rows = pid * ROWS + tl.arange(0, ROWS)
        offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        q = nearest_code_index(x, absmax[:, None], code_ptr, LOG2_CODE)
        tl.store(absmax_ptr + rows, absmax, mask=rows * BLOCK < n_elements)
        tl.store(q_ptr + offsets, q.to(tl.uint8), mask=mask)

    @triton.jit
    def _dequantize_blockwise_kernel(
        q_ptr,
        absmax_ptr,
        code_ptr,
        out_ptr,
        n_elements,
        OUT_IS_BF16: tl.constexpr,
        BLOCK: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        pid = tl.program_id(axis=0).to(tl.int64)
        rows = pid * ROWS + tl.arange(0, ROWS)
        offsets = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offsets < n_elements
        q = tl.load(q_ptr + offsets, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(absmax_ptr + rows, mask=rows * BLOCK < n_elements, other=0.0)
        value = tl.load(code_ptr + q, mask=mask, other=0.0) * absmax[:, None]
        if OUT_IS_BF16:
            out = round_to_bf16(value)
        else:
            out = value.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, out, mask=mask)

    @triton.jit
    def _pack_int4_kernel(q_ptr, packed_ptr, n_elements, n_packed, BLOCK: tl.constexpr):
        pid = tl.program_id(axis=0).to(tl.int64)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        low = tl.load(q_ptr + 2 * offsets, mask=offsets < n_packed, other=0)
        high = tl.load(q_ptr + 2 * offsets + 1, mask=2 * offsets + 1 < n_elements, other=0)
        tl.store(packed_ptr + offsets, (low & 0xF) | ((high & 0xF) << 4), mask=offsets < n_packed)

    @triton.jit
    def _unpack_int4_kernel(packed_ptr, q_ptr, n_elements, BLOCK: tl.constexpr):
        pid = tl.program_id(axis=0).to(tl.int64)
        offsets = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        byte = tl.load(packed_ptr + offsets // 2, mask=mask, other=0)
        shift = ((offsets % 2) * 4).to(tl.uint8)
        tl.store(q_ptr + offsets, (byte >> shift) & 0xF, mask=mask)

else:
    _quantize_blockwise_kernel = _dequantize_blockwise_kernel = _pack_int4_kernel = _unpack_int4_kernel = None

# Launch constants. Quantize / dequantize take a (rows, block) tile of whole blocks per program,
# about 1024 values (eight per thread across four warps on a GPU; under TRITON_INTERPRET=1 a program
# costs the same few ms of numpy whatever its size, so fewer, larger tiles run faster there too);
# pack / unpack 1024 bytes per program. Not yet tuned on a GPU.
_NUM_WARPS = 4
_TILE_VALUES = 1024
_PACK_BLOCK = 1024


def tile_rows(block: int) -> int:
    """Blocks per program for a tile of about _TILE_VALUES values (a power of two, at least 1)."""
    return max(1, _TILE_VALUES // block)


# ---- quantize / dequantize ---------------------------------------------------------------------------


def _check_quantize(x: object, code: object, block: object) -> None:
    check_tensor(_WHERE, "x", x, PARAM_DTYPES, "cast it to float32 first")
    check_code(_WHERE, "code", code)
    check_block(_WHERE, block)
    check_same_device(_WHERE, {"x": x, "code": code})


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, fp32/bf16/fp16) block-wise to code indices; one kernel launch.

    Returns ``(q, absmax)``: ``q`` uint8 of ``x.numel()`` values (flat), ``absmax`` fp32 of one value
    per block of the flattened tensor.
    """
    require_triton(_WHERE, triton, "quantize_blockwise_ref")
    _check_quantize(x, code, block)
    require_gpu_or_interpreter(_WHERE, _quantize_blockwise_kernel, x.device)
    n_elements = x.numel()
    n_blocks = triton.cdiv(n_elements, block)
    q = torch.empty(n_elements, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    rows = tile_rows(block)
    _quantize_blockwise_kernel[(triton.cdiv(n_blocks, rows),)](
        x, code, q, absmax, n_elements, LOG2_CODE=code.numel().bit_length() - 1, BLOCK=block, ROWS=rows,
        num_warps=_NUM_WARPS,
    )
    return q, absmax


def nearest_code_index_ref(xn: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the code nearest to each already-normalized fp32 value; ties to the lower index.

    The kernel's rule, op for op: ``xn`` clamped to ``[code[0], code[-1]]``, the two codes bracketing it
    (searchsorted, left side), then ``|xn - code[lo]| <= |code[hi] - xn|`` in fp32. On the CPU the same
    answer comes from lookup tables (``_decision_tables``), several times faster than torch's searchsorted.
    """
    xn = xn.contiguous()
    tables = _decision_tables(code) if code.device.type == "cpu" else None
    if tables is not None:
        thresholds, first_above = tables
        # Bucket = the top 16 bits of the fp32 pattern; each bucket holds at most one threshold, so one
        # comparison against the first threshold at or above the bucket's start finishes the count.
        bucket = xn.view(torch.int32).bitwise_right_shift(16).add_(32768).view(-1)
        base = first_above.index_select(0, bucket)
        above = thresholds.index_select(0, base).view_as(xn) < xn
        return base.view_as(xn).add_(above).to(torch.uint8)
    xn = xn.clamp(code[0], code[-1])
    hi = torch.searchsorted(code, xn, out_int32=True).clamp_(1, code.numel() - 1)
    lo = hi - 1
    code_lo = code.index_select(0, lo.view(-1)).view_as(xn)
    code_hi = code.index_select(0, hi.view(-1)).view_as(xn)
    take_lo = (xn - code_lo).abs_() <= (code_hi - xn).abs_()
    return torch.where(take_lo, lo, hi).to(torch.uint8)


def _ordered_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the fp32 values (-0.0 just below +0.0), and ``_from_key`` back."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF) - 1, bits)


def _from_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, (-(key + 1)) | -(1 << 31), key)
    return bits.to(torch.int32).view(torch.float32)


_DECISION_TABLES: dict[bytes, tuple[torch.Tensor, torch.Tensor] | None] = {}
_MAX_DECISION_TABLES = 32  # 256 KiB each


def _decision_tables(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a CPU code map: (thresholds, first_above), or None when a bucket would hold two thresholds.

    ``thresholds[i]`` is the largest fp32 ``t`` in ``[code[i], code[i + 1]]`` that the kernel's rule
    sends to ``i`` (the rule is monotone in ``t``: ``t - lo`` only grows and ``hi - t`` only shrinks
    under rounding), padded with +inf; so the nearest index is the count of thresholds below ``xn``.
    ``first_above[b]`` counts the thresholds in buckets below ``b``, indexed by the raw top 16 bits of
    the fp32 pattern plus 32768. Built once per distinct code map (a few ms).
    """
    cache_key = code.numpy().tobytes()
    if cache_key not in _DECISION_TABLES:
        lo, hi = code[:-1], code[1:]
        below, above = _ordered_key(lo), _ordered_key(hi)  # the rule sends lo to i and hi to i + 1
        while bool((above - below > 1).any()):
            middle = (below + above) // 2
            t = _from_key(middle)
            to_lo = (t - lo).abs() <= (hi - t).abs()
            below = torch.where(to_lo, middle, below)
            above = torch.where(to_lo, above, middle)
        thresholds = _from_key(below)
        buckets = _ordered_key(thresholds) >> 16  # in value order, -32768 .. 32767
        tables = None
        if bool((buckets.diff() > 0).all()):
            ordered = torch.arange(-32768, 32768)
            first_above_ordered = torch.searchsorted(buckets, ordered).to(torch.int32)
            # raw top 16 bits -> ordered bucket: negatives count down from -0.0, which sits just below +0.0
            raw = torch.arange(-32768, 32768)
            first_above = first_above_ordered[torch.where(raw < 0, -(raw & 0x7FFF) - 1, raw) + 32768]
            tables = (torch.cat([thresholds, thresholds.new_full((1,), float("inf"))]), first_above.contiguous())
        if len(_DECISION_TABLES) >= _MAX_DECISION_TABLES:  # callers with many code maps: start over
            _DECISION_TABLES.clear()
        _DECISION_TABLES[cache_key] = tables
    return _DECISION_TABLES[cache_key]


def quantize_flat_ref(flat: torch.Tensor, code: torch.Tensor, block: int, q_out: torch.Tensor,
                      absmax_out: torch.Tensor) -> None:
    """Quantize one flat run of values starting at a block boundary into ``q_out`` and ``absmax_out``."""
    n = flat.numel()
    n_blocks = absmax_out.numel()
    values = flat.float()
    pad = n_blocks * block - n
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(n_blocks, block)
    absmax = torch.amax(values.abs(), dim=1)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    q = nearest_code_index_ref(values / scale[:, None], code)
    absmax_out.copy_(absmax)
    q_out.copy_(q.view(-1)[:n])


@torch.no_grad()
def quantize_blockwise_ref(x: torch.Tensor, code: torch.Tensor,
                           block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_blockwise`` in plain torch, bit-equal to the kernel; works in 2**20-value chunks."""
    _check_quantize(x, code, block)
    flat = x.view(-1)
    n_elements = flat.numel()
    n_blocks = -(-n_elements // block)
    q = torch.empty(n_elements, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    for start in range(0, n_elements, _REF_CHUNK):
        stop = min(start + _REF_CHUNK, n_elements)
        quantize_flat_ref(flat[start:stop], code, block, q[start:stop],
                          absmax[start // block: -(-stop // block)])
    return q, absmax


def dequantize_flat_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 ``code[q] * absmax[block]`` for one flat run of codes starting at a block boundary."""
    values = code.index_select(0, q.to(torch.int32))
    full = q.numel() // block
    values[: full * block].view(full, block).mul_(absmax[:full, None])
    if full * block < q.numel():
        values[full * block:].mul_(absmax[full])
    return values


def _check_dequantize(q: object, absmax: object, code: object, block: object, shape: object,
                      dtype: object) -> tuple[int, ...]:
    _check_codes_tensor(_WHERE, "q", q)
    check_code(_WHERE, "code", code)
    check_block(_WHERE, block)
    check_absmax(_WHERE, "absmax", absmax, -(-q.numel() // block))
    check_same_device(_WHERE, {"q": q, "absmax": absmax, "code": code})
    out_shape = (q.numel(),) if shape is None else tuple(shape)
    if torch.Size(out_shape).numel() != q.numel():
        raise KernelError(where_what_got(_WHERE, f"`shape` of {q.numel()} elements, as many as `q`", out_shape,
                                         "pass the shape of the tensor that was quantized"))
    if dtype not in PARAM_DTYPES:
        raise KernelError(where_what_got(_WHERE, "`dtype` float32, bfloat16 or float16", dtype,
                                         "dequantize to float32 and cast after"))
    return out_shape


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int = 256,
                         shape: tuple[int, ...] | torch.Size | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code[q] * absmax[block]`` as a new tensor of ``shape`` (default: flat) and ``dtype``; one kernel."""
    require_triton(_WHERE, triton, "dequantize_blockwise_ref")
    out_shape = _check_dequantize(q, absmax, code, block, shape, dtype)
    require_gpu_or_interpreter(_WHERE, _dequantize_blockwise_kernel, q.device)
    out = torch.empty(out_shape, dtype=dtype, device=q.device)
    n_elements = q.numel()
    rows = tile_rows(block)
    _dequantize_blockwise_kernel[(triton.cdiv(n_elements, rows * block),)](
        q, absmax, code, out, n_elements, OUT_IS_BF16=dtype == torch.bfloat16, BLOCK=block, ROWS=rows,
        num_warps=_NUM_WARPS,
    )
    return out


@torch.no_grad()
def dequantize_blockwise_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block: int = 256,
                             shape: tuple[int, ...] | torch.Size | None = None,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dequantize_blockwise`` in plain torch, bit-equal to the kernel."""
    out_shape = _check_dequantize(q, absmax, code, block, shape, dtype)
    out = torch.empty(out_shape, dtype=dtype, device=q.device)
    flat_q, flat_out = q.view(-1), out.view(-1)
    for start in range(0, q.numel(), _REF_CHUNK):
        stop = min(start + _REF_CHUNK, q.numel())
        flat_out[start:stop] = dequantize_flat_ref(flat_q[start:stop], absmax[start // block:], code, block)
    return out


# ---- int4 packing ------------------------------------------------------------------------------------


def _check_pack(q: object) -> None:
    _check_codes_tensor(_WHERE, "q", q)
    # Values are checked on the CPU only: on a GPU the check would read q back and synchronize on
    # every 4-bit state update. There, values above 15 keep their low nibble (both paths mask).
    if q.device.type == "cpu" and int(q.max()) > 15:
        raise KernelError(where_what_got(_WHERE, "`q` values from 0 to 15", f"a maximum of {int(q.max())}",
                                         "quantize with a 4-bit code (dynamic_code(signed, bits=4))"))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``packed[i] = q[2i] | q[2i + 1] << 4`` (high nibble 0 past an odd end).

    ``q``: uint8 values 0..15, any shape, contiguous; a value above 15 raises on the CPU and is cut to
    its low nibble on a GPU (checking there would synchronize). Returns ``ceil(numel / 2)`` bytes, flat.
    """
    require_triton(_WHERE, triton, "pack_int4_ref")
    _check_pack(q)
    require_gpu_or_interpreter(_WHERE, _pack_int4_kernel, q.device)
    n_elements = q.numel()
    n_packed = -(-n_elements // 2)
    packed = torch.empty(n_packed, dtype=torch.uint8, device=q.device)
    _pack_int4_kernel[(triton.cdiv(n_packed, _PACK_BLOCK),)](
        q, packed, n_elements, n_packed, BLOCK=_PACK_BLOCK, num_warps=_NUM_WARPS
    )
    return packed


@torch.no_grad()
def pack_int4_ref(q: torch.Tensor) -> torch.Tensor:
    """``pack_int4`` in plain torch."""
    _check_pack(q)
    flat = q.view(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2) & 0xF
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _check_unpack(packed: object, n: object) -> None:
    _check_codes_tensor(_WHERE, "packed", packed)
    if isinstance(n, bool) or not isinstance(n, int) or -(-n // 2) != packed.numel() or n < 1:
        raise KernelError(where_what_got(_WHERE, f"`n` of {2 * packed.numel() - 1} or {2 * packed.numel()} "
                                                 f"(two codes in each of the {packed.numel()} bytes)", n,
                                         "pass the number of codes that were packed"))


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` uint8 codes (0..15) that ``pack_int4`` packed, flat."""
    require_triton(_WHERE, triton, "unpack_int4_ref")
    _check_unpack(packed, n)
    require_gpu_or_interpreter(_WHERE, _unpack_int4_kernel, packed.device)
    q = torch.empty(n, dtype=torch.uint8, device=packed.device)
    _unpack_int4_kernel[(triton.cdiv(n, _PACK_BLOCK),)](packed, q, n, BLOCK=_PACK_BLOCK, num_warps=_NUM_WARPS)
    return q


@torch.no_grad()
def unpack_int4_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``unpack_int4`` in plain torch."""
    _check_unpack(packed, n)
    flat = packed.view(-1)
    return torch.stack([flat & 0xF, flat >> 4], dim=1).view(-1)[:n].contiguous()
