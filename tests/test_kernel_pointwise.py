"""memfit.kernels.pointwise: every op a fused program may hold, as a generated Triton kernel (under
TRITON_INTERPRET=1) and as the chunked CPU evaluation, against the unfused ATen ops; on odd shapes,
broadcast, strided and 0-dim inputs, fp32 and bf16; the chunked evaluation's declared workspace is what it
holds; a bad program is a KernelError."""

import json

import pytest
import torch

from memfit.errors import KernelError
from memfit.kernels import pointwise as pw
from memfit.measure import measure_peak

# the generated kernel against the unfused ops: fp32 transcendental functions (exp, sin, rsqrt, erf) differ
# from torch's by a few ulp; bf16 inputs are computed in fp32 and rounded once (torch rounds per op)
TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CHUNKED_TOL = dict(rtol=1e-6, atol=1e-7)  # contiguous chunks vectorise as the whole tensor; strided may not

A, B, MASK = ["in", 0], ["in", 1], ["in", 2]
UNARY = ["neg.default", "exp.default", "log.default", "sqrt.default", "rsqrt.default", "reciprocal.default",
         "abs.default", "cos.default", "sin.default", "sigmoid.default", "silu.default", "tanh.default",
         "relu.default", "gelu.default"]
POSITIVE = {"log.default", "sqrt.default", "rsqrt.default", "reciprocal.default"}
PROGRAMS = {
    **{op: [[op, [A], {}]] for op in UNARY},
    "gelu-tanh": [["gelu.default", [A], {"approximate": "tanh"}]],
    "add-alpha": [["add.Tensor", [A, B], {"alpha": 0.5}]],
    "add.Scalar": [["add.Scalar", [A, 1.5], {}]],
    "sub-alpha": [["sub.Tensor", [A, B], {"alpha": 2}]],
    "rsub": [["rsub.Scalar", [A, 1.0], {}]],
    "mul-div": [["mul.Tensor", [A, B], {}], ["div.Tensor", [["v", 0], B], {}], ["div.Scalar", [["v", 1], 3], {}]],
    "pow": [["pow.Tensor_Scalar", [A, 2], {}], ["pow.Tensor_Scalar", [["v", 0], 3], {}],
            ["pow.Tensor_Scalar", [["v", 1], -1], {}]],
    "tanh_backward": [["tanh.default", [A], {}], ["tanh_backward.default", [B, ["v", 0]], {}]],
    "sigmoid_backward": [["sigmoid.default", [A], {}], ["sigmoid_backward.default", [B, ["v", 0]], {}]],
    "threshold_backward": [["threshold_backward.default", [B, A, 0.0], {}]],
    "hardtanh": [["hardtanh.default", [A, 0.0, 6.0], {}], ["hardtanh_backward.default", [B, A, 0.0, 6.0], {}],
                 ["add.Tensor", [["v", 0], ["v", 1]], {}]],
    "clamp": [["clamp_min.default", [A, -0.5], {}], ["clamp_max.default", [["v", 0], 0.5], {}]],
    "where-compare": [["gt.Scalar", [A, 0.1], {}], ["where.self", [["v", 0], A, B], {}],
                      ["le.Scalar", [B, 0.0], {}], ["masked_fill.Scalar", [["v", 1], ["v", 2], -1.0], {}]],
    "bool-mask-in": [["masked_fill.Scalar", [A, MASK, 0.0], {}], ["mul.Tensor", [["v", 0], B], {}]],
    "casts": [["_to_copy.default", [A], {"dtype": ["dtype", "bfloat16"]}],
              ["_to_copy.default", [["v", 0]], {"dtype": ["dtype", "float32"]}], ["mul.Tensor", [["v", 1], B], {}]],
    "ones-like": [["empty_like.default", [A], {}], ["fill.Scalar", [["v", 0], 1], {}],
                  ["sub.Tensor", [["v", 1], B], {}]],
    "compare-out": [["mul.Tensor", [A, B], {}], ["ge.Scalar", [["v", 0], 0.0], {}]],
    # programs ending in a reduction: RMSNorm's mean of squares, a weight gradient's column sum, a full sum
    "mean-last": [["mul.Tensor", [A, B], {}], ["pow.Tensor_Scalar", [["v", 0], 2], {}],
                  ["mean.dim", [["v", 1], [-1], True], {}]],
    "sum-first": [["mul.Tensor", [A, B], {}], ["sum.dim_IntList", [["v", 0], [0]], {}]],
    "sum-all": [["silu.default", [A], {}], ["mul.Tensor", [["v", 0], B], {}],
                ["sum.dim_IntList", [["v", 1], [0, 1]], {}]],
}
REDUCING = {"mean-last", "sum-first", "sum-all"}
# a reduction sums in another order than ATen's: a few ulp of the sum's magnitude
REDUCE_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}
# (a, b, mask) shapes: same shape; b broadcast from a row; a transposed (strided); 0-dim b; one element
LAYOUTS = {
    "odd": lambda: (torch.randn(3, 5, 7), torch.randn(3, 5, 7), torch.rand(3, 5, 7) > 0.5),
    "broadcast": lambda: (torch.randn(2, 1030), torch.randn(1030), torch.rand(2, 1) > 0.5),
    "strided": lambda: (torch.randn(7, 6).t(), torch.randn(6, 7), torch.rand(6, 7).t().t() > 0.5),
    "scalar-b": lambda: (torch.randn(4, 9), torch.tensor(0.7), torch.rand(()) > 0.5),
}


def _inputs(name, layout, dtype):
    torch.manual_seed(0)
    a, b, m = LAYOUTS[layout]()
    if name == "sum-first" and layout == "broadcast":  # one interpreted program per output: 130 of them, not 1030
        a, b = a[:, :130], b[:130]
    if name in POSITIVE:
        a = a.abs() + 0.1
    return [a.to(dtype), b.to(dtype), m]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_generated_kernel_and_chunked_match_the_unfused_ops(name, layout, dtype):
    program = json.dumps({"steps": PROGRAMS[name]})
    inputs = _inputs(name, layout, dtype)
    want = pw.evaluate(program, inputs)
    got = pw.run_triton(program, inputs)
    assert got.shape == want.shape and got.dtype == want.dtype and got.stride() == want.stride()
    if want.dtype == torch.bool:
        mismatch = (got != want).float().mean()
        assert mismatch <= (0.02 if dtype == torch.bfloat16 else 0.0)  # a value at the threshold rounds either way
    else:
        torch.testing.assert_close(got, want, **(REDUCE_TOL if name in REDUCING else TOL)[dtype])
    chunked = pw.run_chunked(program, inputs)
    assert chunked.stride() == want.stride()
    torch.testing.assert_close(chunked, want, **(CHUNKED_TOL if dtype == torch.float32 and name not in REDUCING
                                                  else (REDUCE_TOL if name in REDUCING else TOL)[dtype]))


def test_chunks_cover_the_output_once_in_small_pieces(monkeypatch):
    monkeypatch.setattr(pw, "CHUNK_ELEMENTS", 10)
    program = json.dumps({"steps": [["mul.Tensor", [A, B], {}], ["add.Scalar", [["v", 0], 1], {}]]})
    a, b = torch.randn(3, 4, 7), torch.randn(4, 1)
    torch.testing.assert_close(pw.run_chunked(program, [a, b]), a * b + 1, rtol=0, atol=0)
    boxes = list(pw._chunks((3, 4, 7)))
    assert len(boxes) == 3 * 4 and all(hi - lo == 1 for box in boxes for lo, hi in box[:-1])


@pytest.mark.parametrize("reduce", [None, ("mean.dim", [-1], True), ("sum.dim_IntList", [0], False)],
                         ids=["pointwise", "mean-last", "sum-first"])
@pytest.mark.parametrize("shapes", [[(64, 300), (64, 300)], [(4, 64, 688), (688,)], [(5, 3), ()]],
                         ids=["rows", "broadcast", "small"])
def test_chunked_workspace_is_what_it_holds(shapes, reduce):
    steps = PROGRAMS["mul-div"] + [["silu.default", [["v", 2]], {}]]
    if reduce:
        steps = [*steps, [reduce[0], [["v", 3], reduce[1], reduce[2]], {}]]
    program = json.dumps({"steps": steps})
    inputs = [torch.randn(s) + 2 for s in shapes]
    out = pw.run_chunked(program, inputs)
    m = measure_peak(lambda: pw.run_chunked(program, inputs, out=out), device="cpu", existing=iter([*inputs, out]))
    held = sum(x.numel() * x.element_size() for x in (*inputs, out))
    assert m.peak_bytes - held == pw.chunked_workspace(
        program, [(tuple(x.shape), x.dtype, tuple(x.stride())) for x in inputs])


@pytest.mark.parametrize("program,match", [
    ("not json", "a program"),
    (json.dumps({"steps": [["matmul.default", [A, B], {}]]}), "ops in"),
    (json.dumps({"steps": [["pow.Tensor_Scalar", [A, 7], {}]]}), "a power in"),
    (json.dumps({"steps": [["sum.dim_IntList", [A, [0]], {}], ["neg.default", [["v", 0]], {}]]}),
     "a reduction only as the program's last step"),
])
def test_bad_program_is_a_kernel_error(program, match):
    with pytest.raises(KernelError, match=match):
        pw.run_triton(program, [torch.randn(3), torch.randn(3)])


@pytest.mark.parametrize("runner", ["chunked", "triton"])
def test_a_program_that_names_its_strides_writes_them(runner, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, 7).transpose(0, 2), torch.randn(7, 3, 1)  # a's ops would give a's permuted layout
    program = json.dumps({"steps": [["mul.Tensor", [A, B], {}], ["exp.default", [["v", 0]], {}]]})
    assert pw.out_layout(program, ((a.shape, a.dtype, a.stride()), (b.shape, b.dtype, b.stride())))[2] == a.stride()
    laid = pw.with_stride(program, (15, 5, 1))
    out = (pw.run_chunked if runner == "chunked" else pw.run_triton)(laid, [a, b])
    assert out.stride() == (15, 5, 1) and out.is_contiguous()
    torch.testing.assert_close(out, torch.exp(a * b), **TOL[torch.float32])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = pw.evaluate_laid_out(laid, [mode.from_tensor(a), mode.from_tensor(b)])
        assert fake.stride() == (15, 5, 1)


def test_a_program_over_0_dim_values_runs_as_one_element(monkeypatch):
    """clip_grad_norm's coefficient, min(max_norm / (norm + 1e-6), 1), made from a 0-dim norm: the generated
    kernel's offsets are blocks even with no dimension to index."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    program = json.dumps({"steps": [["add.Tensor", [A, 1e-6], {}], ["reciprocal.default", [["v", 0]], {}],
                                    ["mul.Tensor", [["v", 1], 0.5], {}], ["clamp_max.default", [["v", 2], 1.0], {}]]})
    norm = torch.tensor(3.0)
    want = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
    for run in (pw.run_triton, pw.run_chunked):
        got = run(program, [norm])
        assert got.shape == () and got.dtype == torch.float32
        torch.testing.assert_close(got, want, **TOL[torch.float32])
