"""freeze: parameters that do not train produce no gradient, no update and no saved activation.

Rewrites: removes the gradient outputs of parameters matched by ``frozen`` (FQN globs), then
dead-code-eliminates the backward: the weight-gradient matmuls, every backward node that only fed
them, and so every forward activation saved only for them (the Tiny Training Engine's compile-time
backward pruning). Parameters with ``requires_grad=False`` at capture are already absent from the
backward (AOTAutograd never traces it); this pass does the same for a glob chosen later, e.g. by
the planner. Reports the saved-activation bytes before and after in ``stats``.

Requires: nothing; runs before ``fused_update``. Guarantees: the loss and the remaining gradients
are unchanged (bitwise: the same nodes compute them).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph, saved_activations, value_nbytes
from .base import MemoryEffect, Pass, PassResult, register_pass


@register_pass("freeze")
@dataclass(frozen=True)
class Freeze(Pass):
    frozen: tuple[str, ...] = ()
    before = ("fused_update",)

    def __post_init__(self):
        if isinstance(self.frozen, str):
            object.__setattr__(self, "frozen", (self.frozen,))
        if not all(isinstance(p, str) for p in self.frozen):
            raise ConfigError(where_what_got("freeze.frozen", "FQN glob strings", self.frozen,
                                             "e.g. frozen=('model.embed_tokens.*', 'model.layers.[0-1].*')"))

    def memory_effect(self, g: TrainGraph) -> MemoryEffect:
        g.check_globs(self.frozen, "freeze.frozen")
        hit = g.match(self.frozen, g.grad_outputs)
        per = {f: -value_nbytes(g.params[f].meta["val"]) for f in hit}
        return MemoryEffect(transient=sum(per.values()), per_param=per)

    def run(self, g: TrainGraph) -> PassResult:
        g.check_globs(self.frozen, "freeze.frozen")
        hit = g.match(self.frozen, g.grad_outputs)
        if not hit:
            return PassResult(g, False)
        before_saved = sum(saved_activations(g).values())
        before_nodes = len(g.graph.nodes)
        for fqn in hit:
            g.grad_outputs.remove(fqn)
            del g.grad_of[fqn]  # its node is about to be dead-code-eliminated
        g.trainable = tuple(p for p in g.trainable if p not in hit)
        g.sync_outputs()
        g.eliminate_dead_code()
        after_saved = sum(saved_activations(g).values())
        stats = {"frozen": hit, "removed_nodes": before_nodes - len(g.graph.nodes),
                 "saved_bytes_before": before_saved, "saved_bytes_after": after_saved}
        g.info["freeze"] = stats
        return PassResult(g, True, stats)
