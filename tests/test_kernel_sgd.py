"""memfit.kernels.sgd: kernel == reference, reference == torch.optim.SGD, every documented error."""

import importlib

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from memfit.errors import KernelError
from memfit.kernels.sgd import sgd, sgd_ref

# `memfit.kernels.sgd` the attribute is the re-exported function; the module lives in sys.modules.
sgd_module = importlib.import_module("memfit.kernels.sgd")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1,), (5, 123, 123), (4096,), (3, 7), (1, 1), (2, 1000)]

# Param tolerances per dtype. fp32: the kernel rounds op for op like torch's CPU kernels (fma where
# torch's add(alpha=) uses one), so results match to an ulp of the update. bf16/fp16: both sides
# round the same fp32 value once, so they differ by at most one ulp of the stored dtype (2**-7
# relative for bf16, 2**-10 for fp16) when fp32 values straddle a rounding boundary.
TOLERANCES = {
    torch.float32: {"rtol": 1e-6, "atol": 1e-7},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-5},
}
# momentum_buffer is float32 whatever the param dtype; atol scales with the largest state value.
STATE_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
HYPER = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 1e-2}
# (momentum, dampening, nesterov, weight_decay): plain, heavy ball, Nesterov, damped, decay only.
VARIANTS = [
    (0.0, 0.0, False, 0.0),
    (0.9, 0.0, False, 1e-2),
    (0.9, 0.0, True, 1e-2),
    (0.5, 0.5, False, 0.0),
    (0.0, 0.0, False, 1e-2),
]


def _make_inputs(shape, dtype, seed, grad_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(shape, generator=gen).to(DEVICE, grad_dtype or dtype)
    momentum_buffer = torch.randn(shape, generator=gen).to(DEVICE)
    return param, grad, momentum_buffer


def _assert_step_close(got, want, before, dtype):
    """Compare (param, momentum_buffer); param slack grows with the size of the update."""
    update = (want[0].float() - before.float()).abs().max().item()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got[0], want[0], rtol=tol["rtol"], atol=tol["atol"] + 1e-6 * update)
    _assert_state_close(got[1], want[1])


def _assert_state_close(got, want):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=STATE_TOLERANCE["rtol"], atol=STATE_TOLERANCE["atol"] * scale)


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    param, _, buf = _make_inputs(shape, dtype, seed=0)
    gen = torch.Generator().manual_seed(1)
    ref = (param.clone(), buf.clone())
    hyper = {**HYPER, "nesterov": dtype == torch.float32}  # both momentum forms, without doubling the grid
    for step in range(1, 4):  # step 1 overwrites the buffer
        before = param.clone()
        grad = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        sgd(param, grad, buf, first_step=step == 1, **hyper)
        sgd_ref(ref[0], grad, ref[1], first_step=step == 1, **hyper)
        _assert_step_close((param, buf), ref, before, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_grad_with_low_precision_param(dtype):
    param, grad, buf = _make_inputs((5, 123, 123), dtype, seed=1, grad_dtype=torch.float32)
    before = param.clone()
    ref = (param.clone(), buf.clone())
    sgd(param, grad, buf, first_step=False, grad_scale=0.25, **HYPER)
    sgd_ref(ref[0], grad, ref[1], first_step=False, grad_scale=0.25, **HYPER)
    _assert_step_close((param, buf), ref, before, dtype)


def test_no_momentum_takes_no_buffer_and_leaves_one_alone():
    param, grad, buf = _make_inputs((2, 1000), torch.float32, seed=3)
    ref, buf_before = param.clone(), buf.clone()
    hyper = {**HYPER, "momentum": 0.0}
    sgd(param, grad, None, first_step=True, **hyper)
    sgd_ref(ref, grad, None, first_step=True, **hyper)
    torch.testing.assert_close(param, ref, **TOLERANCES[torch.float32])
    sgd(param, grad, buf, first_step=False, **hyper)
    assert torch.equal(buf, buf_before)


def _run_torch_and(update, *, shape, momentum, dampening, nesterov, weight_decay, maximize, steps=20):
    """Run torch.optim.SGD(foreach=False) and `update` side by side; yield both states per step."""
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(shape, generator=gen)
    torch_param = torch.nn.Parameter(init.clone().to(DEVICE))
    optimizer = torch.optim.SGD([torch_param], lr=1e-2, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                weight_decay=weight_decay, maximize=maximize, foreach=False)
    param = init.clone().to(DEVICE)
    buf = torch.zeros_like(param) if momentum != 0 else None
    for step in range(1, steps + 1):
        grad = torch.randn(init.shape, generator=gen).to(DEVICE)
        torch_param.grad = grad.clone()
        optimizer.step()
        update(param, grad, buf, lr=1e-2, momentum=momentum, dampening=dampening, nesterov=nesterov,
               weight_decay=weight_decay, first_step=step == 1, maximize=maximize)
        torch_buf = optimizer.state[torch_param].get("momentum_buffer")
        yield (param, buf), (torch_param.detach(), torch_buf)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize(("momentum", "dampening", "nesterov", "weight_decay"), VARIANTS)
def test_reference_bit_identical_to_torch_optim(momentum, dampening, nesterov, weight_decay, maximize):
    # (5, 123, 123) crosses torch's CPU thread chunks and vector tails, where rounding paths differ.
    runs = _run_torch_and(sgd_ref, shape=(5, 123, 123), momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=maximize)
    for (param, buf), (torch_param, torch_buf) in runs:
        assert torch.equal(param, torch_param)
        assert (buf is None and torch_buf is None) or torch.equal(buf, torch_buf)


@pytest.mark.parametrize(("momentum", "dampening", "nesterov", "weight_decay"), VARIANTS[1:3])
def test_kernel_tracks_torch_optim_over_20_steps(momentum, dampening, nesterov, weight_decay):
    # A smaller odd shape: the interpreter costs ~2 ms per 1024-element program.
    runs = _run_torch_and(sgd, shape=(37, 129), momentum=momentum, dampening=dampening, nesterov=nesterov,
                          weight_decay=weight_decay, maximize=False)
    for (param, buf), (torch_param, torch_buf) in runs:
        torch.testing.assert_close(param, torch_param, rtol=1e-6, atol=1e-6)
        _assert_state_close(buf, torch_buf)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from(list(TOLERANCES)),
    lr=st.floats(1e-5, 1.0),
    momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]) | st.floats(0.0, 0.999),
    dampening=st.sampled_from([0.0, 0.1]) | st.floats(0.0, 1.0),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-4, 1e-2, 0.1]),
    first_step=st.booleans(),
    grad_scale=st.sampled_from([1.0, 0.5, 2.0**-10]) | st.floats(1e-3, 1e3),
    maximize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_property(shape, dtype, lr, momentum, dampening, nesterov, weight_decay, first_step,
                                           grad_scale, maximize, seed):
    param, grad, buf = _make_inputs(shape, dtype, seed)
    before = param.clone()
    ref = (param.clone(), buf.clone())
    hyper = {"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
             "weight_decay": weight_decay, "first_step": first_step, "grad_scale": grad_scale, "maximize": maximize}
    sgd(param, grad, buf, **hyper)
    sgd_ref(ref[0], grad, ref[1], **hyper)
    _assert_step_close((param, buf), ref, before, dtype)


# ---- errors ---------------------------------------------------------------------------------


def _call(**overrides):
    tensors = dict(zip(("param", "grad", "momentum_buffer"), _make_inputs((6, 8), torch.float32, 0), strict=True))
    hyper = {**HYPER, "first_step": False}
    for key, value in overrides.items():
        (tensors if key in tensors else hyper)[key] = value
    sgd(tensors["param"], tensors["grad"], tensors["momentum_buffer"], **hyper)


@pytest.mark.parametrize("name", ["param", "grad", "momentum_buffer"])
def test_non_contiguous_raises(name):
    transposed = torch.zeros(8, 6, device=DEVICE).t()
    with pytest.raises(KernelError, match=rf"memfit\.kernels\.sgd: expected contiguous `{name}`, got strides "
                                          r"\(1, 6\) for shape \(6, 8\); call \.contiguous\(\) first"):
        _call(**{name: transposed})


@pytest.mark.parametrize("name", ["grad", "momentum_buffer"])
def test_mismatched_shape_raises(name):
    with pytest.raises(KernelError, match=rf"expected `{name}` of the same shape as `param` \(6, 8\), got \(8, 6\)"):
        _call(**{name: torch.zeros(8, 6, device=DEVICE)})


def test_missing_buffer_with_momentum_raises():
    with pytest.raises(KernelError, match=r"expected a `momentum_buffer` tensor when momentum != 0, got None"):
        _call(momentum_buffer=None)


def test_reference_missing_buffer_with_momentum_raises():
    param, grad, _ = _make_inputs((6, 8), torch.float32, 0)
    with pytest.raises(KernelError, match=r"expected a `momentum_buffer` tensor when momentum != 0, got None"):
        sgd_ref(param, grad, None, first_step=True, **HYPER)


def test_empty_param_raises():
    empty = torch.zeros(0, device=DEVICE)
    with pytest.raises(KernelError, match=r"expected `param` with at least one element, got \(0,\)"):
        _call(param=empty, grad=empty, momentum_buffer=empty)


def test_other_device_raises():
    with pytest.raises(KernelError, match=r"expected `momentum_buffer` on the device of `param`"):
        _call(momentum_buffer=torch.zeros(6, 8, device="meta"))


def test_non_tensor_raises():
    with pytest.raises(KernelError, match=r"expected `grad` to be a torch.Tensor, got list"):
        _call(grad=[0.0])


def test_state_dtype_raises():
    with pytest.raises(KernelError, match=r"expected `momentum_buffer` of dtype float32, got torch.bfloat16"):
        _call(momentum_buffer=torch.zeros(6, 8, device=DEVICE, dtype=torch.bfloat16))


def test_param_dtype_raises():
    param = torch.zeros(6, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(KernelError, match=r"expected `param` of dtype float32, bfloat16 or float16, got torch.float64"):
        _call(param=param, grad=param.clone())


def test_grad_dtype_raises():
    param = torch.zeros(6, 8, device=DEVICE, dtype=torch.bfloat16)
    expected = r"expected `grad` of dtype torch.bfloat16 or torch.float32, got torch.float16"
    with pytest.raises(KernelError, match=expected):
        _call(param=param, grad=torch.zeros(6, 8, device=DEVICE, dtype=torch.float16))


def test_missing_triton_raises(monkeypatch):
    monkeypatch.setattr(sgd_module, "triton", None)
    with pytest.raises(KernelError, match=r"expected triton to be importable, got ImportError"):
        _call()


def _placeholder_kernel(x):
    pass


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(sgd_module, "_sgd_kernel", triton.runtime.JITFunction(_placeholder_kernel))
    param, grad, buf = (t.cpu() for t in _make_inputs((6, 8), torch.float32, 0))
    with pytest.raises(KernelError, match=r"expected tensors on a GPU, got cpu; set TRITON_INTERPRET=1"):
        sgd(param, grad, buf, first_step=False, **HYPER)
