"""quantize_state: 8-bit (and 4-bit) block-wise Adam moments: the bytes the formula says, training that
tracks fp32 AdamW, bit-identical resume, accumulation equal to one big batch, per-parameter bits, clear
config errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models
from memfit.passes.base import make_pass


def _batches(steps: int, batch: int = 16):
    """A learnable task: labels from a fixed random linear teacher."""
    gen = torch.Generator().manual_seed(5)
    teacher = torch.randn(32, 10, generator=gen)
    xs = [torch.randn(batch, 32, generator=gen) for _ in range(steps)]
    return [(x, (x @ teacher).argmax(dim=1)) for x in xs]


def _trainer(model, batch, passes, **kw):
    return memfit.optimize(model, example_inputs=batch, loss_fn=F.cross_entropy,
                           optimizer=memfit.AdamW(lr=3e-3, weight_decay=0.01), passes=passes, **kw)


def _q(bits=8, min_numel=256):
    return ["fused_update", ("quantize_state", {"bits": bits, "min_numel": min_numel})]


def test_state_bytes_follow_the_block_formula_and_small_tensors_stay_fp32():
    t = _trainer(models.build_mlp(), _batches(1)[0], _q(8, min_numel=1000))
    by_owner: dict[str, int] = {}
    for spec in t.graph.state_specs.values():
        by_owner[spec.owner] = by_owner.get(spec.owner, 0) + spec.nbytes
    for fqn, p in models.build_mlp().named_parameters():
        n = p.numel()
        want = 2 * n + 8 * -(-n // 256) if n >= 1000 else 8 * n  # codes + one fp32 absmax per 256, per moment
        assert by_owner[fqn] == want, fqn
    assert t.graph.info["quantize_state"]["quantized"] == ["0.weight", "2.weight"]
    t4 = _trainer(models.build_mlp(), _batches(1)[0], _q(4, min_numel=1000))
    n = 64 * 64
    got = sum(s.nbytes for s in t4.graph.state_specs.values() if s.owner == "2.weight")
    assert got == 2 * (n // 2) + 8 * (n // 128)  # two codes a byte, an absmax per 128


def test_overrides_give_parameters_their_own_bits_as_memory_effect_predicts():
    cfg = {"bits": 8, "min_numel": 256, "targets": "*weight", "overrides": {"2.*": {"bits": 4}}}
    base = _trainer(models.build_mlp(), _batches(1)[0], ["fused_update"])
    effect = make_pass(("quantize_state", cfg)).memory_effect(base.graph)
    t = _trainer(models.build_mlp(), _batches(1)[0], ["fused_update", ("quantize_state", cfg)])
    assert t.graph.info["quantize_state"]["per_param"] == {"0.weight": 8, "2.weight": 4, "4.weight": 8}
    assert "2.weight::exp_avg_q4" in t.graph.state_specs and "0.weight::exp_avg_q8" in t.graph.state_specs
    t.step(*_batches(1)[0])
    for fqn, n in (("0.weight", 64 * 32), ("2.weight", 64 * 64), ("4.weight", 10 * 64)):
        held = sum(v.nbytes for k, v in t.executor.state.items() if k.startswith(f"{fqn}::"))
        assert held == effect.per_param[fqn] + 8 * n, fqn
    assert set(effect.per_param) == {"0.weight", "2.weight", "4.weight"}  # biases are not targets
    assert make_pass(("quantize_state", cfg)).bits_for("2.bias") == 4


@pytest.mark.parametrize("bits, tol", [(8, 0.005), (4, 0.03)])
def test_quantized_moments_track_fp32_adamw(bits, tol):
    init = models.build_mlp()
    batches = _batches(40)
    full = _trainer(copy.deepcopy(init), batches[0], ["fused_update"])
    quant = _trainer(copy.deepcopy(init), batches[0], _q(bits))
    lf = [full.step(*b).item() for b in batches]
    lq = [quant.step(*b).item() for b in batches]
    assert lq[-1] < lq[0] - 0.2
    mean_f, mean_q = sum(lf[-10:]) / 10, sum(lq[-10:]) / 10
    assert abs(mean_q - mean_f) / mean_f < tol, (mean_f, mean_q)


@pytest.mark.parametrize("bits", [8, 4])
def test_resume_is_bit_identical_with_weights_only_load(tmp_path, bits):
    init = models.build_mlp()
    batches = _batches(6)
    a = _trainer(copy.deepcopy(init), batches[0], _q(bits))
    la = [a.step(*b) for b in batches]
    b = _trainer(copy.deepcopy(init), batches[0], _q(bits))
    for batch in batches[:3]:
        b.step(*batch)
    torch.save(b.state_dict(), tmp_path / "s.pt")
    c = _trainer(copy.deepcopy(init), batches[0], _q(bits))
    c.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for batch, want in zip(batches[3:], la[3:], strict=True):
        assert torch.equal(c.step(*batch), want)
    for k, v in a.state_dict()["state"].items():
        assert torch.equal(v, c.state_dict()["state"][k]), k


def test_accumulation_matches_one_big_batch():
    init = models.build_mlp()
    batches = _batches(4, batch=32)
    one = _trainer(copy.deepcopy(init), batches[0], _q())
    four = _trainer(copy.deepcopy(init), batches[0], _q(), micro_steps=4)
    for b in batches:
        one.step(*b)
        four.step(*b)
    pa = torch.cat([p.flatten() for p in one.executor.params.values()])
    pb = torch.cat([p.flatten() for p in four.executor.params.values()])
    pi = torch.cat([p.detach().flatten() for p in init.parameters()])
    assert float((pa - pb).norm() / (pa - pi).norm()) < 3e-3


@pytest.mark.parametrize("cfg, match", [
    ({"bits": 2}, r"quantize_state'\]\.bits: expected 8 or 4, got 2"),
    ({"min_numel": 0}, r"min_numel: expected an int >= 1"),
    ({"overrides": {"2.*": {"bits": 2}}}, r"quantize_state'\]\.overrides\['2\.\*'\]\.bits: expected 8 or 4, got 2"),
    ({"overrides": {"*": {"min_numel": 9}}}, r"overrides\['\*'\]: expected keys among \['bits'\], got \['min_numel'\]"),
])
def test_bad_config_is_refused(cfg, match):
    with pytest.raises(memfit.ConfigError, match=match):
        _trainer(models.build_mlp(), _batches(1)[0], ["fused_update", ("quantize_state", cfg)])
