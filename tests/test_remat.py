"""remat's FLOP cap and budget mode on tiny LLaMA: the cap holds, the predicted peak only falls as the cap or
the bytes to free grow, the prediction is the measured peak, and the values stay bitwise the same."""

from __future__ import annotations

import copy

import pytest
import torch

import memfit
from memfit import models
from memfit.frontends.export import capture
from memfit.passes.base import Pipeline, make_pass
from memfit.passes.sink import sink
from memfit.runtime.memory import plan_memory


@pytest.fixture(scope="module")
def llama():
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g))
    model = models.build_llama("tiny-llama")
    return model, batch, capture(model, batch, models.lm_loss)


def _remat(base, fused=True, **cfg):
    """Predicted peak and recomputed FLOPs of remat(cfg) on ``base``, followed (by default) by the fused update
    and the schedule, as memfit.optimize runs it; without, the gradients stay outputs (as under torch.compile)."""
    passes = [make_pass(("remat", cfg))] + ([make_pass("fused_update")] if fused else [])
    g = Pipeline(passes)(base.clone())
    if fused:
        sink(g)
    return plan_memory(g).peak_bytes, g.info.get("remat", {}).get("recomputed_flops", 0)


def test_max_flops_is_respected_and_the_peak_only_falls_as_it_grows(llama):
    _, _, base = llama
    caps = [0, 10**6, 3 * 10**6, 10**8, 10**9, 2 * 10**9]
    for cfg, fused in (({"mode": "budget"}, True), ({"mode": "budget", "grads": "held"}, False),
                       ({"mode": "free"}, True)):
        peaks = []
        for cap in caps:
            peak, flops = _remat(base, fused, **cfg, max_flops=cap)
            assert flops <= cap, f"{cfg}, max_flops={cap}: recomputed {flops} FLOPs"
            peaks.append(peak)
        print(cfg, "peaks by cap:", dict(zip(caps, peaks, strict=True)))
        assert peaks == sorted(peaks, reverse=True), f"{cfg}: the peak rose with a larger cap: {peaks}"
        assert peaks[-1] < peaks[1] < peaks[0]  # the cap binds
        if cfg["mode"] == "budget":
            assert peaks[-1] < peaks[2]  # recomputing matmuls (34 MFLOP each here) pays once the cap allows


def test_budget_mode_more_bytes_to_free_never_raises_the_peak(llama):
    """The old placement kept each recomputed copy (and what it needed) from its first to its last reader:
    freeing half the saved bytes or more raised the predicted peak here above freeing a quarter, and above
    the free mode's."""
    _, _, base = llama
    saved = plan_memory(base).saved_activation_bytes
    for fused, grads in ((True, "auto"), (False, "held")):
        free_peak, free_flops = _remat(base, fused, mode="free", grads=grads)
        peaks, flops = [], []
        for share in (0.0, 0.125, 0.25, 0.5, 0.75, 1.0):
            peak, f = _remat(base, fused, mode="budget", free_bytes=int(saved * share), grads=grads)
            peaks.append(peak)
            flops.append(f)
        print(grads, "free", free_peak, free_flops, "budget peaks", peaks, "flops", flops)
        assert peaks[0] < free_peak and flops[0] > free_flops
        assert peaks == sorted(peaks, reverse=True), f"more recomputation raised the predicted peak: {peaks}"
        assert flops == sorted(flops)


def test_a_capped_step_is_predicted_exactly_and_changes_no_number(llama):
    model, batch, _ = llama
    cap = 10**8  # room for a few matmuls (34 MFLOP each here) besides the pointwise recomputations
    plain = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=models.lm_loss,
                            passes=["fused_update"])
    capped = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=models.lm_loss,
                             passes=[("remat", {"mode": "budget", "max_flops": cap}), "fused_update"])
    stats = capped.graph.info["remat"]
    assert 0 < stats["recomputed_flops"] <= cap
    assert any(n.meta.get("memfit.recomputed", "").startswith("mm") for n in capped.graph.graph.nodes)
    for _ in range(2):
        assert torch.equal(plain.step(*batch), capped.step(*batch))
    for name, p in plain.executor.params.items():
        assert torch.equal(p, capped.executor.params[name]), name
    measured = capped.measure_step(*batch).peak_bytes
    assert capped.plan.peak_bytes == measured
    assert measured < plain.measure_step(*batch).peak_bytes


def test_max_flops_must_be_a_non_negative_int():
    with pytest.raises(memfit.ConfigError, match=r"remat\.max_flops: expected None or an int >= 0, got -1"):
        make_pass(("remat", {"max_flops": -1}))
