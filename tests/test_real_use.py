"""What ordinary training code does to a Trainer: classified capture failures, globs that match nothing,
mode and freezing changes after optimize(), variable batch shapes, inference through trainer(x)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memfit
from memfit import models


def _mse(out, y):
    return ((out - y) ** 2).mean()


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value
            return self.lin(x)
        return self.lin(-x)


class _Mutating(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin.weight.mul_(0.5)
        return self.lin(x)


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).detach()


X, Y = torch.randn(2, 4), torch.randn(2, 4)


@pytest.mark.parametrize(("model", "batch", "error", "match"), [
    (_Branchy(), (X, Y), memfit.UnsupportedGraph,
     r"capture \(data-dependent branch, at .*test_real_use\.py:\d+.*if x\.sum\(\) > 0.*torch\.where"),
    (nn.Linear(4, 4), (X, X, Y), memfit.ConfigError,
     r"capture \(wrong inputs\).*takes 2 positional arguments but 3 were given; example_inputs do not match"),
    (_Mutating(), (X, Y), memfit.UnsupportedGraph,
     r"capture \(parameter mutation, at .*test_real_use\.py.*weight\.mul_\(0\.5\)\).*edits a parameter in place"),
    (_Detached(), (X, Y), memfit.ConfigError,
     r"expected a loss that depends on a trainable parameter, got a loss with requires_grad=False"),
], ids=["data-dependent", "wrong-inputs", "param-mutation", "loss-without-grad"])
def test_capture_failures_are_classified_with_the_model_line(model, batch, error, match):
    with pytest.raises(error, match=match):
        memfit.optimize(model, example_inputs=batch, loss_fn=_mse)


@pytest.mark.parametrize(("pass_spec", "match"), [
    (("lowrank", {"targets": "layers.*"}),
     r"passes\['lowrank'\]\.targets: expected a glob matching at least one parameter FQN, got 'layers\.\*'; "
     r"did you mean '\*layers\.\*'"),
    (("quantize_state", {"targets": "nothing.*"}), r"passes\['quantize_state'\]\.targets: .*got 'nothing\.\*'; "
     r"use the FQNs of model\.named_parameters\(\); the model has e\.g\. \['model\.embed_tokens\.weight'"),
    (("lowrank", {"overrides": {"typo.*": {"rank": 4}}}), r"passes\['lowrank'\]\.overrides: .*got 'typo\.\*'"),
], ids=["lowrank-prefix", "quantize", "override"])
def test_globs_that_match_nothing_are_config_errors(pass_spec, match):
    model = models.build_llama("tiny-llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    x = torch.randint(0, 256, (2, 8))
    with pytest.raises(memfit.ConfigError, match=match):
        memfit.optimize(model, example_inputs=(x, x), loss_fn=models.lm_loss,
                        passes=["fused_update", pass_spec])


def test_frozen_glob_matching_nothing_is_a_config_error():
    with pytest.raises(memfit.ConfigError, match=r"freeze\.frozen: expected a glob matching .*got 'encoder\.\*'"):
        memfit.optimize(models.build_mlp(), example_inputs=(torch.randn(4, 32), torch.randint(0, 10, (4,))),
                        loss_fn=nn.functional.cross_entropy, frozen=["encoder.*"])


def _dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 2))


def test_eval_mode_after_optimize_takes_effect_and_trainer_call_runs_in_eval_mode():
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    model = _dropout_mlp()
    eager = copy.deepcopy(model)
    tr = memfit.optimize(model, example_inputs=(x, y), loss_fn=_mse, optimizer=memfit.AdamW(lr=1e-2))
    model.eval()  # train without dropout from now on: recaptured, not ignored
    eager.eval()
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-2, foreach=False)
    for _ in range(2):
        loss = tr.step(x, y)
        opt.zero_grad()
        ref = _mse(eager(x), y)
        ref.backward()
        opt.step()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-7)
    assert len(tr.compiled_shapes) == 2  # the train-mode graph and the eval-mode one
    model.train()
    before = model.training
    out = tr(x)
    assert before and model.training, "trainer(x) restores the mode"
    torch.testing.assert_close(out, eager(x))  # eval mode: dropout off, deterministic


def test_requires_grad_change_or_replaced_parameter_after_optimize_is_refused():
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    model = _dropout_mlp()
    tr = memfit.optimize(model, example_inputs=(x, y), loss_fn=_mse)
    model[0].weight.requires_grad_(False)
    with pytest.raises(memfit.ConfigError, match=r"expected requires_grad as at memfit\.optimize\(\), got changed "
                                                 r"since: \{'0\.weight': False\}; call memfit\.optimize again"):
        tr.step(x, y)
    model[0].weight.requires_grad_(True)
    model[3].weight = nn.Parameter(torch.zeros(2, 16))
    with pytest.raises(memfit.ConfigError, match=r"got \['3\.weight'\] replaced by new tensors"):
        tr.step(x, y)
    assert tr.step_count == 0


def test_variable_shapes_match_eager_without_reoptimizing():
    """One Trainer through sequence lengths 17, 64, 128 and batch sizes 8 and 3; each loss equals eager's."""
    cfg = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    model = models.build_llama("tiny-llama", **cfg)
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    biggest = torch.randint(0, 256, (8, 128), generator=g)
    budget = int(1.5 * memfit.plan(copy.deepcopy(model), example_inputs=(biggest, biggest),
                                   loss_fn=models.lm_loss).peak_bytes)
    tr = memfit.optimize(model, example_inputs=(biggest, biggest), loss_fn=models.lm_loss,
                         optimizer=memfit.AdamW(lr=1e-3, weight_decay=0.0), budget=budget)
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
    shapes = [(8, 17), (3, 64), (8, 128), (3, 17), (8, 64), (3, 128)]
    for b, s in shapes:
        x = torch.randint(0, 256, (b, s), generator=g)
        loss = tr.step(x, x)
        opt.zero_grad()
        ref = models.lm_loss(eager(x), x)
        ref.backward()
        opt.step()
        ref = float(ref.detach())
        assert abs(float(loss) - ref) <= 1e-5 * abs(ref), (b, s, float(loss), ref)
    assert len(tr.compiled_shapes) == len(shapes)
    assert all(c.plan.peak_bytes <= budget for c in tr._compiled.values())
    measured = tr.measure_step(biggest, biggest).peak_bytes
    assert measured <= budget
    with pytest.raises(memfit.ConfigError, match=r"expected a shape of at most \(8, 128\) per dimension, the "
                                                 r"largest planned \(planned within the budget .*\).*got shape "
                                                 r"\(8, 129\)"):
        tr.step(torch.zeros(8, 129, dtype=torch.long), torch.zeros(8, 129, dtype=torch.long))


def test_max_shapes_bounds_the_cache():
    x, y = torch.randn(8, 8), torch.randn(8, 2)
    tr = memfit.optimize(_dropout_mlp().eval(), example_inputs=(x, y), loss_fn=_mse, max_shapes=2)
    for b in (7, 6, 5):
        tr.step(x[:b], y[:b])
    assert [k[0][0][0] for k in tr.compiled_shapes] == [6, 5]


def test_max_shapes_must_be_a_positive_int():
    x, y = torch.randn(8, 8), torch.randn(8, 2)
    with pytest.raises(memfit.ConfigError, match=r"max_shapes=\): expected an int >= 1, got 0; e\.g\. 8"):
        memfit.optimize(_dropout_mlp(), example_inputs=(x, y), loss_fn=_mse, max_shapes=0)


def test_capture_leaves_the_compiling_flag_as_it_was():
    import torch.compiler as tc

    memfit.optimize(_dropout_mlp(), example_inputs=(torch.randn(4, 8), torch.randn(4, 2)), loss_fn=_mse)
    assert tc.is_compiling() is False
