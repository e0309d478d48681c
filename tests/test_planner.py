"""The planner under budgets: loose, medium and tight budgets fit (measured <= budget, predicted within 5%
of measured); an impossible one raises BudgetError naming the smallest reachable peak; the optimizer-state
levers are chosen per parameter, so a budget between two uniform settings gets a mix of them."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import models
from memfit.api import build_graph
from memfit.passes.base import LEVER_PASSES, registered_passes


def _case(name):
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        batch = (torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
        return models.build_cnn(), batch, F.cross_entropy
    batch = (torch.randint(0, 256, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g))
    # two LLaMA layers: every lever and the recomputation order show as on four, in half the planning time
    return (models.build_llama(num_hidden_layers=2) if name == "llama" else models.build_gpt2_small()), batch, \
        models.lm_loss


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn"])
def test_budgets_loose_medium_tight_fit_and_are_predicted(name):
    model, batch, loss_fn = _case(name)
    plan = memfit.plan(model, example_inputs=batch, loss_fn=loss_fn)
    lossless, floor = plan.peak_bytes, sum(plan.persistent.values())
    with pytest.raises(memfit.BudgetError) as err:  # just above the floor: the planner searches, then fails
        memfit.plan(model, example_inputs=batch, loss_fn=loss_fn, budget=floor + 1, levers="lossless")
    smallest = err.value.smallest_peak_bytes
    assert not err.value.floor_only and smallest <= lossless
    if name != "cnn":  # the CNN has nothing worth recomputing; the transformers do
        assert smallest < lossless
    budgets = {"loose": 2 * lossless, "medium": (lossless + smallest) // 2 + 1, "tight": smallest}
    for label, budget in budgets.items():
        trainer = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, budget=budget,
                                  levers="lossless")
        trainer.step(*batch)
        measured = trainer.measure_step(*batch).peak_bytes
        print(f"{name} {label}: budget {budget} B, predicted {trainer.plan.peak_bytes} B, measured {measured} B, "
              f"passes {trainer.graph.applied}, recomputed FLOPs {trainer.graph.info.get('remat', {})}")
        assert measured <= budget, f"{name}/{label}: measured {measured} B over the budget {budget} B"
        assert trainer.plan.peak_bytes == pytest.approx(measured, rel=0.05)


def test_impossible_budget_names_the_smallest_peak_and_largest_tensors():
    model, batch, loss_fn = _case("llama")
    floor = sum(memfit.plan(model, example_inputs=batch, loss_fn=loss_fn).persistent.values())
    with pytest.raises(memfit.BudgetError, match=r"smallest reachable peak of [\d.]+ MiB .*largest live at the peak: "
                                                 r"(.+ \(.+\), ){4}.+ \(.+\); raise the budget") as err:
        memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, budget=floor + 1, levers="lossless")
    assert err.value.budget_bytes == floor + 1 and err.value.smallest_peak_bytes > err.value.budget_bytes


def test_budget_below_the_floor_stops_early_and_says_so():
    model, batch, loss_fn = _case("llama")
    with pytest.raises(memfit.BudgetError,
                       match=r"a floor of [\d.]+ MiB that no lever reduces yet \(parameters") as err:
        memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, budget="1MiB")
    assert err.value.floor_only and err.value.plan is not None
    assert err.value.smallest_peak_bytes == err.value.plan.peak_bytes > err.value.budget_bytes


def test_explicit_passes_are_respected_not_changed():
    model, batch, loss_fn = _case("gpt2")
    trainer = memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, passes=["fused_update"], budget="1GB")
    assert trainer.graph.applied == ["fused_update", "sink"]  # the schedule always runs last
    with pytest.raises(memfit.BudgetError, match="with the passes given"):
        memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, passes=["fused_update"], budget=1000)


def test_state_levers_fit_below_the_fp32_adam_floor():
    """Below parameters + fp32 AdamW state, 8-bit moments fit first; below the smallest peak 8-bit
    moments reach (with any recomputation), low-rank projection."""
    model, batch, loss_fn = _case("llama")
    plan = memfit.plan(model, example_inputs=batch, loss_fn=loss_fn)
    params = plan.persistent["parameters"]
    floor = sum(plan.persistent.values())
    floor_8bit = sum(memfit.plan(model, example_inputs=batch, loss_fn=loss_fn,
                                 passes=["remat", "fused_update", "quantize_state"]).persistent.values())
    assert params < floor_8bit < floor
    with pytest.raises(memfit.BudgetError, match="levers='near-lossless'") as err:
        memfit.plan(model, example_inputs=batch, loss_fn=loss_fn, budget=floor_8bit + 1, levers="near-lossless")
    smallest_8bit = err.value.smallest_peak_bytes
    chosen = {}
    for label, budget in (("8bit", floor - 1), ("lowrank", smallest_8bit - 1)):
        with pytest.raises(memfit.BudgetError, match="levers='lossless'"):
            memfit.plan(model, example_inputs=batch, loss_fn=loss_fn, budget=budget, levers="lossless")
        trainer = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, budget=budget)
        trainer.step(*batch)
        measured = trainer.measure_step(*batch).peak_bytes
        chosen[label] = trainer.graph.applied
        print(f"llama {label}: budget {budget} B, predicted {trainer.plan.peak_bytes} B, measured {measured} B, "
              f"passes {trainer.graph.applied}")
        assert measured <= budget
        assert trainer.plan.peak_bytes == pytest.approx(measured, rel=0.05)
    assert "quantize_state" in chosen["8bit"] and "lowrank" not in chosen["8bit"]
    assert "lowrank" in chosen["lowrank"]


def _stack(layers: int, width: int) -> tuple[nn.Module, tuple]:
    """``layers`` square Linear layers: every weight has the same shape, so uniform settings are well defined."""
    torch.manual_seed(0)
    blocks = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())][:-1]
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(*blocks), (torch.randn(8, width, generator=gen), torch.randint(0, width, (8,), generator=gen))


def _settings(g) -> dict[str, object]:
    """Each 2-D weight's optimizer state as the plan chose it."""
    low = g.info.get("lowrank", {}).get("per_param", {})
    eight = g.info.get("quantize_state", {}).get("per_param", {})
    return {f: ("lowrank", low[f]["rank"], low[f]["projector"]) if f in low else
            ("adam", eight.get(f, 32)) for f, n in g.params.items() if n.meta["val"].dim() == 2}


@pytest.mark.parametrize("layers, width, between", [
    (8, 128, (["remat", "fused_update"], ["remat", "fused_update", ("quantize_state", {"bits": 8})])),
    (6, 256, (["remat", "fused_update", ("lowrank", {"rank": 32, "state_bits": 8, "targets": "*weight"})],
              ["remat", "fused_update", ("lowrank", {"rank": 16, "state_bits": 8, "targets": "*weight"})])),
], ids=["fp32-8bit", "rank32-rank16"])
def test_a_budget_between_two_uniform_settings_gets_a_mix_of_them(layers, width, between):
    """Between fp32 and 8-bit moments everywhere (or SVD rank 32 and rank 16 everywhere) the planner moves
    some weights and keeps the rest: the step fits, it saves no more state than the lower uniform setting,
    and fewer parameter elements leave fp32 AdamW than under it."""
    model, batch = _stack(layers, width)
    upper, lower = (memfit.plan(model, example_inputs=batch, loss_fn=F.cross_entropy, passes=p) for p in between)
    budget = (upper.peak_bytes + lower.peak_bytes) // 2
    trainer = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=F.cross_entropy, budget=budget)
    trainer.step(*batch)
    measured = trainer.measure_step(*batch).peak_bytes
    chosen = _settings(trainer.graph)
    persistent = sum(trainer.plan.persistent.values())
    print(f"stack {layers}x{width}: budget {budget} B, predicted {trainer.plan.peak_bytes} B, measured {measured} B, "
          f"{len(trainer.graph.info['planner']['trials'])} trials, settings {sorted(set(chosen.values()))}")
    assert len(set(chosen.values())) >= 2, chosen
    assert trainer.plan.peak_bytes <= budget and measured <= budget
    assert sum(lower.persistent.values()) <= persistent
    assert sum(1 for v in chosen.values() if v != ("adam", 32)) < len(chosen)


def _options(g, levers):
    """Per parameter, the labels of every lever pass's options at ``levers``, in the order declared."""
    out = {}
    for name in LEVER_PASSES:
        for o in registered_passes()[name].options(g, levers):
            out.setdefault(o.target, []).append(o)
    return out


def test_lever_options_follow_levers_and_each_parameter_s_shape():
    g, _ = build_graph(models.build_mlp(), _mlp_batch(), loss_fn=F.cross_entropy, passes=["remat", "fused_update"])
    assert _options(g, "lossless") == {}
    assert {f: [o.label for o in opts] for f, opts in _options(g, "near-lossless").items()} == \
        {"2.weight": ["8-bit"]}  # the others are under quantize_state's min_numel
    lossy = _options(g, "lossy")
    assert {f: [o.label for o in opts] for f, opts in lossy.items()} == {
        "0.weight": ["svd r=8", "svd r=4", "svd r=2", "apollo-mini", "int8 sr"],  # (64, 32): ranks from the
        "2.weight": ["8-bit", "svd r=16", "svd r=8", "svd r=4", "apollo-mini", "int8 sr"],  # smaller side
        "4.weight": ["svd r=2", "apollo-mini", "int8 sr"]}
    for opts in lossy.values():
        low = [o for o in opts if o.pass_name == "lowrank"]
        assert all(a.persistent > b.persistent for a, b in itertools.pairwise(low))
        assert all(o.transient > 0 and o.lossiness == "lossy" for o in low)
        assert [o.degree for o in low] == sorted(o.degree for o in low)


def _mlp_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)
