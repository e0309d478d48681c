"""freeze: frozen parameters get no gradient, no update and no saved activation, and nothing else changes.

On tiny-llama (4 layers) with the embedding and the first two layers frozen: the pass fired (stats),
frozen weights stay bit-identical, the rest train, and the loss curve equals that of the same model
with ``requires_grad=False`` on those parameters (the capture-time way of freezing). One case where the
pass must not fire.
"""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models

FROZEN = ("model.embed_tokens.*", "model.layers.0.*", "model.layers.1.*")
STEPS = 3


def _is_frozen(fqn: str) -> bool:
    return any(fnmatch.fnmatchcase(fqn, p) for p in FROZEN)


def _llama_batches(steps: int):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (2, 32), generator=gen), torch.randint(0, 256, (2, 32), generator=gen))
            for _ in range(steps)]


@pytest.fixture(scope="module")
def frozen_runs():
    """(trainer built with frozen=, its losses, init weights, trainer on requires_grad=False, its losses)."""
    model = models.build_llama("tiny-llama")
    reference = copy.deepcopy(model)
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, p in reference.named_parameters():
        if _is_frozen(name):
            p.requires_grad_(False)
    batches = _llama_batches(STEPS)
    opt = memfit.AdamW(lr=1e-3)
    trainer = memfit.optimize(model, example_inputs=batches[0], loss_fn=models.lm_loss, optimizer=opt,
                              frozen=FROZEN)
    ref_trainer = memfit.optimize(reference, example_inputs=batches[0], loss_fn=models.lm_loss, optimizer=opt)
    losses = [trainer.step(*b) for b in batches]
    ref_losses = [ref_trainer.step(*b) for b in batches]
    return trainer, losses, init, ref_trainer, ref_losses


def test_frozen_params_get_no_update_and_do_not_change(frozen_runs):
    trainer, _, init, _, _ = frozen_runs
    g = trainer.graph
    frozen = [f for f in g.params if _is_frozen(f)]
    trainable = [f for f in g.params if not _is_frozen(f)]
    assert len(frozen) == 1 + 2 * 9 and len(trainable) == 2 * 9 + 2  # embed + 2 layers; 2 layers + norm + head
    assert sorted(g.updates) == sorted(trainable) == sorted(g.trainable)
    assert g.applied.index("freeze") < g.applied.index("fused_update")
    assert sorted(g.grad_of) == sorted(trainable)  # no stale entries pointing at eliminated nodes
    graph_nodes = set(g.graph.nodes)
    assert all(n in graph_nodes for n in g.grad_of.values())
    assert all(s.owner in trainable for s in g.state_specs.values())
    params = dict(trainer.model.named_parameters())
    for f in frozen:
        assert torch.equal(params[f], init[f]), f"frozen {f} changed"
    for f in trainable:
        assert not torch.equal(params[f], init[f]), f"trainable {f} did not change in {STEPS} steps"


def test_freeze_reports_dropped_backward_and_saved_activations(frozen_runs):
    trainer, *_ = frozen_runs
    info = trainer.graph.info["freeze"]
    assert trainer.graph.info["pass_stats"]["freeze"]["modified"] is True
    assert sorted(info["frozen"]) == sorted(f for f in trainer.graph.params if _is_frozen(f))
    assert info["removed_nodes"] > 0
    assert info["saved_bytes_after"] < info["saved_bytes_before"]


def test_freeze_matches_requires_grad_false(frozen_runs):
    trainer, losses, _, ref_trainer, ref_losses = frozen_runs
    assert sorted(ref_trainer.graph.updates) == sorted(trainer.graph.updates)
    for i, (a, b) in enumerate(zip(losses, ref_losses, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, msg=f"step {i}")
    assert not torch.equal(losses[0], losses[-1])  # it trained
    ref = dict(ref_trainer.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_glob_of_a_parameter_without_gradient_does_not_fire():
    """The glob names a real parameter that has no gradient anyway (requires_grad=False): nothing to freeze."""
    model = models.build_mlp()
    model[0].weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    trainer = memfit.optimize(model, example_inputs=batch, loss_fn=F.cross_entropy, frozen=("0.weight",))
    g = trainer.graph
    assert g.info["pass_stats"]["freeze"]["modified"] is False
    assert "freeze" not in g.info
    assert sorted(g.updates) == sorted(g.trainable) == sorted(p for p in g.params if p != "0.weight")
