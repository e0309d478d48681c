"""memfit.kernels.lowrank: kernel == reference to matmul rounding, both sides, exact no-decay, every error."""

import importlib

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.errors import KernelError
from memfit.kernels.lowrank import lowrank_apply, lowrank_apply_ref

lowrank_module = importlib.import_module("memfit.kernels.lowrank")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(37, 53, 5), (64, 16, 1), (1, 130, 1), (130, 70, 40), (1, 1, 1)]  # (m, n, r)
HYPER = {"lr": 1e-2, "weight_decay": 0.1, "scale": 0.25}

# fp32: kernel and torch's addmm sum the r products in different orders (and the kernel adds the
# decayed param with one fma), so they differ by a few ulps of the product; atol scales with the
# update. bf16: both round the same fp32 value once, so at most one bf16 ulp (2**-7 relative) apart.
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5},
}


def _make_inputs(m, n, r, side, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    proj = torch.randn(m if side == "left" else n, r, generator=gen).to(DEVICE)
    update = torch.randn(*((r, n) if side == "left" else (m, r)), generator=gen).to(DEVICE)
    return param, proj, update


def _product(proj, update, side):
    """The back-projected update in float64 (ground truth)."""
    return proj.double() @ update.double() if side == "left" else update.double() @ proj.double().t()


def _assert_close(got, want, product, lr, scale):
    tol = TOLERANCES[got.dtype]
    atol = tol["atol"] + 1e-6 * lr * scale * product.abs().max().item()
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "r"), SHAPES, ids=str)
def test_kernel_matches_reference(m, n, r, side, dtype):
    param, proj, update = _make_inputs(m, n, r, side, dtype, seed=0)
    ref = param.clone()
    lowrank_apply(param, proj, update, side=side, **HYPER)
    lowrank_apply_ref(ref, proj, update, side=side, **HYPER)
    _assert_close(param, ref, _product(proj, update, side), HYPER["lr"], HYPER["scale"])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("fn", [lowrank_apply, lowrank_apply_ref], ids=["kernel", "ref"])
def test_matches_float64_formula(fn, side):
    """fp32 accumulation, not TF32: within fp32 rounding of the exact update (r = 70 crosses two k-tiles)."""
    param, proj, update = _make_inputs(45, 67, 70, side, torch.float32, seed=1)
    want = param.double() * (1 - 0.02 * 0.1) - 0.02 * 0.5 * _product(proj, update, side)
    fn(param, proj, update, lr=0.02, weight_decay=0.1, scale=0.5, side=side)
    torch.testing.assert_close(param.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("fn", [lowrank_apply, lowrank_apply_ref], ids=["kernel", "ref"])
def test_no_weight_decay_leaves_the_param_bits(fn, dtype):
    """weight_decay=0: the decay factor is exactly 1 (no 1 - lr * 0 rounding), so a zero update is a no-op."""
    param, proj, _ = _make_inputs(37, 53, 5, "left", dtype, seed=2)
    before = param.clone()
    fn(param, proj, torch.zeros(5, 53, device=DEVICE), lr=0.1, weight_decay=0.0, scale=0.25, side="left")
    assert torch.equal(param, before)


@pytest.mark.parametrize("fn", [lowrank_apply, lowrank_apply_ref], ids=["kernel", "ref"])
def test_zero_update_applies_decay_only(fn):
    param, proj, _ = _make_inputs(37, 53, 5, "right", torch.float32, seed=3)
    want = param * (1 - 0.1 * 0.5)
    fn(param, proj, torch.zeros(37, 5, device=DEVICE), lr=0.1, weight_decay=0.5, scale=0.25, side="right")
    assert torch.equal(param, want)


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 80),
    n=st.integers(1, 80),
    r=st.integers(1, 20),
    side=st.sampled_from(["left", "right"]),
    dtype=st.sampled_from(list(TOLERANCES)),
    lr=st.floats(1e-5, 1e-1),
    weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
    scale=st.sampled_from([0.25, 1.0]) | st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_property(m, n, r, side, dtype, lr, weight_decay, scale, seed):
    param, proj, update = _make_inputs(m, n, r, side, dtype, seed)
    ref = param.clone()
    hyper = {"lr": lr, "weight_decay": weight_decay, "scale": scale, "side": side}
    lowrank_apply(param, proj, update, **hyper)
    lowrank_apply_ref(ref, proj, update, **hyper)
    _assert_close(param, ref, _product(proj, update, side), lr, scale)


# ---- errors ---------------------------------------------------------------------------------------------


def _call(fn=lowrank_apply, **overrides):
    args = {"param": torch.zeros(6, 8, device=DEVICE), "proj": torch.zeros(6, 2, device=DEVICE),
            "update": torch.zeros(2, 8, device=DEVICE), **HYPER, "side": "left"}
    args.update(overrides)
    fn(args.pop("param"), args.pop("proj"), args.pop("update"), **args)


BAD_INPUTS = [
    ({"param": torch.zeros(8, 6).t()}, r"expected contiguous `param`, got strides \(1, 6\) for shape \(6, 8\); "
                                       r"call \.contiguous\(\) first"),
    ({"param": torch.zeros(6, 8, dtype=torch.float64)}, r"expected `param` of dtype torch.float32 or "
                                                        r"torch.bfloat16 or torch.float16, got torch.float64"),
    ({"proj": torch.zeros(6, 2, dtype=torch.bfloat16)}, r"expected `proj` of dtype torch.float32, got "
                                                        r"torch.bfloat16; keep the projection in float32"),
    ({"update": torch.zeros(8, 2).t()}, r"expected contiguous `update`"),
    ({"param": torch.zeros(48)}, r"expected a 2-D `param`, got \(48,\); reshape it to a matrix first"),
    ({"proj": torch.zeros(8, 2)}, r"expected `proj` of shape \(6, 2\) for side='left' and `param` \(6, 8\), "
                                  r"got \(8, 2\)"),
    ({"update": torch.zeros(3, 8)}, r"expected `update` of shape \(2, 8\) for side='left', `param` \(6, 8\) and "
                                    r"rank 2, got \(3, 8\)"),
    ({"side": "right"}, r"expected `proj` of shape \(8, 2\) for side='right' and `param` \(6, 8\), got \(6, 2\)"),
    ({"side": "top"}, r"expected `side` 'left' or 'right', got 'top'"),
    ({"update": torch.zeros(2, 0)}, r"expected `update` with at least one element, got \(2, 0\)"),
    ({"update": torch.zeros(2, 8, device="meta")}, r"expected `update` on the device of `param` \(\w+\), got meta"),
]


@pytest.mark.parametrize("fn", [lowrank_apply, lowrank_apply_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[
    "non_contiguous", "param_dtype", "proj_dtype", "update_non_contiguous", "param_1d", "proj_shape",
    "update_shape", "wrong_side", "bad_side", "empty", "device"])
def test_bad_input_raises(fn, overrides, message):
    with pytest.raises(KernelError, match=r"memfit\.kernels\.lowrank: " + message):
        _call(fn, **overrides)


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(lowrank_module, "triton", None)
    with pytest.raises(KernelError, match=r"expected triton to be importable, got ImportError; install triton, or "
                                          r"use lowrank_apply_ref"):
        _call()


def _placeholder_kernel(x):
    pass


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(lowrank_module, "_lowrank_apply_kernel", triton.runtime.JITFunction(_placeholder_kernel))
    with pytest.raises(KernelError, match=r"expected tensors on a GPU, got cpu; set TRITON_INTERPRET=1"):
        lowrank_apply(torch.zeros(6, 8), torch.zeros(6, 2), torch.zeros(2, 8), side="left", **HYPER)


# ---- on INT8 group codes with stochastic rounding (lowrank_apply_int8_sr) --------------------------------

from memfit.kernels.lowrank import (  # noqa: E402
    lowrank_apply_int8_sr,
    lowrank_apply_int8_sr_ref,
    lowrank_int8_workspace,
)
from memfit.kernels.wquant import dequantize_int8_group_ref, quantize_int8_group_ref  # noqa: E402

# (m, n, r, group): group | n and <= 512 runs one pass, the rest two passes (groups straddling rows)
INT8_SHAPES = [(48, 256, 4, 128), (40, 96, 5, 32), (37, 80, 7, 16), (16, 688, 3, 128), (32, 72, 1, 64),
               (3, 48, 2, 16), (5, 1024, 9, 1024)]


def _int8_inputs(m, n, r, group, side, dyadic, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        if dyadic:  # multiples of 1/8 in [-1, 1]: every product and sum of the rank-r product is exact in fp32
            return torch.randint(-8, 9, shape, generator=gen).float() / 8
        return torch.randn(*shape, generator=gen)

    codes, scales = quantize_int8_group_ref(torch.randn(m, n, generator=gen), group)
    proj = draw(m if side == "left" else n, r)
    update = draw(*((r, n) if side == "left" else (m, r)))
    return codes.to(DEVICE), scales.to(DEVICE), proj.to(DEVICE), update.to(DEVICE)


def _int8_both(m, n, r, group, side, dyadic, **hyper):
    codes, scales, proj, update = _int8_inputs(m, n, r, group, side, dyadic)
    kernel, ref = (codes.clone(), scales.clone()), (codes.clone(), scales.clone())
    args = {"group": group, "seed": 20261201, "side": side, **hyper}
    lowrank_apply_int8_sr(*kernel, proj, update, **args)
    lowrank_apply_int8_sr_ref(*ref, proj, update, **args)
    return (codes, scales), kernel, ref


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "r", "group"), INT8_SHAPES, ids=str)
def test_int8_sr_kernel_equals_reference_bit_for_bit_on_exact_products(m, n, r, group, side):
    # lr * scale = 1/8 and a decay of 3/4: every term is exact, so both round the same fp32 p once
    before, kernel, ref = _int8_both(m, n, r, group, side, dyadic=True, lr=0.5, weight_decay=0.5, scale=0.25)
    assert torch.equal(kernel[0], ref[0])
    assert torch.equal(kernel[1], ref[1])
    assert (kernel[0] != before[0]).float().mean() > 0.5  # the step moved most codes: the test sees it


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("m", "n", "r", "group"), INT8_SHAPES[:5], ids=str)
def test_int8_sr_kernel_matches_reference_within_one_code(m, n, r, group, side):
    _, kernel, ref = _int8_both(m, n, r, group, side, dyadic=False, lr=1e-2, weight_decay=0.1, scale=0.25)
    torch.testing.assert_close(kernel[1], ref[1], rtol=1e-5, atol=0)
    diff = (kernel[0].int() - ref[0].int()).abs()
    assert diff.max() <= 1
    assert diff.float().mean() < 0.01
    want = dequantize_int8_group_ref(*ref, group)
    got = dequantize_int8_group_ref(*kernel, group)
    torch.testing.assert_close(got, want, rtol=0, atol=1.01 * ref[1].max().item())


def test_int8_sr_is_unbiased_around_the_fp32_update():
    # many seeds of one step: the mean of the dequantized result approaches the fp32 step's weight
    m, n, r, group = 16, 64, 2, 32
    codes, scales, proj, update = _int8_inputs(m, n, r, group, "left", dyadic=False)
    exact = dequantize_int8_group_ref(codes, scales, group)
    lowrank_apply_ref(exact, proj, update, lr=0.05, weight_decay=0.0, scale=1.0, side="left")
    total = torch.zeros_like(exact)
    for seed in range(64):
        c, s = codes.clone(), scales.clone()
        lowrank_apply_int8_sr(c, s, proj, update, group=group, seed=seed, lr=0.05, weight_decay=0.0, scale=1.0,
                              side="left")
        total += dequantize_int8_group_ref(c, s, group)
    step = scales.max().item()
    assert (total / 64 - exact).abs().mean() < 0.1 * step  # one sample is off by up to a whole step


def test_int8_workspace_is_zero_in_one_pass_and_the_absmax_in_two():
    assert lowrank_int8_workspace((48, 256), 128) == 0
    assert lowrank_int8_workspace((16, 688), 128) == 4 * 16 * 688 // 128
    assert lowrank_int8_workspace((4, 2048), 1024) == 4 * 8  # past 512 a one-pass tile is too wide


def _call_int8(fn=lowrank_apply_int8_sr, **overrides):
    args = {"codes": torch.zeros(6, 32, dtype=torch.int8, device=DEVICE),
            "scales": torch.ones(12, device=DEVICE), "proj": torch.zeros(6, 2, device=DEVICE),
            "update": torch.zeros(2, 32, device=DEVICE), "group": 16, "seed": 0, **HYPER, "side": "left"}
    args.update(overrides)
    fn(args.pop("codes"), args.pop("scales"), args.pop("proj"), args.pop("update"), **args)


BAD_INT8_INPUTS = [
    ({"codes": torch.zeros(6, 32)}, r"memfit\.kernels\.lowrank: expected `codes` of dtype torch\.int8, got "
                                    r"torch\.float32; pass the int8 codes of the weight"),
    ({"group": 24}, r"expected `group` a power of two from 16 to 4096, got 24"),
    ({"group": 128}, r"expected `group` dividing the number of elements of `codes` \(192\), got 128"),
    ({"scales": torch.ones(6)}, r"expected `scales` of shape \(12,\), one value per group, got \(6,\)"),
    ({"seed": 1.5}, r"expected `seed` an int, got float"),
    ({"proj": torch.zeros(32, 2)}, r"expected `proj` of shape \(6, 2\) for side='left' and `codes` \(6, 32\)"),
]


@pytest.mark.parametrize("fn", [lowrank_apply_int8_sr, lowrank_apply_int8_sr_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize(("overrides", "message"), BAD_INT8_INPUTS,
                         ids=["codes_dtype", "group_power", "group_divides", "scales_shape", "seed", "proj_shape"])
def test_int8_bad_input_raises_and_changes_nothing(fn, overrides, message):
    codes = torch.arange(192, dtype=torch.int8).reshape(6, 32) if "codes" not in overrides else None
    if codes is not None:
        overrides = {**overrides, "codes": codes}
    before = None if codes is None else codes.clone()
    with pytest.raises(KernelError, match=message):
        _call_int8(fn, **overrides)
    if before is not None:
        assert torch.equal(codes, before)
