"""prune and memfit.sparsity: masks in the weight and in the update, schedules, one-shot criteria, resume.

The plan stays exact at mask events (predicted == measured on CPU), pruned weights stay exact zeros through
training, the schedules prune what they say (cubic, GraNet regrowth at zero), a resumed run across a GraNet
regrow step is bit-identical, Wanda / GBLM / n:m select what their definitions say, and bad input is refused
before anything changes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import memfit
from memfit import models
from memfit import sparsity as sp
from memfit.errors import ConfigError
from memfit.models import build_llama, lm_loss


def _batch(seed: int = 0, batch: int = 2, seq: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq), generator=gen)
    return x, torch.roll(x, -1, 1)


def _llama(layers: int = 1):
    torch.manual_seed(0)
    return build_llama("tiny-llama", num_hidden_layers=layers)


def _trainer(cfg, model=None, lr=1e-3, weight_decay=0.0):
    return memfit.optimize(model if model is not None else _llama(), example_inputs=_batch(), loss_fn=lm_loss,
                           optimizer=memfit.AdamW(lr=lr, weight_decay=weight_decay),
                           passes=["remat", "fused_update", ("prune", cfg)])


def _kept(t, fqn):
    return sp.unpack_kept(t.executor.state[f"{fqn}::pruned"], t.executor.params[fqn].shape)


@pytest.mark.parametrize("cfg", [
    {"schedule": "gradual", "every": 1, "events": 10, "sparsity": 0.5},
    {"schedule": "granet", "every": 1, "events": 10, "sparsity": 0.5, "regrow": 0.3},
    {"schedule": "oneshot", "start": 2, "pattern": "2:4"},
    {"schedule": "fixed"},
], ids=["gradual", "granet", "2:4", "fixed"])
def test_plan_is_exact_at_a_mask_event(cfg):
    t = _trainer(cfg)
    x, y = _batch()
    t.step(x, y)
    measured = t.measure_step(x, y)  # step 2: an event for every schedule here but "fixed"
    assert measured.peak_bytes == t.plan.peak_bytes


def test_pruned_weights_stay_exact_zeros_for_100_steps_with_weight_decay():
    t = _trainer({"schedule": "gradual", "sparsity": 0.75, "every": 10, "events": 5}, lr=3e-3, weight_decay=0.1)
    targets = t.graph.info["prune"]["targets"]
    assert targets and "lm_head.weight" not in targets and "model.embed_tokens.weight" not in targets
    for i in range(100):
        t.step(*_batch(i % 7))
    for f in targets:
        keep = _kept(t, f)
        w = t.executor.params[f]
        assert float((~keep).float().mean()) == pytest.approx(0.75, abs=1 / keep.numel())
        assert torch.count_nonzero(w[~keep]) == 0, f
        assert torch.count_nonzero(t.executor.state[f"{f}::exp_avg"][~keep]) == 0
        assert bool((w[keep] != 0).all())  # the kept ones train
    dense = t.export()
    for f in targets:
        assert torch.equal(dict(dense.named_parameters())[f] == 0, ~_kept(t, f))


def test_gradual_follows_the_cubic_schedule():
    t = _trainer({"schedule": "gradual", "sparsity": 0.8, "initial": 0.2, "start": 2, "every": 3, "events": 4})
    f = t.graph.info["prune"]["targets"][0]
    seen = {}
    for step in range(1, 16):
        t.step(*_batch(step))
        seen[step] = float((~_kept(t, f)).float().mean())
    numel = t.executor.params[f].numel()
    for k in range(5):
        want = 0.8 + (0.2 - 0.8) * (1 - k / 4) ** 3
        assert seen[2 + 3 * k] == pytest.approx(round(want * numel) / numel)
    assert seen[1] == 0.0 and seen[3] == seen[2] and seen[15] == seen[14]


def test_granet_regrows_at_zero_and_keeps_the_sparsity():
    t = _trainer({"schedule": "granet", "sparsity": 0.6, "initial": 0.6, "every": 2, "events": 4, "regrow": 0.4})
    f = t.graph.info["prune"]["targets"][0]
    t.step(*_batch(0))  # step 1: the initial prune to 60%
    t.step(*_batch(1))
    before = _kept(t, f).clone()
    w_before = t.executor.params[f].clone()
    m = copy.deepcopy(t.executor.state[f"{f}::exp_avg"])
    t.step(*_batch(2))  # step 3: event k=1, drop and regrow 0.4 * (1 + cos(pi/4)) / 2 of the kept
    after = _kept(t, f)
    grown = after & ~before
    dropped = before & ~after
    frac = 0.4 * (1 + math.cos(math.pi / 4)) / 2
    # as many regrown as dropped (some of the dropped may be regrown at once: they restart from zero too)
    assert int(grown.sum()) == int(dropped.sum())
    assert 0.5 * frac * int(before.sum()) < int(grown.sum()) <= int(frac * int(before.sum()))
    assert float((~after).float().mean()) == pytest.approx(0.6, abs=1 / after.numel())
    # regrown weights took one AdamW step at step 3 from zero with zeroed moments: m = 0.1 g, v = 0.001 g^2, so
    # |w| = lr * (0.1 / (1 - 0.9^3)) / sqrt(0.001 / (1 - 0.999^3)), whatever g (eps aside)
    w = t.executor.params[f]
    want = 1e-3 * (0.1 / (1 - 0.9**3)) / math.sqrt(0.001 / (1 - 0.999**3))
    assert torch.allclose(w[grown].abs(), torch.full_like(w[grown], want), rtol=1e-3)
    assert torch.count_nonzero(w[dropped]) == 0 and torch.count_nonzero(w_before[grown]) == 0
    assert not torch.equal(m[grown], t.executor.state[f"{f}::exp_avg"][grown])


def test_resume_across_a_granet_regrow_step_is_bit_identical(tmp_path):
    cfg = {"schedule": "granet", "sparsity": 0.7, "every": 2, "events": 5, "regrow": 0.3}
    batches = [_batch(i) for i in range(8)]
    a = _trainer(cfg)
    for b in batches[:4]:
        a.step(*b)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    rest_a = [float(a.step(*b)) for b in batches[4:]]  # steps 5..8: regrow events at 5 and 7
    b_ = _trainer(cfg)
    b_.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    rest_b = [float(b_.step(*b)) for b in batches[4:]]
    assert rest_a == rest_b
    for k, v in a.executor.params.items():
        assert torch.equal(v, b_.executor.params[k]), k
    for k, v in a.executor.state.items():
        assert torch.equal(v, b_.executor.state[k]), k
    packed = a.state_dict()
    assert any(v.dtype == torch.uint8 for k, v in _flat(packed) if k.endswith("::pruned"))


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def test_fixed_schedule_keeps_the_mask_of_a_pruned_model():
    m = _llama()
    masks = sp.prune_model(m, 0.5, pattern="2:4")
    t = _trainer({"schedule": "fixed"}, model=m, lr=3e-3)
    for i in range(5):
        t.step(*_batch(i))
    for f, keep in masks.items():
        if f in t.executor.params:
            assert torch.equal(_kept(t, f), keep), f
            assert torch.count_nonzero(t.executor.params[f][~keep]) == 0


# ---- memfit.sparsity: selection, criteria, storage -----------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 37), st.floats(0.0, 1.0))
def test_pack_unpack_round_trip(rows, cols, p):
    keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(rows * 100 + cols)) < p
    packed = sp.pack_pruned(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (rows * cols + 7) // 8
    assert torch.equal(sp.unpack_kept(packed, (rows, cols)), keep)
    assert sp.pack_pruned(torch.ones(rows, cols, dtype=torch.bool)).count_nonzero() == 0  # zeros = dense


def test_n_m_pattern_prunes_n_of_every_m_lowest():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 0.9]])
    keep = sp.select(score, 0.0, pattern=(2, 4))
    assert keep.tolist() == [[True, False, True, False, False, True, False, True]]


def test_wanda_and_gblm_scores_are_their_definitions():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    xs = [torch.randn(5, 8) * torch.arange(1, 9) for _ in range(3)]
    ys = [torch.randn(5, 4) for _ in range(3)]
    data = list(zip(xs, ys, strict=True))
    cal = sp.calibrate(model, data, loss_fn=F.mse_loss, gradients=True)
    norms = torch.cat(xs).double().pow(2).sum(0).sqrt().float()
    torch.testing.assert_close(cal.act["0.weight"], norms)
    assert lin.weight.grad is None  # calibration left the gradients as they were
    grads = torch.zeros(4, 8, dtype=torch.float64)
    for x, y in data:
        for s in range(5):
            lin.zero_grad()
            F.mse_loss(lin(x[s:s + 1]), y[s:s + 1]).backward()
            grads += (lin.weight.grad.double() * 100) ** 2
    torch.testing.assert_close(cal.grad["0.weight"], grads.sqrt().float())
    w = lin.weight.detach().clone()
    masks = sp.prune_model(model, 0.5, criterion="wanda", data=data)
    score = w.abs() * norms
    want = torch.ones(4, 8, dtype=torch.bool).scatter_(1, score.argsort(dim=1, stable=True)[:, :4], False)
    assert torch.equal(masks["0.weight"], want)
    assert torch.equal(lin.weight == 0, ~want)


def test_scopes_global_and_erk():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    masks = sp.prune_model(copy.deepcopy(model), 0.5, scope="global")
    total = sum(int((~k).sum()) for k in masks.values())
    assert total == int(0.5 * (64 * 64 + 8 * 64))
    dens = sp.erk_densities({"a": (64, 64), "b": (8, 64)}, 0.5)
    assert dens["b"] > dens["a"]  # the narrow layer keeps more
    assert dens["a"] * 4096 + dens["b"] * 512 == pytest.approx(0.5 * (4096 + 512))


def test_wanda_beats_magnitude_on_a_layer_with_outlier_features():
    # a feature with large activations makes its small weights matter: Wanda keeps them, magnitude does not
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    x = torch.randn(256, 16)
    x[:, 3] *= 50
    dense_out = lin(x).detach()
    errs = {}
    for crit in ("magnitude", "wanda"):
        m = nn.Sequential(copy.deepcopy(lin))
        sp.prune_model(m, 0.5, criterion=crit, data=[(x,)], scope="row")
        errs[crit] = float((m(x).detach() - dense_out).pow(2).mean())
    assert errs["wanda"] < errs["magnitude"]


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "message"), [
    ({"sparsity": 1.0}, r"`sparsity` a fraction in \[0, 1\)"),
    ({"sparsity": -0.1}, r"`sparsity` a fraction in \[0, 1\)"),
    ({"schedule": "gradual", "every": 100, "events": 10, "total_steps": 500},
     r"a schedule ending by total_steps=500, got its last event at step 1001"),
    ({"scope": "global"}, r"'layer' or 'erk' while training"),
    ({"schedule": "gradual", "pattern": "2:4"}, r"an n:m pattern with schedule 'oneshot' or 'fixed'"),
    ({"schedule": "oneshot", "pattern": "4:4"}, r"an n:m pattern with 0 < n < m"),
    ({"schedule": "oneshot", "pattern": "1:3"}, r"with an input dimension divisible by m = 3"),
    ({"schedule": "sometimes"}, r"one of \('fixed', 'oneshot', 'gradual', 'granet'\)"),
    ({"targets": ("model.norm.weightx",)}, r"passes\['prune'\]\.targets: expected a glob matching at least one "
                                           r"parameter FQN, got 'model\.norm\.weightx'"),
], ids=["one", "negative", "ends-after-training", "global", "pattern-gradual", "pattern-n", "m-not-dividing",
        "schedule", "no-target"])
def test_bad_config_is_refused_and_changes_nothing(cfg, message):
    m = _llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        _trainer(cfg, model=m)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prune_refuses_a_lowrank_target():
    with pytest.raises(ConfigError, match=r"an AdamW or SGD update on fp32 state"):
        memfit.optimize(_llama(), example_inputs=_batch(), loss_fn=lm_loss,
                        passes=["remat", "fused_update", ("lowrank", {"rank": 4}), ("prune", {})])


def test_calibration_of_the_wrong_shape_is_refused_and_changes_nothing():
    m = _llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bad = [_batch(0), (torch.randint(0, 256, (2, 16, 3)), torch.zeros(2, 16, 3, dtype=torch.long))]
    with pytest.raises(ConfigError, match=r"memfit.prune_model\(data=\) batch 1: expected per-sample shapes"):
        sp.prune_model(m, 0.5, criterion="wanda", data=bad)
    with pytest.raises(ConfigError, match=r"batch 0: expected batches the model accepts"):
        sp.prune_model(m, 0.5, criterion="wanda", data=[(torch.randn(2, 16, 3),)])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prune_model_bad_input():
    mlp = models.build_mlp()
    with pytest.raises(ConfigError, match=r"data= calibration batches for criterion='wanda'"):
        sp.prune_model(mlp, 0.5, criterion="wanda")
    with pytest.raises(ConfigError, match=r"loss_fn= for criterion='gblm'"):
        sp.prune_model(mlp, 0.5, criterion="gblm", data=[(torch.randn(2, 32),)])
    with pytest.raises(ConfigError, match=r"input dimension divisible by m = 3"):
        sp.prune_model(mlp, pattern="1:3")
    with pytest.raises(ConfigError, match=r"weight of an nn.Linear or nn.Conv"):
        sp.prune_model(models.build_cnn(), targets=["1.weight"])  # a BatchNorm


def test_semi_structured_export_stays_dense_on_cpu_and_refuses_non_2_4():
    m = _llama()
    sp.prune_model(m, pattern="2:4")
    w = {f: p.clone() for f, p in m.named_parameters()}
    report = sp.to_semi_structured(m, targets=["model.layers.*.mlp.*.weight"])
    assert report and all(v.startswith("dense: ") for v in report.values())  # CPU: torch's layout needs CUDA
    assert all(torch.equal(p, w[f]) for f, p in m.named_parameters())
    with pytest.raises(ConfigError, match=r"2:4-sparse Linear weights"):
        sp.to_semi_structured(_llama())


# ---- compressed state (compress=True) -----------------------------------------------------------------------


def test_compressed_state_trains_identically_with_a_fraction_of_the_bytes(tmp_path):
    cfg = {"schedule": "granet", "sparsity": 0.8, "initial": 0.8, "every": 2, "events": 5, "regrow": 0.3}
    dense, packed = _trainer(cfg), _trainer({**cfg, "compress": True})
    batches = [_batch(i) for i in range(8)]
    for b in batches[:4]:
        assert float(dense.step(*b)) == float(packed.step(*b))
    x, y = batches[4]
    assert packed.measure_step(x, y).peak_bytes == packed.plan.peak_bytes  # step 5: a regrow event
    dense.step(x, y)
    for k, v in dense.executor.params.items():
        assert torch.equal(v, packed.executor.params[k]), k
    f = packed.graph.info["prune"]["targets"][0]
    numel = packed.executor.params[f].numel()
    assert packed.executor.state[f"{f}::exp_avg"].numel() == numel - round(0.8 * numel)
    # the compressed moments are the dense ones at the kept positions, in flat order
    keep = _kept(packed, f).view(-1)
    assert torch.equal(packed.executor.state[f"{f}::exp_avg"], dense.executor.state[f"{f}::exp_avg"].view(-1)[keep])
    held = {t: sum(v.numel() * v.element_size() for v in t.executor.state.values()) for t in (dense, packed)}
    assert held[packed] < 0.35 * held[dense]
    assert packed.plan.peak_bytes < dense.plan.peak_bytes
    # resume through the next regrow (step 7)
    torch.save(packed.state_dict(), tmp_path / "s.pt")
    rest = [float(packed.step(*b)) for b in batches[5:]]
    again = _trainer({**cfg, "compress": True})
    again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [float(again.step(*b)) for b in batches[5:]] == rest


def test_compressed_fixed_mask_checks_the_kept_count():
    m = _llama()
    sp.prune_model(m, 0.5, scope="layer")
    t = _trainer({"schedule": "fixed", "sparsity": 0.5, "compress": True}, model=m)
    t.step(*_batch(0))
    f = t.graph.info["prune"]["targets"][0]
    assert t.executor.state[f"{f}::exp_avg"].numel() == t.executor.params[f].numel() // 2
    with pytest.raises(ConfigError, match=r"expected \d+ nonzero weights \(the sparsity configured\)"):
        _trainer({"schedule": "fixed", "sparsity": 0.6, "compress": True}, model=copy.deepcopy(m))
    with pytest.raises(ConfigError, match=r"a mask whose kept count is fixed from the first update"):
        _trainer({"schedule": "gradual", "sparsity": 0.6, "compress": True})


def test_pruning_is_an_opt_in_planner_lever_with_exact_bytes():
    def batch(i=0):
        gen = torch.Generator().manual_seed(i)
        x = torch.randint(0, 256, (4, 64), generator=gen)
        return x, torch.roll(x, -1, 1)

    torch.manual_seed(0)
    lossless = memfit.plan(build_llama("tiny-llama", num_hidden_layers=2), example_inputs=batch(), loss_fn=lm_loss)
    budget = int(lossless.peak_bytes * 0.62)
    torch.manual_seed(0)
    t = memfit.optimize(build_llama("tiny-llama", num_hidden_layers=2), example_inputs=batch(), loss_fn=lm_loss,
                        budget=budget, levers="lossy", lever_passes=["prune"])
    chosen = t.graph.info["prune"]["sparsity"]
    assert chosen and set(chosen.values()) <= {0.5, 0.75, 0.9} and t.graph.info["prune"]["compress"]
    x, y = batch()
    m = t.measure_step(x, y)  # step 1: the magnitude prune itself, the plan's worst step
    assert m.peak_bytes == t.plan.peak_bytes <= budget
    for f, s in chosen.items():
        w = t.executor.params[f]
        assert int((w == 0).sum()) == round(s * w.numel())
    # the default levers never prune
    torch.manual_seed(0)
    d = memfit.optimize(build_llama("tiny-llama", num_hidden_layers=2), example_inputs=batch(), loss_fn=lm_loss,
                        budget=budget, levers="lossy")
    assert "prune" not in d.graph.info


def test_compressed_weights_train_identically_and_plan_exactly():
    m = _llama()
    sp.prune_model(m, 0.8)
    runs = {}
    for cw in (False, True):
        t = _trainer({"schedule": "fixed", "sparsity": 0.8, "compress": True, "compress_weights": cw},
                     model=copy.deepcopy(m))
        losses = [float(t.step(*_batch(i))) for i in range(3)]
        assert t.measure_step(*_batch(3)).peak_bytes == t.plan.peak_bytes
        runs[cw] = (t, losses)
    (dense, l0), (packed, l1) = runs[False], runs[True]
    assert l0 == l1
    e0, e1 = dict(dense.export().named_parameters()), dict(packed.export().named_parameters())
    assert all(torch.equal(e0[k], e1[k]) for k in e0)
    f = packed.graph.info["prune"]["targets"][0]
    numel = e1[f].numel()
    assert packed.executor.params[f].numel() == numel - round(0.8 * numel)  # the kept values only
    assert packed.plan.peak_bytes < dense.plan.peak_bytes
    held = {t: sum(v.numel() * v.element_size() for v in t.executor.params.values()) for t in (dense, packed)}
    assert held[packed] < 0.5 * held[dense]
    with pytest.raises(ConfigError, match=r"compress=True with schedule 'fixed'"):
        _trainer({"schedule": "granet", "sparsity": 0.8, "initial": 0.8, "compress": True, "compress_weights": True})
