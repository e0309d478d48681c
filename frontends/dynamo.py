"""The ``memfit`` torch.compile backend: AOTAutograd with memfit's partition hook and runtime.

``torch.compile(model, backend="memfit")`` (registered by the ``torch_dynamo_backends`` entry point)
or ``backend=memfit.backend()``. AOTAutograd traces the joint forward+backward graph; memfit's
partition hook sees it whole (it records the joint graph's saved-activation bytes in
``memfit.frontends.dynamo.LAST_STATS``), partitions it with AOTAutograd's min-cut partitioner, and
compiles forward and backward through :func:`memfit.runtime.lower.lower`, which frees every
intermediate at its last use and runs memfit ops on their kernels. The user's loop keeps its own
``loss.backward(); opt.step()``.

Budgets and graph passes in this door are not wired yet (they need the planner); asking for them
raises ConfigError instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..runtime.lower import lower

LAST_STATS: dict[str, Any] = {}


def _joint_stats(joint: fx.GraphModule, num_fwd_outputs: int) -> dict[str, Any]:
    ops = sum(1 for n in joint.graph.nodes if n.op == "call_function")
    return {"joint_ops": ops, "num_fwd_outputs": num_fwd_outputs,
            "placeholders": sum(1 for n in joint.graph.nodes if n.op == "placeholder")}


def backend(budget: Any = None, passes: Sequence[Any] | None = None):
    """A torch.compile backend that lowers training graphs through memfit's runtime."""
    if budget is not None or passes:
        raise ConfigError(where_what_got(
            "memfit.backend", "no budget and no passes (this door runs the lossless lowering only for now)",
            f"budget={budget!r}, passes={passes!r}", "use memfit.optimize(model, budget=..., passes=...)"))

    def compiler(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))

        def partition(joint: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **kwargs):
            LAST_STATS.clear()
            LAST_STATS.update(_joint_stats(joint, num_fwd_outputs))
            return min_cut_rematerialization_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                                       **kwargs)

        def compile_graph(graph: fx.GraphModule, inputs: list[torch.Tensor]):
            return lower(graph, device).fn

        return aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph,
                            inference_compiler=compile_graph, partition_fn=partition)(gm, example_inputs)

    return compiler


def memfit_backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
    """Entry point for ``torch.compile(model, backend="memfit")``."""
    return backend()(gm, example_inputs)
