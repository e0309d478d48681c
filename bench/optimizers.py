"""Memory-efficient optimizers on tiny-llama: eager AdamW, the peer libraries and memfit, one process.

Every method trains the same model from the same init (one ``build_llama("tiny-llama")``, deep-copied
per method) on the same byte batches (``ByteBatches`` over ``stdlib_corpus()``, drawn once) for the
same number of steps, with the same AdamW hyperparameters (lr, betas, eps, weight decay 0). Methods:

- ``adamw``: eager ``torch.optim.AdamW``, the baseline every ratio is taken against (always run);
- ``galore-torch``: ``galore_torch.GaLoreAdamW`` (SVD projector, ``proj_type="std"``);
- ``apollo-torch`` / ``apollo-mini-torch``: ``apollo_torch.APOLLOAdamW``, APOLLO (rank r, random
  projection, channel-wise scaling, scale 1) and APOLLO-Mini (rank 1, tensor-wise scaling, scale 128);
- ``bnb-adamw8bit``: ``bitsandbytes.optim.AdamW8bit``; ``torchao-adamw8bit``: ``torchao.optim.AdamW8bit``;
- ``memfit-*``: ``memfit.optimize`` with ``fused_update`` and the ``lowrank`` (galore / apollo /
  apollo-mini / fira rules) and ``quantize_state`` (8-bit moments) passes.

The low-rank methods project the 2-D attention and MLP weights (``TARGETS``, fnmatch globs over
parameter names); embeddings, the LM head and the norms keep full AdamW state, in every library.
A method whose library is missing or fails is recorded with the error and the run goes on.

Columns: ``state_bytes`` is the optimizer state actually held after training: every tensor reachable
from ``optimizer.state`` (recursively, including projector objects such as GaLore's ``ortho_matrix``,
and the inner tensors of quantized tensor subclasses), or ``trainer.executor.state`` for memfit,
counted once per storage at the storage's size (a view keeps its whole base alive). ``peak_bytes`` is
one training step measured with ``memfit.measure_peak`` after a warm-up step (CPU: live bytes over
tensor storages; CUDA: max_memory_allocated), counting parameters, buffers, optimizer state and the
batch, as bench/step_memory.py does for eager (on CPU the storage tracker cannot run over torchao's
tensor-subclass state, so that row's peak is the held bytes plus ``profiler_peak_bytes``, noted).
``step_time_ratio`` is the median step time over the run (the warm-up and the measured step left
out, every seed's steps pooled) over eager AdamW's; ``final_loss`` is the mean of the last 20 training
losses, averaged over the seeds (``--seeds``; each sets the init, the batches and both libraries' random
projector seeds, the same for every method; the per-seed values are in the JSON). One seed is not enough
to compare losses at this scale: two fp32 AdamW implementations (foreach vs fused) already differ by 0.3%
after 300 steps, and APOLLO-Mini's rank-1 random projection moves the final loss by about 3% with the
projector seed alone, in either library.

    python bench/optimizers.py [--steps 300 --batch 4 --seq 128 --rank 32 --gap 50 --seeds 0,1,2]
                               [--only adamw,galore-torch]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

import memfit
from memfit import data, models
from memfit.runtime.memory import fmt_bytes

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import RESULTS, storage_bytes, write_table
from _common import tensors_in as state_tensors

TARGETS = ("model.layers.*.self_attn.*.weight", "model.layers.*.mlp.*.weight")
BETAS = (0.9, 0.999)
EPS = 1e-8
GALORE_SCALE = 0.25  # GaLore's alpha
APOLLO_SCALE = 1.0  # APOLLO's README default (apollo-torch multiplies the update by sqrt(scale))
APOLLO_MINI_SCALE = 128.0  # APOLLO-Mini's README default
LAST = 20  # final_loss: mean of the last LAST losses


@dataclass
class Config:
    lr: float
    weight_decay: float
    rank: int
    gap: int
    targets: tuple[str, ...]
    device: torch.device
    seed: int = 0  # this repeat's seed: init, batches and the random projectors' seeds


# ---- state accounting --------------------------------------------------------------------------


def _has_subclass(opt_state: dict) -> bool:
    """Whether a torch.optim state holds a wrapper tensor subclass (one with ``__tensor_flatten__``)."""
    return any(isinstance(v, torch.Tensor) and hasattr(type(v), "__tensor_flatten__")
               for s in opt_state.values() if isinstance(s, dict) for v in s.values())


# ---- one method = one runner -------------------------------------------------------------------


class EagerRunner:
    """A torch.optim-style optimizer stepping an eager model: forward, backward, step, zero_grad(None)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device):
        self.model, self.opt, self.device = model, opt, device

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = models.lm_loss(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self, x, y) -> torch.Tensor:
        return self._step(x, y)

    def measured_step(self, x, y) -> tuple[torch.Tensor, int, str | None]:
        if self.device.type != "cuda" and _has_subclass(self.opt.state):
            return self._profiled_step(x, y)
        m = memfit.measure_peak(self._step, x, y, device=self.device,
                                existing=iter([*self.model.parameters(), *self.model.buffers(),
                                               *state_tensors(self.opt.state), x, y]))
        return m.value, m.peak_bytes, None

    def _profiled_step(self, x, y) -> tuple[torch.Tensor, int, str]:
        """The CPU storage tracker cannot run over tensor-subclass state (torchao's OptimState8bit): it
        raises ``RuntimeError: Attempted to access the data pointer on an invalid python storage`` on the
        subclass's outputs, midway through the update. Measure this step with ``profiler_peak_bytes``
        (every CPU allocation, kernel scratch included) on top of the bytes held before the step; on the eager
        AdamW and bitsandbytes rows (batch 4 x seq 128) the two give the same number, to the byte."""
        from memfit.measure import profiler_peak_bytes

        held = [*self.model.parameters(), *self.model.buffers(), *state_tensors(self.opt.state), x, y]
        baseline = storage_bytes(held)[0]
        del held
        out = []
        added = profiler_peak_bytes(lambda: out.append(self._step(x, y)))
        note = ("peak from torch.profiler (held bytes + memfit.measure.profiler_peak_bytes): measure_peak's CPU "
                "storage tracker raises on tensor-subclass state (RuntimeError: Attempted to access the data "
                "pointer on an invalid python storage)")
        return out[0], baseline + added, note

    def state(self) -> list[torch.Tensor]:
        return state_tensors(self.opt.state)


class MemfitRunner:
    def __init__(self, trainer):
        self.trainer = trainer

    def step(self, x, y) -> torch.Tensor:
        return self.trainer.step(x, y)

    def measured_step(self, x, y) -> tuple[torch.Tensor, int, None]:
        m = self.trainer.measure_step(x, y)
        return m.value, m.peak_bytes, None

    def state(self) -> list[torch.Tensor]:
        return state_tensors(self.trainer.executor.state)


def _split(model: torch.nn.Module, cfg: Config) -> tuple[list, list]:
    """(projected 2-D weights matching cfg.targets, everything else) among the trainable parameters."""
    low, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            hit = p.dim() == 2 and any(fnmatch.fnmatchcase(name, g) for g in cfg.targets)
            (low if hit else rest).append(p)
    return low, rest


def make_adamw(model, x, y, cfg):
    return EagerRunner(model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=BETAS, eps=EPS,
                                                weight_decay=cfg.weight_decay), cfg.device)


def make_galore_torch(model, x, y, cfg):
    from galore_torch import GaLoreAdamW

    low, rest = _split(model, cfg)
    groups = [{"params": rest}, {"params": low, "rank": cfg.rank, "update_proj_gap": cfg.gap,
                                 "scale": GALORE_SCALE, "proj_type": "std"}]
    opt = GaLoreAdamW(groups, lr=cfg.lr, betas=BETAS, eps=EPS, weight_decay=cfg.weight_decay,
                      no_deprecation_warning=True)
    return EagerRunner(model, opt, cfg.device)


def _apollo(model, cfg, rank, scale_type, scale):
    from apollo_torch import APOLLOAdamW

    low, rest = _split(model, cfg)
    groups = [{"params": rest}, {"params": low, "rank": rank, "proj": "random", "scale_type": scale_type,
                                 "scale": scale, "update_proj_gap": cfg.gap, "proj_type": "std"}]
    opt = APOLLOAdamW(groups, lr=cfg.lr, betas=BETAS, eps=EPS, weight_decay=cfg.weight_decay)
    for s in opt.state.values():  # apollo-torch seeds parameter i's projector with i; shift it per repeat
        if "seed" in s:
            s["seed"] += 1000 * cfg.seed
    return EagerRunner(model, opt, cfg.device)


def make_apollo_torch(model, x, y, cfg):
    return _apollo(model, cfg, cfg.rank, "channel", APOLLO_SCALE)


def make_apollo_mini_torch(model, x, y, cfg):
    return _apollo(model, cfg, 1, "tensor", APOLLO_MINI_SCALE)


def make_bnb(model, x, y, cfg):
    import bitsandbytes as bnb

    opt = bnb.optim.AdamW8bit(model.parameters(), lr=cfg.lr, betas=BETAS, eps=EPS, weight_decay=cfg.weight_decay)
    return EagerRunner(model, opt, cfg.device)


def make_torchao(model, x, y, cfg):
    from torchao.optim import AdamW8bit

    opt = AdamW8bit(model.parameters(), lr=cfg.lr, betas=BETAS, eps=EPS, weight_decay=cfg.weight_decay)
    return EagerRunner(model, opt, cfg.device)


def _lowrank(cfg: Config, **kw) -> tuple[str, dict]:
    return ("lowrank", dict(rank=cfg.rank, gap=cfg.gap, targets=list(cfg.targets), seed=cfg.seed, **kw))


def _apollo_torch_seeds(model: torch.nn.Module, cfg: Config) -> dict[str, dict]:
    """Per projected weight, the projector seed apollo-torch gives it in ``_apollo`` (its 1-based index
    over the groups [rest, low], shifted per repeat as ``_apollo`` shifts it), as lowrank ``overrides``."""
    low, rest = _split(model, cfg)
    index = {id(p): i for i, p in enumerate([*rest, *low], start=1)}
    return {name: {"seed": index[id(p)] + 1000 * cfg.seed} for name, p in model.named_parameters()
            if any(p is q for q in low)}


def memfit_passes(key: str, cfg: Config, model: torch.nn.Module | None = None) -> list:
    galore = _lowrank(cfg, scale=GALORE_SCALE, projector="svd", rule="galore")
    return {
        "memfit-adamw": ["fused_update"],
        "memfit-galore": [galore, "fused_update"],
        "memfit-galore-fullgrad": [_lowrank(cfg, scale=GALORE_SCALE, projector="svd", rule="galore", factored=False),
                                   "fused_update"],
        "memfit-apollo": [_lowrank(cfg, scale=APOLLO_SCALE, projector="random", rule="apollo", scaling="channel"),
                          "fused_update"],
        "memfit-apollo-mini": [("lowrank", dict(rank=1, gap=cfg.gap, targets=list(cfg.targets), seed=cfg.seed,
                                                scale=APOLLO_MINI_SCALE, projector="random", rule="apollo",
                                                scaling="tensor")), "fused_update"],
        "memfit-fira": [_lowrank(cfg, scale=GALORE_SCALE, projector="svd", rule="fira"), "fused_update"],
        "memfit-apollo-stored": [_lowrank(cfg, scale=APOLLO_SCALE, projector="random", rule="apollo",
                                          scaling="channel", store_projector=True), "fused_update"],
        # like for like with apollo-torch: its projector matrices (seeds="apollo-torch") and refresh steps
        "memfit-apollo-peerseeds": [_lowrank(cfg, scale=APOLLO_SCALE, projector="random", rule="apollo",
                                             scaling="channel", stagger=False, seeds="apollo-torch",
                                             overrides=_apollo_torch_seeds(model, cfg) if model else {}),
                                    "fused_update"],
        "memfit-apollo-mini-peerseeds": [("lowrank", dict(rank=1, gap=cfg.gap, targets=list(cfg.targets),
                                                          scale=APOLLO_MINI_SCALE, projector="random", rule="apollo",
                                                          scaling="tensor", stagger=False, seeds="apollo-torch",
                                                          overrides=_apollo_torch_seeds(model, cfg) if model else {})),
                                         "fused_update"],
        "memfit-adamw8bit": ["fused_update", ("quantize_state", dict(bits=8))],
        "memfit-galore+8bit": [galore, "fused_update", ("quantize_state", dict(bits=8))],
    }[key]


def make_memfit(key: str) -> Callable:
    def make(model, x, y, cfg):
        trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=models.lm_loss,
                                  optimizer=memfit.AdamW(lr=cfg.lr, betas=BETAS, eps=EPS,
                                                         weight_decay=cfg.weight_decay),
                                  passes=memfit_passes(key, cfg, model))
        return MemfitRunner(trainer)
    return make


# --only key -> (label, factory, what a failure means)
METHODS: dict[str, tuple[str, Callable, str]] = {
    "adamw": ("eager AdamW (torch.optim)", make_adamw, "failed"),
    "galore-torch": ("galore-torch GaLoreAdamW", make_galore_torch, "does not run"),
    "apollo-torch": ("apollo-torch APOLLO", make_apollo_torch, "does not run"),
    "apollo-mini-torch": ("apollo-torch APOLLO-Mini", make_apollo_mini_torch, "does not run"),
    "bnb-adamw8bit": ("bitsandbytes AdamW8bit", make_bnb, "does not run"),
    "torchao-adamw8bit": ("torchao AdamW8bit", make_torchao, "does not run"),
    "memfit-adamw": ("memfit AdamW (fused_update)", make_memfit("memfit-adamw"), "not available"),
    "memfit-galore": ("memfit galore", make_memfit("memfit-galore"), "not available"),
    "memfit-galore-fullgrad": ("memfit galore, full weight gradient (factored=False)",
                               make_memfit("memfit-galore-fullgrad"), "not available"),
    "memfit-apollo": ("memfit apollo", make_memfit("memfit-apollo"), "not available"),
    "memfit-apollo-mini": ("memfit apollo-mini", make_memfit("memfit-apollo-mini"), "not available"),
    "memfit-apollo-stored": ("memfit apollo, projector stored (store_projector=True)",
                             make_memfit("memfit-apollo-stored"), "not available"),
    "memfit-apollo-peerseeds": ("memfit apollo, apollo-torch's projector seeds", make_memfit("memfit-apollo-peerseeds"),
                                "not available"),
    "memfit-apollo-mini-peerseeds": ("memfit apollo-mini, apollo-torch's projector seeds",
                                     make_memfit("memfit-apollo-mini-peerseeds"), "not available"),
    "memfit-fira": ("memfit fira", make_memfit("memfit-fira"), "not available"),
    "memfit-adamw8bit": ("memfit adamw8bit", make_memfit("memfit-adamw8bit"), "not available"),
    "memfit-galore+8bit": ("memfit galore+8bit", make_memfit("memfit-galore+8bit"), "not available"),
}


# the peer each memfit row is held against (the criteria: same rank and gap, same bytes or fewer, loss)
PEER = {"memfit-adamw": "adamw", "memfit-galore": "galore-torch", "memfit-galore-fullgrad": "galore-torch",
        "memfit-galore+8bit": "galore-torch", "memfit-fira": "galore-torch", "memfit-apollo": "apollo-torch",
        "memfit-apollo-mini": "apollo-mini-torch", "memfit-adamw8bit": "bnb-adamw8bit",
        "memfit-apollo-peerseeds": "apollo-torch", "memfit-apollo-mini-peerseeds": "apollo-mini-torch",
        "memfit-apollo-stored": "apollo-torch"}

# plot colours: a peer and its memfit counterpart share one (peers dashed, memfit solid)
COLOR = {"adamw": 0, "memfit-adamw": 0, "galore-torch": 1, "memfit-galore": 1, "memfit-galore-fullgrad": 1,
         "apollo-torch": 2, "memfit-apollo": 2, "apollo-mini-torch": 3, "memfit-apollo-mini": 3, "bnb-adamw8bit": 4,
         "memfit-adamw8bit": 4, "torchao-adamw8bit": 5, "memfit-fira": 6, "memfit-galore+8bit": 7,
         "memfit-apollo-peerseeds": 2, "memfit-apollo-mini-peerseeds": 3, "memfit-apollo-stored": 2}


@dataclass
class Result:
    key: str
    label: str
    runs: list[list[float]] = field(default_factory=list)  # one loss curve per seed
    times: list[float] = field(default_factory=list)  # timed steps of every seed
    state_bytes: int | None = None
    state_logical: int | None = None
    peak_bytes: int | None = None
    setup_s: list[float] = field(default_factory=list)
    peak_note: str | None = None
    error: str | None = None

    @property
    def finals(self) -> list[float]:
        """Final loss of each seed: the mean of its last LAST losses."""
        return [statistics.fmean(r[-LAST:]) for r in self.runs if r]

    @property
    def final_loss(self) -> float | None:
        return statistics.fmean(self.finals) if self.finals and not self.error else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None

    @property
    def curve(self) -> list[float]:
        """The loss curve averaged over the seeds."""
        return [statistics.fmean(step) for step in zip(*self.runs, strict=True)] if self.runs else []


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"


def _fail(res: Result, e: BaseException, device: torch.device) -> None:
    failure = METHODS[res.key][2]
    where = "" if failure != "does not run" else f" on {device.type}"
    res.error = f"{failure}{where}: {_err(e)}"
    print(f"[{res.key}] {res.error}", flush=True)


def run_seed(results: list[Result], base: torch.nn.Module, batches: list, cfg: Config) -> None:
    """Train every method for one seed (``cfg.seed``), round-robin: step i of every method, then step
    i + 1, so the machine's load falls on all methods alike and the time ratios hold on a busy machine.
    Appends each method's losses and step times to its Result (state bytes and peak: first seed); a
    failure is recorded and takes that method out of the rotation."""
    steps = len(batches)
    every = max(1, steps // 10)
    runners: dict[str, Any] = {}
    losses: dict[str, list[float]] = {}
    for res in results:
        if res.error:
            continue
        try:
            torch.manual_seed(cfg.seed)
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            runners[res.key] = METHODS[res.key][1](model, *batches[0], cfg)
            res.setup_s.append(time.perf_counter() - t0)
            losses[res.key] = []
        except Exception as e:  # one method failing must not stop the comparison
            _fail(res, e, cfg.device)
    live = [r for r in results if r.key in runners]
    t_start = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        for res in live:
            if res.error:
                continue
            runner = runners[res.key]
            try:
                t = time.perf_counter()
                if i == 1:  # the warm-up step made the state; measure this one, leave it out of the timing
                    loss, peak, note = runner.measured_step(x, y)
                    loss = float(loss)
                    if res.peak_bytes is None:
                        res.peak_bytes, res.peak_note = peak, note
                else:
                    loss = float(runner.step(x, y))
                    if i > 0:
                        res.times.append(time.perf_counter() - t)
                losses[res.key].append(loss)
            except Exception as e:
                _fail(res, e, cfg.device)
                runners.pop(res.key)
        if (i + 1) % every == 0 or i + 1 == steps:
            now = ", ".join(f"{r.key} {losses[r.key][-1]:.3f}" for r in live if not r.error)
            print(f"seed {cfg.seed} step {i + 1}/{steps} ({time.perf_counter() - t_start:.0f} s): {now}", flush=True)
    for res in live:
        if not res.error:
            res.runs.append(losses[res.key])
            if res.state_bytes is None:
                res.state_bytes, res.state_logical = storage_bytes(runners[res.key].state())


# ---- output ------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


def report(results: list[Result], args, cfg: Config) -> str:
    base = next(r for r in results if r.key == "adamw")
    by_key = {r.key: r for r in results}
    json_rows, md_rows = [], []
    for r in results:
        note = r.error
        if note is None:
            bits = [r.peak_note] if r.peak_note else []
            if r.state_logical is not None and r.state_logical != r.state_bytes:
                bits.append(f"state tensors' own elements {fmt_bytes(r.state_logical)} (views keep their bases)")
            if r.setup_s and statistics.median(r.setup_s) > 1:
                bits.append(f"setup {statistics.median(r.setup_s):.1f} s")
            note = "; ".join(bits) or None
        time_ratio = r.median_s / base.median_s if r.median_s is not None and base.median_s else None
        peer = by_key.get(PEER.get(r.key, ""))
        vs_peer = _vs_peer(r, peer)
        row = dict(method=r.label, state_bytes=r.state_bytes, peak_bytes=r.peak_bytes,
                   step_time_ratio=round(time_ratio, 4) if time_ratio is not None else None,
                   final_loss=round(r.final_loss, 4) if r.final_loss is not None else None,
                   final_loss_per_seed=[round(f, 4) for f in r.finals] if not r.error else None,
                   median_step_s=r.median_s)
        if peer is not None and vs_peer:
            row["peer"] = peer.label
        if note:
            row["note"] = note
        json_rows.append(row)
        md_rows.append(dict(
            method=r.label, note=note or "",
            state=fmt_bytes(r.state_bytes) if r.state_bytes is not None else "",
            state_ratio=_ratio(r.state_bytes, base.state_bytes),
            peak=fmt_bytes(r.peak_bytes) if r.peak_bytes is not None else "",
            peak_ratio=_ratio(r.peak_bytes, base.peak_bytes),
            time_ratio=f"{time_ratio:.2f}" if time_ratio is not None else "",
            loss=f"{r.final_loss:.4f}" if r.final_loss is not None else "",
            seeds=" / ".join(f"{f:.4f}" for f in r.finals) if not r.error and len(r.finals) > 1 else "",
            peer=f"{peer.label}: {vs_peer}" if peer is not None and vs_peer else ""))
    method = "CUDA max_memory_allocated" if cfg.device.type == "cuda" else "live bytes over tensor storages"
    seeds = ", ".join(str(x) for x in args.seeds)
    header = (
        f"### Optimizers on tiny-llama (4 layers, hidden 256), {cfg.device.type}: {args.steps} steps, "
        f"batch {args.batch} x seq {args.seq}\n\n"
        f"Same init, same stdlib byte batches, AdamW lr {cfg.lr:g}, betas {BETAS}, eps {EPS:g}, weight decay "
        f"{cfg.weight_decay:g} everywhere. Low-rank methods project `{'`, `'.join(cfg.targets)}` "
        f"(rank {cfg.rank}, subspace refresh every {cfg.gap} steps; GaLore/Fira scale {GALORE_SCALE:g}, "
        f"APOLLO rank {cfg.rank} channel-wise scale {APOLLO_SCALE:g}, APOLLO-Mini rank 1 tensor-wise scale "
        f"{APOLLO_MINI_SCALE:g}); the other parameters keep full AdamW state. Optimizer state: every tensor "
        f"reachable from the optimizer's state (projectors and quantized subclasses' inner tensors included), "
        f"each storage once. Peak: one step after a warm-up step, `memfit.measure_peak` ({method}), counting "
        f"parameters, buffers, optimizer state and batch. Step time: median over every timed step of every seed, as a "
        f"ratio to eager AdamW's in the same process (methods interleaved step by step, so load falls on all alike). "
        f"Final loss: mean of the last {LAST} steps, averaged over {len(args.seeds)} seed(s) ({seeds}: each seed "
        f"sets the init, the batches and the random projectors' seeds, the same for every method). The peer "
        f"column compares a memfit row with its peer: state, peak and step time as ratios, final loss as a "
        f"relative difference.")
    columns = [("method", "method"), ("state", "optimizer state"), ("state_ratio", "state vs AdamW"),
               ("peak", "measured peak"), ("peak_ratio", "peak vs AdamW"), ("time_ratio", "step time vs AdamW"),
               ("loss", f"final loss (last {LAST})"), ("seeds", "final loss per seed"),
               ("peer", "vs peer: state / peak / time / loss"), ("note", "note")]
    md = write_table(args.name, md_rows, columns, header)
    # write_table wrote the display rows as JSON; the JSON holds the raw numbers, one object per method
    (RESULTS / f"{args.name}.json").write_text(json.dumps(json_rows, indent=2) + "\n")
    return md


def _vs_peer(r: Result, peer: Result | None) -> str:
    """'state / peak / time ratios / loss difference' of ``r`` against ``peer`` ('' if either failed)."""
    if peer is None or r.error or peer.error or None in (r.state_bytes, peer.state_bytes, r.peak_bytes,
                                                         peer.peak_bytes, r.median_s, peer.median_s):
        return ""
    d = (r.final_loss / peer.final_loss - 1) * 100
    return (f"{r.state_bytes / peer.state_bytes:.2f} / {r.peak_bytes / peer.peak_bytes:.2f} / "
            f"{r.median_s / peer.median_s:.2f} / {d:+.2f}%")


def plot(results: list[Result], args) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no loss plot: {_err(e)} (pip install matplotlib)")
        return None
    window = max(1, min(LAST, args.steps // 10))
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in results:
        if r.error or not r.runs:
            continue
        t = torch.tensor(r.curve, dtype=torch.float64)
        c = torch.cat([torch.zeros(1, dtype=torch.float64), t.cumsum(0)])
        idx = torch.arange(1, len(t) + 1)
        lo = (idx - window).clamp(min=0)
        smooth = (c[idx] - c[lo]) / (idx - lo)  # trailing mean over the last `window` steps
        ax.plot(idx.numpy(), smooth.numpy(), label=r.label, linewidth=1.4, color=f"C{COLOR.get(r.key, 9)}",
                linestyle="-" if r.key.startswith("memfit") else "--")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (trailing mean of {window}, mean over {len(args.seeds)} seed(s))")
    ax.set_title(f"tiny-llama, batch {args.batch} x seq {args.seq}: memory-efficient optimizers")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{args.name}_loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def batches_of(batch: int, seq: int, steps: int, seed: int, device: torch.device) -> list:
    it: Iterator = iter(data.ByteBatches(data.stdlib_corpus(), batch, seq, seed=seed))
    return [tuple(t.to(device) for t in next(it)) for _ in range(steps)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32, help="rank of the low-rank methods (APOLLO-Mini: 1)")
    ap.add_argument("--gap", type=int, default=50, help="steps between subspace refreshes")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; each sets the init, the batches and "
                    "the random projectors' seeds, and every method runs once per seed (final loss: their mean)")
    ap.add_argument("--only", default="", help=f"comma-separated methods from {', '.join(METHODS)} "
                                              "(adamw, the baseline, always runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="optimizers", help="results file stem")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be at least 3 (a warm-up step, a measured step, timed steps)")
    keys = list(METHODS)
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in wanted if k not in METHODS]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        keys = ["adamw", *(k for k in keys if k in wanted and k != "adamw")]
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        ap.error("--seeds needs at least one seed")
    device = torch.device(args.device)
    cfg = Config(lr=args.lr, weight_decay=args.weight_decay, rank=args.rank, gap=args.gap, targets=TARGETS,
                 device=device)
    results = [Result(k, METHODS[k][0]) for k in keys]
    t0 = time.perf_counter()
    for seed in args.seeds:
        base = models.build_llama("tiny-llama", seed=seed).to(device)
        smallest = min(min(p.shape) for p in _split(base, cfg)[0])
        if not 1 <= args.rank < smallest:
            ap.error(f"--rank must be in [1, {smallest}) (the smallest side of a projected weight)")
        batches = batches_of(args.batch, args.seq, args.steps, seed, device)
        cfg.seed = seed
        run_seed(results, base, batches, cfg)
        print(f"    seed {seed} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    print(report(results, args, cfg))
    path = plot(results, args)
    if path:
        print(f"loss curves: {path}")


if __name__ == "__main__":
    main()
