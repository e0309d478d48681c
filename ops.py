"""memfit's own ops, as ``torch.library.custom_op`` so they survive tracing and carry FakeTensor meta.

Each op mutates its state in place and returns nothing; passes insert them into a TrainGraph and
the runtime's lowering swaps each one for a Triton launcher (CUDA) or its plain-torch reference (CPU).
The CPU implementation registered here is the reference, so a graph holding these ops also runs as is.

Gradient accumulation lives inside the update ops: with ``micro_steps > 1`` every micro-step but
the last adds the gradient into ``grad_acc`` and returns; the last one updates from the sum scaled
by ``1 / micro_steps`` and zeroes the accumulator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import projection as pj
from .errors import ConfigError, where_what_got
from .kernels.adamw import adamw_ref
from .kernels.sgd import sgd_ref

_LIB = "memfit"


@dataclass(frozen=True)
class WeightKernels:
    """The kernels an update op uses on an INT8 weight (Triton launchers or references): ``dequant(codes,
    scales, group) -> fp32``, ``requant(w, codes, scales, group, seed)`` writing codes and scales in place
    (stochastic rounding with ``seed``, nearest when it is None), and the fused AdamW step and GaLore
    project-back step with stochastic rounding (or None: dequantize, step, requantize)."""

    dequant: Callable
    requant: Callable
    adamw_int8: Callable | None = None
    lowrank_int8: Callable | None = None


def reference_weight_kernels() -> WeightKernels:
    from . import weights as wt

    def dequant(codes, scales, group):
        return wt.decode(codes, [scales], "int8", group, tuple(codes.shape), torch.float32)

    return WeightKernels(dequant, wt.requantize_int8, None)


def sr_seed(base: int, step: int) -> int:
    """The stochastic-rounding seed of one parameter's update at ``step`` (a 32-bit mix of both): the same
    on a resumed run, different at every step."""
    return (int(base) * 0x9E3779B1 + int(step) * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFF


@contextlib.contextmanager
def _int8_weight(wk: WeightKernels, param, wscale, wgroup, wseed, wround, step):
    """The tensor an update op steps: ``param`` itself, or for an INT8 weight (``wscale`` given) an fp32
    copy that is written back to the codes and scales afterwards (stochastic rounding unless ``wround`` is
    "nearest", the control)."""
    if wscale is None:
        yield param
        return
    p = wk.dequant(param, wscale, wgroup)
    yield p
    wk.requant(p, param, wscale, wgroup, sr_seed(wseed, step) if wround == "stochastic" else None)


def _fused_lowrank_int8(wk: WeightKernels, rule: str, wround: str) -> bool:
    """Whether a ``lowrank_update`` on an INT8 weight runs the fused project-back kernel: GaLore's rule (the
    others add a full-size gradient term) with stochastic rounding, when the kernels have it."""
    return wk.lowrank_int8 is not None and rule == "galore" and wround == "stochastic"


def _accumulated(grad: torch.Tensor, grad_acc: torch.Tensor | None, micro_step: int, micro_steps: int):
    """Return the gradient to apply now (None while still accumulating) and its extra scale."""
    if micro_steps <= 1:
        return grad, 1.0
    assert grad_acc is not None, "micro_steps > 1 needs a gradient accumulator"
    grad_acc.add_(grad)
    if micro_step < micro_steps - 1:
        return None, 1.0
    return grad_acc, 1.0 / micro_steps


# the schemas are written out: an optional tensor list (``grad_inputs``) is beyond schema inference
@torch.library.custom_op(f"{_LIB}::adamw_update",
                         mutates_args=("param", "exp_avg", "exp_avg_sq", "grad_acc", "wscale"), schema=(
                             "(Tensor(a0!) param, Tensor? grad, Tensor(a2!) exp_avg, Tensor(a3!) exp_avg_sq, "
                             "Tensor(a4!)? grad_acc, float lr, SymInt step, SymInt micro_step, float beta1, "
                             "float beta2, float eps, float weight_decay, SymInt micro_steps=1, "
                             "float spike_threshold=0., Tensor(a14!)? wscale=None, SymInt wgroup=0, SymInt wseed=0, "
                             'str wround="stochastic", str grad_program="", Tensor[]? grad_inputs=None) -> ()'))
def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_acc: torch.Tensor | None,
    lr: float,
    step: int,
    micro_step: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    micro_steps: int = 1,
    spike_threshold: float = 0.0,
    wscale: torch.Tensor | None = None,
    wgroup: int = 0,
    wseed: int = 0,
    wround: str = "stochastic",
    grad_program: str = "",
    grad_inputs: list[torch.Tensor] | None = None,
) -> None:
    run_adamw_update(adamw_ref, param, grad, exp_avg, exp_avg_sq, grad_acc, lr, step, micro_step,
                     beta1, beta2, eps, weight_decay, micro_steps, spike_threshold, wscale, wgroup, wseed, wround,
                     grad_program, grad_inputs)


@adamw_update.register_fake
def _(*args, **kwargs):
    return None


def run_adamw_update(kernel, param, grad, exp_avg, exp_avg_sq, grad_acc, lr, step, micro_step,
                     beta1, beta2, eps, weight_decay, micro_steps=1, spike_threshold=0.0, wscale=None, wgroup=0,
                     wseed=0, wround="stochastic", grad_program="", grad_inputs=None, *,
                     wk: WeightKernels | None = None, fused=None):
    """Body of ``memfit::adamw_update`` with the elementwise step supplied (Triton launcher or reference).

    ``spike_threshold > 0`` is SPAM's spike-aware clipping, applied inside the step (passed as a keyword
    argument on the graph node, so the positional layout the other passes read is unchanged). With
    ``grad_program`` the gradient is that pointwise program of ``grad_inputs``, made one chunk at a time
    (``prologue_parts``; ``fused`` runs it, None: the chunked CPU evaluation) and stepped at once."""
    if grad_program:
        for box, g in prologue_parts(grad_program, grad_inputs, param, fused):
            run_adamw_update(kernel, _box(param, box), g, _box(exp_avg, box), _box(exp_avg_sq, box),
                             _box(grad_acc, box), lr, step, micro_step, beta1, beta2, eps, weight_decay, micro_steps,
                             spike_threshold, wk=wk)
        return
    g, scale = _accumulated(grad, grad_acc, micro_step, micro_steps)
    if g is None:
        return
    if not g.is_contiguous():
        g = g.contiguous()
    extra = {"spike_threshold": spike_threshold} if spike_threshold > 0 else {}
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=scale)
    wk = wk or reference_weight_kernels()
    if wscale is not None and wk.adamw_int8 is not None and wround == "stochastic" and not extra:
        wk.adamw_int8(param, wscale, g, exp_avg, exp_avg_sq, group=wgroup, seed=sr_seed(wseed, step), **hp)
    else:
        with _int8_weight(wk, param, wscale, wgroup, wseed, wround, step) as p:
            kernel(p, g, exp_avg, exp_avg_sq, **hp, **extra)
    if grad_acc is not None and micro_steps > 1:
        grad_acc.zero_()


@torch.library.custom_op(f"{_LIB}::sgd_update", mutates_args=("param", "momentum_buffer", "grad_acc", "wscale"),
                         schema=("(Tensor(a0!) param, Tensor? grad, Tensor(a2!)? momentum_buffer, "
                                 "Tensor(a3!)? grad_acc, float lr, SymInt step, SymInt micro_step, float momentum, "
                                 "float dampening, bool nesterov, float weight_decay, SymInt micro_steps=1, "
                                 "Tensor(a12!)? wscale=None, SymInt wgroup=0, SymInt wseed=0, "
                                 'str wround="stochastic", str grad_program="", Tensor[]? grad_inputs=None) -> ()'))
def sgd_update(
    param: torch.Tensor,
    grad: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    grad_acc: torch.Tensor | None,
    lr: float,
    step: int,
    micro_step: int,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    micro_steps: int = 1,
    wscale: torch.Tensor | None = None,
    wgroup: int = 0,
    wseed: int = 0,
    wround: str = "stochastic",
    grad_program: str = "",
    grad_inputs: list[torch.Tensor] | None = None,
) -> None:
    run_sgd_update(sgd_ref, param, grad, momentum_buffer, grad_acc, lr, step, micro_step, momentum, dampening,
                   nesterov, weight_decay, micro_steps, wscale, wgroup, wseed, wround, grad_program, grad_inputs)


@sgd_update.register_fake
def _(*args, **kwargs):
    return None


def run_sgd_update(kernel, param, grad, momentum_buffer, grad_acc, lr, step, micro_step, momentum, dampening,
                   nesterov, weight_decay, micro_steps=1, wscale=None, wgroup=0, wseed=0, wround="stochastic",
                   grad_program="", grad_inputs=None, *, wk: WeightKernels | None = None, fused=None):
    """Body of ``memfit::sgd_update`` with the elementwise step supplied (Triton launcher or reference); a
    ``grad_program`` makes the gradient chunk by chunk, as in ``run_adamw_update``."""
    if grad_program:
        for box, g in prologue_parts(grad_program, grad_inputs, param, fused):
            run_sgd_update(kernel, _box(param, box), g, _box(momentum_buffer, box), _box(grad_acc, box), lr, step,
                           micro_step, momentum, dampening, nesterov, weight_decay, micro_steps, wk=wk)
        return
    g, scale = _accumulated(grad, grad_acc, micro_step, micro_steps)
    if g is None:
        return
    if not g.is_contiguous():
        g = g.contiguous()
    with _int8_weight(wk or reference_weight_kernels(), param, wscale, wgroup, wseed, wround, step) as p:
        kernel(p, g, momentum_buffer, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
               weight_decay=weight_decay, first_step=step == 1, grad_scale=scale)
    if grad_acc is not None and micro_steps > 1:
        grad_acc.zero_()



# ---- a pointwise prologue inside an update op (fuse) ------------------------------------------------------
# AdamW's and SGD's updates walk the gradient with the weight, its moments and its accumulator element by
# element, so a pointwise program may make the gradient inside the op, one chunk of the weight's elements at a
# time: ``fuse`` folds a group whose one reader is such an op's gradient (a clipped gradient's ``g * coef``,
# say) into the op's ``grad_program`` / ``grad_inputs``, and the gradient never exists whole. The op and the
# tensors it walks with the gradient (all of the weight's shape, contiguous):
PROLOGUE_OPS = {"adamw_update": ("param", "exp_avg", "exp_avg_sq", "grad_acc"),
                "sgd_update": ("param", "momentum_buffer", "grad_acc")}


def prologue_boxes(shape: tuple[int, ...], program: str) -> list[tuple]:
    """The chunks of a weight a prologue is made in: the program's CPU chunks (``kernels.pointwise``), each
    a contiguous block of a contiguous weight, the first the largest."""
    from .kernels.pointwise import _chunks, chunk_of

    return list(_chunks(tuple(shape), (), chunk_of(program)))


def _box(t: torch.Tensor | None, box: tuple) -> torch.Tensor | None:
    return None if t is None else t[tuple(slice(lo, hi) for lo, hi in box)]


def prologue_parts(program: str, inputs: list[torch.Tensor], param: torch.Tensor, fused=None):
    """Yield ``(box, gradient chunk)`` over ``prologue_boxes(param.shape)``: the program on the inputs' slices
    (each broadcast to the weight's shape), written into one contiguous buffer of the largest chunk, reused."""
    from .kernels import pointwise as pw

    shape = tuple(param.shape)
    boxes = prologue_boxes(shape, program)
    if not boxes or not math.prod(shape):
        return
    dtype = pw.out_layout(program, tuple((tuple(x.shape), x.dtype, tuple(x.stride())) for x in inputs))[1]
    buf = torch.empty(math.prod(hi - lo for lo, hi in boxes[0]), dtype=dtype, device=param.device)
    for box in boxes:
        dims = tuple(hi - lo for lo, hi in box)
        part = buf[:math.prod(dims)].view(dims)
        (fused or pw.run_chunked)(program, [pw._slice(x, len(shape), box) for x in inputs], out=part)
        yield box, part


def prologue_workspace(node, a: OpArgs, triton: bool) -> int:
    """An update op with a ``grad_program``: the chunk buffer, with the program's chunk intermediates on the CPU
    (none in the generated kernel) and then the update's own workspace for one chunk."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .kernels import pointwise as pw

    param = a.param.meta["val"]
    shape = tuple(param.shape)
    first = prologue_boxes(shape, a.grad_program)[0]
    numel = math.prod(hi - lo for lo, hi in first)
    sigs = [(tuple(x.meta["val"].shape), x.meta["val"].dtype, tuple(x.meta["val"].stride())) for x in a.grad_inputs]
    with FakeTensorMode():
        parts = [pw._slice(torch.empty_strided(s, st, dtype=dt), len(shape), first) for s, dt, st in sigs]
        sliced = [(tuple(x.shape), x.dtype, tuple(x.stride())) for x in parts]
    dtype = pw.out_layout(a.grad_program, tuple(sigs))[1]
    evaluate = 0 if triton else pw.chunked_workspace(a.grad_program, sliced)
    low = param.dtype != torch.float32
    if node.target is torch.ops.memfit.adamw_update.default:
        own = adamw_workspace(numel, low, 0, a.micro_steps, triton, spike=(a.spike_threshold or 0) > 0)
    else:
        owns = a.micro_steps > 1 or a.weight_decay != 0 or (a.momentum != 0 and a.nesterov)
        own = sgd_workspace(numel, low, 0, a.micro_steps, triton, owns)
    return numel * dtype.itemsize + max(evaluate, own, FINITE_CHECK_BYTES)


# ---- low-rank projected update (GaLore / APOLLO / Fira / FRUGAL, Q-GaLore options) -----------------

SCHED_LEN = 10  # float64 per parameter: see _Sched
_SCHED_NEXT, _SCHED_GAP, _SCHED_COUNT, _SCHED_NORM, _SCHED_COS, _SCHED_NCOS = 0, 1, 2, 3, 4, 9
LAZY_WINDOW = 5


@dataclass(frozen=True)
class QuantKernels:
    """The block-wise quantization kernels an op body uses (Triton launchers or references)."""

    quantize: Callable
    dequantize: Callable
    pack_int4: Callable
    unpack_int4: Callable


def reference_quant_kernels() -> QuantKernels:
    from .kernels.quant import dequantize_blockwise_ref, pack_int4_ref, quantize_blockwise_ref, unpack_int4_ref

    return QuantKernels(quantize_blockwise_ref, dequantize_blockwise_ref, pack_int4_ref, unpack_int4_ref)


_CODES: dict[tuple[bool, int, torch.device], torch.Tensor] = {}


def code_map(signed: bool, bits: int, device: torch.device) -> torch.Tensor:
    """The code map of a quantized moment: dynamic (tree) maps, except Adam's second moment at 4 bits,
    which takes the linear map without zero, (i + 1) / 16: with only 16 levels a zero code would turn
    small second moments into 0 and the step into lr * m / eps (the zero-point problem of 4-bit Adam)."""
    key = (signed, bits, torch.device(device))
    if key not in _CODES:
        from .kernels.quant import dynamic_code

        linear = not signed and bits == 4
        code = torch.arange(1, 17, dtype=torch.float32) / 16 if linear else dynamic_code(signed, bits)
        _CODES[key] = code.to(device)
    return _CODES[key]


def state_block(bits: int) -> int:
    """Block size of quantized optimizer state: 256 for 8-bit, 128 for 4-bit (as in the papers)."""
    return 256 if bits == 8 else 128


def _load_moments(qk: QuantKernels, exp_avg, exp_avg_sq, absmax, shape, bits):
    if bits == 32:
        return exp_avg, exp_avg_sq
    block = state_block(bits)
    numel = math.prod(shape)
    out = []
    for q, row, signed in ((exp_avg, absmax[0], True), (exp_avg_sq, absmax[1], False)):
        if bits == 4:
            q = qk.unpack_int4(q, numel)
        out.append(qk.dequantize(q, row, code_map(signed, bits, q.device), block, shape))
    return out[0], out[1]


def _store_moments(qk: QuantKernels, m, v, exp_avg, exp_avg_sq, absmax, bits) -> None:
    if bits == 32:
        return
    block = state_block(bits)
    for t, q_out, row, signed in ((m, exp_avg, absmax[0], True), (v, exp_avg_sq, absmax[1], False)):
        q, amax = qk.quantize(t.contiguous(), code_map(signed, bits, t.device), block)
        q_out.copy_(qk.pack_int4(q) if bits == 4 else q)
        row.copy_(amax)


@torch.library.custom_op(f"{_LIB}::lowrank_update", mutates_args=(
    "param", "proj", "proj_meta", "exp_avg", "exp_avg_sq", "absmax", "sched", "grad_acc", "dct", "wscale"))
def lowrank_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    grad_right: torch.Tensor | None,
    proj: torch.Tensor | None,
    proj_meta: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    absmax: torch.Tensor | None,
    sched: torch.Tensor,
    grad_acc: torch.Tensor | None,
    dct: torch.Tensor | None,
    lr: float,
    step: int,
    micro_step: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    micro_steps: int,
    rank: int,
    gap: int,
    offset: int,
    scale: float,
    projector: str,
    rule: str,
    scaling: str,
    moments: str,
    lazy_threshold: float,
    proj_bits: int,
    state_bits: int,
    seed: int,
    limiter: float,
    seed_scheme: str = "memfit",
    wscale: torch.Tensor | None = None,
    wgroup: int = 0,
    wseed: int = 0,
    wround: str = "stochastic",
) -> None:
    from .kernels.lowrank import lowrank_apply_ref

    run_lowrank_update(lowrank_apply_ref, reference_quant_kernels(), param, grad, grad_right, proj, proj_meta,
                       exp_avg, exp_avg_sq, absmax, sched, grad_acc, dct, lr, step, micro_step, beta1, beta2, eps,
                       weight_decay, micro_steps, rank, gap, offset, scale, projector, rule, scaling, moments,
                       lazy_threshold, proj_bits, state_bits, seed, limiter, seed_scheme, wscale, wgroup, wseed,
                       wround)


@lowrank_update.register_fake
def _(*args, **kwargs):
    return None


def run_lowrank_update(apply, qk: QuantKernels, param, grad, grad_right, proj, proj_meta, exp_avg, exp_avg_sq,
                       absmax, sched, grad_acc, dct, lr, step, micro_step, beta1, beta2, eps, weight_decay,
                       micro_steps, rank, gap, offset, scale, projector, rule, scaling, moments, lazy_threshold,
                       proj_bits, state_bits, seed, limiter, seed_scheme="memfit", wscale=None, wgroup=0, wseed=0,
                       wround="stochastic", *, wk: WeightKernels | None = None) -> None:
    """Body of ``memfit::lowrank_update``: refresh the subspace when due, Adam on the projected
    gradient, then the rule's weight update (``apply`` is the fused project-back + update kernel). An INT8
    weight (``wscale`` given) is dequantized to fp32 for the step and written back with stochastic rounding."""
    if wscale is not None:
        if micro_steps > 1 and micro_step < micro_steps - 1:
            run_lowrank_update(apply, qk, param, grad, grad_right, proj, proj_meta, exp_avg, exp_avg_sq, absmax,
                               sched, grad_acc, dct, lr, step, micro_step, beta1, beta2, eps, weight_decay,
                               micro_steps, rank, gap, offset, scale, projector, rule, scaling, moments,
                               lazy_threshold, proj_bits, state_bits, seed, limiter, seed_scheme)
            return
        wk = wk or reference_weight_kernels()
        if _fused_lowrank_int8(wk, rule, wround):
            # the projected step as usual; its project-back lands in the codes in one kernel (no fp32 copy)
            def apply_int8(_codes, P, N, **hyper):
                wk.lowrank_int8(param, wscale, P, N, group=wgroup, seed=sr_seed(wseed, step), **hyper)

            run_lowrank_update(apply_int8, qk, param, grad, grad_right, proj, proj_meta, exp_avg, exp_avg_sq, absmax,
                               sched, grad_acc, dct, lr, step, micro_step, beta1, beta2, eps, weight_decay,
                               micro_steps, rank, gap, offset, scale, projector, rule, scaling, moments,
                               lazy_threshold, proj_bits, state_bits, seed, limiter, seed_scheme)
            return
        with _int8_weight(wk, param, wscale, wgroup, wseed, wround, step) as p:
            run_lowrank_update(apply, qk, p, grad, grad_right, proj, proj_meta, exp_avg, exp_avg_sq, absmax,
                               sched, grad_acc, dct, lr, step, micro_step, beta1, beta2, eps, weight_decay,
                               micro_steps, rank, gap, offset, scale, projector, rule, scaling, moments,
                               lazy_threshold, proj_bits, state_bits, seed, limiter, seed_scheme)
        return
    G: pj.Grad = grad if grad_right is None else (grad, grad_right)
    if micro_steps > 1:
        if isinstance(G, tuple):
            grad_acc.addmm_(G[0], G[1])
        else:
            grad_acc.add_(G)
        if micro_step < micro_steps - 1:
            return
        G = grad_acc.float().mul_(1.0 / micro_steps)
    shape = tuple(param.shape)
    side = pj.side_of(shape)
    low = pj.low_shape(shape, rank)
    sv = sched.tolist()
    sv_in = list(sv)
    if sv[_SCHED_GAP] == 0:
        sv[_SCHED_GAP] = float(gap)
    m, v = _load_moments(qk, exp_avg, exp_avg_sq, absmax, low, state_bits)

    def current(count: int) -> torch.Tensor:
        if projector == "random":
            if proj is not None:  # store_projector: kept between refreshes instead of regenerated
                return proj
            return pj.random_projector(shape, rank, seed, count, param.device, seed_scheme)
        if projector == "dct":
            return pj.dct_projector(_dct_basis(dct), proj)
        if proj_bits == 4:
            return pj.dequantize_int4(proj, proj_meta, pj.proj_shape(shape, rank), qk.unpack_int4)
        return proj

    count = int(sv[_SCHED_COUNT])
    if count == 0 or step >= sv[_SCHED_NEXT]:
        # a copy: the stored projector (svd / randomized at 32 bits, a stored random one) is overwritten below
        P_old = current(count - 1).clone() if count > 0 else None
        P = _refresh(qk, G, shape, side, rank, projector, proj, proj_meta, dct, proj_bits, seed, count, P_old,
                     seed_scheme)
        if P_old is not None:
            if lazy_threshold > 0:
                _lazy_gap(sv, P, P_old, lazy_threshold)
            if moments == "reset":
                m.zero_()
                v.zero_()
            elif moments == "rotate":
                pj.rotate_moments(m, v, P_old, P, side)
        sv[_SCHED_NEXT] = step + (sv[_SCHED_GAP] - offset if count == 0 and offset else sv[_SCHED_GAP])
        sv[_SCHED_COUNT] = count + 1
    else:
        P = current(count - 1)
    R = pj.project(G, P, side)
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    m.lerp_(R, 1 - beta1)
    v.mul_(beta2).addcmul_(R, R, value=1 - beta2)
    if rule == "galore":
        N = (m / bias1).div_(v.sqrt().div_(bias2_sqrt).add_(eps))
    else:  # as APOLLO's and Fira's own code: Adam's direction without bias correction, which the step
        N = m / v.sqrt().add_(eps)  # size carries, so the norm-growth limiter compares directions only
        lr_step = lr * bias2_sqrt / bias1
    _store_moments(qk, m, v, exp_avg, exp_avg_sq, absmax, state_bits)
    if rule == "galore":
        apply(param, P, N, lr=lr, weight_decay=weight_decay, scale=scale, side=side)
    else:
        if rule == "apollo" and not isinstance(G, tuple) and G.dtype == param.dtype == torch.float32:
            _apollo_in_place(param, G, pj.channel_norm_ratio(N, R, side, scaling), sv, side, scaling, scale,
                             limiter, lr, lr_step, weight_decay)
            upd = None
        elif rule == "apollo":
            Gf = pj.full(G)
            # APOLLO: the raw gradient scaled per channel by how Adam rescales its projection.
            upd = Gf.mul_(pj.channel_norm_ratio(N, R, side, scaling))
            if scale != 1.0:
                upd.mul_(math.sqrt(scale))
            if limiter > 0:
                upd, sv[_SCHED_NORM] = pj.limit_growth(upd, sv[_SCHED_NORM], limiter)
        else:
            resid = pj.full(G).sub_(pj.project_back(R, P, side))
            if rule == "fira":
                resid.mul_(pj.channel_norm_ratio(N, R, side, "channel"))
                if limiter > 0:
                    resid, sv[_SCHED_NORM] = pj.limit_growth(resid, sv[_SCHED_NORM], limiter)
            else:  # frugal: state-free signSGD outside the subspace
                resid.sign_()
            upd = resid.add_(pj.project_back(N, P, side), alpha=scale)
        if upd is not None:
            _apply_full(param, upd, lr, weight_decay, lr_step)
    for i, (new, old) in enumerate(zip(sv, sv_in, strict=True)):
        if new != old:  # per entry: most steps change one value (the limiter's norm) or none
            sched[i] = new
    if grad_acc is not None and micro_steps > 1:
        grad_acc.zero_()


def _apollo_in_place(param, G, ratio, sv, side, scaling, scale, limiter, lr, lr_step, weight_decay) -> None:
    """APOLLO's update, W -= lr_step·c·sqrt(scale)·(G ∘ ratio), in one pass over G, no (m, n) temporary
    (``lr_step`` is lr with Adam's bias corrections, ``lr`` scales the weight decay):
    the norm of the scaled gradient the limiter needs comes from G's per-channel norms (or its norm for
    tensor scaling), so the limiter's factor c is known before the weight is touched."""
    if scaling == "tensor":
        norm = float(ratio) * float(torch.linalg.vector_norm(G))
    else:
        per_channel = torch.linalg.vector_norm(G, dim=0 if side == "left" else 1)
        norm = float(torch.linalg.vector_norm(ratio.reshape(-1) * per_channel))
    norm *= math.sqrt(scale)
    c = 1.0
    if limiter > 0 and sv[_SCHED_NORM] > 0 and norm > limiter * sv[_SCHED_NORM]:
        c = limiter * sv[_SCHED_NORM] / norm
        norm = limiter * sv[_SCHED_NORM]
    if limiter > 0:
        sv[_SCHED_NORM] = norm
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    param.addcmul_(G, ratio, value=-lr_step * c * math.sqrt(scale))


def _apply_full(param: torch.Tensor, upd: torch.Tensor, lr: float, weight_decay: float, lr_step: float) -> None:
    """W = (1 - lr·wd)·W - lr_step·upd (decoupled decay at the plain lr, the update at the bias-corrected one)."""
    if param.dtype == torch.float32:
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(upd, alpha=-lr_step)
        return
    p = param.float()
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    param.copy_(p.add_(upd, alpha=-lr_step))


def _dct_basis(dct: torch.Tensor) -> torch.Tensor:
    """The shared DCT basis state, filled on first use (all zeros means not yet computed)."""
    if not bool(dct[0, 0] != 0):
        dct.copy_(pj.dct_matrix(dct.shape[0], dct.device))
    return dct


def _refresh(qk, G, shape, side, rank, projector, proj, proj_meta, dct, proj_bits, seed, count, P_old,
             seed_scheme="memfit"):
    """A new projector from G (stored in ``proj``), returned as the fp32 matrix the step uses."""
    if projector == "random":
        P = pj.random_projector(shape, rank, seed, count, proj.device if proj is not None else
                                (G[0] if isinstance(G, tuple) else G).device, seed_scheme)
        if proj is None:
            return P
        proj.copy_(P)
        return proj
    if projector == "dct":
        Q = _dct_basis(dct)
        idx = pj.dct_indices(G, rank, side, Q)
        proj.copy_(idx)
        return pj.dct_projector(Q, idx)
    if projector == "svd":
        A = pj.full(G)
        # finite and not all zero, with 0-dim temporaries only (isfinite and abs would each hold A-sized ones
        # beyond what the refresh declares): a NaN/inf makes the sum non-finite; only then the exact check
        finite = math.isfinite(float(A.sum())) or bool(torch.isfinite(A).all())
        if not (finite and (bool(A.amax() > 0) or bool(A.amin() < 0))):
            # SVD of a zero / non-finite gradient is meaningless (and may not converge): keep the subspace.
            if P_old is not None:
                return P_old
            P = _orthonormal(shape, side, rank, seed, A.device)
        else:
            P = pj.svd_projector(A, rank, side)
    else:
        P = pj.randomized_projector(G, rank, side, pj.seeded_generator(seed, count))
    if proj_bits == 4:
        packed, meta = pj.quantize_int4(P, qk.pack_int4)
        proj.copy_(packed)
        proj_meta.copy_(meta)
        return pj.dequantize_int4(proj, proj_meta, tuple(P.shape), qk.unpack_int4)
    proj.copy_(P)
    return proj


def _orthonormal(shape, side, rank, seed, device) -> torch.Tensor:
    gen = pj.seeded_generator(seed, -1)
    rows = pj.proj_shape(shape, rank)[0]
    Q, _ = torch.linalg.qr(torch.randn(rows, rank, generator=gen))
    return Q.to(device)


def _lazy_gap(sv: list[float], P: torch.Tensor, P_old: torch.Tensor, threshold: float) -> None:
    """Q-GaLore's lazy refresh: when the leading directions of the last LAZY_WINDOW refreshes agree
    (mean |cos| >= threshold), the subspace is stable; double the gap and start a new window."""
    a, b = P[:, 0], P_old[:, 0]
    cos = float((a @ b).abs() / (a.norm() * b.norm() + 1e-12))
    n = int(sv[_SCHED_NCOS])
    sv[_SCHED_COS + n % LAZY_WINDOW] = cos
    n += 1
    if n >= LAZY_WINDOW and sum(sv[_SCHED_COS:_SCHED_COS + LAZY_WINDOW]) / LAZY_WINDOW >= threshold:
        sv[_SCHED_GAP] *= 2
        n = 0
    sv[_SCHED_NCOS] = n


# ---- AdamW with block-wise quantized (8- or 4-bit) moments --------------------------------------

@torch.library.custom_op(f"{_LIB}::adam8bit_update",
                         mutates_args=("param", "q_m", "q_v", "absmax", "grad_acc", "wscale"))
def adam8bit_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    q_m: torch.Tensor,
    q_v: torch.Tensor,
    absmax: torch.Tensor,
    grad_acc: torch.Tensor | None,
    lr: float,
    step: int,
    micro_step: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    micro_steps: int,
    bits: int,
    wscale: torch.Tensor | None = None,
    wgroup: int = 0,
    wseed: int = 0,
    wround: str = "stochastic",
) -> None:
    from .kernels.adam8bit import adam8bit_ref

    run_adam8bit_update(adam8bit_ref, reference_quant_kernels(), param, grad, q_m, q_v, absmax, grad_acc, lr, step,
                        micro_step, beta1, beta2, eps, weight_decay, micro_steps, bits, wscale, wgroup, wseed, wround)


@adam8bit_update.register_fake
def _(*args, **kwargs):
    return None


def run_adam8bit_update(kernel, qk: QuantKernels, param, grad, q_m, q_v, absmax, grad_acc, lr, step, micro_step,
                        beta1, beta2, eps, weight_decay, micro_steps, bits, wscale=None, wgroup=0, wseed=0,
                        wround="stochastic", *, wk: WeightKernels | None = None) -> None:
    """Body of ``memfit::adam8bit_update``: 8-bit goes through the fused kernel (dequantize, update and
    requantize one block in registers); 4-bit unpacks, updates with the AdamW reference, repacks."""
    g, gscale = _accumulated(grad, grad_acc, micro_step, micro_steps)
    if g is None:
        return
    if not g.is_contiguous():
        g = g.contiguous()
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, grad_scale=gscale)
    with _int8_weight(wk or reference_weight_kernels(), param, wscale, wgroup, wseed, wround, step) as p:
        if bits == 8:
            kernel(p, g, q_m, absmax[0], q_v, absmax[1], code_map(True, 8, p.device),
                   code_map(False, 8, p.device), block=state_block(8), **hp)
        else:
            m, v = _load_moments(qk, q_m, q_v, absmax, tuple(p.shape), bits)
            adamw_ref(p, g, m, v, **hp)
            _store_moments(qk, m, v, q_m, q_v, absmax, bits)
    if grad_acc is not None and micro_steps > 1:
        grad_acc.zero_()


# ---- weights held encoded (quantize_weights, lora's frozen base) and fake-quantized (qat) ---------------------

@torch.library.custom_op(f"{_LIB}::dequant_weight", mutates_args=())
def dequant_weight(codes: torch.Tensor, scales: torch.Tensor, scales2: torch.Tensor | None, codec: str, group: int,
                   shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The weight an encoding holds (``memfit.weights``), as a new ``dtype`` tensor of ``shape``: a transient
    made just before the ops that read it, in the forward and again in the backward."""
    return run_dequant_weight(None, codes, scales, scales2, codec, group, shape, dtype)


@dequant_weight.register_fake
def _(codes, scales, scales2, codec, group, shape, dtype):
    return codes.new_empty(tuple(shape), dtype=dtype)


def run_dequant_weight(kernels, codes, scales, scales2, codec, group, shape, dtype):
    """Body of ``memfit::dequant_weight``; ``kernels`` maps a codec to a Triton dequantize launcher (None: the
    references)."""
    from . import weights as wt

    if kernels is not None and scales2 is None and codec in kernels:
        return kernels[codec](codes, scales, group, tuple(shape), dtype)
    return wt.decode(codes, [scales] if scales2 is None else [scales, scales2], codec, group, tuple(shape), dtype)


@torch.library.custom_op(f"{_LIB}::lsq_quant", mutates_args=())
def lsq_quant(w: torch.Tensor, step: torch.Tensor, group: int, qmax: int) -> torch.Tensor:
    """LSQ's fake quantization (Esser et al.): ``clamp(round(w / s), -qmax - 1, qmax) * s`` with one step
    size ``s`` per group of ``group`` flattened elements (round half up: floor(x + 0.5))."""
    return run_lsq_quant(w, step, group, qmax)


@lsq_quant.register_fake
def _(w, step, group, qmax):
    return torch.empty_like(w)


def run_lsq_quant(w, step, group, qmax):
    """Body of ``memfit::lsq_quant`` (the lowering calls it directly, so a measured step sees its
    temporaries): one fp32 buffer, rounded, clamped and rescaled in place."""
    s = step.float()[:, None]
    x = w.float().reshape(-1, group) / s
    x.add_(0.5).floor_().clamp_(-qmax - 1, qmax).mul_(s)
    return x.reshape(w.shape).to(w.dtype)


@torch.library.custom_op(f"{_LIB}::lsq_quant_backward", mutates_args=())
def lsq_quant_backward(grad: torch.Tensor, w: torch.Tensor, step: torch.Tensor, group: int, qmax: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``lsq_quant``: the straight-through estimator for ``w`` (passed inside the clipping
    range, zero outside) and LSQ's step gradient, per group ``sum(grad * (round(x) - x))`` inside the range
    and ``sum(grad * bound)`` outside, scaled by LSQ's ``1 / sqrt(group * qmax)``."""
    return run_lsq_quant_backward(grad, w, step, group, qmax)


@lsq_quant_backward.register_fake
def _(grad, w, step, group, qmax):
    return torch.empty_like(w), torch.empty_like(step)


def run_lsq_quant_backward(grad, w, step, group, qmax):
    """Body of ``memfit::lsq_quant_backward``. The step gradient's per-element factor is
    ``clamp(floor(x + 0.5), lo, hi) - x · inside`` (inside the range round(x) - x, outside the bound), made in
    one fp32 buffer beside ``x`` and reduced before the weight gradient is allocated."""
    s = step.float()[:, None]
    x = w.float().reshape(-1, group) / s
    lo, hi = float(-qmax - 1), float(qmax)
    inside = x >= lo
    inside &= x <= hi
    r = x.add(0.5).floor_().clamp_(lo, hi)
    r.sub_(x.mul_(inside))
    del x
    r.mul_(grad.reshape(-1, group))
    ds = r.sum(dim=1).div_(math.sqrt(group * qmax)).to(step.dtype)
    del r
    dw = torch.where(inside, grad.reshape(-1, group), 0.0).reshape(w.shape).to(w.dtype)
    return dw, ds


def lsq_workspace(target, numel: int, groups: int, w_size: int, grad_size: int, step_size: int) -> int:
    """Bytes ``run_lsq_quant`` / ``run_lsq_quant_backward`` hold beyond their outputs (measured on CPU):
    the fp32 copies of ``w`` and the step sizes when those are not fp32, the fp32 buffer(s), the range mask."""
    wf = 4 * numel if w_size != 4 else 0  # w.float(), alive while it is divided
    sf = 4 * groups if step_size != 4 else 0
    out = numel * w_size
    if target is torch.ops.memfit.lsq_quant.default:
        return sf + max(wf + 4 * numel, 4 * numel + (out if w_size != 4 else 0)) - out
    ds = groups * 4 + (groups * step_size if step_size != 4 else 0)
    mask = numel  # inside (bool)
    # x / s; the mask beside x (and its second comparison); r beside x; x freed, the sum beside r
    during = max(wf + 4 * numel, 4 * numel + 2 * mask, 8 * numel + mask, 4 * numel + mask + ds)
    where = numel * grad_size  # torch.where in grad's dtype, then .to(w.dtype) when they differ
    after = mask + groups * step_size + where + (out if grad_size != w_size else 0)
    return sf + max(during, after) - out - groups * step_size


# ---- data parallel (data_parallel) --------------------------------------------------------------------------

# bytes each rank has sent into all-reduces since the last reset (what ``data_parallel`` communicates)
COMMUNICATED = {"all_reduce_bytes": 0, "all_gather_bytes": 0, "reduce_bytes": 0, "broadcast_bytes": 0,
                "projected_bytes": 0, "calls": 0}


@torch.library.custom_op(f"{_LIB}::all_reduce_mean", mutates_args=())
def all_reduce_mean(grad: torch.Tensor, group: str, world: int, name: str = "") -> torch.Tensor:
    """The mean of ``grad`` over the ranks of process group ``group`` (its name), as a new tensor: a copy
    all-reduced by sum with ``torch.distributed`` and divided by ``world``. ``name`` (the value's, for
    errors: a parameter's gradient) is named when the collective fails or times out."""
    return run_all_reduce_mean(grad, group, world, name)


@all_reduce_mean.register_fake
def _(grad, group, world, name=""):
    return torch.empty_like(grad)


def _settle(tensors, before: list[int]) -> None:
    """Wait (at most about 10 ms) until the process group's worker thread has dropped its references to
    ``tensors`` (back to the counts ``before`` the collective): gloo marks a collective complete before its
    thread lets go of the buffers, so a tensor freed right after would otherwise live on for a moment,
    beyond where the plan frees it."""
    import time

    for t, base in zip(tensors, before, strict=True):
        deadline, calm = time.perf_counter() + 0.01, 0
        while calm < 3 and time.perf_counter() < deadline:  # three looks in a row at the count from before
            calm = calm + 1 if t._use_count() <= base else 0
            time.sleep(0)


def _collective(op: str, name: str, group: str, fn, *settle: torch.Tensor):
    """Run ``fn`` (a torch.distributed call); its failure (a timeout, a rank gone) as a CollectiveError
    naming the op and the value it waited on. ``settle``: tensors the call used, waited for (``_settle``)."""
    from .errors import CollectiveError

    settle = settle if all(hasattr(t, "_use_count") for t in settle) else ()
    before = [t._use_count() for t in settle]
    try:
        out = fn()
        _settle(settle, before)
        return out
    except RuntimeError as e:  # gloo / NCCL report timeouts and closed peers as RuntimeError (DistError)
        raise CollectiveError(where_what_got(
            f"memfit::{op} of {name or 'a value'} (process group {group!r})",
            "every rank of the group in this collective within the group's timeout",
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
            "check that every rank runs the same steps on the same batch shapes; raise the timeout with "
            "torch.distributed.init_process_group(timeout=...)"), node=f"{op}:{name}") from e


def run_all_reduce_mean(grad, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    out = grad.clone()
    _collective("all_reduce_mean", name, group,
                lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_resolve_process_group(group)), out)
    COMMUNICATED["all_reduce_bytes"] += out.numel() * out.element_size()
    COMMUNICATED["calls"] += 1
    return out.div_(world)


@torch.library.custom_op(f"{_LIB}::all_gather_cat", mutates_args=())
def all_gather_cat(t: torch.Tensor, dim: int, scale: float, group: str, world: int, name: str = "") -> torch.Tensor:
    """Every rank's ``t`` of process group ``group``, concatenated along ``dim`` in rank order and multiplied
    by ``scale``: a gradient held as factors ``L @ R`` (tokens inner) averaged over ranks as
    ``[L_1 .. L_W] @ [R_1; ..; R_W] / W`` without forming it."""
    return run_all_gather_cat(t, dim, scale, group, world, name)


@all_gather_cat.register_fake
def _(t, dim, scale, group, world, name=""):
    shape = list(t.shape)
    shape[dim] *= world
    return t.new_empty(shape)


def run_all_gather_cat(t, dim, scale, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    parts = [torch.empty_like(t) for _ in range(world)]
    _collective("all_gather_cat", name, group,
                lambda parts=parts: dist.all_gather(parts, t.contiguous(), group=_resolve_process_group(group)), *parts)
    COMMUNICATED["all_gather_bytes"] += t.numel() * t.element_size()
    COMMUNICATED["calls"] += 1
    out = torch.cat(parts, dim)
    del parts
    return out.mul_(scale) if scale != 1.0 else out


@torch.library.custom_op(f"{_LIB}::all_reduce_accumulated", mutates_args=("grad_acc",))
def all_reduce_accumulated(grad: torch.Tensor, grad_acc: torch.Tensor, micro_step: int, micro_steps: int,
                           group: str, world: int, name: str = "") -> torch.Tensor:
    """Gradient accumulation, data parallel, one collective per optimizer step: on every micro-step but the
    last, ``grad`` unchanged (a copy; the update adds it to its accumulator ``grad_acc``); on the last, the
    accumulator becomes the group's mean of (accumulator + ``grad``), all-reduced in place, and zeros are
    returned, so the update's own ``grad_acc + grad`` is that mean exactly."""
    return run_all_reduce_accumulated(grad, grad_acc, micro_step, micro_steps, group, world, name)


@all_reduce_accumulated.register_fake
def _(grad, grad_acc, micro_step, micro_steps, group, world, name=""):
    return torch.empty_like(grad)


def run_all_reduce_accumulated(grad, grad_acc, micro_step, micro_steps, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    if micro_step < micro_steps - 1:
        return grad.clone()
    grad_acc.add_(grad)
    _collective("all_reduce_accumulated", name, group,
                lambda: dist.all_reduce(grad_acc, op=dist.ReduceOp.SUM, group=_resolve_process_group(group)))
    COMMUNICATED["all_reduce_bytes"] += grad_acc.numel() * grad_acc.element_size()
    COMMUNICATED["calls"] += 1
    grad_acc.div_(world)
    return torch.zeros_like(grad)


@torch.library.custom_op(f"{_LIB}::all_reduce_projected", mutates_args=())
def all_reduce_projected(grad: torch.Tensor, grad_right: torch.Tensor | None, proj: torch.Tensor,
                         sched: torch.Tensor, step: int, side: str, group: str, world: int,
                         name: str = "") -> torch.Tensor:
    """GaLore's mean gradient over the group's ranks, sent in its subspace: on a step where the subspace
    refreshes (read from the update's schedule ``sched`` before the update runs: its first step, or ``step``
    at or past the next refresh) the whole gradient is all-reduced (the SVD needs it); on the others each rank
    projects its gradient with the stored projector ``proj`` (the same on every rank: computed from the same
    reduced gradient), all-reduces the projection (rank x n instead of m x n) and returns it projected back,
    ``P (P^T G_mean)``, whose projection the update takes: ``P^T P = I``, so it steps the mean projected
    gradient. ``grad_right``: the gradient as factors ``grad @ grad_right``, projected without forming it."""
    return run_all_reduce_projected(grad, grad_right, proj, sched, step, side, group, world, name)


@all_reduce_projected.register_fake
def _(grad, grad_right, proj, sched, step, side, group, world, name=""):
    m = grad.shape[0]
    n = grad_right.shape[1] if grad_right is not None else grad.shape[1]
    return grad.new_empty((m, n), dtype=torch.float32)


def projected_refresh(sched: torch.Tensor, step: int) -> bool:
    """Whether the lowrank update with schedule ``sched`` refreshes its subspace at ``step``."""
    return int(sched[_SCHED_COUNT]) == 0 or step >= float(sched[_SCHED_NEXT])


def run_all_reduce_projected(grad, grad_right, proj, sched, step, side, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    G = (grad, grad_right) if grad_right is not None else grad
    pg = _resolve_process_group(group)
    if projected_refresh(sched, step):
        out = pj.full(G)
        _collective("all_reduce_projected (a refresh: the whole gradient)", name, group,
                    lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=pg), out)
        COMMUNICATED["all_reduce_bytes"] += out.numel() * out.element_size()
        COMMUNICATED["calls"] += 1
        return out.div_(world)
    R = pj.project(G, proj, side)
    _collective("all_reduce_projected", name, group, lambda: dist.all_reduce(R, op=dist.ReduceOp.SUM, group=pg), R)
    COMMUNICATED["projected_bytes"] += R.numel() * R.element_size()
    COMMUNICATED["calls"] += 1
    return pj.project_back(R.div_(world), proj, side)


def projected_workspace(m: int, n: int, rank: int, side: str, tokens: int) -> int:
    """What ``all_reduce_projected`` (fp32 gradients only) holds beyond its (m, n) fp32 output: the projection
    (rank x n or m x rank) while it is projected back, and from factors (``tokens`` inner) their partial
    product with the projector (rank x tokens or tokens x rank) while the projection is made. A refresh
    forms or copies the gradient into the output itself."""
    low = 4 * rank * (n if side == "left" else m)
    return low + 4 * rank * tokens


# ---- sharded optimizer state (data_parallel shard="state") ---------------------------------------------------

@torch.library.custom_op(f"{_LIB}::reduce_mean", mutates_args=())
def reduce_mean(grad: torch.Tensor, dst: int, group: str, world: int, name: str = "") -> torch.Tensor:
    """On the rank ``dst`` of process group ``group`` (its group rank) that owns a parameter: the mean of
    ``grad`` over the group's ranks, as a new contiguous tensor (a copy reduced by sum with
    ``torch.distributed.reduce`` onto this rank, divided by ``world``). The other ranks call
    ``reduce_send_`` in the same place."""
    return run_reduce_mean(grad, dst, group, world, name)


@reduce_mean.register_fake
def _(grad, dst, group, world, name=""):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _global_rank(group: str, rank: int) -> int:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_global_rank(_resolve_process_group(group), rank)


def run_reduce_mean(grad, dst, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    out = grad.clone(memory_format=torch.contiguous_format)
    _collective("reduce_mean", name, group, lambda: dist.reduce(out, dst=_global_rank(group, dst), op=dist.ReduceOp.SUM,
                                                               group=_resolve_process_group(group)), out)
    COMMUNICATED["reduce_bytes"] += out.numel() * out.element_size()
    COMMUNICATED["calls"] += 1
    return out.div_(world)


@torch.library.custom_op(f"{_LIB}::reduce_send_", mutates_args=("grad",))
def reduce_send_(grad: torch.Tensor, dst: int, group: str, world: int, name: str = "") -> None:
    """This rank's part of ``reduce_mean`` onto rank ``dst`` (the parameter's owner): ``grad`` is sent and
    may be overwritten (the collective's scratch; it is the gradient's last use), nothing is returned. A
    gradient that is not contiguous is sent through a contiguous copy."""
    run_reduce_send_(grad, dst, group, world, name)


@reduce_send_.register_fake
def _(grad, dst, group, world, name=""):
    return None


def run_reduce_send_(grad, dst, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    buf = grad if grad.is_contiguous() else grad.contiguous()
    _collective("reduce_mean", name, group, lambda: dist.reduce(buf, dst=_global_rank(group, dst), op=dist.ReduceOp.SUM,
                                                               group=_resolve_process_group(group)), buf)
    COMMUNICATED["reduce_bytes"] += buf.numel() * buf.element_size()
    COMMUNICATED["calls"] += 1


@torch.library.custom_op(f"{_LIB}::broadcast_", mutates_args=("t",))
def broadcast_(t: torch.Tensor, src: int, group: str, name: str = "") -> None:
    """``t`` (a parameter, in place) from group rank ``src`` (its owner, which just updated it) to every
    rank of process group ``group``."""
    run_broadcast_(t, src, group, name)


@broadcast_.register_fake
def _(t, src, group, name=""):
    return None


def run_broadcast_(t, src, group, name=""):

    _broadcast(t, src, group, name, "broadcast_", wait=True)


def _broadcast(t, src, group, name, op, wait):
    """``t`` broadcast from group rank ``src`` of ``group``: finished (``wait``) or left running (its work
    returned); the bytes counted on the sender."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    work = _collective(op, name, group, lambda: dist.broadcast(t, src=dist.get_global_rank(pg, src), group=pg,
                                                               async_op=not wait))
    if dist.get_rank(pg) == src:
        COMMUNICATED["broadcast_bytes"] += t.numel() * t.element_size()
    COMMUNICATED["calls"] += 1
    return work


# ---- bucketed, overlapped all-reduce (data_parallel bucket_bytes > 0) --------------------------------------

_PENDING: dict[int, tuple] = {}  # a started bucket's data_ptr -> (its async works, its name, the group's name)


@torch.library.custom_op(f"{_LIB}::all_reduce_start", mutates_args=())
def all_reduce_start(grads: list[torch.Tensor], group: str, world: int, name: str = "") -> torch.Tensor:
    """A bucket: ``grads`` (one dtype) copied one after another into a new flat tensor, whose all-reduce (sum)
    over process group ``group`` is started and left running (``async_op``) while the step goes on; the
    bucket is returned at once and must not be read before ``bucket_wait`` on it. Reading each gradient
    back is a view of the bucket (``reduced = bucket[offset:offset + numel].view(shape)``)."""
    return run_all_reduce_start(grads, group, world, name)


@all_reduce_start.register_fake
def _(grads, group, world, name=""):
    return grads[0].new_empty((sum(g.numel() for g in grads),))


def run_all_reduce_start(grads, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    flat = grads[0].new_empty((sum(g.numel() for g in grads),))
    at = 0
    for g in grads:
        flat[at:at + g.numel()].view(g.shape).copy_(g)
        at += g.numel()
    work = _collective("all_reduce_start", name, group,
                       lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=_resolve_process_group(group),
                                               async_op=True))
    _PENDING[flat.data_ptr()] = ([work], name, group)
    COMMUNICATED["all_reduce_bytes"] += flat.numel() * flat.element_size()
    COMMUNICATED["calls"] += 1
    return flat


def _not_started(op: str, starts: str) -> RuntimeError:
    """A wait on a tensor no start op of this process has in flight: the graph's order was broken."""
    return RuntimeError(where_what_got(f"memfit::{op}", f"a tensor {starts} started a collective on earlier in "
                                       "the same step", "none in flight on it",
                                       "run the step's graph in its order (data_parallel places each start "
                                       "before its wait); after a failed step, ops.drain_collectives()"))


@torch.library.custom_op(f"{_LIB}::reduce_start", mutates_args=())
def reduce_start(grads: list[torch.Tensor], owners: list[int], group: str, world: int, name: str = "") -> torch.Tensor:
    """A bucket of sharded gradients: ``grads`` (one dtype, ordered so that each owner's are contiguous;
    ``owners[i]`` is the group rank owning ``grads[i]``) copied into a new flat tensor, and for each owner a
    ``torch.distributed.reduce`` (sum) of its run onto it started and left running. After ``bucket_wait`` an
    owner's run holds the group's mean; the rest of the bucket is scratch."""
    return run_reduce_start(grads, owners, group, world, name)


@reduce_start.register_fake
def _(grads, owners, group, world, name=""):
    return grads[0].new_empty((sum(g.numel() for g in grads),))


def run_reduce_start(grads, owners, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    flat = grads[0].new_empty((sum(g.numel() for g in grads),))
    runs, at = [], 0
    for g, o in zip(grads, owners, strict=True):
        flat[at:at + g.numel()].view(g.shape).copy_(g)
        if runs and runs[-1][0] == o:
            runs[-1][2] = at + g.numel()
        else:
            runs.append([o, at, at + g.numel()])
        at += g.numel()
    works = [_collective("reduce_start", name, group,
                         lambda o=o, a=a, b=b: dist.reduce(flat[a:b], dst=dist.get_global_rank(pg, o),
                                                           op=dist.ReduceOp.SUM, group=pg, async_op=True))
             for o, a, b in runs]
    _PENDING[flat.data_ptr()] = (works, name, group)
    COMMUNICATED["reduce_bytes"] += flat.numel() * flat.element_size()
    COMMUNICATED["calls"] += len(runs)
    return flat


@torch.library.custom_op(f"{_LIB}::bucket_wait", mutates_args=("bucket",))
def bucket_wait(bucket: torch.Tensor, world: int) -> None:
    """The end of a bucket's collectives (``all_reduce_start``'s all-reduce, ``reduce_start``'s reduces):
    waits for them, then divides the bucket by ``world`` in place, so it holds the mean of every rank's
    gradients (a reduced bucket: where this rank owns them)."""
    run_bucket_wait(bucket, world)


@bucket_wait.register_fake
def _(bucket, world):
    return None


def run_bucket_wait(bucket, world):
    pending = _PENDING.pop(bucket.data_ptr(), None)
    if pending is None:
        raise _not_started("bucket_wait", "all_reduce_start or reduce_start")
    works, name, group = pending[:3]
    for work in works:
        _collective("bucket_wait", name, group, work.wait)
    del works, pending
    _calm(bucket)  # the process group's thread lets go of the bucket: it may die right after this
    bucket.div_(world)


def _calm(t: torch.Tensor) -> None:
    """Wait (at most about 10 ms) until ``t``'s reference count has stopped falling: a finished collective's
    worker thread drops its references to the buffers a moment after the work completes."""
    import time

    if not hasattr(t, "_use_count"):
        return
    deadline, last, calm = time.perf_counter() + 0.01, t._use_count(), 0
    while calm < 3 and time.perf_counter() < deadline:
        time.sleep(0)
        now = t._use_count()
        calm, last = (calm + 1, now) if now == last else (0, now)


_BROADCASTS: dict[str, list] = {}  # a process group's name -> its broadcasts started and not yet waited for


@torch.library.custom_op(f"{_LIB}::broadcast_start_", mutates_args=("t",))
def broadcast_start_(t: torch.Tensor, src: int, group: str, name: str = "") -> None:
    """``broadcast_`` left running: ``t`` (a parameter its owner, group rank ``src``, just updated) is sent
    to, or received by, this rank while the step goes on; ``broadcasts_wait`` at the step's end finishes
    every one. Nothing reads or writes ``t`` in between (the next reads are the next step's)."""
    run_broadcast_start_(t, src, group, name)


@broadcast_start_.register_fake
def _(t, src, group, name=""):
    return None


def run_broadcast_start_(t, src, group, name=""):
    _BROADCASTS.setdefault(group, []).append((_broadcast(t, src, group, name, "broadcast_start_", wait=False), name))


@torch.library.custom_op(f"{_LIB}::broadcasts_wait", mutates_args=("ts",))
def broadcasts_wait(ts: list[torch.Tensor], group: str) -> None:
    """Every ``broadcast_start_`` of process group ``group`` finished: ``ts`` are the tensors they wrote
    (named so that the graph orders this after them)."""
    run_broadcasts_wait(ts, group)


@broadcasts_wait.register_fake
def _(ts, group):
    return None


def run_broadcasts_wait(ts, group):
    pending = _BROADCASTS.pop(group, [])
    for work, name in pending:
        _collective("broadcasts_wait", name, group, work.wait)


_LENT: dict[int, list] = {}  # a fetched or lent parameter's data_ptr -> its broadcasts in flight, oldest first


@torch.library.custom_op(f"{_LIB}::fetch_start", mutates_args=())
def fetch_start(shape: list[int], dtype: torch.dtype, device: torch.device, src: int, group: str,
                name: str = "") -> torch.Tensor:
    """``fetch_param`` left running: a new tensor the owner (group rank ``src``, calling ``lend_start_`` in
    the same place) broadcasts into while the step goes on; ``fetch_wait_`` on it before it is read."""
    return run_fetch_start(shape, dtype, device, src, group, name)


@fetch_start.register_fake
def _(shape, dtype, device, src, group, name=""):
    return torch.empty(shape, dtype=dtype, device=device)


def run_fetch_start(shape, dtype, device, src, group, name=""):
    out = torch.empty(shape, dtype=dtype, device=device)
    _LENT.setdefault(out.data_ptr(), []).append((_broadcast(out, src, group, name, "fetch_start", wait=False),
                                                 name, group))
    return out


@torch.library.custom_op(f"{_LIB}::lend_start_", mutates_args=("t",))
def lend_start_(t: torch.Tensor, src: int, group: str, name: str = "") -> None:
    """The owner's end of ``fetch_start``: its parameter ``t`` broadcast from this rank (group rank ``src``),
    left running; ``fetch_wait_`` on it finishes it (before anything writes it)."""
    _LENT.setdefault(t.data_ptr(), []).append((_broadcast(t, src, group, name, "lend_start_", wait=False), name,
                                               group))


@lend_start_.register_fake
def _(t, src, group, name=""):
    return None


@torch.library.custom_op(f"{_LIB}::fetch_wait_", mutates_args=("t",))
def fetch_wait_(t: torch.Tensor) -> None:
    """The oldest broadcast in flight on ``t`` (``fetch_start``'s result, or a parameter ``lend_start_`` sent)
    finished: ``t`` may be read."""
    pending = _LENT.get(t.data_ptr())
    if not pending:
        raise _not_started("fetch_wait_", "fetch_start or lend_start_")
    work, name, group = pending.pop(0)
    if not pending:
        del _LENT[t.data_ptr()]
    _collective("fetch_wait_", name, group, work.wait)
    del work
    _calm(t)  # a fetched copy may die right after its reader: the process group's thread lets go of it first


@fetch_wait_.register_fake
def _(t):
    return None


@torch.library.custom_op(f"{_LIB}::projected_start", mutates_args=())
def projected_start(grad: torch.Tensor, grad_right: torch.Tensor | None, proj: torch.Tensor, sched: torch.Tensor,
                    step: int, side: str, group: str, world: int, name: str = "") -> torch.Tensor:
    """``all_reduce_projected`` left running: returns the (m, n) fp32 tensor the update will read. On a
    refresh step it holds the whole gradient, all-reduced in place; otherwise its first elements hold the
    projection ``P^T G`` (rank x n, or m x rank), all-reduced there. ``projected_wait`` finishes it (and
    projects the mean back into the whole tensor)."""
    return run_projected_start(grad, grad_right, proj, sched, step, side, group, world, name)


@projected_start.register_fake
def _(grad, grad_right, proj, sched, step, side, group, world, name=""):
    n = grad_right.shape[1] if grad_right is not None else grad.shape[1]
    return grad.new_empty((grad.shape[0], n), dtype=torch.float32)


def run_projected_start(grad, grad_right, proj, sched, step, side, group, world, name=""):
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group)
    n = grad_right.shape[1] if grad_right is not None else grad.shape[1]
    out = grad.new_empty((grad.shape[0], n), dtype=torch.float32)
    if projected_refresh(sched, step):
        if grad_right is not None:
            torch.mm(grad, grad_right, out=out)
        else:
            out.copy_(grad)
        sent, shape = out, None
        COMMUNICATED["all_reduce_bytes"] += out.numel() * out.element_size()
    else:
        R = pj.project((grad, grad_right) if grad_right is not None else grad, proj, side)
        sent, shape = out.view(-1)[:R.numel()].view(R.shape), tuple(R.shape)
        sent.copy_(R)
        del R
        COMMUNICATED["projected_bytes"] += sent.numel() * sent.element_size()
    work = _collective("projected_start", name, group,
                       lambda: dist.all_reduce(sent, op=dist.ReduceOp.SUM, group=pg, async_op=True))
    _PENDING[out.data_ptr()] = ([work], name, group, shape)
    COMMUNICATED["calls"] += 1
    return out


@torch.library.custom_op(f"{_LIB}::projected_wait", mutates_args=("out",))
def projected_wait(out: torch.Tensor, proj: torch.Tensor, side: str, world: int) -> None:
    """The end of ``projected_start``: waits for its all-reduce, then ``out`` becomes the mean gradient (a
    refresh) or the mean projection projected back, ``P (P^T G)`` (through a copy of the projection)."""
    pending = _PENDING.pop(out.data_ptr(), None)
    if pending is None:
        raise _not_started("projected_wait", "projected_start")
    works, name, group, shape = pending
    for work in works:
        _collective("projected_wait", name, group, work.wait)
    del works, pending
    _calm(out)
    if shape is None:
        out.div_(world)
        return
    low = out.view(-1)[:math.prod(shape)].view(shape).clone().div_(world)
    if side == "left":
        torch.mm(proj, low, out=out)
    else:
        torch.mm(low, proj.t(), out=out)


@projected_wait.register_fake
def _(out, proj, side, world):
    return None


def drain_collectives() -> int:
    """After a step that stopped part-way (a non-finite loss or gradient, an error): finish every collective
    it left running (buckets, broadcasts, fetches) and forget them, so that none writes a tensor after the
    step is undone and no bucket outlives it. A collective that fails here (a rank gone) is dropped.
    Returns how many were in flight."""
    works = [w for entry in _PENDING.values() for w in entry[0]]
    works += [w for entries in _BROADCASTS.values() for w, _ in entries]
    works += [w for entries in _LENT.values() for w, _, _ in entries]
    _PENDING.clear()
    _BROADCASTS.clear()
    _LENT.clear()
    for w in works:
        try:
            w.wait()
        except RuntimeError:  # the group is broken: the step's own error says so
            pass
    return len(works)


def communicated_bytes() -> int:
    """Bytes this rank has put into memfit's collectives since ``COMMUNICATED`` was last reset: all-reduced and
    reduced gradients, gathered factors, and the parameters it broadcast as their owner."""
    return sum(v for k, v in COMMUNICATED.items() if k.endswith("_bytes"))


def reset_communicated() -> None:
    for k in list(COMMUNICATED):
        COMMUNICATED[k] = 0


# Every rank must issue the collectives in the same order: to fx they have side effects, so dead-code
# elimination keeps them and the schedule (``sink``) never moves them.
for _op in (all_reduce_mean, all_gather_cat, all_reduce_accumulated, all_reduce_projected, reduce_mean, reduce_send_,
            broadcast_, all_reduce_start, reduce_start, bucket_wait, broadcast_start_, broadcasts_wait,
            fetch_start, lend_start_, fetch_wait_, projected_start, projected_wait):
    torch.fx.node.has_side_effect(_op._opoverload)


# ---- fused pointwise programs (fuse) -----------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::fused", mutates_args=())
def fused(inputs: list[torch.Tensor], program: str) -> torch.Tensor:
    """A chain of pointwise ATen ops as one op (``memfit.kernels.pointwise``): the program's output, its
    intermediates never whole (one generated Triton kernel; on CPU, chunks of the output)."""
    return run_fused(None, inputs, program)


@fused.register_fake
def _(inputs, program):
    from .kernels import pointwise as pw

    return pw.evaluate_laid_out(program, list(inputs))


def run_fused(kernel, inputs, program):
    """Body of ``memfit::fused``: ``kernel`` is the Triton runner (None: the chunked CPU evaluation)."""
    from .kernels import pointwise as pw

    return (kernel or pw.run_chunked)(program, list(inputs))


def fused_layout(program: str, sig: tuple) -> tuple:
    """(shape, dtype, strides) of a fused program's output for inputs of these (shape, dtype, strides)."""
    from .kernels.pointwise import out_layout

    return out_layout(program, sig)


def fused_with_stride(program: str, stride: tuple[int, ...]) -> str:
    """The program with its output laid out in these strides."""
    from .kernels.pointwise import with_stride

    return with_stride(program, stride)


def fused_chunk(program: str) -> int:
    """Elements per chunk of a fused program's CPU evaluation."""
    from .kernels.pointwise import chunk_of

    return chunk_of(program)


def fused_with_chunk(program: str, chunk: int) -> str:
    """The program with its CPU evaluation in chunks of ``chunk`` elements."""
    from .kernels.pointwise import with_chunk

    return with_chunk(program, chunk)


def fusible_ops() -> frozenset[str]:
    """The ATen overloads (``"mul.Tensor"``) a fused program may hold."""
    from .kernels.pointwise import SUPPORTED

    return SUPPORTED


# ---- linear + cross-entropy without the logits (fused_cross_entropy) --------------------------------------

@torch.library.custom_op(f"{_LIB}::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                         ignore_index: int, label_smoothing: float, reduction: int, chunk: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F.cross_entropy((h @ weight.T + bias).float(), target, ...)`` with its gradients for ``h``, ``weight``
    and ``bias`` at an incoming gradient of 1, the logits made ``chunk`` rows at a time
    (``memfit.kernels.cross_entropy``); ``reduction`` is torch's enum (1 mean, 2 sum). Returns
    ``(loss, dh, dweight, dbias)`` (``dbias`` empty without a bias)."""
    return run_linear_cross_entropy(None, h, weight, bias, target, ignore_index, label_smoothing, reduction, chunk)


@linear_cross_entropy.register_fake
def _(h, weight, bias, target, ignore_index, label_smoothing, reduction, chunk):
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(h), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(0))


def run_linear_cross_entropy(kernel, h, weight, bias, target, ignore_index, label_smoothing, reduction, chunk):
    """Body of ``memfit::linear_cross_entropy``: ``kernel`` is the Triton launcher (None: the reference)."""
    from .kernels import cross_entropy as ce

    fn = kernel or ce.linear_cross_entropy_ref
    return fn(h, weight, target, bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing,
              reduction=reduction, chunk=chunk)


# ---- pruning masks (prune) -------------------------------------------------------------------------------------

PRUNE_SCHEDULES = ("fixed", "oneshot", "gradual", "granet")


@torch.library.custom_op(f"{_LIB}::prune_mask", mutates_args=("param", "pruned", "sched", "moment1", "moment2"))
def prune_mask(param: torch.Tensor, grad: torch.Tensor, pruned: torch.Tensor, sched: torch.Tensor,
               moment1: torch.Tensor | None, moment2: torch.Tensor | None, step: int, schedule: str,
               sparsity: float, initial: float, start: int, every: int, events: int, regrow: float,
               pattern_n: int = 0, pattern_m: int = 0) -> torch.Tensor:
    """A pruned weight's gradient with its pruned entries zeroed (what its update op steps), after the mask
    event of this ``step`` if the schedule has one (``memfit.sparsity``): prune to the scheduled sparsity by
    magnitude (or the n:m pattern), GraNet's drop-and-regrow by gradient magnitude, the weight zeroed where
    pruned and the optimizer moments (``moment1`` / ``moment2``, the update's fp32 state) where the mask
    changed. ``pruned`` holds the mask as packed bits, ``sched`` [events done, step of the last]."""
    return run_prune_mask(param, grad, pruned, sched, moment1, moment2, step, schedule, sparsity, initial, start,
                          every, events, regrow, pattern_n, pattern_m)


@prune_mask.register_fake
def _(param, grad, pruned, sched, moment1, moment2, step, schedule, sparsity, initial, start, every, events, regrow,
      pattern_n=0, pattern_m=0):
    return torch.empty_like(grad)


def prune_event(step: int, schedule: str, sparsity: float, initial: float, start: int, every: int, events: int,
                regrow: float, pattern_n: int = 0, pattern_m: int = 0):
    """``(k, sparsity.Event)`` of the schedule's event at ``step``, or None on a step without one."""
    from .sparsity import Event, cubic_sparsity, regrow_fraction

    pattern = (pattern_n, pattern_m) if pattern_m else None
    if schedule == "fixed" or step < start:
        return None
    if schedule == "oneshot":
        return (0, Event(sparsity, 0.0, pattern)) if step == start else None
    if (step - start) % every or (step - start) // every > events:
        return None
    k = (step - start) // every
    return k, Event(cubic_sparsity(k, events, initial, sparsity),
                    regrow_fraction(k, events, regrow) if schedule == "granet" else 0.0, pattern)


def prune_workspace(numel: int, grad_bytes: int, schedule: str, pattern: bool, dense_moments: int = 0) -> int:
    """Bytes ``run_prune_mask`` allocates beside its output (``grad_bytes``), at its worst step: the unpacked
    mask (1 byte per element, unpacked through one byte-per-element temporary), and at a mask event the fp32
    magnitudes (of the weight, then for a GraNet regrow of the gradient) with their stable sort (4 + 8 bytes
    per element), plus a new mask for an n:m pattern, plus the dense fp32 form of each of ``dense_moments``
    compressed moments (measured on CPU: 17n, 18n, and 8n more for AdamW's two compressed moments)."""
    from .sparsity import packed_bytes

    plain = max(8 * packed_bytes(numel) + numel, numel + grad_bytes)
    if schedule == "fixed":
        return plain - grad_bytes
    event = 17 * numel + (numel if pattern else 0) + 4 * numel * dense_moments
    return max(plain, event) - grad_bytes


def sparse_adamw_workspace(numel: int, kept: int, param_bytes: int, grad_bytes: int, values: bool = False) -> int:
    """``memfit::sparse_adamw_update``: the unpacked mask (through its byte-per-element temporary), the kept
    indices (int64), the gathered gradient, the gathered weight (unless the weight is held as its ``values``)
    and ``adamw_ref``'s own temporaries on ``kept`` values (measured on CPU)."""
    from .sparsity import packed_bytes

    own = adamw_workspace(kept, param_bytes != 4, 0, 1, False)
    unpack = max(8 * packed_bytes(numel) + numel, numel + 8 * kept)
    if values:
        return max(unpack, kept * (8 + grad_bytes), kept * grad_bytes + own)
    return max(unpack, kept * (8 + param_bytes + grad_bytes) + own)


def run_prune_mask(param, grad, pruned, sched, moment1, moment2, step, schedule, sparsity, initial, start, every,
                   events, regrow, pattern_n=0, pattern_m=0) -> torch.Tensor:
    from . import sparsity as sp

    keep = sp.unpack_into(pruned, torch.empty(param.shape, dtype=torch.bool, device=param.device))
    due = prune_event(step, schedule, sparsity, initial, start, every, events, regrow, pattern_n, pattern_m)
    if due is not None and int(sched[0]) <= due[0]:  # not yet applied (a retried step finds it done)
        moments = [m for m in (moment1, moment2) if m is not None]
        packed = bool(moments) and moments[0].numel() != param.numel()  # prune(compress=True)
        if packed:  # to dense, the event, then back to the kept positions of the new mask
            dense = compressed_moments(keep, moments, param.numel(), int(sched[0]) > 0)
            sp.apply_event(param, grad, keep, due[1], [d.view(param.shape) for d in dense])
            idx = keep.view(-1).nonzero().squeeze(1)
            if idx.numel() != moments[0].numel():
                raise ConfigError(where_what_got(
                    "memfit::prune_mask (prune(compress=True))", f"{moments[0].numel()} kept entries after the "
                    "event (the compressed state's length)", f"{idx.numel()}",
                    "the mask's kept count must not change once compressed: use a sparse-to-sparse schedule "
                    "(initial = sparsity, start=1), or leave compress off"))
            for m, d in zip(moments, dense, strict=True):
                m.copy_(d[idx])
            del dense, idx
        else:
            sp.apply_event(param, grad, keep, due[1], moments)
        pruned.copy_(sp.pack_pruned(keep))
        sched[0] = due[0] + 1
        sched[1] = step
    return grad * keep


@torch.library.custom_op(f"{_LIB}::sparse_adamw_update", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def sparse_adamw_update(param: torch.Tensor, grad: torch.Tensor, pruned: torch.Tensor, exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, lr: float, step: int, beta1: float, beta2: float, eps: float,
                        weight_decay: float) -> None:
    """AdamW on the kept entries of a pruned weight only, with moments stored compressed: ``exp_avg`` and
    ``exp_avg_sq`` hold one value per kept entry, in flat order of the kept positions of the packed mask
    ``pruned`` (``prune(compress=True)``). The pruned entries are not touched (they stay zero)."""
    run_sparse_adamw_update(param, grad, pruned, exp_avg, exp_avg_sq, lr, step, beta1, beta2, eps, weight_decay)


@sparse_adamw_update.register_fake
def _(*args, **kwargs):
    return None


def run_sparse_adamw_update(param, grad, pruned, exp_avg, exp_avg_sq, lr, step, beta1, beta2, eps,
                            weight_decay) -> None:
    from . import sparsity as sp

    keep = sp.unpack_into(pruned, torch.empty(grad.shape, dtype=torch.bool, device=grad.device))
    idx = keep.view(-1).nonzero().squeeze(1)
    del keep
    if idx.numel() != exp_avg.numel():
        raise ConfigError(where_what_got(
            "memfit::sparse_adamw_update", f"a mask keeping {exp_avg.numel()} entries (the compressed state's "
            "length)", f"{idx.numel()}", "load a state saved by this configuration, or rebuild the Trainer"))
    g = grad.reshape(-1)[idx]
    if param.numel() == exp_avg.numel():  # the weight itself held as its kept values (compress_weights)
        del idx
        adamw_ref(param, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=weight_decay, step=step)
        return
    flat = param.view(-1)
    p = flat[idx]
    adamw_ref(p, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
              step=step)
    flat[idx] = p


@torch.library.custom_op(f"{_LIB}::sparse_weight", mutates_args=())
def sparse_weight(values: torch.Tensor, pruned: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense weight of a pruned weight held as its kept values (``prune(compress_weights=True)``):
    zeros where the packed mask ``pruned`` prunes. A transient made just before each op that reads it."""

    return run_sparse_weight(values, pruned, shape)


@sparse_weight.register_fake
def _(values, pruned, shape):
    return values.new_empty(tuple(shape))


def compressed_moments(keep: torch.Tensor, moments, numel: int, started: bool) -> list[torch.Tensor]:
    """The dense fp32 form of compressed moments (kept positions of ``keep`` in flat order; zeros before the
    first mask event, when they have not been used)."""
    out = []
    idx = keep.view(-1).nonzero().squeeze(1) if started else None
    for m in moments:
        dense = torch.zeros(numel, dtype=m.dtype, device=m.device)
        if started:
            dense[idx] = m
        out.append(dense)
    return out


# ---- 1-bit activation masks (sparse_update) ----------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::pack_mask", mutates_args=())
def pack_mask(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """A ReLU's or ReLU6's derivative, ``lo < x < hi``, as packed bits in ``memfit.sparsity``'s mask layout
    (eight to a byte, flat, LSB first, 1 = the gradient is zeroed): what the backward keeps instead of the
    activation."""
    return run_pack_mask(x, lo, hi)


@pack_mask.register_fake
def _(x, lo, hi):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


@torch.library.custom_op(f"{_LIB}::mask_grad", mutates_args=())
def mask_grad(grad: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``grad`` where the packed mask ``bits`` (``pack_mask``) is set, 0 elsewhere: threshold_backward and
    hardtanh_backward from one bit per element."""
    return run_mask_grad(grad, bits)


@mask_grad.register_fake
def _(grad, bits):
    return torch.empty_like(grad)


def run_pack_mask(x, lo, hi):
    from . import sparsity as sp

    return sp.pack_pruned((x > lo) & (x < hi))


def run_mask_grad(grad, bits):
    from . import sparsity as sp

    keep = sp.unpack_into(bits, torch.empty(grad.shape, dtype=torch.bool, device=grad.device))
    return grad * keep


def run_sparse_weight(values, pruned, shape):
    from . import sparsity as sp

    return sp.scatter_values(values, pruned, shape)


def bit_mask_workspace(target, numel: int, out_bytes: int) -> int:
    """``memfit::pack_mask`` (two comparisons and their and, the flat uint8 copy and its padding) and
    ``memfit::mask_grad`` / ``memfit::sparse_weight`` (the unpacked mask beside the output); measured on CPU."""
    from .sparsity import packed_bytes

    if target is torch.ops.memfit.pack_mask.default:
        return 3 * numel + 2 * ((-numel) % 8)
    return max(8 * packed_bytes(numel) + numel, numel + out_bytes) - out_bytes


# ---- named arguments: every consumer reads and writes memfit op arguments by schema name -------------

class OpArgs:
    """The arguments of a memfit op node by schema name (``args_of(node).rank``), defaults filled in.

    Positions come from the op's registered schema, so adding an argument to an op never silently shifts
    what a pass or the lowering reads."""

    __slots__ = ("_op", "_values")

    def __init__(self, op: torch._ops.OpOverload, values: dict):
        object.__setattr__(self, "_op", op)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name: str):
        values = object.__getattribute__(self, "_values")
        if name not in values:
            op = object.__getattribute__(self, "_op")
            raise AttributeError(f"{op._schema.name} has no argument {name!r}; it has {sorted(values)}")
        return values[name]

    def as_dict(self) -> dict:
        return dict(self._values)


def args_of(node) -> OpArgs:
    """Bind ``node``'s positional and keyword arguments to its op's schema names."""
    op = node.target
    schema = op._schema
    values = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
        else:
            values[arg.name] = None
    return OpArgs(op, values)


def op_call(graph, op: torch._ops.OpOverload, **named):
    """Insert ``op`` into ``graph`` (at its current insert point) with arguments given by schema name.

    Arguments up to the last one named without a default are passed positionally, the rest by keyword;
    an unknown or missing name raises at once, naming the op and the argument."""
    schema = op._schema
    names = [a.name for a in schema.arguments]
    unknown = set(named) - set(names)
    if unknown:
        raise TypeError(f"{schema.name}: no argument(s) {sorted(unknown)}; it takes {names}")
    args, kwargs = [], {}
    for a in schema.arguments:
        if a.has_default_value():
            if a.name in named:
                kwargs[a.name] = named[a.name]
            continue
        if a.name not in named:
            raise TypeError(f"{schema.name}: argument {a.name!r} is required")
        if kwargs:
            raise TypeError(f"{schema.name}: required argument {a.name!r} after defaulted ones")
        args.append(named[a.name])
    return graph.call_function(op, tuple(args), kwargs)


def replace_args(node, **changes) -> tuple[tuple, dict]:
    """``node``'s (args, kwargs) with the named arguments changed (positions from the schema)."""
    names = [a.name for a in node.target._schema.arguments]
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in changes.items():
        i = names.index(name)
        if i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs


# ---- workspace: the bytes each op allocates and frees while it runs ------------------------------------
# Declared here with the ops and read both by the lowering's plan (``workspace_bytes`` of a node) and by the
# passes' planner options (the value-level functions), so there is one figure for each op.

def adamw_workspace(numel: int, low_precision: bool, grad_copy: int, micro_steps: int, triton: bool,
                    spike: bool = False) -> int:
    """``memfit::adamw_update``: ``grad_copy`` (a contiguous copy of a non-contiguous gradient); on the CPU
    reference also an fp32 working copy of a low-precision parameter, ``denom``, the scaled accumulated
    gradient and, with spike clipping, the chunked clip's temporaries. Triton keeps the rest in registers."""
    if triton:
        return grad_copy
    fp32 = numel * 4
    total = grad_copy + (fp32 if low_precision else 0)
    if not spike:
        return total + fp32 + (fp32 if micro_steps > 1 else 0)
    from .kernels.adamw import spike_workspace_bytes

    # an owned fp32 gradient (the scaled sum, a cast, or a copy), then the chunked clip, then denom
    return total + fp32 + max(spike_workspace_bytes(numel), fp32)


def sgd_workspace(numel: int, low_precision: bool, grad_copy: int, micro_steps: int, triton: bool,
                  owns_temp: bool) -> int:
    """``memfit::sgd_update``: the gradient copy; on the CPU reference an fp32 parameter copy when low
    precision and one owned gradient temporary when it scales, decays or uses Nesterov."""
    if triton:
        return grad_copy
    return grad_copy + (numel * 4 if low_precision else 0) + (numel * 4 if owns_temp else 0)


def adam8bit_workspace(numel: int, low_precision: bool, grad_copy: int, bits: int, triton: bool) -> int:
    """``memfit::adam8bit_update``: 8-bit Triton keeps a block in registers; the 8-bit reference works in
    chunks (fp32 m, v, update and the code search); 4-bit holds whole fp32 m and v, unpacked codes,
    ``denom`` and an fp32 parameter copy when low precision."""
    if triton and bits == 8:
        return grad_copy
    if bits == 8:
        from .kernels.adam8bit import _REF_CHUNK

        return grad_copy + 7 * 4 * min(numel, _REF_CHUNK) + 8192
    return grad_copy + 5 * numel * 4 + (numel * 4 if low_precision else 0)


def lowrank_workspace(shape: tuple[int, int], *, rank: int, projector: str, rule: str, proj_bits: int,
                      micro_steps: int, fp32_param_and_grad: bool, low_precision: bool, factored_tokens: int,
                      triton: bool) -> int:
    """``memfit::lowrank_update`` at its worst step, a subspace refresh: R, N and two moment-sized
    temporaries; P^T L first when factored; the accumulated gradient; the rule's full-size temporaries;
    a regenerated or unpacked projector; the refresh itself (``projection.refresh_bytes``)."""
    m, n = shape
    rows = pj.proj_shape((m, n), rank)[0]
    full = 4 * m * n
    step = 4 * 4 * math.prod(pj.low_shape((m, n), rank))
    step += 4 * rank * factored_tokens
    if micro_steps > 1:
        step += full  # the accumulated gradient, scaled, in fp32
    if rule == "apollo" and fp32_param_and_grad:
        step += 4 * max(m, n)  # W += G ∘ ratio in place (_apollo_in_place): G's per-channel norms only
    elif rule != "galore":
        step += 2 * full  # the fp32 gradient and the projected-back update
    elif not triton:
        step += full if low_precision else 0
    if projector == "random" or proj_bits == 4:
        step += 4 * rows * rank
    return step + pj.refresh_bytes((m, n), rank, projector)


# The step hook checks each guarded op's gradient before the op runs (``runtime.executor.all_finite``): one
# 0-dim fp32 sum, alive while the op's inputs are; declared as a floor of those ops' workspace.
FINITE_CHECK_BYTES = 4


def workspace_bytes(node, triton: bool) -> int:
    """Workspace of the memfit op at ``node`` (0 for any other node), for the Triton kernels or the CPU
    references (``triton``); an op whose gradient the step hook checks holds at least the check's sum."""
    own = _op_workspace(node, triton)
    ops = torch.ops.memfit
    if node.target in (ops.adamw_update.default, ops.sgd_update.default, ops.adam8bit_update.default,
                       ops.lowrank_update.default, ops.prune_mask.default, ops.sparse_adamw_update.default):
        return max(own, FINITE_CHECK_BYTES)
    return own


def _op_workspace(node, triton: bool) -> int:
    target = node.target
    ops = torch.ops.memfit
    if target is ops.prune_mask.default:
        a = args_of(node)
        grad = a.grad.meta["val"]
        moments = [m for m in (a.moment1, a.moment2) if m is not None]
        dense = len(moments) if moments and moments[0].meta["val"].numel() != grad.numel() else 0
        return prune_workspace(grad.numel(), grad.numel() * grad.element_size(), a.schedule, a.pattern_m > 0,
                               dense)
    if target is ops.sparse_adamw_update.default:
        a = args_of(node)
        param, grad = a.param.meta["val"], a.grad.meta["val"]
        kept = a.exp_avg.meta["val"].numel()
        return sparse_adamw_workspace(grad.numel(), kept, param.element_size(), grad.element_size(),
                                      values=param.numel() == kept)
    if target is ops.all_reduce_projected.default:
        a = args_of(node)
        g, right = a.grad.meta["val"], a.grad_right.meta["val"] if a.grad_right is not None else None
        m, n = g.shape[0], right.shape[1] if right is not None else g.shape[1]
        rank = a.proj.meta["val"].shape[1]
        return projected_workspace(m, n, rank, a.side, g.shape[1] if right is not None else 0)
    if target is ops.projected_start.default:  # as all_reduce_projected: the projection, the factors' product
        a = args_of(node)
        g, right = a.grad.meta["val"], a.grad_right.meta["val"] if a.grad_right is not None else None
        m, n = g.shape[0], right.shape[1] if right is not None else g.shape[1]
        return projected_workspace(m, n, a.proj.meta["val"].shape[1], a.side, g.shape[1] if right is not None else 0)
    if target is ops.projected_wait.default:  # the mean projection's copy, projected back into the output
        a = args_of(node)
        (m, n), rank = a.out.meta["val"].shape, a.proj.meta["val"].shape[1]
        return 4 * rank * (n if a.side == "left" else m)
    if target is ops.reduce_send_.default:  # a gradient that is not contiguous goes out through a copy
        grad = node.args[0].meta["val"]
        return 0 if grad.is_contiguous() else grad.numel() * grad.element_size()
    if target is ops.all_gather_cat.default:  # the gathered pieces, alive while they are concatenated
        t = node.args[0].meta["val"]
        return node.args[4] * t.numel() * t.element_size()
    if target is ops.fused.default:
        if triton:
            return 0
        from .kernels.pointwise import chunked_workspace

        a = args_of(node)
        return chunked_workspace(a.program, [(tuple(x.meta["val"].shape), x.meta["val"].dtype,
                                              tuple(x.meta["val"].stride())) for x in a.inputs])
    if target is ops.linear_cross_entropy.default:
        from .kernels.cross_entropy import workspace_bytes as ce_workspace

        a = args_of(node)
        h, w = a.h.meta["val"], a.weight.meta["val"]
        return ce_workspace(h.shape[0], h.shape[1], w.shape[0], a.chunk, h.element_size(), w.element_size(), triton,
                            bias=a.bias is not None)
    if target in (ops.lsq_quant.default, ops.lsq_quant_backward.default):
        w, step = node.args[1 if target is ops.lsq_quant_backward.default else 0].meta["val"], \
            node.args[2 if target is ops.lsq_quant_backward.default else 1].meta["val"]
        grad = node.args[0].meta["val"] if target is ops.lsq_quant_backward.default else w
        return lsq_workspace(target, w.numel(), step.numel(), w.element_size(), grad.element_size(),
                             step.element_size())
    if target in (ops.sparse_weight.default, ops.mask_grad.default, ops.pack_mask.default):
        out = node.meta["val"]
        numel = out.numel() if target is not ops.pack_mask.default else args_of(node).x.meta["val"].numel()
        return bit_mask_workspace(target, numel, out.numel() * out.element_size())
    if target is ops.dequant_weight.default:
        if triton and node.args[2] is None:
            return 0
        from . import weights as wt

        a = args_of(node)
        return wt.decode_workspace(math.prod(a.shape), a.codec, a.group, a.scales2 is not None)
    if target not in (ops.adamw_update.default, ops.sgd_update.default, ops.adam8bit_update.default,
                      ops.lowrank_update.default):
        return 0
    a = args_of(node)
    if a.wscale is not None:
        return _int8_weight_workspace(node, a, triton)
    if target in (ops.adamw_update.default, ops.sgd_update.default) and a.grad_program:
        return prologue_workspace(node, a, triton)
    return _update_workspace(node, a, triton)


def _int8_weight_workspace(node, a: OpArgs, triton: bool) -> int:
    """An update on an INT8 weight: the op's own workspace for an fp32 weight, on top of the fp32 copy it
    steps, and then the write-back (none of this in the fused Triton AdamW kernel)."""
    from . import weights as wt

    numel = a.param.meta["val"].numel()
    fused = triton and node.target is torch.ops.memfit.adamw_update.default and a.wround == "stochastic" and \
        not a.spike_threshold
    if fused:
        return 0
    if triton and node.target is torch.ops.memfit.lowrank_update.default and a.rule == "galore" and \
            a.wround == "stochastic":
        from .kernels.lowrank import lowrank_int8_workspace

        # the projected step's own temporaries, then the project-back kernel's absmax (none in one pass)
        return max(_update_workspace(node, a, triton, fp32_param=True),
                   lowrank_int8_workspace(tuple(a.param.meta["val"].shape), a.wgroup))
    copy = numel * 4
    own = _update_workspace(node, a, triton, fp32_param=True)
    if triton:
        return copy + own
    bits = a.bits if node.target is torch.ops.memfit.adam8bit_update.default else \
        a.state_bits if node.target is torch.ops.memfit.lowrank_update.default else 32
    # the op's two cached code maps of quantized moments (code_map) are held while the weight is written back
    maps = 2 * 4 * (256 if bits == 8 else 16) if bits in (8, 4) else 0
    return copy + max(own, maps + wt.requant_workspace(numel, a.wgroup, a.wround == "stochastic"))


def _update_workspace(node, a: OpArgs, triton: bool, fp32_param: bool = False) -> int:
    target = node.target
    ops = torch.ops.memfit
    param, grad = a.param.meta["val"], a.grad.meta["val"]
    numel = param.numel()
    low = param.dtype != torch.float32 and not fp32_param
    if target is ops.lowrank_update.default:
        return lowrank_workspace(tuple(param.shape), rank=a.rank, projector=a.projector, rule=a.rule,
                                 proj_bits=a.proj_bits, micro_steps=a.micro_steps,
                                 fp32_param_and_grad=(fp32_param or param.dtype == torch.float32)
                                 and grad.dtype == torch.float32, low_precision=low,
                                 factored_tokens=grad.shape[1] if a.grad_right is not None else 0, triton=triton)
    if target is ops.adam8bit_update.default:
        copy = 0 if grad.is_contiguous() or a.micro_steps > 1 else numel * 4
        return adam8bit_workspace(numel, low, copy, a.bits, triton)
    copy = grad.numel() * grad.element_size() if a.micro_steps <= 1 and not grad.is_contiguous() else 0
    if target is ops.adamw_update.default:
        return adamw_workspace(numel, low, copy, a.micro_steps, triton, spike=(a.spike_threshold or 0) > 0)
    owns = a.micro_steps > 1 or a.weight_decay != 0 or (a.momentum != 0 and a.nesterov)
    return sgd_workspace(numel, low, copy, a.micro_steps, triton, owns)
