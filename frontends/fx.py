"""``torch.fx.symbolic_trace``'d GraphModules in, the same TrainGraph out.

A symbolically traced GraphModule is an nn.Module holding the original parameters under the same
FQNs, so it goes through the same whole-step capture as any model; this door checks what it was
handed and says so clearly when it is not a GraphModule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph
from .export import capture


def capture_fx(gm: fx.GraphModule, example_inputs: Sequence[Any], loss_fn: Callable | None = None) -> TrainGraph:
    if not isinstance(gm, fx.GraphModule):
        raise ConfigError(where_what_got("memfit.frontends.fx.capture_fx", "a torch.fx.GraphModule",
                                         type(gm).__name__, "trace it with torch.fx.symbolic_trace(model) first"))
    return capture(gm, example_inputs, loss_fn)
