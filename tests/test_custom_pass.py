"""Door 3: a user pass registered by name runs in the Pipeline, in order, with its stats recorded."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models


@memfit.register_pass("test_scale_loss")
@dataclass(frozen=True)
class ScaleLoss(memfit.Pass):
    """Multiplies the loss seed of the backward by ``factor`` (so every gradient scales by it)."""

    factor: float = 2.0
    before = ("fused_update",)

    def run(self, g: memfit.TrainGraph) -> memfit.PassResult:
        seeds = [n for n in g.graph.nodes if n.target is torch.ops.aten.ones_like.default and n.args[0] is g.loss]
        for seed in seeds:
            with g.graph.inserting_after(seed):
                scaled = g.graph.call_function(torch.ops.aten.mul.Tensor, (seed, self.factor))
            seed.replace_all_uses_with(scaled, delete_user_cb=lambda u, s=scaled: u is not s)
        return memfit.PassResult(g, bool(seeds), {"seeds": len(seeds)})


def test_custom_pass_runs_in_order_and_changes_the_step():
    torch.manual_seed(0)
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    a, b = models.build_mlp(), models.build_mlp()
    sgd = memfit.SGD(lr=0.1)
    plain = memfit.optimize(a, example_inputs=(x, y), loss_fn=F.cross_entropy, optimizer=sgd,
                            passes=["fused_update"])
    scaled = memfit.optimize(b, example_inputs=(x, y), loss_fn=F.cross_entropy, optimizer=sgd,
                             passes=["fused_update", ("test_scale_loss", {"factor": 3.0})])
    assert scaled.graph.applied == ["test_scale_loss", "fused_update", "sink"], "before= must order it first"
    assert scaled.graph.info["pass_stats"]["test_scale_loss"] == {"modified": True, "seeds": 1}
    w0 = b[0].weight.detach().clone()
    plain.step(x, y)
    scaled.step(x, y)
    # SGD without momentum: the step is -lr * grad, so tripled gradients triple the step
    torch.testing.assert_close(b[0].weight - w0, 3 * (a[0].weight - w0), rtol=1e-5, atol=1e-7)


def test_pass_config_is_json_serializable():
    p = memfit.passes.base.make_pass(("test_scale_loss", {"factor": 0.5}))
    assert p.to_json() == '{"config": {"factor": 0.5}, "pass": "test_scale_loss"}'
    with pytest.raises(memfit.ConfigError, match="config keys among"):
        memfit.passes.base.make_pass(("test_scale_loss", {"factr": 0.5}))


@memfit.register_pass("test_breaks_graph")
@dataclass(frozen=True)
class BreaksGraph(memfit.Pass):
    """Makes the loss read a node defined after it: the Pipeline's lint must catch it."""

    def run(self, g: memfit.TrainGraph) -> memfit.PassResult:
        last = list(g.graph.nodes)[-2]
        with g.graph.inserting_before(g.loss):
            g.graph.call_function(torch.ops.aten.clone.default, (last,))
        return memfit.PassResult(g, True)


@memfit.register_pass("test_refuses")
@dataclass(frozen=True)
class Refuses(memfit.Pass):
    def run(self, g: memfit.TrainGraph) -> memfit.PassResult:
        raise memfit.UnsupportedGraph("test_refuses: expected nothing, got a graph; stop", op="aten::mm", node="mm")


def test_pipeline_names_the_pass_that_broke_the_graph_and_the_ones_before():
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    with pytest.raises(memfit.UnsupportedGraph,
                       match=r"(?s)^Pipeline: pass 'test_breaks_graph' \(after \['remat'\]\): "
                             r"expected a graph that lints.*"
                             r", got .*; fix the pass"):
        memfit.optimize(models.build_mlp(), example_inputs=(x, y), loss_fn=F.cross_entropy,
                        passes=["remat", "test_breaks_graph", "fused_update"])


def test_pipeline_keeps_a_memfit_errors_attributes_and_adds_where():
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    with pytest.raises(memfit.UnsupportedGraph, match=r"\[in pass 'test_refuses', after capture\]$") as err:
        memfit.optimize(models.build_mlp(), example_inputs=(x, y), loss_fn=F.cross_entropy,
                        passes=["test_refuses", "fused_update"])
    assert (err.value.op, err.value.node) == ("aten::mm", "mm")
