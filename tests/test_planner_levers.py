"""The planner as a policy over the passes' option table: a pass that only declares options becomes a lever
with no change to the planner; a model of identical layers planned from 1- and 2-layer captures gives the
fully captured plan to the byte; the CLI's hand arithmetic follows the state the planner chose."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import cli, models
from memfit.graph import NAME_KEY, TrainGraph
from memfit.ops import args_of, op_call
from memfit.passes.base import Option, Pass, PassResult, register_pass, registered_passes
from memfit.runtime.blocks import BASE_LAYERS


@register_pass("test_sgd_lever")
class SGDLever(Pass):
    """A toy lever: selected parameters drop AdamW for plain SGD (no state). It names no planner internals:
    it declares its options (8 bytes of moments saved per element, lossy) and how to apply a choice."""

    targets: tuple[str, ...] = ()
    requires = ("fused_update",)
    lossless = False

    @classmethod
    def options(cls, g: TrainGraph, levers: str) -> list[Option]:
        if levers != "lossy":
            return []
        return [Option("test_sgd_lever", fqn, "sgd", (), persistent=-8 * g.params[fqn].meta["val"].numel(),
                       lossiness="lossy")
                for fqn, node in g.updates.items() if node.target is torch.ops.memfit.adamw_update.default]

    @classmethod
    def from_options(cls, chosen: list[Option]) -> tuple[str, dict]:
        return "test_sgd_lever", {"targets": tuple(o.target for o in chosen)}

    def run(self, g: TrainGraph) -> PassResult:
        for fqn in self.targets:
            old = g.updates[fqn]
            a = args_of(old)
            with g.graph.inserting_before(old):
                new = op_call(g.graph, torch.ops.memfit.sgd_update.default, param=a.param, grad=a.grad,
                              momentum_buffer=None, grad_acc=a.grad_acc, lr=a.lr, step=a.step,
                              micro_step=a.micro_step, momentum=0.0, dampening=0.0, nesterov=False,
                              weight_decay=0.0, micro_steps=a.micro_steps)
            states = [a.exp_avg.meta[NAME_KEY], a.exp_avg_sq.meta[NAME_KEY]]
            old.replace_all_uses_with(new)
            g.graph.erase_node(old)
            g.updates[fqn] = new
            for name in states:
                g.remove_state(name)
        return PassResult(g, bool(self.targets), {"sgd": list(self.targets)})


def test_from_options_on_a_pass_without_options_is_a_config_error():
    with pytest.raises(memfit.ConfigError, match=r"pass 'remat'\.from_options: expected a pass that declares "
                                                 r"options, got 1 option\(s\) .*; override options\(\)"):
        registered_passes()["remat"].from_options([Option("remat", "w", "x", (), persistent=-1)])


def _mlp():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
    return model, (torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen))


def test_a_pass_that_only_declares_options_is_picked_under_a_budget():
    model, batch = _mlp()
    lossless = memfit.plan(model, example_inputs=batch, loss_fn=F.cross_entropy)
    state = lossless.persistent["optimizer state"]
    budget = lossless.peak_bytes - state // 2  # half the moments must go
    with pytest.raises(memfit.BudgetError):
        memfit.plan(model, example_inputs=batch, loss_fn=F.cross_entropy, budget=budget, levers="lossless")
    trainer = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=F.cross_entropy, budget=budget,
                              lever_passes=("test_sgd_lever",))
    assert "test_sgd_lever" in trainer.graph.applied and "lowrank" not in trainer.graph.applied
    chosen = trainer.graph.info["pass_stats"]["test_sgd_lever"]["sgd"]
    assert chosen and set(trainer.plan.state_choice.values()) == {"sgd"}
    assert set(chosen) == set(trainer.plan.state_choice)
    assert all(trainer.graph.updates[f].target is torch.ops.memfit.sgd_update.default for f in chosen)
    trainer.step(*batch)
    measured = trainer.measure_step(*batch).peak_bytes
    assert trainer.plan.peak_bytes <= budget and measured <= budget
    # as few as fit: some parameters keep AdamW, and the state saved covers the bytes missing
    assert set(chosen) < {n for n, _ in model.named_parameters()}
    saved = sum(8 * p.numel() for n, p in model.named_parameters() if n in chosen)
    assert saved >= lossless.peak_bytes - budget - 4 * 2**10 * len(chosen)  # up to an SGD workspace each


def test_an_unknown_lever_pass_is_a_config_error():
    model, batch = _mlp()
    with pytest.raises(memfit.ConfigError, match=r"lever_passes: expected registered passes .* got \['nope'\]"):
        memfit.optimize(model, example_inputs=batch, loss_fn=F.cross_entropy, budget=10**9, lever_passes=("nope",))


def _meta_llama(name: str, seq: int = 256, **overrides):
    with torch.device("meta"):
        model = models.build_llama(name, **overrides)
    tokens = torch.zeros((1, seq), dtype=torch.int64, device="meta")
    return model.to(torch.bfloat16), (tokens, tokens)


@pytest.mark.parametrize("name", ["llama-60m"])  # llama-350m (24 layers) gives the same to the byte, in 43 s more
def test_replicated_blocks_give_the_fully_captured_plan_to_the_byte(name):
    model, batch = _meta_llama(name)
    full = memfit.plan(model, example_inputs=batch, loss_fn=models.lm_loss, replicate=False)
    rep = memfit.plan(model, example_inputs=batch, loss_fn=models.lm_loss, replicate=True)
    print(f"{name}: full {full.peak_bytes} B, replicated {rep.peak_bytes} B")
    assert rep.replicated == (BASE_LAYERS + 1, model.config.num_hidden_layers) and full.replicated is None
    assert rep.peak_bytes == full.peak_bytes
    assert rep.persistent == full.persistent and rep.at_peak == full.at_peak
    assert rep.saved_activation_bytes == full.saved_activation_bytes and rep.gradient_bytes == full.gradient_bytes
    assert sum(rep.by_layer.values()) == sum(full.by_layer.values())


def test_replicated_smallest_peak_equals_the_fully_captured_one():
    """At a budget nothing fits, both searches end at every lever at its most: the same smallest peak (on 5
    layers: the fully captured search is the slow one)."""
    model, batch = _meta_llama("llama-60m", num_hidden_layers=5)
    peaks = []
    for replicate in (True, False):
        with pytest.raises(memfit.BudgetError) as err:
            memfit.plan(model, example_inputs=batch, loss_fn=models.lm_loss, budget="150MiB", replicate=replicate)
        peaks.append(err.value.smallest_peak_bytes)
    assert peaks[0] == peaks[1]


def test_replicate_refuses_name_based_settings_and_models_without_layers():
    model, batch = _meta_llama("llama-60m")
    with pytest.raises(memfit.ConfigError, match=r"replicate=True\): expected no passes= and no frozen="):
        memfit.plan(model, example_inputs=batch, loss_fn=models.lm_loss, passes=["fused_update"], replicate=True)
    from memfit.api import replicated_model

    assert replicated_model(nn.Linear(3, 3)) is None
    small, layers = replicated_model(model)
    assert layers == 8 and [m.config.num_hidden_layers for m in small] == [BASE_LAYERS, BASE_LAYERS + 1]
    assert all(next(m.parameters()).device.type == "meta" for m in small)


def test_cli_hand_check_follows_the_chosen_state():
    """Below the fp32-AdamW floor the planner takes 8-bit and low-rank state: the CLI's arithmetic follows it."""
    model, batch = _meta_llama("llama-60m")
    lossless = memfit.plan(model, example_inputs=batch, loss_fn=models.lm_loss)
    budget = lossless.peak_bytes // 2  # below parameters + fp32 moments: the state must shrink
    plan = cli.plan_on_meta(model, batch=1, seq=256, budget=str(budget))
    assert plan.peak_bytes <= budget and plan.replicated
    assert budget < sum(lossless.persistent.values()) and plan.state_choice
    line, ok = cli.hand_check(model, plan)
    assert ok and line.count("[matches]") == 2 and "per parameter:" in line, line
    assert sum(plan.persistent.values()) < sum(lossless.persistent.values())


def _tiny_lm(layers: int = 2):
    torch.manual_seed(0)
    m = models.build_llama("tiny-llama", num_hidden_layers=layers)
    x = torch.randint(0, 256, (2, 64))
    return m, (x, torch.roll(x, -1, 1))


def test_weight_precision_is_a_lever_past_the_state_levers():
    """A budget below what 8-bit state and recomputation reach: near-lossless cannot fit it; lossy does, with
    INT8 weights (and low-rank state); the step runs within it and the CLI's arithmetic agrees."""
    m, batch = _tiny_lm()
    budget = 10_000_000  # near-lossless reaches 13.9 MB on this model, lossy 8.8 MB
    with pytest.raises(memfit.BudgetError):
        memfit.plan(m, example_inputs=batch, loss_fn=models.lm_loss, budget=budget, levers="near-lossless")
    t = memfit.optimize(m, example_inputs=batch, loss_fn=models.lm_loss, budget=budget)
    assert "quantize_weights" in t.plan.passes and "lora" not in t.plan.passes
    assert any("int8 sr" in label for label in t.plan.state_choice.values())
    t.step(*batch)
    assert t.measure_step(*batch).peak_bytes <= budget
    line, ok = cli.hand_check(m, t.plan)
    assert ok, line


def test_adapters_are_offered_only_at_their_level_and_apply():
    from memfit.api import build_graph

    m, batch = _tiny_lm(1)
    g, _ = build_graph(m, batch, loss_fn=models.lm_loss)
    lora = registered_passes()["lora"]
    assert lora.options(g, "lossy") == []
    opts = lora.options(g, "adapters")
    assert opts and all(o.lossiness == "adapters" and o.alone for o in opts)
    chosen = [o for o in opts if o.label == "lora r=8 nf4"][:2]
    name, cfg = lora.from_options(chosen)
    t = memfit.optimize(m, example_inputs=batch, loss_fn=models.lm_loss, passes=[(name, cfg), "remat", "fused_update"])
    assert set(t.graph.info["lora"]["targets"]) == {o.target for o in chosen}
    assert t.graph.info["lora"]["base"] == "nf4"
    t.step(*batch)
    assert t.measure_step(*batch).peak_bytes == t.plan.peak_bytes
