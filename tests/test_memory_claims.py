"""Memory claims of the spine, measured: memfit's step vs eager's, predicted vs measured, tracker vs profiler."""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models
from memfit.measure import profiler_peak_bytes


def _lm_batch(batch, seq):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, seq), generator=g), torch.randint(0, 256, (batch, seq), generator=g)


def _eager_peak(model, x, y, loss_fn):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return memfit.measure_peak(step, existing=iter([*model.parameters(), *model.buffers(), *state, x, y])).peak_bytes


@pytest.fixture(scope="module")
def llama_8x128():
    return models.build_llama("tiny-llama"), _lm_batch(8, 128)


def test_step_peak_beats_eager_by_the_gradients(llama_8x128):
    base, (x, y) = llama_8x128
    eager = _eager_peak(copy.deepcopy(base), x, y, models.lm_loss)
    trainer = memfit.optimize(copy.deepcopy(base), example_inputs=(x, y), loss_fn=models.lm_loss)
    trainer.step(x, y)
    ours = trainer.measure_step(x, y).peak_bytes
    grads = [p.numel() * p.element_size() for p in base.parameters()]
    needed = sum(grads) - max(grads)
    print(f"eager {eager} B, memfit {ours} B, saving {eager - ours} B, needed {needed} B")
    assert eager - ours >= needed
    assert trainer.plan.peak_bytes == pytest.approx(ours, rel=0.05)


def test_tracker_agrees_with_profiler_on_a_memfit_step(llama_8x128):
    base, (x, y) = llama_8x128
    trainer = memfit.optimize(copy.deepcopy(base), example_inputs=(x, y), loss_fn=models.lm_loss)
    trainer.step(x, y)
    tracked = trainer.measure_step(x, y)
    prof = profiler_peak_bytes(trainer.step, x, y)
    added = tracked.peak_bytes - tracked.baseline_bytes
    print(f"tracker {added} B above baseline, profiler {prof} B")
    assert prof == pytest.approx(added, rel=0.05)


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn"])
def test_predicted_peak_matches_measured(name):
    if name == "cnn":
        model, batch, loss_fn = models.build_cnn(), (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), \
            F.cross_entropy
    else:
        model = models.build_llama() if name == "llama" else models.build_gpt2_small()
        batch, loss_fn = _lm_batch(4, 64), models.lm_loss
    trainer = memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn)
    trainer.step(*batch)
    measured = trainer.measure_step(*batch).peak_bytes
    print(f"{name}: predicted {trainer.plan.peak_bytes} B, measured {measured} B")
    # The issue asks for 5%; on CPU the accounting is exact (same ops, same frees), so hold it to 1%.
    assert trainer.plan.peak_bytes == pytest.approx(measured, rel=0.01)
    assert "measured peak" in str(trainer.plan)


def test_freeze_drops_saved_activations_and_beats_eager(llama_8x128):
    base, (x, y) = llama_8x128
    frozen = ("model.embed_tokens.*", "model.layers.0.*", "model.layers.1.*")
    eager_model = copy.deepcopy(base)
    for n, p in eager_model.named_parameters():
        p.requires_grad_(not any(fnmatch.fnmatchcase(n, f) for f in frozen))
    eager = _eager_peak(eager_model, x, y, models.lm_loss)
    trainer = memfit.optimize(copy.deepcopy(base), example_inputs=(x, y), loss_fn=models.lm_loss, frozen=frozen)
    info = trainer.graph.info["freeze"]
    assert info["saved_bytes_after"] < info["saved_bytes_before"]
    trainer.step(x, y)
    ours = trainer.measure_step(x, y).peak_bytes
    print(f"freeze: saved {info['saved_bytes_before']} -> {info['saved_bytes_after']} B; "
          f"peak eager {eager} B, memfit {ours} B")
    assert ours < eager


def test_plan_breaks_the_peak_down_by_layer():
    model, (x, y) = models.build_llama("tiny-llama"), _lm_batch(4, 64)
    plan = memfit.plan(model, example_inputs=(x, y), loss_fn=models.lm_loss)
    assert sum(plan.by_layer.values()) == plan.peak_bytes - plan.at_peak["kernel workspace"]
    layers = [f"model.layers.{i}" for i in range(4)]
    assert set(layers) <= set(plan.by_layer) and {"model.embed_tokens", "lm_head"} <= set(plan.by_layer)
    # identical decoder layers hold identical bytes at the peak (the last one also holds the loss head's backward)
    assert plan.by_layer[layers[0]] == plan.by_layer[layers[1]] == plan.by_layer[layers[2]] > 0
    assert "by layer at the peak: " in str(plan)
