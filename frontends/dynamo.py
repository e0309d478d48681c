"""The ``memfit`` torch.compile backend: AOTAutograd with memfit's partition hook and runtime.

``torch.compile(model, backend="memfit")`` (registered by the ``torch_dynamo_backends`` entry point)
or ``backend=memfit.backend(passes=[...])``. AOTAutograd traces the joint forward+backward graph;
memfit's partition hook turns it into a TrainGraph (parameters named by FQN from Dynamo's sources),
runs the pass pipeline on it (default ``["remat"]``: lossless recomputation), partitions it with
AOTAutograd's ``default_partition`` (which saves exactly what the rewritten backward reads, so
memfit's choices stand), and compiles forward and backward through :func:`memfit.runtime.lower.lower`,
which frees every intermediate at its last use and runs memfit ops on their kernels. The user's
loop keeps its own ``loss.backward(); opt.step()``, so passes that rewrite the update or drop
gradients (``fused_update``, ``freeze``) belong to ``memfit.optimize`` and are refused here.
``passes=[]`` hands partitioning back to AOTAutograd's min-cut partitioner.

``LAST_STATS`` holds what the hook saw and did for the most recent graph (for tests and logs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import NAME_KEY, ROLE_KEY, TrainGraph, saved_activations
from ..passes.base import Pass, Pipeline, make_pass
from ..runtime.lower import lower

LAST_STATS: dict[str, Any] = {}
DEFAULT_PASSES = ("remat",)


def fqn_from_source(source: str) -> str | None:
    """``L['self']._modules['0']._parameters['weight']`` -> ``0.weight``; None for non-parameters."""
    if "_parameters[" not in source:
        return None
    parts = re.findall(r"_(?:modules|parameters)\['([^']+)'\]", source)
    return ".".join(parts) if parts else None


def joint_train_graph(joint: fx.GraphModule, num_fwd_outputs: int, names: Sequence[str | None]) -> TrainGraph:
    """A TrainGraph view of AOTAutograd's joint graph (primals, tangents -> forward outputs, grads)."""
    from torch._guards import detect_fake_mode

    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if n.name.startswith("primals")]
    params: dict[str, fx.Node] = {}
    inputs: list[fx.Node] = []
    for i, node in enumerate(primals):
        fqn = names[i] if i < len(names) else None
        if fqn is not None:
            node.meta[ROLE_KEY], node.meta[NAME_KEY] = "param", fqn
            params[fqn] = node
        else:
            node.meta[ROLE_KEY], node.meta[NAME_KEY] = "input", f"input[{i}]"
            inputs.append(node)
    for j, node in enumerate(n for n in placeholders if n not in primals):
        node.meta[ROLE_KEY], node.meta[NAME_KEY] = "input", f"tangent[{j}]"
        inputs.append(node)
    out = next(n for n in joint.graph.nodes if n.op == "output")
    flat = list(out.args[0])
    forward_outputs = [v for v in flat[:num_fwd_outputs] if isinstance(v, fx.Node)]
    grads = flat[num_fwd_outputs:]
    grad_of = {fqn: grads[i] for i, fqn in enumerate(names[:len(primals)])
               if fqn is not None and i < len(grads) and isinstance(grads[i], fx.Node)}
    vals = [n.meta.get("val") for n in placeholders]
    g = TrainGraph(gm=joint, params=params, buffers={}, inputs=inputs, loss=forward_outputs[0], grad_of=grad_of,
                   grad_outputs=list(grad_of), buffer_updates={}, trainable=tuple(grad_of), joint=True,
                   forward_outputs=forward_outputs)
    g.fake = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    return g


def _joint_passes(passes: Sequence[Any] | None) -> list[Pass]:
    made = [make_pass(p) for p in (DEFAULT_PASSES if passes is None else passes)]
    refused = [p.name for p in made if not p.joint_ok]
    if refused:
        raise ConfigError(where_what_got(
            "memfit.backend(passes=)", "passes that keep the joint graph's outputs (e.g. 'remat')", refused,
            "fused_update/freeze change the optimizer step; use memfit.optimize for them"))
    return made


def backend(budget: Any = None, passes: Sequence[Any] | None = None):
    """A torch.compile backend: memfit passes on the joint graph, lowered through memfit's runtime."""
    if budget is not None:
        raise ConfigError(where_what_got(
            "memfit.backend", "no budget (the torch.compile door has no planner yet)", f"budget={budget!r}",
            "use memfit.optimize(model, budget=...) for a budgeted step"))
    pass_list = _joint_passes(passes)

    def compiler(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        names = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                arg = n.meta.get("grapharg")
                names.append(fqn_from_source(arg.source.name) if arg is not None and arg.source is not None
                             else None)

        def partition(joint: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **kwargs):
            LAST_STATS.clear()
            LAST_STATS["joint_ops"] = sum(1 for n in joint.graph.nodes if n.op == "call_function")
            if not pass_list:
                return min_cut_rematerialization_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                                           **kwargs)
            g = joint_train_graph(joint, num_fwd_outputs, names)
            LAST_STATS["saved_bytes_before"] = sum(saved_activations(g).values())
            g = Pipeline(pass_list)(g)
            LAST_STATS["saved_bytes_after"] = sum(saved_activations(g).values())
            LAST_STATS["passes"] = list(g.applied)
            LAST_STATS["pass_stats"] = g.info.get("pass_stats", {})
            LAST_STATS["params"] = list(g.params)
            return default_partition(g.gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

        def compile_graph(graph: fx.GraphModule, inputs: list[torch.Tensor]):
            return lower(graph, device).fn

        return aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph,
                            inference_compiler=compile_graph, partition_fn=partition)(gm, example_inputs)

    return compiler


def memfit_backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
    """Entry point for ``torch.compile(model, backend="memfit")``."""
    return backend()(gm, example_inputs)
