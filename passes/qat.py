"""qat: quantization-aware training with learned step sizes (LSQ), optionally through LoRA (QALoRA).

Rewrites, per targeted weight ``W``: a new trainable parameter ``<fqn>.lsq_step`` (one step size per group
of ``group`` flattened elements, LSQ's initialisation 2·mean|w|/sqrt(qmax)) and every read of ``W`` becomes
a read of ``Wq = lsq_quant(W, s) = clamp(round(W / s), -qmax - 1, qmax) · s`` (``qmax = 2**(bits - 1) - 1``:
7 at 4 bits, 127 at 8; 2 and 3 bits too), a copy made just before each reader (never saved across the
step). The backward takes the gradient the step already makes for ``Wq`` through ``lsq_quant_backward``:
the straight-through estimator for ``W`` (zero where ``W / s`` is clipped) and LSQ's gradient for ``s``
(scaled by 1/sqrt(group·qmax)).

``lora_rank > 0`` is QALoRA as EfficientDM uses it: ``W`` is frozen and LoRA adapters are merged into it before
fake quantization, ``Wq = lsq_quant(W + s_lora · B A, s)``, so only A, B and the step sizes train and the
result is one low-bit weight per layer. ``Trainer.export()`` gives a plain module holding ``Wq`` (its outputs
are the training graph's); ``Trainer.export_quantized()`` the integer codes and step sizes.

Default targets: the weights ``quantize_weights`` would take (2-D or more, not embeddings nor the head).
Runs before ``remat`` and ``fused_update``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch

from .. import weights as wt
from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph
from .base import Pass, PassResult, register_pass
from .lora import freeze_params
from .quantize_weights import _rewire_to_dequant, default_targets, refuse_tied

aten = torch.ops.aten
_LSQ = torch.ops.memfit.lsq_quant.default
_LSQ_BWD = torch.ops.memfit.lsq_quant_backward.default


@register_pass("qat")
@dataclass(frozen=True)
class Qat(Pass):
    bits: Literal[2, 3, 4, 8] = 4
    group: int = 128
    targets: str | tuple[str, ...] | None = None
    lora_rank: int = 0  # > 0: QALoRA (W frozen, adapters merged before fake quantization)
    lora_alpha: float = 16.0
    freeze_rest: bool = False  # QALoRA: as peft, only adapters and step sizes train
    seed: int = 0

    before = ("remat", "fused_update", "quantize_weights", "lora")
    lossless = False

    def __post_init__(self):
        where = "passes['qat']"
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.bits not in (2, 3, 4, 8) or isinstance(self.bits, bool):
            raise ConfigError(where_what_got(f"{where}.bits", "2, 3, 4 or 8", repr(self.bits), "e.g. 4 (W4)"))
        wt.check_codec(where, "int8", self.group)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(where_what_got(f"{where}.lora_rank", "an int >= 0 (0: plain LSQ)", repr(self.lora_rank),
                                             "e.g. 8 for QALoRA"))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def selected(self, g: TrainGraph) -> list[str]:
        if self.targets is None:
            chosen = default_targets(g)
        else:
            g.check_globs(self.targets, "passes['qat'].targets")
            chosen = g.match(self.targets)
            refuse_tied(g, self.targets, chosen, "passes['qat'].targets")
        for f in chosen:
            val = g.params[f].meta["val"]
            if val.numel() % self.group:
                raise ConfigError(where_what_got(f"passes['qat'] on {f!r}", f"a weight whose {val.numel()} elements "
                                                 f"split into groups of {self.group}",
                                                 f"{val.numel()} % {self.group} = {val.numel() % self.group}",
                                                 "pick another group size or leave the weight out of targets"))
            if f not in g.grad_of and not self.lora_rank:
                raise ConfigError(where_what_got(f"passes['qat'] on {f!r}", "a trainable weight",
                                                 "a weight without a gradient", "LSQ trains the weight with its step "
                                                 "sizes; use lora_rank > 0 (QALoRA) for frozen weights"))
        return chosen

    def run(self, g: TrainGraph) -> PassResult:
        chosen = self.selected(g)
        G = g.graph
        made_params: list[str] = []
        frozen: list[str] = []
        for fqn in chosen:
            p = g.params[fqn]
            val = p.meta["val"]
            numel = val.numel()
            step_name = f"{fqn}.lsq_step"
            with g.fake_mode():
                S = g.add_param(step_name, torch.empty(numel // self.group, dtype=torch.float32, device=val.device))
            adapters = None
            A = B = None
            if self.lora_rank:
                out_f, in_f = val.shape[0], val.numel() // val.shape[0]
                module = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
                a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
                with g.fake_mode():
                    A = g.add_param(a_name, torch.empty(self.lora_rank, in_f, dtype=val.dtype, device=val.device))
                    B = g.add_param(b_name, torch.empty(out_f, self.lora_rank, dtype=val.dtype, device=val.device))
                scaling = float(self.lora_alpha) / self.lora_rank
                adapters = wt.Adapters(fqn, a_name, b_name, self.lora_rank, scaling, self.seed + len(g.inits))
                made_params += [a_name, b_name]

            def merged(p=p, A=A, B=B, adapters=adapters, shape=tuple(val.shape)):
                if A is None:
                    return p
                ba = G.call_function(aten.mm.default, (B, A))
                if len(shape) != 2:
                    ba = G.call_function(aten.view.default, (ba, list(shape)))
                return G.call_function(aten.add.Tensor, (p, ba), {"alpha": adapters.scaling})

            def make(merged=merged, S=S):
                return G.call_function(_LSQ, (merged(), S, self.group, self.qmax))

            dwq = g.grad_of.get(fqn)
            _rewire_to_dequant(g, p, make)
            if dwq is None:
                raise ConfigError(where_what_got(f"passes['qat'] on {fqn!r}", "a gradient for the weight's readers",
                                                 "none in the captured step", "capture with the weight trainable"))
            with G.inserting_before(dwq.next):
                bwd = G.call_function(_LSQ_BWD, (dwq, merged(), S, self.group, self.qmax))
                dw = G.call_function(operator.getitem, (bwd, 0))
                ds = G.call_function(operator.getitem, (bwd, 1))
                if A is not None:
                    s = adapters.scaling
                    dw2 = dw if val.dim() == 2 else G.call_function(aten.view.default, (dw, [val.shape[0], -1]))
                    db = G.call_function(aten.mul.Tensor, (G.call_function(
                        aten.mm.default, (dw2, G.call_function(aten.t.default, (A,)))), s))
                    da = G.call_function(aten.mul.Tensor, (G.call_function(
                        aten.mm.default, (G.call_function(aten.t.default, (B,)), dw2)), s))
            g.grad_of[step_name] = ds
            g.grad_outputs.append(step_name)
            if A is None:
                g.grad_of[fqn] = dw
            else:
                g.grad_of[adapters.a], g.grad_of[adapters.b] = da, db
                g.grad_outputs += [adapters.a, adapters.b]
                frozen.append(fqn)
            made_params.append(step_name)
            g.inits.append(wt.StepSizes(fqn, step_name, self.group, self.qmax, adapters))
        if self.freeze_rest:
            frozen += [f for f in g.trainable if f not in made_params and f not in frozen]
        freeze_params(g, frozen)
        g.sync_outputs()
        g.eliminate_dead_code()
        stats = {"targets": chosen, "bits": self.bits, "group": self.group, "lora_rank": self.lora_rank}
        g.info["qat"] = stats
        return PassResult(g, bool(chosen), stats)
