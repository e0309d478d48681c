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
