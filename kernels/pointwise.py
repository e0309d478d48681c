"""Fused pointwise programs: one generated Triton kernel per program, and a chunked plain-torch evaluation.

A *program* is a chain (or tree) of pointwise ATen ops over some input tensors, as the ``fuse`` pass cuts it
from the step: a JSON string ``{"steps": [[op, args, kwargs], ...]}`` whose last step is the output, and
optionally ``"stride"``, the output's strides (else those ATen's ops give it), and ``"chunk"``, the CPU
evaluation's chunk (else ``CHUNK_ELEMENTS``). An
argument is ``["in", i]`` (input ``i``), ``["v", j]`` (step ``j``'s value), ``["dtype", name]`` or a literal.
``OPS`` lists the ops a program may use, each with its ATen overload and its Triton expression.

``run_triton(program, inputs)`` generates (once per program and input layout: rank, dtypes) a kernel over
the output's elements: each input is read through its strides broadcast to the output's shape (stride 0 on
broadcast dimensions, so views and expands cost nothing), every op is evaluated in fp32 registers (bool and
integer inputs as themselves), and only the output is written. The kernel source is written under
``$MEMFIT_CACHE`` (default ``~/.cache/memfit/kernels``) and imported from there, keyed by its hash.

``run_chunked(program, inputs)`` is the CPU evaluation: the ops run as ATen calls on slices of the output's
first dimension, ``CHUNK_ELEMENTS`` output elements at a time, each chunk written into the output, so an
intermediate never exists beyond one chunk; per element it is the same ATen arithmetic as the unfused
graph (bit-identical results). ``chunked_workspace`` is what it holds beyond the output, computed from the
same schedule.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import torch

from ..errors import KernelError, where_what_got
from ._checks import require_gpu_or_interpreter, require_triton

try:
    import triton
    import triton.language as tl  # noqa: F401  (the generated modules import it themselves)
except ImportError:  # no triton wheel on this platform; run_chunked still works
    triton = None

_WHERE = "memfit.kernels.pointwise"
# the CPU evaluation's chunk: 64 Ki elements (256 KiB per fp32 intermediate). On the 4-layer tiny LLaMA's step
# (8 x 128 tokens) 16 Ki took 1.49x the unfused step time, 64 Ki 1.18x, 256 Ki 1.14x with a peak above the
# unfused one: past 64 Ki the per-chunk Python calls no longer dominate
CHUNK_ELEMENTS = 1 << 16
_BLOCK = 1024
_MAX_RANK = 6
aten = torch.ops.aten


def _f(x: object) -> str:
    """A Python literal as Triton source (floats as fp32 constants)."""
    if isinstance(x, bool):
        return "True" if x else "False"
    if isinstance(x, int):
        return f"{x}"
    if isinstance(x, float):
        if math.isinf(x):
            return "float('inf')" if x > 0 else "float('-inf')"
        return repr(x)
    raise KernelError(where_what_got(_WHERE, "a number", repr(x), "report the op"))


def _pow(a: str, e: object) -> str:
    table = {1: "{a}", 2: "({a} * {a})", 3: "({a} * {a} * {a})", 0.5: "tl.sqrt_rn({a})", -0.5: "tl.rsqrt({a})",
             -1: "(1.0 / {a})"}
    e = float(e)
    if e not in table:
        raise KernelError(where_what_got(_WHERE, f"a power in {sorted(table)}", e, "leave it unfused"))
    return table[e].format(a=a)


def _alpha(b: str, kw: dict) -> str:
    alpha = kw.get("alpha", 1)
    return b if alpha == 1 else f"({b} * {_f(float(alpha))})"


# op name (aten.<name>) -> Triton expression from its operand expressions (tensors or literals as source)
OPS = {
    "add.Tensor": lambda a, b, **kw: f"({a} + {_alpha(b, kw)})",
    "add.Scalar": lambda a, b, **kw: f"({a} + {_alpha(b, kw)})",
    "sub.Tensor": lambda a, b, **kw: f"({a} - {_alpha(b, kw)})",
    "sub.Scalar": lambda a, b, **kw: f"({a} - {_alpha(b, kw)})",
    "rsub.Scalar": lambda a, b, **kw: f"({b} - {_alpha(a, kw)})",
    "mul.Tensor": lambda a, b: f"({a} * {b})",
    "mul.Scalar": lambda a, b: f"({a} * {b})",
    "div.Tensor": lambda a, b: f"({a} / {b})",
    "div.Scalar": lambda a, b: f"({a} / {b})",
    "neg.default": lambda a: f"(-{a})",
    "exp.default": lambda a: f"tl.exp({a})",
    "log.default": lambda a: f"tl.log({a})",
    "sqrt.default": lambda a: f"tl.sqrt_rn({a})",
    "rsqrt.default": lambda a: f"tl.rsqrt({a})",
    "reciprocal.default": lambda a: f"(1.0 / {a})",
    "abs.default": lambda a: f"tl.abs({a})",
    "cos.default": lambda a: f"tl.cos({a})",
    "sin.default": lambda a: f"tl.sin({a})",
    "sigmoid.default": lambda a: f"(1.0 / (1.0 + tl.exp(-{a})))",
    "silu.default": lambda a: f"({a} / (1.0 + tl.exp(-{a})))",
    "tanh.default": lambda a: f"(1.0 - 2.0 / (tl.exp(2.0 * {a}) + 1.0))",
    "relu.default": lambda a: f"tl.maximum({a}, 0.0)",
    "gelu.default": lambda a, approximate="none": (
        f"(0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476)))" if approximate == "none" else
        f"(0.5 * {a} * (2.0 - 2.0 / (tl.exp(2.0 * 0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})) + 1.0)))"),
    "pow.Tensor_Scalar": _pow,
    "tanh_backward.default": lambda g, y: f"({g} * (1.0 - {y} * {y}))",
    "sigmoid_backward.default": lambda g, y: f"({g} * {y} * (1.0 - {y}))",
    "threshold_backward.default": lambda g, x, t: f"tl.where({x} <= {t}, 0.0, {g})",
    "hardtanh.default": lambda a, lo=-1.0, hi=1.0: f"tl.minimum(tl.maximum({a}, {lo}), {hi})",
    "hardtanh_backward.default": lambda g, x, lo, hi: f"tl.where(({x} <= {lo}) | ({x} >= {hi}), 0.0, {g})",
    "clamp_min.default": lambda a, lo: f"tl.maximum({a}, {lo})",
    "clamp_max.default": lambda a, hi: f"tl.minimum({a}, {hi})",
    "where.self": lambda c, a, b: f"tl.where({c}, {a}, {b})",
    "masked_fill.Scalar": lambda a, m, v: f"tl.where({m}, {v}, {a})",
    "eq.Scalar": lambda a, b: f"({a} == {b})",
    "ne.Scalar": lambda a, b: f"({a} != {b})",
    "gt.Scalar": lambda a, b: f"({a} > {b})",
    "ge.Scalar": lambda a, b: f"({a} >= {b})",
    "lt.Scalar": lambda a, b: f"({a} < {b})",
    "le.Scalar": lambda a, b: f"({a} <= {b})",
    "empty_like.default": lambda a: "tl.zeros([BLOCK], tl.float32)",  # values unset: only read after a fill
    "fill.Scalar": lambda a, v: f"(tl.zeros([BLOCK], tl.float32) + {v})",
    "_to_copy.default": None,  # a dtype cast: handled by the generator (see _cast)
}
# a program may end in one of these (its last step): sum or mean over some dimensions of the pointwise value
REDUCTIONS = frozenset({"sum.dim_IntList", "mean.dim"})
SUPPORTED = frozenset(OPS) | REDUCTIONS

_TL = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
       torch.bool: "tl.int1", torch.int64: "tl.int64", torch.int32: "tl.int32"}


def parse(program: str) -> list:
    return _parse(program)


@functools.lru_cache(maxsize=4096)
def _parse(program: str) -> list:
    try:
        steps = json.loads(program)["steps"]
    except (ValueError, KeyError, TypeError) as e:
        raise KernelError(where_what_got(_WHERE, "a program {'steps': [[op, args, kwargs], ...]}", program[:80],
                                         "build programs with the fuse pass")) from e
    for j, (op, _, _) in enumerate(steps):
        if op not in SUPPORTED:
            raise KernelError(where_what_got(_WHERE, f"ops in {sorted(SUPPORTED)}", op, "leave it unfused"))
        if op in REDUCTIONS and j != len(steps) - 1:
            raise KernelError(where_what_got(_WHERE, "a reduction only as the program's last step", f"{op} at {j}",
                                             "end the group at the reduction"))
    return steps


def _reduction(steps: list, rank: int) -> tuple[tuple[int, ...], bool] | None:
    """(reduced dimensions of the space, keepdim) when the program ends in a reduction, else None."""
    op, args, kwargs = steps[-1]
    if op not in REDUCTIONS:
        return None
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not dims or kwargs.get("dtype") is not None:
        raise KernelError(where_what_got(_WHERE, "a reduction over listed dimensions, in the input's dtype",
                                         f"dims {dims}, kwargs {kwargs}", "leave it unfused"))
    return tuple(sorted({d % rank for d in dims})), bool(keepdim)


def _space(steps: list, inputs: list) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
    """(space shape, reduced dims, keepdim) of a reduction program: the shape its pointwise part runs over
    (every input broadcasts to it)."""
    if steps[-1][0] not in REDUCTIONS:
        return None
    space = tuple(torch.broadcast_shapes(*[tuple(x.shape) for x in inputs]))
    dims, keepdim = _reduction(steps, len(space))
    return space, dims, keepdim


def _out_box(box: tuple, dims: tuple[int, ...], keepdim: bool) -> tuple:
    if keepdim:
        return tuple((0, 1) if d in dims else b for d, b in enumerate(box))
    return tuple(b for d, b in enumerate(box) if d not in dims)


def _decode(a, env_in, env_v):
    if isinstance(a, list) and len(a) == 2 and a[0] in ("in", "v", "dtype"):
        if a[0] == "in":
            return env_in[a[1]]
        if a[0] == "v":
            return env_v[a[1]]
        return getattr(torch, a[1])
    if isinstance(a, list):
        return [_decode(x, env_in, env_v) for x in a]
    return a


def _aten(op: str):
    name, overload = op.split(".")
    return getattr(getattr(aten, name), overload)


def _last_uses(steps: list) -> dict[int, int]:
    last = {}
    for j, (_, args, kwargs) in enumerate(steps):
        for a in _refs(args) + _refs(list(kwargs.values())):
            last[a] = j
    return last


def _refs(args) -> list[int]:
    out = []
    for a in args:
        if isinstance(a, list) and len(a) == 2 and a[0] == "v":
            out.append(a[1])
        elif isinstance(a, list):
            out += _refs(a)
    return out


def evaluate(program: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The program as plain ATen calls on ``inputs`` (any tensors, fake ones included): the unfused result."""
    steps = parse(program)
    last = _last_uses(steps)
    vals: dict[int, torch.Tensor] = {}
    for j, (op, args, kwargs) in enumerate(steps):
        fn = _aten(op)
        vals[j] = fn(*_decode(args, inputs, vals), **{k: _decode(v, inputs, vals) for k, v in kwargs.items()})
        for i in [i for i, lj in last.items() if lj == j and i in vals]:
            del vals[i]
    return vals[len(steps) - 1]


def _chunks(shape: tuple[int, ...], whole: tuple[int, ...] = (), chunk: int | None = None):
    """Chunks of ``shape`` as per-dimension (start, stop) tuples: the ``whole`` dimensions (a reduction's)
    entire in every chunk; of the others, every index of those before the split dimension ``j`` alone and
    ``j`` in runs of as many rows as fit ``chunk`` elements (default ``CHUNK_ELEMENTS``). ``j`` is the first
    free dimension whose row (the dimensions after it and the whole ones) holds at most that many."""
    chunk = chunk or CHUNK_ELEMENTS
    rank = len(shape)
    free = [k for k in range(rank) if k not in whole]
    if not free:
        yield tuple((0, n) for n in shape)
        return

    def row(j: int) -> int:
        return math.prod(shape[k] for k in range(rank) if k > j or k in whole)

    j = next((k for k in free if row(k) <= chunk), free[-1])
    rows = max(1, chunk // max(1, row(j)))
    lead = [k for k in free if k < j]
    for index in itertools.product(*[range(shape[k]) for k in lead]):
        at = dict(zip(lead, index, strict=True))
        for lo in range(0, shape[j], rows):
            yield tuple((at[d], at[d] + 1) if d in at else (lo, min(shape[j], lo + rows)) if d == j
                        else (0, shape[d]) for d in range(rank))


def _slice(x: torch.Tensor, rank: int, box: tuple) -> torch.Tensor:
    """``x`` (broadcast to an output of ``rank`` dimensions) cut to the chunk ``box`` of the output; a
    dimension ``x`` broadcasts over stays whole."""
    offset = rank - x.dim()
    for d, (lo, hi) in enumerate(box):
        k = d - offset
        if k >= 0 and x.shape[k] != 1:
            x = x.narrow(k, lo, hi - lo)
    return x


def run_chunked(program: str, inputs: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU evaluation: ``evaluate`` on chunks of about ``CHUNK_ELEMENTS`` output elements (``_chunks``),
    each written into the output."""
    if any(isinstance(x, torch._subclasses.FakeTensor) for x in inputs):
        return evaluate(program, inputs)
    meta = _out_meta(program, inputs)
    if out is None:
        out = _empty_out(meta, inputs[0].device)
    if out.numel() == 0:
        return out
    red = _space(parse(program), inputs)
    space, dims, keepdim = red if red else (tuple(out.shape), (), False)
    for box in _chunks(space, dims, chunk_of(program)):
        part = evaluate(program, [_slice(x, len(space), box) for x in inputs])
        _slice(out, out.dim(), _out_box(box, dims, keepdim) if red else box).copy_(part)
        del part  # not alive while the next chunk is made
    return out


@functools.lru_cache(maxsize=4096)
def _meta_cached(program: str, sig: tuple) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
    """(shape, dtype, strides) of the program's output for inputs of these (shape, dtype[, strides]): the
    unfused ops' own output layout (a later view may rely on it), or the strides the program names."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fakes = [torch.empty_strided(s[0], s[2], dtype=s[1]) if len(s) > 2 else torch.empty(s[0], dtype=s[1])
                 for s in sig]
        r = evaluate(program, fakes)
        stride = _stride(program)
        return tuple(r.shape), r.dtype, stride if stride is not None else tuple(r.stride())


def out_layout(program: str, sig: tuple) -> tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]:
    """(shape, dtype, strides) of the output for inputs of these (shape, dtype, strides)."""
    return _meta_cached(program, sig)


def with_stride(program: str, stride: tuple[int, ...]) -> str:
    """``program`` whose output is laid out with these strides (the unfused op's, when the inputs' views would
    lead ATen to another layout)."""
    d = json.loads(program)
    d["stride"] = list(stride)
    return json.dumps(d, separators=(",", ":"))


def with_chunk(program: str, chunk: int) -> str:
    """``program`` evaluated on CPU in chunks of ``chunk`` output elements (else ``CHUNK_ELEMENTS``)."""
    d = json.loads(program)
    d["chunk"] = int(chunk)
    return json.dumps(d, separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def chunk_of(program: str) -> int:
    """The elements per chunk of the CPU evaluation of ``program``."""
    return int(json.loads(program).get("chunk") or CHUNK_ELEMENTS)


@functools.lru_cache(maxsize=4096)
def _stride(program: str) -> tuple[int, ...] | None:
    s = json.loads(program).get("stride")
    return None if s is None else tuple(s)


def evaluate_laid_out(program: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``evaluate`` with the output in the strides the program names (the fake of ``memfit::fused``)."""
    r = evaluate(program, inputs)
    stride = _stride(program)
    if stride is None or tuple(r.stride()) == stride:
        return r
    return torch.empty_strided(r.shape, stride, dtype=r.dtype, device=r.device).copy_(r)


class _Meta:
    def __init__(self, shape, dtype, stride):
        self.shape, self.dtype, self.stride = shape, dtype, stride


def _out_meta(program: str, inputs: list[torch.Tensor]) -> _Meta:
    return _Meta(*_meta_cached(program, tuple((tuple(x.shape), x.dtype, tuple(x.stride())) for x in inputs)))


def _empty_out(meta: _Meta, device) -> torch.Tensor:
    return torch.empty_strided(meta.shape, meta.stride, dtype=meta.dtype, device=device)


def chunked_workspace(program: str, shapes: list[tuple]) -> int:
    """Bytes ``run_chunked`` holds beyond its output: the largest chunk's live intermediates (each step's result
    until its last use) at their peak, computed on fake tensors of the chunk's input slices; ``shapes`` holds
    each input's (shape, dtype, strides)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    steps = parse(program)
    out_shape = _meta_cached(program, tuple(shapes))[0]
    last = _last_uses(steps)
    with FakeTensorMode():
        ins = [torch.empty_strided(s[0], s[2], dtype=s[1]) if len(s) > 2 else torch.empty(s[0], dtype=s[1])
               for s in shapes]
        red = _space(steps, ins)
        space, dims = (red[0], red[1]) if red else (out_shape, ())
        if math.prod(out_shape):
            box = next(_chunks(space, dims, chunk_of(program)))  # the first chunk is the largest
            ins = [_slice(x, len(space), box) for x in ins]
        vals, sizes, live, peak = {}, {}, 0, 0
        for j, (op, args, kwargs) in enumerate(steps):
            fn = _aten(op)
            r = fn(*_decode(args, ins, vals), **{k: _decode(v, ins, vals) for k, v in kwargs.items()})
            vals[j] = r
            sizes[j] = r.untyped_storage().nbytes() if not _aliases_input(r, ins, vals, j) else 0
            live += sizes[j]
            peak = max(peak, live)
            for i in [i for i, lj in last.items() if lj == j and i in vals]:
                live -= sizes.pop(i)
                del vals[i]
    return peak


def _aliases_input(r, ins, vals, j) -> bool:
    """An op that returned one of its inputs (``_to_copy`` to the same dtype): no new storage."""
    return any(r is x for x in ins) or any(r is v for i, v in vals.items() if i != j)


# ---- the Triton generator ------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    d = Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit")) / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _kind(dtype: torch.dtype) -> str:
    return "f" if dtype.is_floating_point else ("b" if dtype == torch.bool else "i")


def generate_source(program: str, in_dtypes: tuple[torch.dtype, ...], out_dtype: torch.dtype, rank: int,
                    reduce: tuple[tuple[int, ...], bool] | None = None) -> str:
    """The Triton source of ``program``'s kernel for inputs of these dtypes over a space of ``rank``
    dimensions (the output's; a reduction's input when ``reduce`` gives its dimensions and mean-ness).

    Pointwise: one program per ``BLOCK`` elements of the output, each decomposed into space indices. With a
    reduction: one program per output element, its kept indices scalars, a loop over the reduced elements in
    blocks of ``BLOCK`` (their indices vectors), the pointwise value summed in fp32 registers, divided by
    their count for a mean."""
    steps = parse(program)
    if rank > _MAX_RANK:
        raise KernelError(where_what_got(_WHERE, f"outputs of rank <= {_MAX_RANK}", rank, "leave it unfused"))
    n_in = len(in_dtypes)
    reduced, mean = reduce if reduce else ((), False)
    kept = [k for k in range(rank) if k not in reduced]
    dims = [f"d{k}" for k in range(rank)]
    strides = [f"s{i}_{k}" for i in range(n_in) for k in range(rank)]
    out_strides = [f"so_{k}" for k in range(rank)]
    params = ["out_ptr", *[f"in{i}" for i in range(n_in)], "n_elements", *dims, *strides, *out_strides,
              "BLOCK: tl.constexpr"]
    lines = ["import triton", "import triton.language as tl", "", "", "@triton.jit",
             f"def fused_kernel({', '.join(params)}):"]
    pad = "    "
    if reduce:
        # n_elements: the reduced count; one program per output element
        lines += ["    rem = tl.program_id(0).to(tl.int64)"]
        for k in reversed(kept):
            lines += [f"    i{k} = rem % d{k}", f"    rem = rem // d{k}"]
        lines += ["    acc = tl.zeros([BLOCK], tl.float32)",
                  "    for start in range(0, n_elements, BLOCK):",
                  "        r = start + tl.arange(0, BLOCK)",
                  "        mask = r < n_elements",
                  "        rem_r = r"]
        for k in reversed(reduced):
            lines += [f"        i{k} = rem_r % d{k}", f"        rem_r = rem_r // d{k}"]
        pad = "        "
    else:
        lines += ["    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
                  "    mask = offs < n_elements",
                  "    rem = offs"]
        for k in reversed(range(rank)):
            lines.append(f"    i{k} = rem % d{k}")
            if k:
                lines.append(f"    rem = rem // d{k}")
    env_in = []
    for i, dt in enumerate(in_dtypes):
        off = " + ".join(f"i{k} * s{i}_{k}" for k in range(rank)) or ("0" if reduce else "offs * 0")  # a block
        load = f"tl.load(in{i} + ({off}), mask=mask"
        if _kind(dt) == "f":
            lines.append(f"{pad}x{i} = {load}, other=0.0).to(tl.float32)")
        elif _kind(dt) == "b":
            lines.append(f"{pad}x{i} = {load}, other=0) != 0")
        else:
            lines.append(f"{pad}x{i} = {load}, other=0)")
        env_in.append(f"x{i}")

    def src(a):
        if isinstance(a, list) and len(a) == 2 and a[0] == "in":
            return env_in[a[1]]
        if isinstance(a, list) and len(a) == 2 and a[0] == "v":
            return f"v{a[1]}"
        if isinstance(a, list) and len(a) == 2 and a[0] == "dtype":
            return a
        return _f(a)

    body = steps[:-1] if reduce else steps
    for j, (op, args, kwargs) in enumerate(body):
        if op == "_to_copy.default":
            dtype = getattr(torch, kwargs["dtype"][1]) if "dtype" in kwargs else None
            expr = _cast(src(args[0]), dtype)
        else:
            expr = OPS[op](*[src(a) for a in args], **{k: (v if isinstance(v, str) else _lit(v))
                                                      for k, v in kwargs.items()})
        lines.append(f"{pad}v{j} = {expr}")
    if reduce:
        value = src(steps[-1][1][0])
        lines.append(f"        acc += tl.where(mask, {value} + tl.zeros([BLOCK], tl.float32), 0.0)")
        lines.append("    r = tl.sum(acc, axis=0)" + (" / n_elements" if mean else ""))
        lines.append(f"    out_off = {' + '.join(f'i{k} * so_{k}' for k in kept) or '0'}")
        lines.append("    mask = True")
    else:
        lines.append(f"    r = v{len(steps) - 1}")
        lines.append(f"    out_off = {' + '.join(f'i{k} * so_{k}' for k in range(rank)) or 'offs * 0'}")
    if out_dtype == torch.bool:
        lines.append("    tl.store(out_ptr + out_off, r.to(tl.int1), mask=mask)")
    elif out_dtype == torch.bfloat16:
        bits = _bf16_bits("r")
        lines.append(f"    tl.store(out_ptr + out_off, ({bits}).to(tl.uint16).to(tl.bfloat16, bitcast=True), "
                     "mask=mask)")
    else:
        lines.append(f"    tl.store(out_ptr + out_off, r.to({_TL[out_dtype]}), mask=mask)")
    return "\n".join(lines) + "\n"


def _lit(v):
    return _f(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _bf16_bits(a: str) -> str:
    """``a`` (fp32) rounded to nearest even at bf16, as its upper 16 bits in a uint32: by hand, since
    ``.to(tl.bfloat16)`` truncates under TRITON_INTERPRET=1 (torch and GPUs round); NaN stays a quiet NaN."""
    bits = f"{a}.to(tl.uint32, bitcast=True)"
    return f"tl.where({a} != {a}, 0x7FC0, ({bits} + 0x7FFF + (({bits} >> 16) & 1)) >> 16)"


def _cast(a: str, dtype: torch.dtype | None) -> str:
    """A cast inside fp32 registers: to a narrower float, round there and back; to fp32 or a wider type, as is."""
    if dtype is torch.bfloat16:
        return f"({_bf16_bits(a)} << 16).to(tl.float32, bitcast=True)"
    if dtype is torch.float16:
        return f"{a}.to({_TL[dtype]}).to(tl.float32)"
    if dtype is torch.bool:
        return f"({a} != 0)"
    return a


@functools.lru_cache(maxsize=1024)
def _kernel(source: str):
    key = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = _cache_dir() / f"fused_{key}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    spec = importlib.util.spec_from_file_location(f"memfit_fused_{key}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fused_kernel


def run_triton(program: str, inputs: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """The program as one generated Triton kernel (GPU, or CPU under ``TRITON_INTERPRET=1``)."""
    require_triton(_WHERE, triton, "run_chunked")
    if not inputs:
        raise KernelError(where_what_got(_WHERE, "at least one input", 0, "fuse ops that read tensors"))
    meta = _out_meta(program, inputs)
    device = inputs[0].device
    if any(x.device != device for x in inputs):
        raise KernelError(where_what_got(_WHERE, f"inputs on one device ({device})",
                                         sorted({str(x.device) for x in inputs}), "move them"))
    if out is None:
        out = _empty_out(meta, device)
    steps = parse(program)
    red = _space(steps, inputs)
    space = red[0] if red else tuple(meta.shape)
    rank = len(space)
    mean = bool(red) and steps[-1][0] == "mean.dim"
    source = generate_source(program, tuple(x.dtype for x in inputs), meta.dtype, rank,
                             (red[1], mean) if red else None)
    kernel = _kernel(source)
    require_gpu_or_interpreter(_WHERE, kernel, device)
    if out.numel() == 0:
        return out
    strides = []
    for x in inputs:
        strides += list(x.expand(space).stride()) if rank else []
    if red:  # the output's strides per space dimension (0 on a reduced one, which it may not have)
        dims, keepdim = red[1], red[2]
        it = iter(out.stride())
        out_strides = [0 if d in dims and not keepdim else next(it) for d in range(rank)]
        out_strides = [0 if d in dims else st for d, st in enumerate(out_strides)]
        n = math.prod(space[d] for d in dims)
        grid = (out.numel(),)
    else:
        out_strides, n = list(out.stride()), out.numel()
        grid = (triton.cdiv(n, _BLOCK),)
    kernel[grid](out, *inputs, n, *space, *strides, *out_strides, BLOCK=_BLOCK)
    return out
