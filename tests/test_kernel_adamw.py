"""memfit.kernels.adamw: kernel == reference, reference == torch.optim.AdamW, every documented error."""

import importlib

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.errors import KernelError
from memfit.kernels.adamw import adamw, adamw_ref

# `memfit.kernels.adamw` the attribute is the re-exported function; the module lives in sys.modules.
adamw_module = importlib.import_module("memfit.kernels.adamw")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1,), (5, 123, 123), (4096,), (3, 7), (1, 1), (2, 1000)]

# Param tolerances per dtype. fp32: the kernel takes IEEE sqrt where torch's vectorized CPU sqrt is
# off by an ulp on some inputs, so params differ by at most an ulp of the update. bf16/fp16: both
# sides round the same fp32 value once, so they differ by at most one ulp of the stored dtype
# (2**-7 relative for bf16, 2**-10 for fp16) when the fp32 values straddle a rounding boundary.
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}
# exp_avg / exp_avg_sq are float32 whatever the param dtype; atol scales with the largest state value.
STATE_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2}


def _make_inputs(shape, dtype, seed, grad_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(shape, generator=gen).to(DEVICE, grad_dtype or dtype)
    exp_avg = (0.1 * torch.randn(shape, generator=gen)).to(DEVICE)
    exp_avg_sq = (0.01 * torch.rand(shape, generator=gen) + 1e-4).to(DEVICE)
    return param, grad, exp_avg, exp_avg_sq


def _clone(*tensors):
    return tuple(t.clone() for t in tensors)


def _assert_step_close(got, want, before, dtype):
    """Compare (param, exp_avg, exp_avg_sq); param slack grows with the size of the update."""
    update = (want[0].float() - before.float()).abs().max().item()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=tol["rtol"], atol=tol["atol"] + 1e-6 * update)
    for got_state, want_state in zip(got[1:], want[1:], strict=True):
        _assert_state_close(got_state, want_state)


def _assert_state_close(got, want):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=STATE_TOLERANCE["rtol"], atol=STATE_TOLERANCE["atol"] * scale)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    param, _, exp_avg, exp_avg_sq = _make_inputs(shape, dtype, seed=0)
    gen = torch.Generator().manual_seed(1)
    exp_avg.zero_()
    exp_avg_sq.zero_()
    ref = _clone(param, exp_avg, exp_avg_sq)
    for step in range(1, 4):  # step 1 from zero state exercises the largest bias correction
        before = param.clone()
        grad = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        adamw(param, grad, exp_avg, exp_avg_sq, step=step, **HYPER)
        adamw_ref(ref[0], grad, ref[1], ref[2], step=step, **HYPER)
        _assert_step_close((param, exp_avg, exp_avg_sq), ref, before, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_grad_with_low_precision_param(dtype):
    param, grad, exp_avg, exp_avg_sq = _make_inputs((5, 123, 123), dtype, seed=1, grad_dtype=torch.float32)
    before = param.clone()
    ref = _clone(param, exp_avg, exp_avg_sq)
    adamw(param, grad, exp_avg, exp_avg_sq, step=7, grad_scale=0.25, **HYPER)
    adamw_ref(ref[0], grad, ref[1], ref[2], step=7, grad_scale=0.25, **HYPER)
    _assert_step_close((param, exp_avg, exp_avg_sq), ref, before, dtype)


def _run_torch_and(update, *, shape, beta1, weight_decay, maximize, steps=20):
    """Run torch.optim.AdamW(foreach=False) and `update` side by side; yield both states per step."""
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(shape, generator=gen)
    torch_param = torch.nn.Parameter(init.clone().to(DEVICE))
    optimizer = torch.optim.AdamW([torch_param], lr=1e-2, betas=(beta1, 0.999), eps=1e-8,
                                  weight_decay=weight_decay, maximize=maximize, foreach=False)
    param = init.clone().to(DEVICE)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, steps + 1):
        grad = torch.randn(init.shape, generator=gen).to(DEVICE)
        torch_param.grad = grad.clone()
        optimizer.step()
        update(param, grad, exp_avg, exp_avg_sq, lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8,
               weight_decay=weight_decay, step=step, maximize=maximize)
        state = optimizer.state[torch_param]
        yield (param, exp_avg, exp_avg_sq), (torch_param.detach(), state["exp_avg"], state["exp_avg_sq"])


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("beta1", [0.9, 0.3])  # 1 - 0.3 >= 0.5 takes torch's other lerp formula
def test_reference_bit_identical_to_torch_optim(beta1, weight_decay, maximize):
    # (5, 123, 123) crosses torch's CPU thread chunks and vector tails, where rounding paths differ.
    runs = _run_torch_and(adamw_ref, shape=(5, 123, 123), beta1=beta1, weight_decay=weight_decay, maximize=maximize)
    for ours, theirs in runs:
        for got, want in zip(ours, theirs, strict=True):
            assert torch.equal(got, want)


def test_kernel_tracks_torch_optim_over_20_steps():
    # A smaller odd shape: the interpreter costs ~2 ms per 1024-element program.
    for ours, theirs in _run_torch_and(adamw, shape=(37, 129), beta1=0.9, weight_decay=1e-2, maximize=False):
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-6)
        _assert_state_close(ours[1], theirs[1])
        _assert_state_close(ours[2], theirs[2])


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(list(TOLERANCES)),
    lr=st.floats(1e-5, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    eps=st.floats(1e-10, 1e-4),
    weight_decay=st.sampled_from([0.0, 1e-4, 1e-2, 0.1]),
    step=st.integers(1, 10_000),
    grad_scale=st.sampled_from([1.0, 0.5, 2.0**-10]) | st.floats(1e-3, 1e3),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_property(shape, dtype, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                                           maximize, seed):
    param, grad, exp_avg, exp_avg_sq = _make_inputs(shape, dtype, seed)
    before = param.clone()
    ref = _clone(param, exp_avg, exp_avg_sq)
    hyper = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "step": step,
             "grad_scale": grad_scale, "maximize": maximize}
    adamw(param, grad, exp_avg, exp_avg_sq, **hyper)
    adamw_ref(ref[0], grad, ref[1], ref[2], **hyper)
    _assert_step_close((param, exp_avg, exp_avg_sq), ref, before, dtype)


# ---- errors ---------------------------------------------------------------------------------


def _call(**overrides):
    tensors = dict(zip(("param", "grad", "exp_avg", "exp_avg_sq"), _make_inputs((6, 8), torch.float32, 0),
                       strict=True))
    hyper = {**HYPER, "step": 1}
    for key, value in overrides.items():
        (tensors if key in tensors else hyper)[key] = value
    adamw(tensors["param"], tensors["grad"], tensors["exp_avg"], tensors["exp_avg_sq"], **hyper)


@pytest.mark.parametrize("name", ["param", "grad", "exp_avg", "exp_avg_sq"])
def test_non_contiguous_raises(name):
    transposed = torch.zeros(8, 6, device=DEVICE).t()
    with pytest.raises(KernelError, match=rf"memfit\.kernels\.adamw: expected contiguous `{name}`, got strides "
                                          r"\(1, 6\) for shape \(6, 8\); call \.contiguous\(\) first"):
        _call(**{name: transposed})


@pytest.mark.parametrize("name", ["grad", "exp_avg", "exp_avg_sq"])
def test_mismatched_shape_raises(name):
    with pytest.raises(KernelError, match=rf"expected `{name}` of the same shape as `param` \(6, 8\), got \(8, 6\)"):
        _call(**{name: torch.zeros(8, 6, device=DEVICE)})


def test_empty_param_raises():
    empty = torch.zeros(0, device=DEVICE)
    with pytest.raises(KernelError, match=r"expected `param` with at least one element, got \(0,\)"):
        _call(param=empty, grad=empty, exp_avg=empty, exp_avg_sq=empty)


def test_other_device_raises():
    with pytest.raises(KernelError, match=r"expected `exp_avg` on the device of `param`"):
        _call(exp_avg=torch.zeros(6, 8, device="meta"))


def test_non_tensor_raises():
    with pytest.raises(KernelError, match=r"expected `grad` to be a torch.Tensor, got list"):
        _call(grad=[0.0])


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_state_dtype_raises(name):
    with pytest.raises(KernelError, match=rf"expected `{name}` of dtype float32, got torch.bfloat16"):
        _call(**{name: torch.zeros(6, 8, device=DEVICE, dtype=torch.bfloat16)})


def test_param_dtype_raises():
    param = torch.zeros(6, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(KernelError, match=r"expected `param` of dtype float32, bfloat16 or float16, got torch.float64"):
        _call(param=param, grad=param.clone())


def test_grad_dtype_raises():
    with pytest.raises(KernelError, match=r"expected `grad` of dtype torch.float32, got torch.float16"):
        _call(grad=torch.zeros(6, 8, device=DEVICE, dtype=torch.float16))


@pytest.mark.parametrize("step", [0, -3, 1.0])
def test_bad_step_raises(step):
    with pytest.raises(KernelError, match=r"expected `step` an int >= 1"):
        _call(step=step)


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(adamw_module, "triton", None)
    with pytest.raises(KernelError, match=r"expected triton to be importable, got ImportError"):
        _call()


def _placeholder_kernel(x):
    pass


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(adamw_module, "_adamw_kernel", triton.runtime.JITFunction(_placeholder_kernel))
    tensors = [t.cpu() for t in _make_inputs((6, 8), torch.float32, 0)]
    with pytest.raises(KernelError, match=r"expected tensors on a GPU, got cpu; set TRITON_INTERPRET=1"):
        adamw(*tensors, step=1, **HYPER)
