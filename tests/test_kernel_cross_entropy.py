"""memfit.kernels.cross_entropy: the Triton row kernel == the plain-torch reference == F.cross_entropy on
materialised logits, on odd shapes, dtypes, label smoothing, ignored rows and both reductions; the declared
workspace is what the reference holds; bad input is a KernelError."""

import pytest
import torch
import torch.nn.functional as F

from memfit.errors import KernelError
from memfit.kernels import cross_entropy as ce
from memfit.measure import measure_peak

# (tokens, hidden, vocab, chunk): one chunk, a ragged last chunk, a vocabulary past one 1024-wide block,
# chunks of one row
SHAPES = [(37, 16, 50, 8), (64, 8, 7, 64), (19, 12, 1500, 6), (5, 4, 33, 1)]
# loss, dh, dW tolerances against F.cross_entropy's autograd (fp32 everywhere but the bf16 inputs'
# matmuls, which round both sides alike only up to bf16's epsilon)
TOL = {torch.float32: dict(loss=1e-6, grad=2e-6), torch.bfloat16: dict(loss=2e-3, grad=2e-2)}


def _inputs(n, hidden, vocab, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).to(dtype)
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[::4] = -100
    return h, w, t


def _eager(h, w, t, eps, reduction, b=None):
    hr, wr = h.float().clone().requires_grad_(True), w.float().clone().requires_grad_(True)
    br = b.float().clone().requires_grad_(True) if b is not None else None
    logits = hr @ wr.t() if br is None else hr @ wr.t() + br
    loss = F.cross_entropy(logits, t, label_smoothing=eps, reduction="mean" if reduction == 1 else "sum")
    loss.backward()
    return loss.detach(), hr.grad, wr.grad, (br.grad if br is not None else None)


def _close(got, want, tol):
    scale = want.abs().max().clamp_min(1e-30)
    assert float((got.float() - want).abs().max() / scale) <= tol


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("eps,reduction", [(0.0, 1), (0.1, 1), (0.2, 2)], ids=["mean", "smooth-mean", "smooth-sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_and_reference_match_cross_entropy(shape, eps, reduction, dtype, bias):
    n, hidden, vocab, chunk = shape
    h, w, t = _inputs(n, hidden, vocab, dtype)
    b = torch.randn(vocab, generator=torch.Generator().manual_seed(1)).to(dtype) if bias else None
    want = _eager(h, w, t, eps, reduction, b)
    tol = TOL[dtype]
    for fn in (ce.linear_cross_entropy_ref, ce.linear_cross_entropy):
        loss, dh, dw, db = fn(h, w, t, bias=b, label_smoothing=eps, reduction=reduction, chunk=chunk)
        assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
        assert float((loss - want[0]).abs() / want[0].abs()) <= tol["loss"], fn.__name__
        _close(dh, want[1], tol["grad"])
        _close(dw, want[2], tol["grad"])
        if bias:
            assert db.dtype == dtype
            _close(db, want[3], tol["grad"])
        else:
            assert db.numel() == 0


def test_chunking_does_not_change_the_result_beyond_summation_order():
    h, w, t = _inputs(50, 16, 300, torch.float32)
    whole = ce.linear_cross_entropy_ref(h, w, t, chunk=50)
    for chunk in (1, 7, 16):
        part = ce.linear_cross_entropy_ref(h, w, t, chunk=chunk)
        assert float((part[0] - whole[0]).abs() / whole[0]) <= 1e-6
        torch.testing.assert_close(part[1], whole[1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(part[2], whole[2], rtol=1e-5, atol=1e-7)


def test_all_ignored_mean_is_nan_as_in_torch_and_sum_is_zero():
    h, w, t = _inputs(6, 4, 9, torch.float32)
    t[:] = -100
    assert torch.isnan(ce.linear_cross_entropy_ref(h, w, t)[0])
    assert torch.isnan(ce.linear_cross_entropy(h, w, t)[0])
    assert torch.isnan(F.cross_entropy(h @ w.t(), t))
    loss, dh, dw, _ = ce.linear_cross_entropy(h, w, t, reduction=2)
    assert float(loss) == 0.0 and not dh.any() and not dw.any()


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(37, 16, 50, 8), (37, 16, 50, 64), (64, 8, 7, 64), (74, 16, 100, 16),
                                   (40, 4, 3000, 2)], ids=lambda s: "x".join(map(str, s)))
def test_declared_workspace_is_what_the_reference_holds(shape, dtype, bias):
    n, hidden, vocab, chunk = shape
    h, w, t = _inputs(n, hidden, vocab, dtype)
    b = torch.zeros(vocab, dtype=dtype) if bias else None
    given = [x for x in (h, w, t, b) if x is not None]
    held = sum(x.numel() * x.element_size() for x in given)
    m = measure_peak(lambda: ce.linear_cross_entropy_ref(h, w, t, bias=b, label_smoothing=0.1, chunk=chunk),
                     device="cpu", existing=iter(given))
    outputs = 4 + h.numel() * h.element_size() + w.numel() * w.element_size() + (b.numel() * b.element_size()
                                                                                if bias else 0)
    assert m.peak_bytes - held - outputs == ce.workspace_bytes(n, hidden, vocab, chunk, h.element_size(),
                                                               w.element_size(), triton=False, bias=bias)


@pytest.mark.parametrize("bad,match", [
    (dict(h=torch.zeros(4, 3)), r"h \(N, H\) and weight \(V, H\)"),
    (dict(target=torch.zeros(5, dtype=torch.int64)), r"target \(N,\)"),
    (dict(reduction=0), "reduction='none' keeps the logits"),
    (dict(chunk=0), "positive number of rows"),
    (dict(label_smoothing=1.5), r"label_smoothing in \[0, 1\]"),
])
def test_bad_input_is_a_kernel_error(bad, match):
    args = dict(h=torch.zeros(4, 8), weight=torch.zeros(10, 8), target=torch.zeros(4, dtype=torch.int64))
    kw = dict(reduction=1, chunk=2, label_smoothing=0.0)
    for k, v in bad.items():
        (args if k in args else kw)[k] = v
    for fn in (ce.linear_cross_entropy_ref, ce.linear_cross_entropy):
        with pytest.raises(KernelError, match=match):
            fn(args["h"], args["weight"], args["target"], **kw)
