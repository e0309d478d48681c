"""data_parallel: the step's gradients averaged over the ranks of a process group, inside the graph.

Every rank runs the same compiled step on its own part of the global batch. Before each parameter's update
op the pass inserts ``memfit::all_reduce_mean(grad, group, world)``, a ``torch.distributed`` all-reduce
(sum, then a division by the world size) of a copy of the gradient: the update steps the mean gradient, so
every rank makes the same update and the result is single-process training on the concatenated batch
(each rank's loss is the mean over its own equal share). One all-reduce per gradient, placed where the
gradient is complete, in backward order; the plan counts the reduced copy as one more gradient-sized value
while it lives. A gradient GaLore holds as factors ``L @ R`` (``lowrank``'s ``factored`` path: tokens
inner) is not formed when its factors are fewer bytes: the ranks' factors are all-gathered and concatenated
(``memfit::all_gather_cat``), ``[L_1 .. L_W] @ [R_1; ..; R_W] / W`` being the mean gradient (tokens x
(m + n) values sent instead of m x n); otherwise it is formed and all-reduced. ``graph.info["data_parallel"]``
counts the all-reduces, the factor gathers and the bytes each rank sends per step.

What it does not do (refused at ``memfit.optimize(process_group=...)``): gradient accumulation over
micro-steps (each micro-step would communicate), gradient clipping (the norm must be of the reduced
gradient), pruning masks (their events read the local gradient). BatchNorm running statistics: the Trainer
broadcasts every buffer from the group's first rank before each step, as PyTorch DDP does by default.

Needs ``fused_update``. The ``group`` is the process group's name, ``world`` its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph
from ..ops import args_of, op_call, replace_args
from .base import Pass, PassResult, register_pass

_WHERE = "passes['data_parallel']"


@register_pass("data_parallel")
@dataclass(frozen=True)
class DataParallel(Pass):
    group: str = ""
    world: int = 0

    requires = ("fused_update",)
    keeps_meta = True

    def __post_init__(self):
        if not self.group or isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ConfigError(where_what_got(_WHERE, "a process group's name and its size >= 1",
                                             f"group={self.group!r}, world={self.world!r}",
                                             "pass process_group= to memfit.optimize"))

    def run(self, g: TrainGraph) -> PassResult:
        if any(n.target is torch.ops.memfit.prune_mask.default for n in g.graph.nodes):
            raise ConfigError(where_what_got(_WHERE, "a step without pruning masks",
                                             "prune's mask op (its events read the local gradient)",
                                             "prune on one process, or drop prune"))
        sent, gathered = 0, 0
        for f, upd in g.updates.items():
            a = args_of(upd)
            if a.grad is None:
                continue
            micro = a.as_dict().get("micro_steps", 1)
            if micro > 1:
                raise ConfigError(where_what_got(_WHERE, "one micro-step per step", f"{micro} on {f}",
                                                 "drop micro_steps= with process_group="))
            right = a.as_dict().get("grad_right")
            if right is not None:
                (m, tokens), n = a.grad.meta["val"].shape, right.meta["val"].shape[1]
                if tokens * (m + n) >= m * n:  # the factors outweigh the gradient: form it, all-reduce it
                    with g.graph.inserting_before(upd):
                        full = g.graph.call_function(torch.ops.aten.mm.default, (a.grad, right))
                    full.meta["val"] = a.grad.meta["val"].new_empty((m, n))
                    upd.args, upd.kwargs = replace_args(upd, grad=full, grad_right=None)
                    a = args_of(upd)
                    right = None
            if right is not None:  # a gradient held as factors L @ R (tokens inner): gather, never form it
                with g.graph.inserting_before(upd):
                    left = op_call(g.graph, torch.ops.memfit.all_gather_cat.default, t=a.grad, dim=1,
                                   scale=1.0 / self.world, group=self.group, world=self.world,
                                   name=f"the gradient of {f} (left factor)")
                    rows = op_call(g.graph, torch.ops.memfit.all_gather_cat.default, t=right, dim=0, scale=1.0,
                                   group=self.group, world=self.world, name=f"the gradient of {f} (right factor)")
                for node, src, dim in ((left, a.grad, 1), (rows, right, 0)):
                    shape = list(src.meta["val"].shape)
                    shape[dim] *= self.world
                    node.meta["val"] = src.meta["val"].new_empty(shape)
                upd.args, upd.kwargs = replace_args(upd, grad=left, grad_right=rows)
                gathered += 1
                sent += sum(v.meta["val"].numel() * v.meta["val"].element_size() for v in (a.grad, right))
                continue
            with g.graph.inserting_before(upd):
                mean = op_call(g.graph, torch.ops.memfit.all_reduce_mean.default, grad=a.grad, group=self.group,
                               world=self.world, name=f"the gradient of {f}")
            mean.meta["val"] = a.grad.meta["val"]
            upd.args, upd.kwargs = replace_args(upd, grad=mean)
            val = a.grad.meta["val"]
            sent += val.numel() * val.element_size()
        stats = {"all_reduces": len(g.updates) - gathered, "factor_gathers": gathered, "bytes_per_step": sent,
                 "world": self.world}
        g.info["data_parallel"] = stats
        return PassResult(g, bool(g.updates), stats, meta_ok=True)
