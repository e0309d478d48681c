"""Pruning masks: bit-packed storage, scores, selection, schedules, calibration and one-shot pruning.

A mask is held as the bits of the *pruned* positions (1 = pruned), packed eight to a byte in the flat
row-major order of the weight (bit ``i % 8`` of byte ``i // 8``, least significant first), so a state of
zeros is a dense weight. ``pack_pruned`` / ``unpack_kept`` convert.

Scores (larger = more important, kept first):

* ``magnitude``: ``|W|``;
* ``wanda`` (Sun et al.): ``|W| * ||X_j||``, ``||X_j||`` the l2 norm of input feature ``j`` over every
  calibration token, compared within each output row;
* ``gblm`` (Das et al., GBLM-Pruner): ``|W| * ||X_j|| + |W| * G``, ``G = sqrt(sum_s (scale * g_s)**2)`` the l2
  norm over calibration samples of the per-sample gradient scaled by ``scale`` (100, as the paper's code),
  compared within each output row.

Selection: ``sparsity`` of the elements of a weight are pruned (the lowest scores; ties by flat index) per
``"layer"`` (the whole tensor), per ``"row"`` (each output row: Wanda's and GBLM's comparison group),
``"global"`` (one threshold over every target), or ``"erk"`` (layer-adaptive: Erdős–Rényi-Kernel densities,
``eps * sum(shape) / prod(shape)`` scaled so the targets keep ``1 - sparsity`` of their elements, dense
layers capped at 1, as RigL and GraNet allocate). ``n:m`` (``pattern=(n, m)``): in every run of ``m``
consecutive input elements of a row, the ``n`` lowest scores are pruned (2:4 prunes two of four).

Schedules (``cubic_sparsity``): Zhu & Gupta's gradual pruning, ``s_k = s_f + (s_i - s_f) (1 - k / n)**3`` at
steps ``t0 + k * dt``, ``k = 0..n``. GraNet adds at each of those events a prune-and-regrow of
``r_k = r * (1 + cos(pi * k / n)) / 2`` of the kept weights: drop that many more by magnitude, regrow as
many of the pruned positions by gradient magnitude, starting at zero.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, where_what_got
from .weights import Recipe

CRITERIA = ("magnitude", "wanda", "gblm")
SCOPES = ("layer", "row", "global", "erk")
GBLM_SCALE = 100.0


# ---- storage -----------------------------------------------------------------------------------------------

def packed_bytes(numel: int) -> int:
    return (numel + 7) // 8


# bit positions, one tensor per device, made once (the CPU one at import, outside any measured step)
_SHIFTS: dict[torch.device, torch.Tensor] = {torch.device("cpu"): torch.arange(8, dtype=torch.uint8)}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_pruned(keep: torch.Tensor) -> torch.Tensor:
    """The uint8 bits of the pruned positions of the bool ``keep`` mask (flat, 8 per byte, LSB first)."""
    flat = (~keep.reshape(-1)).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _shifts(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_kept(pruned: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The bool keep mask of ``shape`` from the packed pruned bits."""
    numel = math.prod(shape)
    bits = (pruned[:, None] >> _shifts(pruned.device)) & 1
    return (bits.view(-1)[:numel] == 0).view(tuple(shape))


def unpack_into(pruned: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``unpack_kept`` written into the bool tensor ``out`` with one uint8 byte-per-element temporary."""
    bits = pruned[:, None].bitwise_right_shift(_shifts(pruned.device))
    bits.bitwise_and_(1)
    torch.eq(bits.view(-1)[:out.numel()].view(out.shape), 0, out=out)
    return out


# ---- selection ---------------------------------------------------------------------------------------------

def parse_pattern(pattern: object, where: str) -> tuple[int, int] | None:
    """``"2:4"`` / ``(2, 4)`` -> ``(2, 4)`` (n pruned in every m); None stays None."""
    if pattern is None:
        return None
    try:
        n, m = (int(x) for x in (pattern.split(":") if isinstance(pattern, str) else pattern))
    except (TypeError, ValueError):
        raise ConfigError(where_what_got(where, "an 'n:m' pattern such as '2:4' (n pruned in every m)", pattern,
                                         "pass pattern='2:4'")) from None
    if not 0 < n < m:
        raise ConfigError(where_what_got(where, "an n:m pattern with 0 < n < m", pattern, "e.g. '2:4' or '1:4'"))
    return n, m


def check_sparsity(value: object, where: str, name: str = "sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(where_what_got(where, f"`{name}` a fraction in [0, 1) (0.5 prunes half the elements)",
                                         value, "pass e.g. 0.5 or 0.9"))
    return float(value)


def check_pattern_fits(pattern: tuple[int, int], shape: Sequence[int], fqn: str, where: str) -> None:
    width = shape[-1] if len(shape) >= 1 else 0
    if len(shape) < 2 or width % pattern[1]:
        raise ConfigError(where_what_got(where, f"{fqn!r} with an input dimension divisible by m = {pattern[1]} "
                                                f"for the {pattern[0]}:{pattern[1]} pattern",
                                         tuple(shape), "pick an m that divides it, or leave this weight out of "
                                                       "the targets"))


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Flat indices of the ``count`` lowest entries of ``score`` (ties: the lower flat index first)."""
    if count <= 0:
        return torch.empty(0, dtype=torch.int64, device=score.device)
    return torch.sort(score.reshape(-1), stable=True).indices[:count]


def select(score: torch.Tensor, sparsity: float, scope: str = "layer",
           pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """The bool keep mask pruning ``sparsity`` of ``score``'s elements (or the n:m ``pattern``) by lowest score,
    over the whole tensor (``scope="layer"``) or within each output row (``"row"``)."""
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if pattern is not None:
        n, m = pattern
        s = score.reshape(-1, m)
        idx = torch.sort(s, dim=1, stable=True).indices[:, :n]
        keep.view(-1, m).scatter_(1, idx, False)
        return keep
    if scope == "row":
        rows = score.reshape(score.shape[0], -1)
        count = int(sparsity * rows.shape[1])
        idx = torch.sort(rows, dim=1, stable=True).indices[:, :count]
        keep.view(rows.shape).scatter_(1, idx, False)
        return keep
    keep.view(-1)[_lowest(score, round(sparsity * score.numel()))] = False
    return keep


def erk_densities(shapes: dict[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities per target (``sum(shape) / prod(shape)``, scaled to keep ``1 - sparsity`` of
    all elements; a layer that would exceed 1 is dense and the rest rescaled), as RigL / GraNet."""
    numel = {f: math.prod(s) for f, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = (1 - sparsity) * sum(numel.values()) - sum(numel[f] for f in dense)
        raw = {f: sum(s) / numel[f] for f, s in shapes.items() if f not in dense}
        eps = budget / sum(raw[f] * numel[f] for f in raw) if raw else 0.0
        over = {f for f in raw if eps * raw[f] > 1}
        if not over:
            return {f: 1.0 if f in dense else eps * raw[f] for f in shapes}
        dense |= over


def cubic_sparsity(k: int, events: int, initial: float, final: float) -> float:
    """Zhu & Gupta's sparsity after pruning event ``k`` of ``events`` (``k = 0..events``)."""
    if events <= 0:
        return final
    return final + (initial - final) * (1 - min(k, events) / events) ** 3


def regrow_fraction(k: int, events: int, rate: float) -> float:
    """GraNet's prune-and-regrow fraction at event ``k``: ``rate`` decayed by a half cosine to 0 at the end."""
    if events <= 0:
        return 0.0
    return rate * (1 + math.cos(math.pi * min(k, events) / events)) / 2


# ---- the in-training mask step (the CPU body of memfit::prune_mask) ------------------------------------------

@dataclass(frozen=True)
class Event:
    """What one schedule event does to one weight: prune to ``sparsity`` by magnitude (or to the n:m
    ``pattern``), then drop and regrow ``regrow`` of the kept weights (GraNet)."""

    sparsity: float
    regrow: float = 0.0
    pattern: tuple[int, int] | None = None


@torch.no_grad()
def apply_event(param: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, event: Event,
                moments: Iterable[torch.Tensor | None] = ()) -> None:
    """Update ``keep`` in place for ``event``; zero the weight where it is pruned, and the weight and the
    optimizer ``moments`` at every position dropped or regrown (a regrown weight starts at zero with fresh
    moments, even one dropped and regrown in the same event, as GraNet's code does)."""
    moments = [m for m in moments if m is not None]

    def reset(idx: torch.Tensor, kept: bool) -> None:
        keep.view(-1)[idx] = kept
        for t in (param, *moments):
            t.view(-1)[idx] = 0

    score = param.detach().abs().float()
    if event.pattern is not None:
        keep.copy_(select(score, 0.0, pattern=event.pattern))
        for t in (param, *moments):
            t.masked_fill_(~keep, 0)
        return
    pruned_now = keep.numel() - int(keep.sum())
    drop = max(round(event.sparsity * keep.numel()) - pruned_now, 0)
    regrow = int(event.regrow * (keep.numel() - pruned_now - drop)) if event.regrow > 0 else 0
    if drop + regrow:
        score.masked_fill_(~keep, math.inf)
        reset(_lowest(score, drop + regrow), False)
    del score
    if regrow:
        gscore = grad.detach().abs().float().neg_()
        gscore.masked_fill_(keep, math.inf)  # kept positions are not candidates
        reset(_lowest(gscore, regrow), True)
    param.masked_fill_(~keep, 0)


# ---- recipes: masks made from the model's weights --------------------------------------------------------

@dataclass(frozen=True)
class MaskFromZeros(Recipe):
    """The mask of ``fqn`` built from the model's weight: its exact zeros are pruned (a model pruned once, e.g. by
    ``prune_model``, trains with that mask fixed)."""

    fqn: str
    state: str
    kept: int | None = None  # the kept count compressed state was sized for (prune(compress=True)), checked

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fqn,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.state,)

    def build(self, src):
        keep = src[self.fqn] != 0
        if self.kept is not None and int(keep.sum()) != self.kept:
            raise ConfigError(where_what_got(f"prune(compress=True) on {self.fqn!r}",
                                             f"{self.kept} nonzero weights (the sparsity configured)",
                                             f"{int(keep.sum())} of {keep.numel()}",
                                             "pass the sparsity the model was pruned to (per layer), or its n:m "
                                             "pattern"))
        return {self.state: pack_pruned(keep)}

    def apply(self, get, weights):
        pass  # the weight holds its zeros itself


# ---- one-shot pruning of a model (magnitude, Wanda, GBLM), with calibration ---------------------------------

def default_targets(model: nn.Module) -> list[str]:
    """Weights of ``nn.Linear`` and ``nn.Conv*d`` modules, but the output head (``lm_head``) and embeddings."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and "lm_head" not in name:
            out.append(f"{name}.weight" if name else "weight")
    return out


def _match(model: nn.Module, targets: Sequence[str] | None, where: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    names = default_targets(model) if targets is None else [
        f for f in (n for n, _ in model.named_parameters()) if any(fnmatch.fnmatchcase(f, t) for t in targets)]
    if not names:
        raise ConfigError(where_what_got(where, "targets matching weights of the model", list(targets or []),
                                         "list FQN globs such as 'model.layers.*.mlp.*.weight'"))
    out = {}
    for f in names:
        mod = modules.get(f.rsplit(".", 1)[0] if "." in f else "")
        if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not f.endswith("weight"):
            raise ConfigError(where_what_got(where, "targets that are the weight of an nn.Linear or nn.Conv",
                                             f, "leave embeddings, norms and biases out of the targets"))
        out[f] = mod
    return out


@dataclass
class Calibration:
    """Per target: the l2 norm of each input feature over every calibration token (``act``) and GBLM's
    per-sample gradient l2 norm (``grad``); ``tokens`` and ``samples`` counted."""

    act: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor]
    tokens: int = 0
    samples: int = 0


def _feature_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's input as (tokens, in_features) with the weight's input layout (im2col for convs)."""
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = nn.functional.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride) \
        if x.dim() == 4 else None
    if cols is None or mod.groups != 1:
        raise ConfigError(where_what_got("memfit.prune_model", "Wanda / GBLM on nn.Linear or ungrouped nn.Conv2d",
                                         type(mod).__name__ + (f"(groups={mod.groups})" if cols is not None else ""),
                                         "use criterion='magnitude' for this layer, or leave it out of targets"))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def calibrate(model: nn.Module, batches: Iterable[Sequence[Any]], *, loss_fn: Callable | None = None,
              targets: Sequence[str] | None = None, gradients: bool = False,
              scale: float = GBLM_SCALE) -> Calibration:
    """Input-feature norms of every target over ``batches`` (each ``(inputs..., target)`` as the training step
    takes them; a one-element tuple holds inputs only), and with ``gradients`` GBLM's gradient norms (needs
    ``loss_fn`` and targets): each sample of each batch (dim 0) back-propagated alone. The model's weights and
    gradients are left as they were."""
    where = "memfit.prune_model(data=)"
    mods = _match(model, targets, where)
    cal = Calibration({f: torch.zeros(m.weight[0].numel(), dtype=torch.float64) for f, m in mods.items()},
                      {f: torch.zeros(m.weight.shape, dtype=torch.float64) for f, m in mods.items()} if gradients
                      else {})
    sq = {f: torch.zeros_like(v) for f, v in cal.act.items()}

    def hook(f):
        def fn(mod, args):
            rows = _feature_rows(mod, args[0].detach()).double()
            sq[f].add_(rows.pow(2).sum(dim=0).cpu())
        return fn

    handles = [m.register_forward_pre_hook(hook(f)) for f, m in mods.items()]
    saved_grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    first = None
    try:
        for i, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or not batch:
                raise ConfigError(where_what_got(where, "batches as tuples of tensors (inputs..., target)",
                                                 type(batch).__name__, "yield (x, y) tuples"))
            shapes = [tuple(t.shape[1:]) for t in batch if isinstance(t, torch.Tensor)]
            if first is None:
                first = shapes
            elif shapes != first:
                raise ConfigError(where_what_got(f"{where} batch {i}", f"per-sample shapes {first} (batch 0's)",
                                                 shapes, "give calibration batches of one shape"))
            inputs = batch[:-1] if len(batch) > 1 else batch  # (inputs..., target), as the training step takes them
            try:
                if gradients:
                    for s in range(batch[0].shape[0]):
                        model.zero_grad(set_to_none=True)
                        sample = [t[s:s + 1] for t in batch]
                        out = model(*sample[:-1])
                        loss = loss_fn(out, sample[-1])
                        loss.backward()
                        for f in cal.grad:
                            g = params[f].grad
                            if g is not None:
                                cal.grad[f].add_((g.detach().double().cpu() * scale).pow_(2))
                        cal.samples += 1
                else:
                    with torch.no_grad():
                        model(*inputs)
                    cal.samples += batch[0].shape[0]
            except ConfigError:
                raise
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                got = [tuple(t.shape) for t in batch if isinstance(t, torch.Tensor)]
                raise ConfigError(where_what_got(f"{where} batch {i}",
                                                 "batches the model accepts (its example inputs' shapes)",
                                                 f"shapes {got} ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                                                 "pass batches shaped as the model's training inputs")) from e
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.grad = saved_grads[n]
    if first is None:
        raise ConfigError(where_what_got(where, "at least one calibration batch", "none", "pass a few batches"))
    cal.act = {f: v.sqrt().float() for f, v in sq.items()}
    cal.grad = {f: v.sqrt().float() for f, v in cal.grad.items()}
    return cal


def scores(model: nn.Module, criterion: str, calibration: Calibration | None,
           targets: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    out = {}
    for f, mod in targets.items():
        w = mod.weight.detach().abs().float()
        if criterion == "magnitude":
            out[f] = w
            continue
        act = calibration.act[f].to(w.device).view(1, -1)
        s = (w.reshape(w.shape[0], -1) * act).view(w.shape)
        if criterion == "gblm":
            s = s + w * calibration.grad[f].to(w.device)
        out[f] = s
    return out


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float = 0.5, *, criterion: str = "magnitude",
                data: Iterable[Sequence[Any]] | None = None, loss_fn: Callable | None = None,
                scope: str | None = None, pattern: str | tuple[int, int] | None = None,
                targets: Sequence[str] | None = None, scale: float = GBLM_SCALE) -> dict[str, torch.Tensor]:
    """Prune ``model`` once, in place: the pruned weights become exact zeros. Returns the bool keep masks by FQN.

    ``criterion``: ``"magnitude"``, ``"wanda"`` (needs ``data``: calibration batches) or ``"gblm"`` (needs
    ``data`` and ``loss_fn``). ``scope``: ``"layer"``, ``"row"`` (default for Wanda and GBLM, as their
    papers), ``"global"`` or ``"erk"``. ``pattern="2:4"`` prunes n of every m input elements instead of
    ``sparsity``. ``targets``: FQN globs of Linear / Conv weights (default all but the head). Train the result
    with its mask fixed by ``optimize(..., passes=[..., ("prune", {"schedule": "fixed"})])``, or retrain only
    biases and norms (PERP) with ``frozen=``."""
    where = "memfit.prune_model"
    if criterion not in CRITERIA:
        raise ConfigError(where_what_got(where, f"criterion one of {CRITERIA}", repr(criterion), "pick one"))
    sparsity = check_sparsity(sparsity, where)
    pat = parse_pattern(pattern, where)
    scope = scope or ("row" if criterion != "magnitude" else "layer")
    if scope not in SCOPES:
        raise ConfigError(where_what_got(where, f"scope one of {SCOPES}", repr(scope), "pick one"))
    mods = _match(model, targets, where)
    if pat is not None:
        for f, m in mods.items():
            check_pattern_fits(pat, tuple(m.weight.reshape(m.weight.shape[0], -1).shape), f, where)
    cal = None
    if criterion != "magnitude":
        if data is None:
            raise ConfigError(where_what_got(where, f"data= calibration batches for criterion={criterion!r}", "None",
                                             "pass a few training batches, or use criterion='magnitude'"))
        if criterion == "gblm" and loss_fn is None:
            raise ConfigError(where_what_got(where, "loss_fn= for criterion='gblm' (it needs gradients)", "None",
                                             "pass the training loss, e.g. loss_fn=memfit.models.lm_loss"))
        with torch.enable_grad():
            cal = calibrate(model, data, loss_fn=loss_fn, targets=list(mods), gradients=criterion == "gblm",
                            scale=scale)
    sc = scores(model, criterion, cal, mods)
    masks: dict[str, torch.Tensor] = {}
    if pat is not None:
        masks = {f: select(s.reshape(s.shape[0], -1), 0.0, pattern=pat).view(s.shape) for f, s in sc.items()}
    elif scope == "global":
        flat = torch.cat([s.reshape(-1).cpu() for s in sc.values()])
        cut = int(sparsity * flat.numel())
        keep_all = torch.ones(flat.numel(), dtype=torch.bool)
        keep_all[_lowest(flat, cut)] = False
        start = 0
        for f, s in sc.items():
            masks[f] = keep_all[start:start + s.numel()].view(s.shape).to(s.device)
            start += s.numel()
    elif scope == "erk":
        dens = erk_densities({f: tuple(m.weight.shape) for f, m in mods.items()}, sparsity)
        masks = {f: select(s, 1 - dens[f], "layer") for f, s in sc.items()}
    else:
        masks = {f: select(s, sparsity, scope) for f, s in sc.items()}
    for f, keep in masks.items():
        mods[f].weight.masked_fill_(~keep, 0)
    return masks


def density(model: nn.Module, targets: Sequence[str] | None = None) -> float:
    """The fraction of nonzero elements over the targets (default: every Linear / Conv weight but the head)."""
    mods = _match(model, targets, "memfit.sparsity.density")
    nonzero = sum(int((m.weight != 0).sum()) for m in mods.values())
    return nonzero / sum(m.weight.numel() for m in mods.values())


def is_n_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every run of ``m`` consecutive input elements of every row holds at least ``n`` zeros."""
    w = weight.reshape(weight.shape[0], -1)
    if w.shape[1] % m:
        return False
    return bool(((w.reshape(-1, m) == 0).sum(dim=1) >= n).all())


@torch.no_grad()
def to_semi_structured(model: nn.Module, targets: Sequence[str] | None = None) -> dict[str, str]:
    """Hold the 2:4-sparse Linear weights of ``model`` in torch's semi-structured sparse layout
    (``torch.sparse.to_sparse_semi_structured``: kept values plus metadata, the sparse tensor-core matmul)
    where torch supports it: a CUDA device and fp16 / bf16 weights. Elsewhere the weight stays dense (its
    zeros in place). Returns, per target, ``"semi-structured"`` or why it stayed dense. A target that is not
    2:4 sparse is a ConfigError (nothing is changed)."""
    where = "memfit.sparsity.to_semi_structured"
    mods = {f: m for f, m in _match(model, targets, where).items() if isinstance(m, nn.Linear)}
    bad = [f for f, m in mods.items() if not is_n_m(m.weight)]
    if bad:
        raise ConfigError(where_what_got(where, "2:4-sparse Linear weights (two zeros in every four inputs)", bad[:4],
                                         "prune them with prune_model(..., pattern='2:4') first"))
    convert = getattr(torch.sparse, "to_sparse_semi_structured", None)
    out = {}
    for f, m in mods.items():
        w = m.weight
        if convert is None:
            out[f] = "dense: this torch has no torch.sparse.to_sparse_semi_structured"
        elif w.device.type != "cuda":
            out[f] = f"dense: the semi-structured layout needs CUDA (weight on {w.device.type})"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            out[f] = f"dense: the semi-structured layout takes fp16 / bf16 (weight is {w.dtype})"
        else:
            try:
                m.weight = nn.Parameter(convert(w.detach()), requires_grad=False)
                out[f] = "semi-structured"
            except (RuntimeError, ValueError) as e:  # shapes or GPUs the kernels do not take
                out[f] = f"dense: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return out


@dataclass(frozen=True)
class SparseValues(Recipe):
    """A pruned weight held compressed (``prune(compress_weights=True)``): the graph's parameter ``fqn`` is
    its ``kept`` nonzero values in flat order, ``state`` the packed mask; read back dense with zeros."""

    fqn: str
    state: str
    kept: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.fqn,)

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.fqn, self.state)

    @property
    def replaces(self) -> tuple[str, ...]:
        return (self.fqn,)

    def build(self, src):
        w = src[self.fqn].detach()
        keep = MaskFromZeros(self.fqn, self.state, self.kept).build(src)[self.state]
        return {self.fqn: w.reshape(-1)[w.reshape(-1) != 0].clone(), self.state: keep}

    def apply(self, get, weights):
        weights[self.fqn] = scatter_values(get(self.fqn), get(self.state), self.shape)


def scatter_values(values: torch.Tensor, pruned: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense weight of compressed ``values`` under the packed mask ``pruned`` (zeros where pruned)."""
    keep = unpack_into(pruned, torch.empty(tuple(shape), dtype=torch.bool, device=values.device))
    out = torch.zeros(tuple(shape), dtype=values.dtype, device=values.device)
    out.view(-1)[keep.view(-1)] = values
    return out
