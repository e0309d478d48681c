"""Executor: runs a lowered TrainGraph step, owns the persistent tensors, measures peak memory.

It decides nothing: the placeholders' roles say where each argument comes from, the output layout
says where each result goes (loss back to the caller, new buffer values copied into the buffers,
remaining gradients handed back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..graph import NAME_KEY, ROLE_KEY, TrainGraph
from .lower import Lowered


@dataclass
class StepOutputs:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


class Executor:
    def __init__(self, g: TrainGraph, lowered: Lowered, params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], device: torch.device):
        self.lowered = lowered
        self.params = params
        self.buffers = buffers
        self.state: dict[str, torch.Tensor] = {
            name: torch.zeros(spec.shape, dtype=spec.dtype, device=device) for name, spec in g.state_specs.items()}
        self.slots = [(n.meta[ROLE_KEY], n.meta[NAME_KEY]) for n in g.placeholders()]
        self.layout = g.output_layout()

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.buffers.values(), *self.state.values()]

    def run(self, inputs: Sequence[torch.Tensor], hparams: dict[str, float | int]) -> StepOutputs:
        source = {"param": self.params, "buffer": self.buffers, "state": self.state, "hparam": hparams}
        args: list = []
        n_input = 0
        for role, name in self.slots:
            if role == "input":
                args.append(inputs[n_input])
                n_input += 1
            else:
                args.append(source[role][name])
        outs = self.lowered(args)
        loss, grads = None, {}
        for (kind, name), value in zip(self.layout, outs, strict=True):
            if kind == "loss":
                loss = value
            elif kind == "buffer":
                self.buffers[name].copy_(value)
            else:
                grads[name] = value
        return StepOutputs(loss.detach(), grads)
