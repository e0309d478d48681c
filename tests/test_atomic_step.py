"""A step that fails changes nothing: raises in each micro-batch position and in the update phase,
non-finite losses and gradients, and SPAM's spike handling."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import memfit
from memfit import models
from memfit.kernels import adamw as adamw_kernels


def _mlp_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _ce(out, y):
    return torch.nn.functional.cross_entropy(out, y)


def _trainer(micro_steps: int = 1, **kw):
    model = models.build_mlp(seed=0)
    x, y = _mlp_batches(1)[0]
    return memfit.optimize(model, example_inputs=(x, y), loss_fn=_ce, optimizer=memfit.AdamW(lr=1e-2),
                           micro_steps=micro_steps, **kw)


def _snapshot(tr) -> dict[str, torch.Tensor]:
    ex = tr.executor
    out = {f"p:{k}": v.clone() for k, v in ex.params.items()}
    out.update({f"s:{k}": v.clone() for k, v in ex.state.items()})
    out.update({f"b:{k}": v.clone() for k, v in ex.buffers.items()})
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors changed: {diff[:5]}"


def _nan_batch(micro_steps: int, position: int):
    """A batch whose micro-batch ``position`` (of ``micro_steps``) holds a NaN input."""
    x, y = _mlp_batches(1, seed=7)[0]
    x = x.clone()
    rows = x.shape[0] // micro_steps
    x[position * rows] = math.nan
    return x, y


@pytest.mark.parametrize(("micro_steps", "position"), [(2, 0), (2, 1), (1, 0)],
                         ids=["micro-1-of-2", "micro-2-of-2", "single"])
def test_raise_in_any_micro_batch_leaves_everything_and_the_next_step_is_clean(micro_steps, position):
    clean, seen = _trainer(micro_steps), _trainer(micro_steps)
    good = _mlp_batches(3)
    for tr in (clean, seen):
        tr.step(*good[0])
    before = _snapshot(seen)
    rng = torch.get_rng_state()
    bad_x, bad_y = good[1][0].clone(), good[1][1].clone()
    rows = bad_x.shape[0] // micro_steps
    bad_y[position * rows] = 99  # an out-of-range class: cross_entropy raises in that micro-batch's forward
    with pytest.raises((IndexError, RuntimeError), match=r"out of bounds|Target 99"):
        seen.step(bad_x, bad_y)
    _assert_same(before, _snapshot(seen))
    assert seen.step_count == 1 and torch.equal(torch.get_rng_state(), rng)
    for tr in (clean, seen):
        tr.step(*good[2])
    _assert_same(_snapshot(clean), _snapshot(seen))


def _failing_kernel(fail_on_call: int):
    calls = {"n": 0, "armed": False}
    real = adamw_kernels.adamw_ref

    def kernel(*args, **kwargs):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == fail_on_call:
                raise RuntimeError("injected kernel failure")
        return real(*args, **kwargs)

    return kernel, calls


def test_raise_in_the_update_phase_is_undone_with_a_journal(monkeypatch):
    kernel, calls = _failing_kernel(fail_on_call=3)  # after two parameters were updated
    monkeypatch.setattr(adamw_kernels, "adamw_ref", kernel)
    clean, seen = _trainer(transactional=True), _trainer(transactional=True)
    good = _mlp_batches(3)
    for tr in (clean, seen):
        tr.step(*good[0])
    before = _snapshot(seen)
    calls["armed"] = True
    with pytest.raises(RuntimeError, match="injected kernel failure"):
        seen.step(*good[1])
    calls["armed"] = False
    _assert_same(before, _snapshot(seen))
    for tr in (clean, seen):
        tr.step(*good[2])
    _assert_same(_snapshot(clean), _snapshot(seen))


def test_raise_in_the_update_phase_without_a_journal_says_it_was_partial(monkeypatch):
    kernel, calls = _failing_kernel(fail_on_call=3)
    monkeypatch.setattr(adamw_kernels, "adamw_ref", kernel)
    tr = _trainer()
    calls["armed"] = True
    with pytest.raises(memfit.StepError, match=r"after 3 update op\(s\) had started.*transactional=True") as info:
        tr.step(*_mlp_batches(1)[0])
    assert info.value.updated == 3 and tr.step_count == 0


@pytest.mark.parametrize(("micro_steps", "position"), [(1, 0), (2, 0), (2, 1)])
def test_nonfinite_skip_leaves_every_tensor_bit_identical(micro_steps, position):
    tr = _trainer(micro_steps)
    tr.step(*_mlp_batches(1)[0])
    before = _snapshot(tr)
    with pytest.warns(memfit.NonFiniteWarning, match="step 2 skipped: non-finite loss"):
        loss = tr.step(*_nan_batch(micro_steps, position))
    assert math.isnan(float(loss)) and tr.step_count == 1 and tr.skipped_steps == 1
    _assert_same(before, _snapshot(tr))


def test_nonfinite_raise_undoes_and_raises():
    tr = _trainer(nonfinite="raise")
    before = _snapshot(tr)
    with pytest.raises(memfit.NonFiniteError, match="expected a finite loss, got loss nan") as info:
        tr.step(*_nan_batch(1, 0))
    assert info.value.what == "loss" and info.value.before_updates
    _assert_same(before, _snapshot(tr))


@pytest.mark.parametrize(("prologue", "nonfinite"), [(False, "raise"), (True, "raise"), (True, "skip")],
                         ids=["grad", "prologue-raise", "prologue-skip"])
def test_nonfinite_gradient_with_a_finite_loss_is_caught_before_its_update(prologue, nonfinite):
    """sqrt(|out - y|) at out == y: the loss is 0, its gradient NaN. With ``prologue`` the gradient is clipped
    inside its update (``fuse``): the step hook checks the chunks the op would step, so nothing changes."""
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()

    def loss_fn(out, y):
        return torch.sqrt((out.squeeze(-1) - y).abs()).sum()

    x, y = torch.ones(2, 4), torch.zeros(2)
    extra = {"clip_grad_norm": 1.0, "clip": "per_param", "fuse": True} if prologue else {}
    tr = memfit.optimize(model, example_inputs=(x, y), loss_fn=loss_fn, optimizer=memfit.AdamW(lr=0.1),
                         nonfinite=nonfinite, **extra)
    updates = [n for n in tr.graph.graph.nodes if n.target is torch.ops.memfit.adamw_update.default]
    assert all(bool(n.kwargs.get("grad_program")) == prologue for n in updates)
    before = _snapshot(tr)
    if nonfinite == "raise":
        with pytest.raises(memfit.NonFiniteError, match=r"expected a finite gradient of (weight|bias)") as info:
            tr.step(x, y)
        assert info.value.before_updates
    else:
        with pytest.warns(UserWarning, match="non-finite"):
            tr.step(x, y)
    _assert_same(before, _snapshot(tr))


def test_nonfinite_ignore_lets_nan_through():
    tr = _trainer(nonfinite="ignore")
    tr.step(*_nan_batch(1, 0))
    assert any(torch.isnan(p).any() for p in tr.executor.params.values())


def test_bad_nonfinite_mode_and_transactional_with_budget_are_config_errors():
    with pytest.raises(memfit.ConfigError, match=r"nonfinite=\): expected one of \('raise', 'skip', 'ignore'\)"):
        _trainer(nonfinite="drop")
    with pytest.raises(memfit.ConfigError, match="transactional=True\\): expected no budget"):
        _trainer(transactional=True, budget="1GB")


# ---- SPAM -----------------------------------------------------------------------------------------

def test_spike_clip_reference_matches_the_rule():
    g = torch.tensor([1.0, -100.0, 3.0, 0.5, 7.0])
    v = torch.tensor([1.0, 1.0, 0.0, 0.01, 1.0])
    out = g.clone()
    adamw_kernels.clip_spikes_(out, v, threshold=4.0)
    # 100^2 > 4 -> -2; v == 0 is left alone; 0.5^2 > 0.04 -> 0.2; 7^2 > 4 -> 2
    assert torch.allclose(out, torch.tensor([1.0, -2.0, 3.0, 0.2, 2.0]))


def test_adamw_kernel_spike_clip_matches_reference_under_the_interpreter():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    n = 1000
    p, g = torch.randn(n), torch.randn(n) * 10
    m, v = torch.randn(n) * 0.1, torch.rand(n) * 0.5
    v[::7] = 0
    ref = [t.clone() for t in (p, m, v)]
    ker = [t.clone() for t in (p, m, v)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=5, spike_threshold=50.0)
    adamw_kernels.adamw_ref(ref[0], g, ref[1], ref[2], **kw)
    adamw_kernels.adamw(ker[0], g, ker[1], ker[2], **kw)
    for a, b in zip(ref, ker, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    unclipped = p.clone()
    adamw_kernels.adamw_ref(unclipped, g, m.clone(), v.clone(), **{**kw, "spike_threshold": 0.0})
    assert not torch.equal(unclipped, ref[0])  # the clip fired


def test_spam_settings_and_schedule():
    o = memfit.AdamW.spam(lr=1e-3, reset_interval=10, reset_warmup=4)
    assert o.spike_threshold == 5000.0
    assert [o.resets_before(t) for t in (1, 10, 11, 21)] == [False, False, True, True]
    assert o.lr_scale(5) == 1.0 and o.lr_scale(11) < o.lr_scale(12) < o.lr_scale(14) < 1.0 and o.lr_scale(15) == 1.0
    with pytest.raises(memfit.ConfigError, match="reset_warmup=\\): expected reset_interval > 0"):
        memfit.AdamW(reset_warmup=5)
    with pytest.raises(memfit.ConfigError, match="spike_threshold=\\): expected a number >= 0"):
        memfit.AdamW(spike_threshold=-1)


def test_spam_moment_reset_zeroes_moments_before_the_update():
    model = models.build_mlp(seed=0)
    batches = _mlp_batches(3)
    tr = memfit.optimize(model, example_inputs=batches[0], loss_fn=_ce,
                         optimizer=memfit.AdamW(lr=1e-2, reset_interval=2))
    for b in batches:  # step 3 zeroes the moments first: m = (1 - b1) g3, v = (1 - b2) g3^2
        tr.step(*b)
    checked = 0
    for k, v in tr.executor.state.items():
        if k.endswith("::exp_avg_sq"):
            m = tr.executor.state[k.replace("exp_avg_sq", "exp_avg")]
            torch.testing.assert_close(v, m * m * (0.001 / 0.01), rtol=1e-4, atol=1e-12)
            checked += 1
    assert checked == 6


def test_accumulate_feeds_micro_batches_like_step_and_guards_its_window():
    by_step, by_feed = _trainer(micro_steps=2), _trainer(micro_steps=2)
    x, y = _mlp_batches(1)[0]
    whole = by_step.step(x, y)
    first = by_feed.accumulate(x[:4], y[:4])
    assert by_feed.step_count == 0
    with pytest.raises(memfit.ConfigError, match=r"Trainer\.step: expected no accumulate\(\) window open, got 1 of 2 "
                                                 r"micro-batches fed; finish the window"):
        by_feed.step(x, y)
    mean = by_feed.accumulate(x[4:], y[4:])
    assert by_feed.step_count == 1 and torch.equal(mean, whole)
    assert torch.equal(mean, torch.stack([first, by_feed.last_micro_loss]).mean())
    _assert_same(_snapshot(by_step), _snapshot(by_feed))
    by_feed.accumulate(x[:4], y[:4])
    by_feed.discard_window()  # the fed micro-batch's gradient is dropped
    by_feed.accumulate(x[:4], y[:4])
    by_feed.accumulate(x[4:], y[4:])
    by_step.step(x, y)
    _assert_same(_snapshot(by_step), _snapshot(by_feed))


def test_passes_replacing_the_adamw_update_refuse_spam_clipping():
    model = models.build_llama("tiny-llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    x = torch.randint(0, 256, (2, 8))
    for spec in (("lowrank", {"rank": 4}), ("quantize_state", {"min_numel": 16})):
        with pytest.raises(memfit.ConfigError, match=rf"passes\['{spec[0]}'\] on '.+': expected an AdamW update "
                                                     r"without SPAM spike clipping, got spike_threshold=5000\.0"):
            memfit.optimize(copy.deepcopy(model), example_inputs=(x, x), loss_fn=models.lm_loss,
                            optimizer=memfit.AdamW.spam(), passes=["fused_update", spec])
