"""memfit.kernels.quant: code maps, kernel == reference exactly, round-trip bounds, int4 packing, errors."""

import importlib

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.errors import KernelError
from memfit.kernels.quant import (
    dequantize_blockwise,
    dequantize_blockwise_ref,
    dynamic_code,
    pack_int4,
    pack_int4_ref,
    quantize_blockwise,
    quantize_blockwise_ref,
    unpack_int4,
    unpack_int4_ref,
)

quant_module = importlib.import_module("memfit.kernels.quant")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1,), (255,), (257,), (3, 517), (4096,)]
CODES = [(True, 8), (False, 8), (True, 4), (False, 4)]  # (signed, bits)
CODE_IDS = ["signed8", "unsigned8", "signed4", "unsigned4"]


def _code(signed, bits):
    return dynamic_code(signed, bits).to(DEVICE)


def _values(shape, dtype, signed, seed):
    """randn with a spread of magnitudes (so small decades are hit too); |x| for unsigned codes.

    Kept finite in fp16 (|x| <= 6e4): an infinite input makes its block's absmax infinite, and its
    code is unspecified.
    """
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * torch.exp(3 * torch.randn(shape, generator=gen))).clamp(-6e4, 6e4)
    return (x if signed else x.abs()).to(DEVICE, dtype)


# ---- code maps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signed", "bits"), [(s, b) for s in (True, False) for b in range(2, 9)])
def test_dynamic_code_is_sorted_unique_and_spans_the_range(signed, bits):
    code = dynamic_code(signed, bits)
    assert code.dtype == torch.float32 and code.shape == (2**bits,)
    assert bool((code.diff() > 0).all())  # sorted ascending, hence unique
    assert {0.0, 1.0} <= set(code.tolist())
    if signed:
        assert code[0].item() == -1.0
        assert int((code < 0).sum()) == 2 ** (bits - 1) - 1  # one sign bit; -0 holds +1.0
    else:
        assert code[0].item() == 0.0
    assert code[-1].item() == 1.0


def test_dynamic_code_matches_bitsandbytes_layout():
    """The values bitsandbytes' create_dynamic_map gives, except the one slot signed maps give to -1."""
    signed, unsigned = dynamic_code(True), dynamic_code(False)
    # Top decade of the signed map: 64 midpoints of [0.1, 1] (6 fraction bits) on each side.
    top = torch.tensor([0.1 + 0.9 * (j + 0.5) / 64 for j in range(64)])
    torch.testing.assert_close(signed[signed >= 0.1], torch.cat([top, torch.ones(1)]), rtol=0, atol=1e-7)
    torch.testing.assert_close(signed[(signed <= -0.1) & (signed > -1)], -top.flip(0), rtol=0, atol=1e-7)
    # Unsigned: 128, 64, ..., 2 values per decade from 1 down to 1e-6 (7 down to 1 fraction bits).
    for k in range(7):
        in_decade = (unsigned >= 0.1 * 10.0**-k) & (unsigned < 10.0**-k)
        assert int(in_decade.sum()) == 2 ** (7 - k)
    assert unsigned[1].item() == pytest.approx(0.325e-6) and unsigned[-2].item() == pytest.approx(0.996484375)
    # Signed: the smallest positive is 0.55e-6 (decade 1e-6, no fraction bits); its negative gave its
    # slot to -1, so the smallest negative magnitude is the first of decade 1e-5 (one fraction bit).
    assert signed[signed > 0][0].item() == pytest.approx(0.55e-6)
    assert signed[signed < 0][-1].item() == pytest.approx(-0.325e-5)


def test_dynamic_code_returns_a_fresh_tensor_each_call():
    code = dynamic_code(True)
    code.zero_()
    assert dynamic_code(True)[-1].item() == 1.0


@pytest.mark.parametrize("bits", [1, 9, 8.0, True])
def test_dynamic_code_bad_bits_raises(bits):
    with pytest.raises(KernelError, match=r"memfit\.kernels\.quant: expected `bits` an int from 2 to 8, got "):
        dynamic_code(True, bits)


# ---- quantize / dequantize ---------------------------------------------------------------------------


@pytest.mark.parametrize(("signed", "bits"), CODES, ids=CODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_kernel_matches_reference_exactly(shape, dtype, signed, bits):
    x, code = _values(shape, dtype, signed, seed=0), _code(signed, bits)
    q, absmax = quantize_blockwise(x, code)
    q_ref, absmax_ref = quantize_blockwise_ref(x, code)
    assert q.dtype == torch.uint8 and q.shape == (x.numel(),)
    assert absmax.dtype == torch.float32 and absmax.shape == (triton.cdiv(x.numel(), 256),)
    assert torch.equal(q, q_ref)
    assert torch.equal(absmax, absmax_ref)
    assert int(q.max()) < 2**bits
    assert torch.equal(absmax, torch.stack([part.abs().max() for part in x.float().view(-1).split(256)]))


@pytest.mark.parametrize("block", [16, 64, 1024, 4096])
def test_quantize_other_block_sizes(block):
    x, code = _values((3, 517), torch.float16, True, seed=1), _code(True, 8)
    q, absmax = quantize_blockwise(x, code, block=block)
    q_ref, absmax_ref = quantize_blockwise_ref(x, code, block=block)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    padded = torch.nn.functional.pad(x.float().view(-1), (0, absmax.numel() * block - x.numel()))
    assert torch.equal(absmax, padded.view(-1, block).abs().amax(dim=1))


def test_reference_chunks_give_the_same_result(monkeypatch):
    """The references work through _REF_CHUNK values at a time; chunk seams change nothing."""
    x, code = _values((3, 517), torch.float32, True, seed=5), _code(True, 8)
    q, absmax = quantize_blockwise_ref(x, code, block=64)
    out = dequantize_blockwise_ref(q, absmax, code, block=64)
    monkeypatch.setattr(quant_module, "_REF_CHUNK", 128)
    q_chunked, absmax_chunked = quantize_blockwise_ref(x, code, block=64)
    assert torch.equal(q_chunked, q) and torch.equal(absmax_chunked, absmax)
    assert torch.equal(dequantize_blockwise_ref(q, absmax, code, block=64), out)


@pytest.mark.parametrize(("signed", "bits"), CODES, ids=CODE_IDS)
@pytest.mark.parametrize("quantize", [quantize_blockwise, quantize_blockwise_ref], ids=["kernel", "ref"])
def test_ties_go_to_the_lower_index_and_codes_map_to_themselves(quantize, signed, bits):
    code = _code(signed, bits)
    # Block 1: 1.0 fixes absmax at 1, then every code value and every fp32-exact midpoint.
    mids = (code[:-1] + code[1:]) / 2
    exact = (mids - code[:-1]) == (code[1:] - mids)
    x = torch.cat([torch.ones(1, device=DEVICE), code, mids[exact]])
    q, absmax = quantize(x, code, block=1024)
    assert absmax.tolist() == [1.0]
    assert torch.equal(q[1 : 1 + code.numel()].long(), torch.arange(code.numel(), device=DEVICE))
    assert int(exact.sum()) > 0
    assert torch.equal(q[1 + code.numel():].long(), torch.nonzero(exact).view(-1))


@pytest.mark.parametrize("quantize", [quantize_blockwise, quantize_blockwise_ref], ids=["kernel", "ref"])
def test_zero_block_keeps_zero_absmax_and_decodes_to_zero(quantize):
    code = _code(True, 8)
    x = torch.cat([torch.zeros(256), torch.randn(10)]).to(DEVICE)
    q, absmax = quantize(x, code)
    assert absmax[0].item() == 0.0 and absmax[1].item() > 0
    assert bool((code[q[:256].long()] == 0).all())
    assert bool((dequantize_blockwise_ref(q, absmax, code)[:256] == 0).all())


@pytest.mark.parametrize(("signed", "bits"), CODES, ids=CODE_IDS)
@pytest.mark.parametrize("shape", [(257,), (3, 517)], ids=str)
def test_round_trip_error_within_half_the_largest_code_gap(shape, signed, bits):
    x, code = _values(shape, torch.float32, signed, seed=2), _code(signed, bits)
    q, absmax = quantize_blockwise(x, code)
    back = dequantize_blockwise(q, absmax, code, shape=x.shape)
    assert back.shape == x.shape
    half_gap = code.diff().max().item() / 2
    per_value_absmax = absmax.repeat_interleave(256)[: x.numel()].view(x.shape)
    # fp32 slack: x / absmax and code * absmax each round once.
    assert bool(((back - x).abs() <= (half_gap + 1e-6) * per_value_absmax).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (257,), (3, 517)], ids=str)
def test_dequantize_kernel_matches_reference_exactly(shape, dtype):
    code = _code(True, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # within fp16 range
    q, absmax = quantize_blockwise_ref(x, code)
    out = dequantize_blockwise(q, absmax, code, shape=shape, dtype=dtype)
    ref = dequantize_blockwise_ref(q, absmax, code, shape=shape, dtype=dtype)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out, ref)
    # bf16 / fp16 outputs round the fp32 values to nearest even, as torch's .to() does.
    assert torch.equal(out, dequantize_blockwise_ref(q, absmax, code, shape=shape).to(dtype))


@pytest.mark.parametrize(("signed", "bits"), [(s, b) for s in (True, False) for b in range(2, 9)])
def test_lookup_tables_give_the_searchsorted_rule_exactly(monkeypatch, signed, bits):
    """The CPU reference's lookup tables against the plain rule, on every fp32 value where it could slip:
    the codes, the decision thresholds and their fp32 neighbours, +-0, denormals, +-inf, out of range."""
    code = dynamic_code(signed, bits)
    thresholds = quant_module._decision_tables(code)[0][:-1]
    points = torch.cat([code, thresholds, -code, -thresholds])
    x = torch.cat([
        points,
        torch.nextafter(points, torch.full_like(points, 2.0)),
        torch.nextafter(points, torch.full_like(points, -2.0)),
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, float("inf"), float("-inf"), 3.0, -3.0, 1e30]),
        torch.randn(4000) * torch.exp(4 * torch.randn(4000)),
    ])
    fast = quant_module.nearest_code_index_ref(x, code)
    past_the_ends = quant_module.nearest_code_index_ref(torch.tensor([3.0, 1e30, float("inf"), -3.0, -1e30]), code)
    monkeypatch.setattr(quant_module, "_decision_tables", lambda code: None)
    assert torch.equal(fast, quant_module.nearest_code_index_ref(x, code))
    assert past_the_ends.tolist() == [code.numel() - 1] * 3 + [0, 0]  # clamped into the table


# ---- int4 packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 1024, 2049])
def test_pack_int4_kernel_matches_reference_and_unpacks(n):
    q = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).to(DEVICE)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert torch.equal(packed, pack_int4_ref(q))
    assert torch.equal(packed[: n // 2], q[0 : 2 * (n // 2) : 2] | (q[1 : 2 * (n // 2) : 2] << 4))
    if n % 2:
        assert packed[-1].item() == q[-1].item()  # the high nibble past an odd end is 0
    assert torch.equal(unpack_int4(packed, n), q)
    assert torch.equal(unpack_int4_ref(packed, n), q)


def test_pack_int4_takes_4bit_quantized_codes():
    code = _code(True, 4)
    x = _values((3, 517), torch.float32, True, seed=4)
    q, absmax = quantize_blockwise(x, code)
    back = dequantize_blockwise(unpack_int4(pack_int4(q), q.numel()), absmax, code, shape=x.shape)
    assert torch.equal(back, dequantize_blockwise(q, absmax, code, shape=x.shape))


@settings(max_examples=15, deadline=None)
@given(values=st.lists(st.integers(0, 15), min_size=1, max_size=300))
def test_pack_unpack_round_trip_property(values):
    q = torch.tensor(values, dtype=torch.uint8, device=DEVICE)
    packed = pack_int4(q)
    assert torch.equal(packed, pack_int4_ref(q))
    assert torch.equal(unpack_int4(packed, len(values)), q)
    assert torch.equal(unpack_int4_ref(packed, len(values)), q)


@settings(max_examples=10, deadline=None)
@given(
    shape=st.lists(st.integers(1, 70), min_size=1, max_size=2).map(tuple),
    signed_bits=st.sampled_from(CODES),
    block=st.sampled_from([16, 64, 256]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_quantize_kernel_matches_reference_property(shape, signed_bits, block, dtype, seed):
    x, code = _values(shape, dtype, signed_bits[0], seed), _code(*signed_bits)
    q, absmax = quantize_blockwise(x, code, block=block)
    q_ref, absmax_ref = quantize_blockwise_ref(x, code, block=block)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)


# ---- errors ----------------------------------------------------------------------------------------------


def _quantize_args(**overrides):
    args = {"x": torch.randn(6, 8, device=DEVICE), "code": _code(True, 8), "block": 256}
    args.update(overrides)
    return args


@pytest.mark.parametrize("quantize", [quantize_blockwise, quantize_blockwise_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"x": torch.zeros(8, 6).t()}, r"expected contiguous `x`, got strides \(1, 6\) for shape \(6, 8\); "
                                   r"call \.contiguous\(\) first"),
    ({"x": torch.zeros(6, 8, dtype=torch.float64)}, r"expected `x` of dtype torch.float32 or torch.bfloat16 or "
                                                    r"torch.float16, got torch.float64; cast it to float32 first"),
    ({"x": torch.zeros(0)}, r"expected `x` with at least one element, got \(0,\)"),
    ({"x": [1.0]}, r"expected `x` to be a torch.Tensor, got list"),
    ({"code": torch.zeros(100)}, r"expected `code` a 1-D code map of 2, 4, \.\.\., 256 values, got \(100,\)"),
    ({"code": torch.zeros(512)}, r"expected `code` a 1-D code map of 2, 4, \.\.\., 256 values, got \(512,\)"),
    ({"code": torch.zeros(256, dtype=torch.float64)}, r"expected `code` of dtype torch.float32, got torch.float64"),
    ({"block": 100}, r"expected `block` a power of two from 16 to 4096, got 100; use 256"),
    ({"block": 8192}, r"expected `block` a power of two from 16 to 4096, got 8192"),
    ({"code": torch.zeros(256, device="meta")}, r"expected `code` on the device of `x` \(\w+\), got meta"),
], ids=["non_contiguous", "dtype", "empty", "not_tensor", "code_size", "code_too_big", "code_dtype", "block",
        "block_too_big", "device"])
def test_quantize_bad_input_raises(quantize, overrides, message):
    with pytest.raises(KernelError, match=r"memfit\.kernels\.quant: " + message):
        quantize(**_quantize_args(**overrides))


@pytest.mark.parametrize("dequantize", [dequantize_blockwise, dequantize_blockwise_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"q": torch.zeros(300, dtype=torch.int32)}, r"expected `q` of dtype torch.uint8, got torch.int32"),
    ({"absmax": torch.ones(3)}, r"expected `absmax` of shape \(2,\), one value per block, got \(3,\)"),
    ({"absmax": torch.ones(2, dtype=torch.float16)}, r"expected `absmax` of dtype torch.float32"),
    ({"shape": (7, 7)}, r"expected `shape` of 300 elements, as many as `q`, got \(7, 7\)"),
    ({"dtype": torch.int8}, r"expected `dtype` float32, bfloat16 or float16, got torch.int8"),
], ids=["q_dtype", "absmax_shape", "absmax_dtype", "shape", "dtype"])
def test_dequantize_bad_input_raises(dequantize, overrides, message):
    args = {"q": torch.zeros(300, dtype=torch.uint8, device=DEVICE), "absmax": torch.ones(2, device=DEVICE),
            "code": _code(True, 8), "block": 256, "shape": (300,), "dtype": torch.float32}
    args.update(overrides)
    with pytest.raises(KernelError, match=r"memfit\.kernels\.quant: " + message):
        dequantize(**args)


@pytest.mark.parametrize("pack", [pack_int4, pack_int4_ref], ids=["kernel", "ref"])
def test_pack_int4_values_above_15_raise_on_cpu(pack):
    with pytest.raises(KernelError, match=r"expected `q` values from 0 to 15, got a maximum of 16; quantize with a "
                                          r"4-bit code"):
        pack(torch.tensor([1, 16, 3], dtype=torch.uint8))  # checked before the device, on the CPU only


@pytest.mark.gpu
def test_pack_int4_keeps_the_low_nibble_on_gpu():
    q = torch.arange(256, dtype=torch.uint8, device="cuda")
    assert torch.equal(pack_int4(q), pack_int4_ref(q))
    assert torch.equal(pack_int4(q).cpu(), pack_int4_ref(q.cpu() & 0xF))


@pytest.mark.parametrize("unpack", [unpack_int4, unpack_int4_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("n", [4, 7, 0, 6.0])
def test_unpack_int4_bad_n_raises(unpack, n):
    with pytest.raises(KernelError, match=r"expected `n` of 5 or 6 \(two codes in each of the 3 bytes\), got "):
        unpack(torch.zeros(3, dtype=torch.uint8, device=DEVICE), n)


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(quant_module, "triton", None)
    with pytest.raises(KernelError, match=r"expected triton to be importable, got ImportError; install triton, or "
                                          r"use quantize_blockwise_ref"):
        quantize_blockwise(**_quantize_args())


def _placeholder_kernel(x):
    pass


@pytest.mark.parametrize("name", ["_quantize_blockwise_kernel", "_dequantize_blockwise_kernel",
                                  "_pack_int4_kernel", "_unpack_int4_kernel"])
def test_cpu_tensors_without_interpreter_raise(monkeypatch, name):
    monkeypatch.setattr(quant_module, name, triton.runtime.JITFunction(_placeholder_kernel))
    q = torch.zeros(300, dtype=torch.uint8)
    calls = {
        "_quantize_blockwise_kernel": lambda: quantize_blockwise(torch.randn(300), dynamic_code(True)),
        "_dequantize_blockwise_kernel": lambda: dequantize_blockwise(q, torch.ones(2), dynamic_code(True)),
        "_pack_int4_kernel": lambda: pack_int4(q),
        "_unpack_int4_kernel": lambda: unpack_int4(q, 600),
    }
    with pytest.raises(KernelError, match=r"expected tensors on a GPU, got cpu; set TRITON_INTERPRET=1"):
        calls[name]()
