"""sparse_update: the Tiny Training Engine's sparse update trains exactly what it says, and saves less.

A scheme of frozen, bias-only and channel-ratio layers trains step for step as eager PyTorch with the same
parameters trainable and the weight gradients cut to the same channels; the plan stays exact; the saved
activations fall at each of the three rewrites (dead code of frozen weights, narrowed inputs, 1-bit masks);
bad schemes are refused.
"""

from __future__ import annotations

import copy
import fnmatch

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models
from memfit.errors import ConfigError
from memfit.models import build_llama, lm_loss

CNN_SCHEME = {"5.3.weight": 0.25, "5.0.weight": 0.5, "4.3.weight": 0.125, "5.4.*": 1, "8.*": 1, "5.1.*": 1}
# (dim, channels) of each narrowed weight's trained slice, for the eager reference
CNN_SLICES = {"5.3.weight": (1, 16), "5.0.weight": (0, 32), "4.3.weight": (1, 4)}
LLAMA_SCHEME = {"model.layers.1.mlp.down_proj.weight": 0.25, "model.layers.1.self_attn.o_proj.weight": 0.5,
                "model.layers.1.*norm*": 1, "model.norm.weight": 1}
LLAMA_SLICES = {"model.layers.1.mlp.down_proj.weight": (1, 172), "model.layers.1.self_attn.o_proj.weight": (1, 128)}


def _eager_losses(model, x, y, loss_fn, scheme, slices, steps=3, lr=1e-2):
    """Eager AdamW with the scheme's parameters trainable and each narrowed weight's gradient cut to its slice."""
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
        for n, p in params.items():
            if n in slices:
                dim, k = slices[n]
                cut = torch.zeros_like(p.grad)
                cut.narrow(dim, 0, k).copy_(p.grad.narrow(dim, 0, k))
                p.grad = cut
            elif not any(fnmatch.fnmatchcase(n, pat) for pat in scheme):
                p.grad = None
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def _memfit(model, x, y, loss_fn, scheme, steps=3, lr=1e-2, **kw):
    t = memfit.optimize(model, example_inputs=(x, y), loss_fn=loss_fn,
                        optimizer=memfit.AdamW(lr=lr, weight_decay=0.0),
                        passes=[("sparse_update", {"scheme": scheme, **kw}), "remat", "fused_update"])
    return t, [float(t.step(x, y)) for _ in range(steps)]


def _cnn_batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def test_cnn_scheme_trains_as_eager_with_the_same_cut_and_plans_exactly():
    x, y = _cnn_batch()
    m = models.build_mobilenet_tiny()
    t, got = _memfit(copy.deepcopy(m), x, y, F.cross_entropy, CNN_SCHEME)
    want = _eager_losses(copy.deepcopy(m), x, y, F.cross_entropy, CNN_SCHEME, CNN_SLICES)
    assert got == pytest.approx(want, rel=1e-5)
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes
    s = t.graph.info["sparse_update"]
    assert s["narrowed"] == {"4.3.weight": 4, "5.0.weight": 32, "5.3.weight": 16}
    assert s["saved_bytes_before"] > s["saved_bytes_after_freeze"] > s["saved_bytes_after_channels"] \
        > s["saved_bytes_after_masks"]
    assert s["relu_masks"] >= 1
    # the optimizer state is the trained slice's size
    assert tuple(t.executor.state["5.3.weight::exp_avg"].shape) == (64, 16, 1, 1)
    assert tuple(t.executor.state["5.0.weight::exp_avg"].shape) == (32, 1, 3, 3)
    # what was not trained did not move
    before = dict(m.named_parameters())
    after = t.executor.params
    assert torch.equal(after["5.3.weight"][:, 16:], before["5.3.weight"][:, 16:].detach())
    assert torch.equal(after["3.0.weight"], before["3.0.weight"].detach())
    assert not torch.equal(after["5.3.weight"][:, :16], before["5.3.weight"][:, :16].detach())


def test_one_bit_masks_change_nothing_but_the_bytes():
    x, y = _cnn_batch()
    m = models.build_mobilenet_tiny()
    t1, with_masks = _memfit(copy.deepcopy(m), x, y, F.cross_entropy, CNN_SCHEME)
    t2, without = _memfit(copy.deepcopy(m), x, y, F.cross_entropy, CNN_SCHEME, relu_masks=False)
    assert with_masks == without
    assert t1.plan.peak_bytes < t2.plan.peak_bytes
    assert t2.graph.info["sparse_update"]["relu_masks"] == 0


def test_linear_channel_subsets_on_llama_train_as_eager():
    torch.manual_seed(0)
    m = build_llama("tiny-llama", num_hidden_layers=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 16), generator=gen)
    y = torch.roll(x, -1, 1)
    t, got = _memfit(copy.deepcopy(m), x, y, lm_loss, LLAMA_SCHEME)
    want = _eager_losses(copy.deepcopy(m), x, y, lm_loss, LLAMA_SCHEME, LLAMA_SLICES)
    assert got == pytest.approx(want, rel=1e-5)
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes
    s = t.graph.info["sparse_update"]
    assert s["saved_bytes_after_channels"] < s["saved_bytes_after_freeze"]


@pytest.mark.parametrize(("scheme", "message"), [
    ({"5.3.weight": 0.3}, r"a ratio of input channels in \(0.0, 0.125, 0.25, 0.5, 1.0\)"),
    ({"5.4.bias": 0.5}, r"0 \(frozen\) or 1 \(trains\)"),
    ({"nothing.*": 1}, r"a glob matching at least one parameter FQN"),
], ids=["ratio", "bias-ratio", "no-match"])
def test_bad_scheme_is_refused(scheme, message):
    x, y = _cnn_batch()
    with pytest.raises(ConfigError, match=message):
        _memfit(models.build_mobilenet_tiny(), x, y, F.cross_entropy, scheme, steps=0)


def test_sparse_update_is_an_opt_in_planner_lever_with_exact_state_bytes():
    from memfit.passes.sparse_update import SparseUpdate

    x, y = _cnn_batch()
    torch.manual_seed(0)
    m = models.build_mobilenet_tiny()
    lossless = memfit.optimize(copy.deepcopy(m), example_inputs=(x, y), loss_fn=F.cross_entropy)
    options = {(o.target, dict(o.config)["ratio"]): o for o in SparseUpdate.options(lossless.graph, "adapters")}
    assert not SparseUpdate.options(lossless.graph, "lossy")  # it changes what trains: adapters only
    state0 = sum(v.numel() * v.element_size() for v in lossless.executor.state.values())
    with pytest.raises(memfit.BudgetError, match="the smallest peak reachable is") as e:  # recomputation alone
        memfit.optimize(copy.deepcopy(m), example_inputs=(x, y), loss_fn=F.cross_entropy, budget=1, levers="lossless")
    budget = e.value.plan.peak_bytes - state0 // 3  # below the smallest lossless peak: state must go
    t = memfit.optimize(copy.deepcopy(m), example_inputs=(x, y), loss_fn=F.cross_entropy,
                        optimizer=memfit.AdamW(lr=1e-2, weight_decay=0.0), budget=budget, levers="adapters",
                        lever_passes=["sparse_update"])
    s = t.graph.info["sparse_update"]
    assert s["frozen"] or s["narrowed"]
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes <= budget
    # the chosen options' declared bytes are what the state holds, exactly
    chosen = [options[(f, s["trained"].get(f, 0.0))] for f, p in m.named_parameters()
              if p.dim() >= 2 and s["trained"].get(f, 0.0) != 1.0]
    state = sum(v.numel() * v.element_size() for v in t.executor.state.values())
    assert chosen and state - state0 == sum(o.persistent for o in chosen)
    # the default levers never freeze
    d = memfit.optimize(copy.deepcopy(m), example_inputs=(x, y), loss_fn=F.cross_entropy, budget=budget,
                        levers="adapters")
    assert "sparse_update" not in d.graph.info
