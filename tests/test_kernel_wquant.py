"""memfit.kernels.wquant: kernel == reference exactly, round-trip bounds, the SR hash, fused AdamW, matmuls, errors."""

import importlib
import math

import pytest
import torch
import triton

from memfit.errors import KernelError
from memfit.kernels.adamw import adamw_ref
from memfit.kernels.quant import dynamic_code
from memfit.kernels.wquant import (
    NF4_CODE,
    NF4_MIDPOINTS,
    adamw_int8_sr,
    adamw_int8_sr_ref,
    dequantize_int4_group,
    dequantize_int4_group_ref,
    dequantize_int8_group,
    dequantize_int8_group_ref,
    dequantize_nf4,
    dequantize_nf4_ref,
    double_dequantize_ref,
    double_quantize_ref,
    matmul_int8w,
    matmul_int8w_ref,
    matmul_nf4w,
    matmul_nf4w_ref,
    quantize_int4_group,
    quantize_int4_group_ref,
    quantize_int8_group,
    quantize_int8_group_ref,
    quantize_int8_group_sr,
    quantize_int8_group_sr_ref,
    quantize_nf4,
    quantize_nf4_ref,
    requantize_int8_sr,
    requantize_int8_sr_ref,
    sr_uniform,
    sr_uniform_ref,
)

wquant_module = importlib.import_module("memfit.kernels.wquant")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, group): odd numbers of groups (15, 21, 63, 15) and a single whole-tensor group.
CASES = [((5, 192), 64), ((3, 112), 16), ((7, 9, 16), 16), ((3, 1280), 256), ((1, 4096), 4096)]
CASE_IDS = ["5x192_g64", "3x112_g16", "7x9x16_g16", "3x1280_g256", "1x4096_g4096"]
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


def _weights(shape, dtype, seed, group=None):
    """randn with a spread of magnitudes across groups; the second group all zeros when there is one."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    flat = w.view(-1)
    if group is not None and flat.numel() >= 2 * group:
        flat[group: 2 * group] = 0
    return w.to(DEVICE, dtype)


def _per_element(scales, group, shape):
    return scales.repeat_interleave(group).view(shape)


def _hash_py(seed, i):
    """The hash of the module docstring in Python integers, as an independent check."""
    mask = 0xFFFFFFFF
    x = (i + (seed % 2**32) * 0x9E3779B9) & mask
    x ^= x >> 16
    x = (x * 0x7FEB352D) & mask
    x ^= x >> 15
    x = (x * 0x846CA68B) & mask
    x ^= x >> 16
    return (x >> 8) * 2.0**-24


# ---- the NF4 code book -----------------------------------------------------------------------------------


def test_nf4_code_book():
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert bool((NF4_CODE.diff() > 0).all())
    assert NF4_CODE[0].item() == -1.0 and NF4_CODE[7].item() == 0.0 and NF4_CODE[15].item() == 1.0
    assert NF4_CODE[1].item() == pytest.approx(-0.6961928009986877, abs=1e-7)
    assert NF4_CODE[8].item() == pytest.approx(0.07958029955625534, abs=1e-7)
    assert NF4_CODE[14].item() == pytest.approx(0.7229568362236023, abs=1e-7)
    assert torch.equal(NF4_MIDPOINTS, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2)


# ---- the stochastic-rounding hash --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 + 17, 2**32 - 1, -3, 2**40 + 5])
def test_sr_uniform_kernel_equals_reference_equals_python(seed):
    idx = torch.cat([torch.arange(3000), torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3])])
    u = sr_uniform(seed, idx.to(DEVICE))
    u_ref = sr_uniform_ref(seed, idx.to(DEVICE))
    assert u.dtype == torch.float32 and u.shape == idx.shape
    assert torch.equal(u, u_ref)
    picks = [0, 1, 2, 999, 2999, 3000, 3001, 3002, 3003, 3004, 3005]
    assert [u_ref[j].item() for j in picks] == [_hash_py(seed, int(idx[j])) for j in picks]
    assert torch.equal(sr_uniform(seed, idx.to(torch.int32).to(DEVICE)[:3000]), u[:3000])  # int32 indices too


def test_sr_uniform_is_uniform_and_seeded():
    idx = torch.arange(1 << 16, device=DEVICE)
    u = sr_uniform_ref(7, idx)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    counts = torch.histc(u.cpu(), bins=16, min=0.0, max=1.0)
    assert bool(((counts - 4096).abs() < 0.08 * 4096).all())
    other = sr_uniform_ref(8, idx)
    assert abs(float(torch.corrcoef(torch.stack([u, other]))[0, 1])) < 0.02
    assert torch.equal(sr_uniform_ref(7 + 2**32, idx), u)  # only seed mod 2**32 matters


# ---- INT8 groups -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "group"), CASES, ids=CASE_IDS)
def test_int8_kernel_matches_reference_exactly(shape, group, dtype):
    w = _weights(shape, dtype, seed=0, group=group)
    codes, scales = quantize_int8_group(w, group)
    codes_ref, scales_ref = quantize_int8_group_ref(w, group)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert scales.dtype == torch.float32 and scales.shape == (w.numel() // group,)
    assert torch.equal(codes, codes_ref) and torch.equal(scales, scales_ref)
    absmax = w.float().view(-1, group).abs().amax(dim=1)
    assert torch.equal(scales, absmax / torch.full_like(absmax, 127.0))
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    codes_sr, scales_sr = quantize_int8_group_sr(w, group, seed=11)
    codes_sr_ref, scales_sr_ref = quantize_int8_group_sr_ref(w, group, seed=11)
    assert torch.equal(codes_sr, codes_sr_ref) and torch.equal(scales_sr, scales)
    assert torch.equal(scales_sr_ref, scales)
    for out_dtype in DTYPES:
        out = dequantize_int8_group(codes, scales, group, out_dtype)
        assert out.shape == w.shape and out.dtype == out_dtype
        assert torch.equal(out, dequantize_int8_group_ref(codes, scales, group, out_dtype))


@pytest.mark.parametrize(("shape", "group"), CASES[:3], ids=CASE_IDS[:3])
def test_int8_round_trip_within_half_a_step(shape, group):
    w = _weights(shape, torch.float32, seed=1, group=group)
    codes, scales = quantize_int8_group(w, group)
    back = dequantize_int8_group(codes, scales, group)
    step = _per_element(scales, group, w.shape)
    # fp32 slack: y = x / scale and code * scale each round once (relative 2**-24 of up to 127 steps).
    assert bool(((back - w).abs() <= step * (0.5 + 2e-5)).all())
    assert bool((back.view(-1)[group: 2 * group] == 0).all())  # the zero group: scale 0, codes 0
    assert scales[1].item() == 0.0 and bool((codes.view(-1)[group: 2 * group] == 0).all())


@pytest.mark.parametrize("quantize", [quantize_int8_group, quantize_int8_group_ref], ids=["kernel", "ref"])
def test_int8_rounds_halves_up(quantize):
    # absmax 127 makes the scale exactly 1: floor(y + 0.5) sends k + 0.5 up, toward +inf.
    values = [127.0, -2.5, 2.5, -0.5, 0.5, 1.4999, -1.5001, -127.0] + [0.0] * 8
    codes, scales = quantize(torch.tensor(values, device=DEVICE), 16)
    assert scales.tolist() == [1.0]
    assert codes.tolist() == [127, -2, 3, 0, 1, 1, -2, -127] + [0] * 8


def test_int8_sr_is_unbiased_and_brackets_the_value():
    group, n_seeds = 64, 300
    w = _weights((4, 128), torch.float32, seed=2)
    _, scales = quantize_int8_group_ref(w, group)
    step = _per_element(scales, group, w.shape)
    y = w / step
    total = torch.zeros_like(w)
    for seed in range(n_seeds):
        codes, sr_scales = quantize_int8_group_sr_ref(w, group, seed)
        assert torch.equal(sr_scales, scales)
        c = codes.float()
        assert bool(((c == torch.floor(y)) | (c == torch.ceil(y))).all())
        total += c
    mean = total / n_seeds
    frac = y - torch.floor(y)
    # Per element, 5 standard deviations of a mean of n_seeds Bernoulli(frac) draws (plus fp32 slack).
    bound = 5 * torch.sqrt(frac * (1 - frac) / n_seeds) + 1e-4
    assert bool(((mean - y).abs() <= bound).all())
    assert abs(float((mean - y).mean())) < 0.01  # no bias over all 512 elements
    # Nearest rounding would be biased by up to half a step; SR's draws differ between seeds.
    assert float((mean - torch.floor(y + 0.5)).abs().max()) > 0.3
    assert not torch.equal(quantize_int8_group_sr(w, group, 1)[0], quantize_int8_group_sr(w, group, 2)[0])


@pytest.mark.parametrize("quantize", [quantize_int8_group_sr, quantize_int8_group_sr_ref], ids=["kernel", "ref"])
def test_int8_sr_rounds_up_only_when_u_is_strictly_below_the_fraction(quantize):
    # absmax 127 makes the scale exactly 1, so y = x; element i gets y = u_i (rounds down: u < u is false)
    # or y = u_i + 2**-24 (rounds up). u is a multiple of 2**-24 below 1, so both are exact in fp32.
    seed, n = 3, 64
    u = sr_uniform_ref(seed, torch.arange(n, device=DEVICE))
    for bump, want in ((0.0, 0), (2.0**-24, 1)):
        w = u + bump
        w[0] = 127.0
        codes, scales = quantize(w, n, seed)
        assert scales.tolist() == [1.0]
        assert codes[0].item() == 127 and bool((codes[1:] == want).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_requantize_int8_sr_kernel_matches_reference(dtype):
    w = _weights((3, 336), dtype, seed=3, group=16)  # 63 groups of 16
    codes, scales = torch.empty(w.numel(), dtype=torch.int8, device=DEVICE), torch.empty(63, device=DEVICE)
    codes_ref, scales_ref = torch.empty_like(codes), torch.empty_like(scales)
    requantize_int8_sr(w, codes, scales, 16, seed=-9)
    requantize_int8_sr_ref(w, codes_ref, scales_ref, 16, seed=-9)
    assert torch.equal(codes, codes_ref) and torch.equal(scales, scales_ref)
    want_codes, want_scales = quantize_int8_group_sr_ref(w, 16, -9)
    assert torch.equal(codes, want_codes.view(-1)) and torch.equal(scales, want_scales)


# ---- INT4 and NF4 groups -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "group"), CASES, ids=CASE_IDS)
def test_int4_and_nf4_kernels_match_reference_exactly(shape, group, dtype):
    w = _weights(shape, dtype, seed=4, group=group)
    for quantize, quantize_ref, dequantize, dequantize_ref in (
        (quantize_int4_group, quantize_int4_group_ref, dequantize_int4_group, dequantize_int4_group_ref),
        (quantize_nf4, quantize_nf4_ref, dequantize_nf4, dequantize_nf4_ref),
    ):
        packed, scales = quantize(w, group)
        packed_ref, scales_ref = quantize_ref(w, group)
        assert packed.dtype == torch.uint8 and packed.shape == (w.numel() // 2,)
        assert scales.dtype == torch.float32 and scales.shape == (w.numel() // group,)
        assert torch.equal(packed, packed_ref) and torch.equal(scales, scales_ref)
        for out_dtype in DTYPES:
            out = dequantize(packed, scales, group, w.shape, out_dtype)
            assert out.shape == w.shape and out.dtype == out_dtype
            assert torch.equal(out, dequantize_ref(packed, scales, group, w.shape, out_dtype))


@pytest.mark.parametrize("quantize", [quantize_int4_group, quantize_int4_group_ref], ids=["kernel", "ref"])
def test_int4_nibble_layout_and_rounding(quantize):
    # absmax 7: scale exactly 1. Codes 7, -7, 1, 0, 3 (2.5 rounds up), -2 (-2.5 up), -7 (clamped side), 0 ...
    values = [7.0, -7.0, 1.0, 0.0, 2.5, -2.5, -6.6, 0.4] + [0.0] * 8
    packed, scales = quantize(torch.tensor(values, device=DEVICE), 16)
    assert scales.tolist() == [1.0]
    nibbles = [c + 8 for c in (7, -7, 1, 0, 3, -2, -7, 0)] + [8] * 8
    assert packed.tolist() == [nibbles[2 * b] | nibbles[2 * b + 1] << 4 for b in range(8)]
    assert packed[0].item() == 0x1F and packed[1].item() == 0x89  # low nibble: even index


@pytest.mark.parametrize(("shape", "group"), CASES[:3], ids=CASE_IDS[:3])
def test_int4_round_trip_within_half_a_step(shape, group):
    w = _weights(shape, torch.float32, seed=5, group=group)
    packed, scales = quantize_int4_group(w, group)
    back = dequantize_int4_group(packed, scales, group, w.shape)
    step = _per_element(scales, group, w.shape)
    assert bool(((back - w).abs() <= step * (0.5 + 1e-5)).all())
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1)
    assert int(nibbles.min()) >= 1 and int(nibbles.max()) <= 15  # code + 8, code in [-7, 7]


@pytest.mark.parametrize(("shape", "group"), CASES[:3], ids=CASE_IDS[:3])
def test_nf4_round_trip_within_half_the_largest_gap(shape, group):
    w = _weights(shape, torch.float32, seed=6, group=group)
    packed, absmax = quantize_nf4(w, group)
    assert torch.equal(absmax, w.view(-1, group).abs().amax(dim=1))
    back = dequantize_nf4(packed, absmax, group, w.shape)
    half_gap = NF4_CODE.diff().max().item() / 2
    assert bool(((back - w).abs() <= (half_gap + 1e-6) * _per_element(absmax, group, w.shape)).all())
    # Nearest code: no other code value is closer to x / absmax.
    y = (w / _per_element(absmax, group, w.shape).clamp_min(1e-30)).view(-1, 1)
    got = (back / _per_element(absmax, group, w.shape).clamp_min(1e-30)).view(-1, 1)
    best = (y - NF4_CODE.to(DEVICE)[None, :]).abs().min(dim=1, keepdim=True).values
    assert bool(((y - got).abs() <= best + 1e-6).all())


@pytest.mark.parametrize("quantize", [quantize_nf4, quantize_nf4_ref], ids=["kernel", "ref"])
def test_nf4_codes_map_to_themselves_and_ties_go_to_the_lower_index(quantize):
    code, mids = NF4_CODE.to(DEVICE), NF4_MIDPOINTS.to(DEVICE)
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    x = torch.cat([torch.ones(1, device=DEVICE), code, mids, above, torch.zeros(17, device=DEVICE)])  # 64 values
    packed, absmax = quantize(x, 64)
    assert absmax.tolist() == [1.0]
    index = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1).long()
    assert torch.equal(index[1:17], torch.arange(16, device=DEVICE))
    assert torch.equal(index[17:32], torch.arange(15, device=DEVICE))  # on a midpoint: the lower index
    assert torch.equal(index[32:47], torch.arange(1, 16, device=DEVICE))  # one ulp above: the upper one
    assert bool((index[47:] == 7).all())  # 0.0 is code 7


@pytest.mark.parametrize("nb", [1, 255, 515])
def test_double_quantization_round_trip(nb):
    gen = torch.Generator().manual_seed(nb)
    absmax = (0.05 + torch.rand(nb, generator=gen)).to(DEVICE)
    q, absmax2, offset = double_quantize_ref(absmax)
    assert q.dtype == torch.uint8 and q.shape == (nb,)
    assert absmax2.dtype == torch.float32 and absmax2.shape == (math.ceil(nb / 256),)
    assert isinstance(offset, float) and offset == float(absmax.mean())
    back = double_dequantize_ref(q, absmax2, offset, nb)
    assert back.dtype == torch.float32 and back.shape == (nb,)
    half_gap = dynamic_code(True, 8).diff().max().item() / 2
    per_value = absmax2.repeat_interleave(256)[:nb]
    assert bool(((back - absmax).abs() <= (half_gap + 1e-6) * per_value + 1e-6).all())


def test_reference_chunks_give_the_same_result(monkeypatch):
    """The quantizer references work through _REF_CHUNK values at a time; chunk seams change nothing."""
    w = _weights((5, 192), torch.float32, seed=7, group=64)
    calls = [lambda: quantize_int8_group_ref(w, 64), lambda: quantize_int8_group_sr_ref(w, 64, 5),
             lambda: quantize_int4_group_ref(w, 64), lambda: quantize_nf4_ref(w, 64)]
    whole = [call() for call in calls]
    monkeypatch.setattr(wquant_module, "_REF_CHUNK", 128)
    for call, want in zip(calls, whole, strict=True):
        got = call()
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# ---- fused AdamW on INT8 weights -------------------------------------------------------------------------


def _assert_state_close(got, want):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("hyper", [HYPER, {**HYPER, "beta1": 0.3, "weight_decay": 0.0}], ids=["default", "beta1_0.3"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("shape", "group"), [((37, 64), 64), ((3, 1280), 256)], ids=["37x64_g64", "3x1280_g256"])
def test_adamw_int8_sr_kernel_matches_reference(shape, group, grad_dtype, hyper):
    gen = torch.Generator().manual_seed(8)
    codes, scales = quantize_int8_group_ref(torch.randn(shape, generator=gen).to(DEVICE), group)
    exp_avg = torch.zeros(shape, device=DEVICE)
    exp_avg_sq = torch.zeros(shape, device=DEVICE)
    differ = total = 0
    for step in range(1, 4):  # each step from the kernel's state, so the comparison is one step deep
        grad = torch.randn(shape, generator=gen).to(DEVICE, grad_dtype)
        ref = [t.clone() for t in (codes, scales, exp_avg, exp_avg_sq)]
        # What the reference must equal: plain AdamW on the dequantized weight, then SR of the result.
        p = dequantize_int8_group_ref(codes, scales, group)
        adamw_ref(p, grad, exp_avg.clone(), exp_avg_sq.clone(), step=step, **hyper)

        adamw_int8_sr(codes, scales, grad, exp_avg, exp_avg_sq, group=group, seed=100 + step, step=step, **hyper)
        adamw_int8_sr_ref(ref[0], ref[1], grad, ref[2], ref[3], group=group, seed=100 + step, step=step, **hyper)

        want_codes, want_scales = quantize_int8_group_sr_ref(p, group, 100 + step)
        assert torch.equal(ref[0], want_codes) and torch.equal(ref[1], want_scales)
        _assert_state_close(exp_avg, ref[2])
        _assert_state_close(exp_avg_sq, ref[3])
        torch.testing.assert_close(scales, ref[1], rtol=1e-6, atol=0)
        diff = codes.int() - ref[0].int()
        assert int(diff.abs().max()) <= 1  # an fp32 rounding of p moves a value across its threshold at most
        differ += int((diff != 0).sum())
        total += diff.numel()
        back = dequantize_int8_group(codes, scales, group)
        assert bool(((back - p).abs() <= _per_element(scales, group, shape) * (1 + 1e-4)).all())  # SR: < 1 step
    assert differ < 0.005 * total, f"{differ} of {total} codes differ"


def test_adamw_int8_sr_follows_fp32_adamw_where_nearest_rounding_would_stall():
    """Updates of a tenth of a quantization step: rounding each to nearest would leave every code where it
    is (a regression slope of ~0 against fp32 AdamW's displacement, measured); SR moves the INT8 weight by
    fp32 AdamW's displacement on average (slope ~1)."""
    group, shape = 64, (8, 64)
    hyper = {**HYPER, "lr": 2e-3, "weight_decay": 0.0}
    gen = torch.Generator().manual_seed(9)
    codes, scales = quantize_int8_group_ref(torch.randn(shape, generator=gen).to(DEVICE), group)
    start = dequantize_int8_group_ref(codes, scales, group)
    p = start.clone()
    m, v, m32, v32 = (torch.zeros(shape, device=DEVICE) for _ in range(4))
    direction = torch.randn(shape, generator=gen)  # a steady gradient per element, plus noise
    for step in range(1, 31):
        grad = (direction + 0.5 * torch.randn(shape, generator=gen)).to(DEVICE)
        adamw_int8_sr(codes, scales, grad, m, v, group=group, seed=step, step=step, **hyper)
        adamw_ref(p, grad, m32, v32, step=step, **hyper)
    moved_fp32 = p - start
    moved_int8 = dequantize_int8_group(codes, scales, group) - start
    assert float(moved_fp32.abs().mean() / scales.mean()) > 1.5  # fp32 AdamW moved about two steps
    slope = float((moved_int8 * moved_fp32).sum() / (moved_fp32 * moved_fp32).sum())
    assert 0.9 < slope < 1.1


# ---- weight-only-quantized matmuls -----------------------------------------------------------------------

# fp32: the kernel's IEEE fp32 dot differs from torch's only in summation order. bf16 / fp16: the kernel rounds
# the dequantized tile to x's dtype (see the module docstring), an error of up to one unit roundoff u of each
# product, so the bound scales with sum_k |x||w| rather than with the (possibly cancelling) output; both
# outputs are then rounded to x's dtype, up to an ulp apart.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _assert_matmul_close(out, ref, x, weight):
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        return
    u = UNIT_ROUNDOFF[x.dtype]
    magnitude = x.float().abs() @ weight.abs().T
    bound = 2 * u * magnitude + 2 * u * ref.float().abs() + 1e-6
    excess = (out.float() - ref.float()).abs() - bound
    assert float(excess.max()) <= 0, f"{int((excess > 0).sum())} of {excess.numel()} outside the bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "n", "k", "group"), [(5, 33, 128, 64), (17, 65, 96, 32), (1, 7, 64, 16)],
                         ids=["5x33x128_g64", "17x65x96_g32", "1x7x64_g16"])
def test_matmuls_match_reference(m, n, k, group, dtype):
    gen = torch.Generator().manual_seed(m * n)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    weight = _weights((n, k), torch.float32, seed=n, group=group)
    codes, scales = quantize_int8_group_ref(weight, group)
    out = matmul_int8w(x, codes, scales, group)
    ref = matmul_int8w_ref(x, codes, scales, group)
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.equal(ref, (x.float() @ dequantize_int8_group_ref(codes, scales, group).T).to(dtype))
    _assert_matmul_close(out, ref, x, dequantize_int8_group_ref(codes, scales, group))
    packed, absmax = quantize_nf4_ref(weight, group)
    out = matmul_nf4w(x, packed, absmax, group, n, k)
    ref = matmul_nf4w_ref(x, packed, absmax, group, n, k)
    assert out.shape == (m, n) and out.dtype == dtype
    assert torch.equal(ref, (x.float() @ dequantize_nf4_ref(packed, absmax, group, (n, k)).T).to(dtype))
    _assert_matmul_close(out, ref, x, dequantize_nf4_ref(packed, absmax, group, (n, k)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matmul_half_dtypes_on_gpu(dtype):
    """On a GPU bf16 takes the tensor-core path the interpreter cannot run (bf16 tiles, fp32 accumulation)."""
    x = torch.randn(70, 256, device="cuda", dtype=dtype)
    codes, scales = quantize_int8_group_ref(torch.randn(130, 256, device="cuda"), 128)
    _assert_matmul_close(matmul_int8w(x, codes, scales, 128), matmul_int8w_ref(x, codes, scales, 128), x,
                         dequantize_int8_group_ref(codes, scales, 128))


# ---- errors ----------------------------------------------------------------------------------------------

W = torch.randn(6, 64)


@pytest.mark.parametrize("quantize", [quantize_int8_group, quantize_int8_group_ref, quantize_int4_group,
                                      quantize_int4_group_ref, quantize_nf4, quantize_nf4_ref],
                         ids=["int8", "int8_ref", "int4", "int4_ref", "nf4", "nf4_ref"])
@pytest.mark.parametrize(("w", "group", "message"), [
    (torch.randn(300), 64, r"expected `(group|block)` dividing the number of elements of `w` \(300\), got 64; "
                           r"pick a power of two from 16 that divides 300"),
    (W, 48, r"expected `(group|block)` a power of two from 16 to 4096, got 48; use 64 or 128"),
    (W, 8, r"expected `(group|block)` a power of two from 16 to 4096, got 8"),
    (W, 8192, r"expected `(group|block)` a power of two from 16 to 4096, got 8192"),
    (W, True, r"expected `(group|block)` a power of two from 16 to 4096, got True"),
    (W.to(torch.int32), 64, r"expected `w` of dtype torch.float32 or torch.bfloat16 or torch.float16, got "
                            r"torch.int32; cast it to float32 first"),
    (W.t(), 64, r"expected contiguous `w`, got strides \(1, 64\)"),
    (torch.zeros(0), 64, r"expected `w` with at least one element"),
], ids=["not_dividing", "not_power_of_two", "too_small", "too_big", "bool", "dtype", "non_contiguous", "empty"])
def test_quantize_bad_input_raises(quantize, w, group, message):
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        quantize(w.to(DEVICE), group)


@pytest.mark.parametrize("quantize", [quantize_int8_group_sr, quantize_int8_group_sr_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("seed", [1.5, True, None])
def test_bad_seed_raises(quantize, seed):
    with pytest.raises(KernelError, match=r"expected `seed` an int, got \w+; pass a fresh int"):
        quantize(W.to(DEVICE), 64, seed)


@pytest.mark.parametrize("fn", [sr_uniform, sr_uniform_ref], ids=["kernel", "ref"])
def test_sr_uniform_bad_indices_raise(fn):
    with pytest.raises(KernelError, match=r"expected `idx` of dtype torch.int32 or torch.int64, got torch.float32"):
        fn(0, torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("dequantize", [dequantize_int8_group, dequantize_int8_group_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"codes": torch.zeros(6, 64, dtype=torch.uint8)}, r"expected `codes` of dtype torch.int8, got torch.uint8"),
    ({"scales": torch.ones(5)}, r"expected `scales` of shape \(6,\), one value per group, got \(5,\)"),
    ({"scales": torch.ones(6, dtype=torch.float16)}, r"expected `scales` of dtype torch.float32, got torch.float16"),
    ({"group": 256}, r"expected `group` dividing the number of elements of `codes` \(384\), got 256"),
    ({"dtype": torch.int8}, r"expected `dtype` float32, bfloat16 or float16, got torch.int8"),
    ({"scales": torch.ones(6, device="meta")}, r"expected `scales` on the device of `codes` \(\w+\), got meta"),
], ids=["codes_dtype", "scales_shape", "scales_dtype", "group", "dtype", "device"])
def test_dequantize_int8_bad_input_raises(dequantize, overrides, message):
    args = {"codes": torch.zeros(6, 64, dtype=torch.int8), "scales": torch.ones(6), "group": 64,
            "dtype": torch.float32}
    args.update(overrides)
    args = {key: value.to(DEVICE) if isinstance(value, torch.Tensor) and value.device.type != "meta" else value
            for key, value in args.items()}
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        dequantize(**args)


@pytest.mark.parametrize("dequantize", [dequantize_int4_group, dequantize_int4_group_ref, dequantize_nf4,
                                        dequantize_nf4_ref], ids=["int4", "int4_ref", "nf4", "nf4_ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"packed": torch.zeros(192, dtype=torch.int8)}, r"expected `packed` of dtype torch.uint8, got torch.int8"),
    ({"shape": (7, 7)}, r"expected `shape` of 384 elements, got \(7, 7\)"),
    ({"scales": torch.ones(7)}, r"expected `(scales|absmax)` of shape \(6,\), one value per group, got \(7,\)"),
    ({"group": 100}, r"expected `(group|block)` a power of two from 16 to 4096, got 100"),
], ids=["packed_dtype", "shape", "scales_shape", "group"])
def test_dequantize_4bit_bad_input_raises(dequantize, overrides, message):
    args = {"packed": torch.zeros(192, dtype=torch.uint8), "scales": torch.ones(6), "group": 64, "shape": (6, 64)}
    args.update(overrides)
    packed, scales, group, shape = (args[key] for key in ("packed", "scales", "group", "shape"))
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        dequantize(packed.to(DEVICE), scales.to(DEVICE), group, shape)


def _requantize_args(**overrides):
    args = {"w_fp32": W, "codes_out": torch.zeros(384, dtype=torch.int8), "scales_out": torch.zeros(6),
            "group": 64, "seed": 0}
    args.update(overrides)
    return {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}


@pytest.mark.parametrize("requantize", [requantize_int8_sr, requantize_int8_sr_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"codes_out": torch.zeros(383, dtype=torch.int8)}, r"expected `codes_out` of 384 elements, as many as `w_fp32`"),
    ({"codes_out": torch.zeros(384, dtype=torch.uint8)}, r"expected `codes_out` of dtype torch.int8"),
    ({"scales_out": torch.zeros(3)}, r"expected `scales_out` of shape \(6,\), one value per group, got \(3,\)"),
    ({"group": 128 + 64}, r"expected `group` a power of two from 16 to 4096, got 192"),
    ({"w_fp32": torch.zeros(6, 64, dtype=torch.float64)}, r"expected `w_fp32` of dtype torch.float32"),
], ids=["codes_numel", "codes_dtype", "scales_shape", "group", "w_dtype"])
def test_requantize_bad_input_raises(requantize, overrides, message):
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        requantize(**_requantize_args(**overrides))


def _adamw_args(**overrides):
    args = {"codes": torch.zeros(6, 64, dtype=torch.int8), "scales": torch.ones(6), "grad": torch.zeros(6, 64),
            "exp_avg": torch.zeros(6, 64), "exp_avg_sq": torch.zeros(6, 64), "group": 64, "seed": 0, "step": 1,
            **HYPER}
    args.update(overrides)
    return {key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for key, value in args.items()}


@pytest.mark.parametrize("adamw", [adamw_int8_sr, adamw_int8_sr_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"grad": torch.zeros(64, 6)}, r"expected `grad` of the shape of `codes` \(6, 64\), got \(64, 6\)"),
    ({"grad": torch.zeros(6, 64, dtype=torch.float64)}, r"expected `grad` of dtype torch.float32 or"),
    ({"exp_avg_sq": torch.zeros(6, 64, dtype=torch.bfloat16)}, r"expected `exp_avg_sq` of dtype torch.float32"),
    ({"codes": torch.zeros(6, 64)}, r"expected `codes` of dtype torch.int8, got torch.float32"),
    ({"scales": torch.ones(12)}, r"expected `scales` of shape \(6,\), one value per group, got \(12,\)"),
    ({"group": 100}, r"expected `group` a power of two from 16 to 4096, got 100"),
    ({"step": 0}, r"expected `step` an int >= 1 \(the count after this update\), got 0"),
    ({"seed": 2.0}, r"expected `seed` an int, got float"),
], ids=["grad_shape", "grad_dtype", "state_dtype", "codes_dtype", "scales_shape", "group", "step", "seed"])
def test_adamw_int8_sr_bad_input_raises(adamw, overrides, message):
    args = _adamw_args(**overrides)
    codes, scales, grad, exp_avg, exp_avg_sq = (args.pop(key) for key in ("codes", "scales", "grad", "exp_avg",
                                                                          "exp_avg_sq"))
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        adamw(codes, scales, grad, exp_avg, exp_avg_sq, **args)


@pytest.mark.parametrize("matmul", [matmul_int8w, matmul_int8w_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"x": torch.zeros(5, 96)}, r"expected `codes` of shape \[N, 96\] \(K = x.shape\[1\]\), got \(33, 128\)"),
    ({"x": torch.zeros(2, 5, 128)}, r"expected `x` of 2 dimensions \[M, K\], got \(2, 5, 128\)"),
    ({"x": torch.zeros(5, 128, dtype=torch.float64)}, r"expected `x` of dtype torch.float32 or"),
    ({"group": 256}, r"expected `group` dividing K = x.shape\[1\] \(128\), got 256"),
    ({"scales": torch.ones(33)}, r"expected `scales` of shape \(66,\), one value per group, got \(33,\)"),
], ids=["k_mismatch", "x_dims", "x_dtype", "group", "scales_shape"])
def test_matmul_int8w_bad_input_raises(matmul, overrides, message):
    args = {"x": torch.zeros(5, 128), "codes": torch.zeros(33, 128, dtype=torch.int8), "scales": torch.ones(66),
            "group": 64}
    args.update(overrides)
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        matmul(args["x"].to(DEVICE), args["codes"].to(DEVICE), args["scales"].to(DEVICE), args["group"])


@pytest.mark.parametrize("matmul", [matmul_nf4w, matmul_nf4w_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), [
    ({"packed": torch.zeros(2000, dtype=torch.uint8)}, r"expected `packed` of 2112 bytes \(two codes per byte\), "
                                                       r"got 2000"),
    ({"k": 96}, r"expected `k` equal to x.shape\[1\] \(128\), got 96"),
    ({"n": 0}, r"expected `n` an int >= 1, got 0"),
    ({"block": 48}, r"expected `block` a power of two from 16 to 4096, got 48"),
    ({"absmax": torch.ones(33)}, r"expected `absmax` of shape \(66,\), one value per group, got \(33,\)"),
], ids=["packed_size", "k", "n", "block", "absmax_shape"])
def test_matmul_nf4w_bad_input_raises(matmul, overrides, message):
    args = {"x": torch.zeros(5, 128), "packed": torch.zeros(33 * 64, dtype=torch.uint8), "absmax": torch.ones(66),
            "block": 64, "n": 33, "k": 128}
    args.update(overrides)
    with pytest.raises(KernelError, match=r"memfit\.kernels\.wquant: " + message):
        matmul(args["x"].to(DEVICE), args["packed"].to(DEVICE), args["absmax"].to(DEVICE), args["block"], args["n"],
               args["k"])


def test_double_quantize_bad_input_raises():
    with pytest.raises(KernelError, match=r"expected `absmax` of dtype torch.float32, got torch.float16"):
        double_quantize_ref(torch.ones(4, dtype=torch.float16, device=DEVICE))
    q, absmax2, offset = double_quantize_ref(torch.rand(10, device=DEVICE))
    with pytest.raises(KernelError, match=r"expected `q` of 11 elements, one per NF4 block, got 10"):
        double_dequantize_ref(q, absmax2, offset, 11)


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(wquant_module, "triton", None)
    with pytest.raises(KernelError, match=r"expected triton to be importable, got ImportError; install triton, or "
                                          r"use quantize_int8_group_ref"):
        quantize_int8_group(W, 64)


def _placeholder_kernel(x):
    pass


@pytest.mark.parametrize("name", ["_quantize_int8_kernel", "_dequantize_int8_kernel", "_sr_uniform_kernel",
                                  "_quantize_4bit_kernel", "_dequantize_4bit_kernel", "_adamw_int8_sr_kernel",
                                  "_matmul_qw_kernel"])
def test_cpu_tensors_without_interpreter_raise(monkeypatch, name):
    monkeypatch.setattr(wquant_module, name, triton.runtime.JITFunction(_placeholder_kernel))
    codes, scales = torch.zeros(6, 64, dtype=torch.int8), torch.ones(6)
    packed = torch.zeros(192, dtype=torch.uint8)
    calls = {
        "_quantize_int8_kernel": lambda: quantize_int8_group_sr(W, 64, 0),
        "_dequantize_int8_kernel": lambda: dequantize_int8_group(codes, scales, 64),
        "_sr_uniform_kernel": lambda: sr_uniform(0, torch.arange(4)),
        "_quantize_4bit_kernel": lambda: quantize_nf4(W),
        "_dequantize_4bit_kernel": lambda: dequantize_int4_group(packed, scales, 64, (6, 64)),
        "_adamw_int8_sr_kernel": lambda: adamw_int8_sr(**_adamw_args(codes=codes, scales=scales)),
        "_matmul_qw_kernel": lambda: matmul_int8w(torch.zeros(5, 64), codes, scales, 64),
    }
    with pytest.raises(KernelError, match=r"expected tensors on a GPU, got cpu; set TRITON_INTERPRET=1"):
        calls[name]()
