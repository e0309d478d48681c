"""Weight encodings, and the recipes that make a TrainGraph's tensors from the model's weights and back.

A pass that changes how a weight is held (``quantize_weights``: INT8 codes updated with stochastic
rounding; ``lora``: adapters beside a frozen base, the base possibly NF4; ``qat``: learned step sizes)
changes the graph's placeholders, so the tensors fed to them are no longer the model's parameters. The
pass records a :class:`Recipe` in ``TrainGraph.inits``: which model weights it reads (``sources``), which
graph tensors it makes (``build``), and how the weights a plain model needs are read back (``apply``:
used by ``Trainer.export()`` and inference). The runtime runs the recipes; it names no technique.

Encodings (the layouts are the kernels' own, see ``memfit.kernels.wquant``): ``int8`` (symmetric absmax
per group of ``group`` flattened elements, codes shaped as the weight), ``int4`` (symmetric, two codes per
byte) and ``nf4`` (QLoRA's NormalFloat code book, absmax per block, two codes per byte; optionally the
absmax themselves 8-bit quantized: "double quantization").
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, where_what_got

CODECS = ("int8", "int4", "nf4")
BITS = {"int8": 8, "int4": 4, "nf4": 4}
DQ_BLOCK = 256  # block of the 8-bit quantized absmax (double quantization)


def check_codec(where: str, codec: Any, group: Any, numel: int | None = None, fqn: str = "") -> None:
    """A ConfigError unless ``codec`` is known and ``group`` a power of two in [16, 4096] dividing ``numel``."""
    if codec not in CODECS:
        raise ConfigError(where_what_got(f"{where}.codec", f"one of {CODECS}", repr(codec), "pick one"))
    if isinstance(group, bool) or not isinstance(group, int) or group < 16 or group > 4096 or group & (group - 1):
        raise ConfigError(where_what_got(f"{where}.group", "a power of two in [16, 4096]", repr(group),
                                         "e.g. 128 (INT8/INT4) or 64 (NF4)"))
    if numel is not None and numel % group:
        raise ConfigError(where_what_got(f"{where}: {fqn}", f"a weight whose {numel} elements split into groups "
                                         f"of {group}", f"{numel} % {group} = {numel % group}",
                                         "pick a group size dividing it, or leave this weight out of targets"))


def codes_shape(shape: tuple[int, ...], codec: str) -> tuple[int, ...]:
    return tuple(shape) if codec == "int8" else (math.prod(shape) // 2,)


def scale_shapes(numel: int, codec: str, group: int, double_quant: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of the scale tensors of an encoding: fp32 scales, or (double quantization) uint8
    codes of the scales plus fp32 second-level absmax with the mean offset appended."""
    n = numel // group
    if not double_quant:
        return [((n,), torch.float32)]
    return [((n,), torch.uint8), ((-(-n // DQ_BLOCK) + 1,), torch.float32)]


def encoded_bytes(numel: int, codec: str, group: int, double_quant: bool = False) -> int:
    """Bytes of a weight of ``numel`` elements held in ``codec``: codes plus scales."""
    codes = numel if codec == "int8" else numel // 2
    scales = sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                 for s, d in scale_shapes(numel, codec, group, double_quant))
    return codes + scales


def encode(w: torch.Tensor, codec: str, group: int, *, double_quant: bool = False) -> list[torch.Tensor]:
    """[codes, *scales] of ``w``, rounding to nearest (the update's stochastic write-back is
    ``requantize_int8``)."""
    from .kernels import wquant as wq

    w = w.detach().contiguous()
    if codec == "int8":
        codes, scales = wq.quantize_int8_group_ref(w, group)
    elif codec == "int4":
        codes, scales = wq.quantize_int4_group_ref(w, group)
    else:
        codes, scales = wq.quantize_nf4_ref(w, group)
    if not double_quant:
        return [codes, scales]
    q, absmax2, offset = wq.double_quantize_ref(scales)
    return [codes, q, torch.cat([absmax2, torch.tensor([offset], dtype=torch.float32, device=absmax2.device)])]


def scales_of(scales: list[torch.Tensor], n: int) -> torch.Tensor:
    """The fp32 scales from an encoding's scale tensors (undoing double quantization)."""
    if len(scales) == 1:
        return scales[0]
    from .kernels import wquant as wq

    q, packed = scales
    return wq.double_dequantize_ref(q, packed[:-1], float(packed[-1]), n)


NF4_CHUNK = 1 << 16  # NF4 codes are looked up this many at a time (bounded temporaries)


def decode(codes: torch.Tensor, scales: list[torch.Tensor], codec: str, group: int, shape: tuple[int, ...],
           dtype: torch.dtype) -> torch.Tensor:
    """The weight an encoding holds, as a new ``dtype`` tensor of ``shape``."""
    out = torch.empty(tuple(shape), dtype=dtype, device=codes.device)
    decode_into(out, codes, scales, codec, group)
    return out


def decode_into(out: torch.Tensor, codes: torch.Tensor, scales: list[torch.Tensor], codec: str, group: int) -> None:
    """Write the weight an encoding holds into ``out`` (contiguous), with few temporaries (``decode_workspace``):
    the codes are converted by ``copy_`` and scaled in place; 4-bit codes are unpacked one nibble plane at a
    time, NF4's looked up ``NF4_CHUNK`` at a time."""
    flat = out.view(-1)
    s = scales_of(scales, flat.numel() // group)
    if codec == "int8":
        flat.copy_(codes.reshape(-1))
    elif codec == "int4":
        flat[0::2].copy_(codes & 15)
        flat[1::2].copy_(codes >> 4)
        flat.sub_(8)
    else:
        from .kernels.wquant import NF4_CODE

        table = NF4_CODE.to(out.device)
        half = NF4_CHUNK // 2
        for i in range(0, codes.numel(), half):
            part = codes[i:i + half]
            flat[2 * i:2 * (i + part.numel()):2].copy_(table.index_select(0, (part & 15).int()))
            flat[2 * i + 1:2 * (i + part.numel()):2].copy_(table.index_select(0, (part >> 4).int()))
    flat.view(-1, group).mul_(s[:, None])


def decode_workspace(numel: int, codec: str, group: int, double_quant: bool) -> int:
    """Bytes ``decode_into`` allocates beyond its output, at most at once (for the memory plan): the 4-bit
    unpacking temporaries, and with double quantization the fp32 scales rebuilt from their 8-bit codes, which
    stay while the codes are unpacked (rebuilding them holds 12 bytes a scale and a 256-entry code map)."""
    if codec == "int8":
        own = 0
    elif codec == "int4":
        own = -(-numel // 2)
    else:
        own = 8 * (min(NF4_CHUNK, numel) // 2)  # a chunk's int32 indices and its looked-up fp32 values
    if not double_quant:
        return own
    n = numel // group
    return max(12 * n + 4 * 256, 4 * n + own)


REQUANT_CHUNK = 1 << 16  # elements requantized at a time on the reference path (bounded temporaries)
_GOLDEN_INV = pow(0x9E3779B9, -1, 1 << 32)  # the hash mixes the seed as i + seed * 0x9E3779B9 (mod 2**32)


def requantize_int8(w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group: int, seed: int | None
                    ) -> None:
    """Write ``w`` (fp32) back as INT8 ``codes`` and ``scales`` in place: new per-group absmax scales, codes by
    stochastic rounding with ``seed`` (nearest when None). Works ``REQUANT_CHUNK`` elements at a time; a chunk
    starting at element ``i`` uses the seed that makes its hash inputs those of the whole tensor, so the codes
    equal one whole-tensor call's (and the Triton kernel's)."""
    from .kernels import wquant as wq

    flat, cflat = w.reshape(-1), codes.view(-1)
    step = max(group, REQUANT_CHUNK // group * group)
    for i in range(0, flat.numel(), step):
        part = flat[i:i + step]
        if seed is None:
            c, s = wq.quantize_int8_group_ref(part, group)
        else:
            c, s = wq.quantize_int8_group_sr_ref(part, group, (seed + i * _GOLDEN_INV) & 0xFFFFFFFF)
        cflat[i:i + part.numel()].copy_(c)
        scales[i // group:(i + part.numel()) // group].copy_(s)
        del c, s


def requant_workspace(numel: int, group: int, stochastic: bool = True) -> int:
    """Bytes ``requantize_int8`` allocates at most at once: per element of a chunk, the kernel reference's fp32
    working values (and for stochastic rounding its int64 indices, hash words and draws), plus three fp32
    values per group (measured on the reference; ``tests/test_quantize_weights.py`` holds it to the byte)."""
    n = min(numel, max(group, REQUANT_CHUNK // group * group))
    return (45 if stochastic else 13) * n + 12 * (n // group)


# ---- recipes -------------------------------------------------------------------------------------------

class Recipe(abc.ABC):
    """How some graph tensors are made from model weights, and how the model's weights are read back."""

    sources: tuple[str, ...]  # model parameter FQNs read by build
    outputs: tuple[str, ...]  # graph parameter / state names made by build

    @abc.abstractmethod
    def build(self, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The graph tensors (by name) from the model's weights ``src`` (by FQN)."""

    @abc.abstractmethod
    def apply(self, get, weights: dict[str, torch.Tensor]) -> None:
        """Write the plain weights this recipe holds into ``weights`` (model FQN -> tensor), reading the graph's
        current tensors with ``get(name)``; a later recipe may add to what an earlier one wrote (adapters)."""

    @property
    def replaces(self) -> tuple[str, ...]:
        """Model parameters whose own storage the step no longer reads (freed while training)."""
        return ()


@dataclass(frozen=True)
class Encoded(Recipe):
    """A weight held encoded: the graph's parameter ``fqn`` is the codes, ``scale_names`` the state of scales."""

    fqn: str
    codec: str
    group: int
    double_quant: bool
    scale_names: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fqn,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.fqn, *self.scale_names)

    @property
    def replaces(self) -> tuple[str, ...]:
        return (self.fqn,)

    def build(self, src):
        codes, *scales = encode(src[self.fqn].float(), self.codec, self.group, double_quant=self.double_quant)
        return {self.fqn: codes, **dict(zip(self.scale_names, scales, strict=True))}

    def apply(self, get, weights):
        weights[self.fqn] = decode(get(self.fqn), [get(s) for s in self.scale_names], self.codec, self.group,
                                   self.shape, self.dtype)


@dataclass(frozen=True)
class Adapters(Recipe):
    """LoRA adapters of the weight ``fqn``: ``a`` [rank, in] and ``b`` [out, rank], the weight reading
    ``W + scaling * b @ a``. ``init``: ``"lora"`` (A Kaiming-uniform as ``nn.Linear`` and peft, B zero) or
    ``"lq"`` (LQ-LoRA: W = Q + L1 L2 by ``lq_iters`` rounds of quantize / rank-r SVD, the low-rank part in
    the adapters, Q in ``base``, which this recipe then builds too)."""

    fqn: str
    a: str
    b: str
    rank: int
    scaling: float
    seed: int
    init: str = "lora"
    base: Encoded | None = None
    lq_iters: int = 10

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fqn,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.a, self.b, *(self.base.outputs if self.base is not None else ()))

    @property
    def replaces(self) -> tuple[str, ...]:
        return (self.fqn,) if self.base is not None else ()

    def build(self, src):
        w = src[self.fqn]
        out, inp = w.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        if self.init == "lq":
            a, b, base = lq_decompose(w, self.rank, self.scaling, self.base, self.lq_iters)
            return {self.a: a.to(w.dtype), self.b: b.to(w.dtype), **base}
        bound = 1.0 / math.sqrt(inp)  # kaiming_uniform_(a=sqrt(5)) on [rank, in], as nn.Linear and peft
        a = (torch.rand(self.rank, inp, generator=gen) * 2 - 1).mul_(bound).to(w.dtype).to(w.device)
        b = torch.zeros(out, self.rank, dtype=w.dtype, device=w.device)
        made = {self.a: a, self.b: b}
        if self.base is not None:
            made.update(self.base.build(src))
        return made

    def apply(self, get, weights):
        if self.base is not None:
            self.base.apply(get, weights)
        w = weights.get(self.fqn)
        if w is None:
            w = get(self.fqn)
        delta = (get(self.b).float() @ get(self.a).float()).mul_(self.scaling)
        weights[self.fqn] = (w.float() + delta).to(w.dtype)


def lq_decompose(w: torch.Tensor, rank: int, scaling: float, base: Encoded | None, iters: int
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """LQ-LoRA's initialisation: W ≈ Q + L1 L2 with Q quantized (``base``'s encoding; unquantized when None,
    then the adapters hold W's best rank-r part), alternating ``L = SVD_r(W - Q)`` and ``Q = quant(W - L)``
    for ``iters`` rounds, keeping the round of smallest ||W - Q - L||_F. Returns (A, B, base tensors) with
    ``scaling * B @ A = L``: B = U sqrt(S) / sqrt(scaling), A = sqrt(S) V^T / sqrt(scaling)."""
    W = w.detach().float()
    L = torch.zeros_like(W)
    best = None
    for _ in range(max(1, iters)):
        if base is not None:
            made = base.build({base.fqn: W - L})
            Q = decode(made[base.fqn], [made[s] for s in base.scale_names], base.codec, base.group, tuple(W.shape),
                       torch.float32)
        else:
            made, Q = {}, torch.zeros_like(W)
        U, S, V = _top_singular(W - Q, rank)
        root = S.sqrt()
        B = U * root / math.sqrt(scaling)
        A = root[:, None] * V.T / math.sqrt(scaling)
        L = (B @ A) * scaling
        err = float(torch.linalg.matrix_norm(W - Q - L))
        if best is None or err < best[0]:
            best = (err, A, B, made)
        if base is None:
            break
    _, A, B, made = best
    return A, B, made


def _top_singular(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of ``M`` (U [m, r], S [r], V [n, r]): an exact SVD for small matrices,
    the seeded randomized range finder (``torch.svd_lowrank``, 8 extra columns, 4 power iterations) when
    ``rank`` is a small part of them, as on a 7B layer where ten full SVDs per weight would take minutes."""
    if min(M.shape) <= 4 * (rank + 8):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank].T
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        U, S, V = torch.svd_lowrank(M, q=rank + 8, niter=4)
    finally:
        torch.random.set_rng_state(state)
    return U[:, :rank], S[:rank], V[:, :rank]


@dataclass(frozen=True)
class StepSizes(Recipe):
    """LSQ's learned step sizes of the fake-quantized weight ``fqn`` (one per group of ``group`` elements,
    the trainable parameter ``step``), initialised as LSQ does: 2·mean|w|/sqrt(qmax) per group. With
    ``adapters`` (QALoRA) the fake-quantized weight is ``W + scaling * B @ A``."""

    fqn: str
    step: str
    group: int
    qmax: int
    adapters: Adapters | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fqn,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.step, *(self.adapters.outputs if self.adapters is not None else ()))

    def build(self, src):
        w = src[self.fqn].detach().float()
        s = w.reshape(-1, self.group).abs().mean(dim=1).mul_(2 / math.sqrt(self.qmax)).clamp_(min=1e-8)
        made = {self.step: s.to(src[self.fqn].device)}
        if self.adapters is not None:
            made.update(self.adapters.build(src))
        return made

    def merged(self, get) -> torch.Tensor:
        """The weight before fake quantization, fp32."""
        w = get(self.fqn).float()
        if self.adapters is not None:
            w = w + (get(self.adapters.b).float() @ get(self.adapters.a).float()) * self.adapters.scaling
        return w

    def codes(self, get) -> tuple[torch.Tensor, torch.Tensor]:
        """The real integer codes (int8, values in [-qmax-1, qmax]) and the fp32 step per group."""
        s = get(self.step).float()
        w = self.merged(get).reshape(-1, self.group)
        q = torch.clamp(torch.floor(w / s[:, None] + 0.5), -self.qmax - 1, self.qmax)
        return q.to(torch.int8).reshape(get(self.fqn).shape), s

    def apply(self, get, weights):
        q, s = self.codes(get)
        w = get(self.fqn)
        weights[self.fqn] = (q.float().reshape(-1, self.group) * s[:, None]).reshape(w.shape).to(w.dtype)


def plain_weights(recipes: list[Recipe], get, names: list[str]) -> dict[str, torch.Tensor]:
    """The model weights the recipes hold, by FQN (only those a recipe writes)."""
    out: dict[str, torch.Tensor] = {}
    for r in recipes:
        r.apply(get, out)
    return {k: v for k, v in out.items() if k in names}
