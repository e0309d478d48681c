"""quantize_weights: INT8 weights updated with stochastic rounding, frozen INT8/INT4/NF4 weights.

The plan stays exact (predicted == measured on CPU), each dequantized copy lives for one op, the update
writes codes and scales (SR moves weights that nearest rounding leaves where they are), a resumed run is
bit-identical, the model's own storage is released and read back by export(), and bad configurations or
states are refused before anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch

import memfit
from memfit import weights as wt
from memfit.errors import ConfigError
from memfit.graph import alias_users
from memfit.models import build_llama, lm_loss

APOLLO_MINI = {"rank": 1, "projector": "random", "rule": "apollo", "scaling": "tensor", "scale": 128.0}


def _batch(seed: int = 0, batch: int = 2, seq: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq), generator=gen)
    return x, torch.roll(x, -1, 1)


def _model(layers: int = 1):
    torch.manual_seed(0)
    return build_llama("tiny-llama", num_hidden_layers=layers)


def _trainer(passes, lr=1e-3, layers=1, model=None, **kw):
    m = model if model is not None else _model(layers)
    return memfit.optimize(m, example_inputs=_batch(), loss_fn=lm_loss, optimizer=memfit.AdamW(lr=lr, weight_decay=0.0),
                           passes=passes, **kw)


QW = ["remat", "fused_update", ("quantize_weights", {})]


@pytest.mark.parametrize("passes", [
    QW,
    ["remat", "fused_update", "quantize_state", ("quantize_weights", {})],
    ["remat", "fused_update", ("lowrank", APOLLO_MINI), ("quantize_weights", {})],
    ["remat", "fused_update", ("quantize_weights", {"rounding": "nearest"})],
], ids=["adamw", "adam8bit", "apollo-mini", "nearest"])
def test_plan_is_exact_and_codes_are_int8(passes):
    t = _trainer(passes)
    x, y = _batch()
    t.step(x, y)
    m = t.measure_step(x, y)
    assert m.peak_bytes == t.plan.peak_bytes
    q = t.graph.info["quantize_weights"]["trainable"]
    assert q and "model.embed_tokens.weight" not in q and "lm_head.weight" not in q
    for f in q:
        assert t.executor.params[f].dtype == torch.int8
        assert t.executor.state[f"{f}::wscale"].dtype == torch.float32


def test_each_dequantized_copy_lives_for_one_op():
    t = _trainer(QW)
    dq = [n for n in t.graph.graph.nodes if n.target is torch.ops.memfit.dequant_weight.default]
    # one per reader: forward product, recomputed product or input gradient; never shared across them
    per_weight: dict[str, int] = {}
    for n in dq:
        readers = alias_users(n)
        assert len(readers) == 1, (n.name, readers)
        per_weight[n.args[0].name] = per_weight.get(n.args[0].name, 0) + 1
    assert min(per_weight.values()) >= 2  # the forward's copy and the backward's


def test_stochastic_rounding_moves_weights_nearest_leaves():
    """At an lr far below half a quantization step, rounding to nearest writes back the same codes, while
    stochastic rounding moves them (and in expectation by the update)."""
    x, y = _batch()
    codes = {}
    for rounding in ("stochastic", "nearest"):
        t = _trainer(["remat", "fused_update", ("quantize_weights", {"rounding": rounding})], lr=1e-5)
        f = t.graph.info["quantize_weights"]["trainable"][0]
        before = t.executor.params[f].clone()
        for _ in range(3):
            t.step(x, y)
        codes[rounding] = (t.executor.params[f] != before).float().mean().item()
    assert codes["nearest"] == 0.0
    assert codes["stochastic"] > 0.001


def test_int8_sr_tracks_fp32_adamw():
    x, _ = _batch()
    fp = _trainer(["remat", "fused_update"], lr=2e-3)
    q = _trainer(QW, lr=2e-3)
    for i in range(12):
        gen = torch.Generator().manual_seed(i)
        xb = torch.randint(0, 256, x.shape, generator=gen)
        yb = torch.roll(xb, -1, 1)
        a, b = float(fp.step(xb, yb)), float(q.step(xb, yb))
    assert abs(a - b) / a < 0.03, (a, b)


def test_resume_is_bit_identical_and_loads_weights_only(tmp_path):
    passes = ["remat", "fused_update", ("lowrank", APOLLO_MINI), ("quantize_weights", {"seed": 3})]
    batches = [_batch(i) for i in range(6)]
    a = _trainer(passes)
    for b in batches[:3]:
        a.step(*b)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    rest_a = [float(a.step(*b)) for b in batches[3:]]
    b_ = _trainer(passes)
    b_.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    rest_b = [float(b_.step(*b)) for b in batches[3:]]
    assert rest_a == rest_b
    for k, v in a.executor.params.items():
        assert torch.equal(v, b_.executor.params[k]), k
    for k, v in a.executor.state.items():
        assert torch.equal(v, b_.executor.state[k]), k


def test_model_storage_released_and_export_dequantizes():
    m = _model()
    t = _trainer(QW, model=m)
    f = t.graph.info["quantize_weights"]["trainable"][0]
    p = dict(m.named_parameters())[f]
    assert p.untyped_storage().nbytes() == p.element_size()  # one element behind a zero-stride view
    x, y = _batch()
    t.step(x, y)
    e = t.export()
    w = dict(e.named_parameters())[f]
    want = wt.decode(t.executor.params[f], [t.executor.state[f"{f}::wscale"]], "int8", 128, tuple(w.shape),
                     torch.float32)
    assert torch.equal(w, want)
    out = t(x)
    assert torch.allclose(out.logits, e(x).logits)
    assert p.untyped_storage().nbytes() == p.element_size()  # released again after inference
    t.step(x[:1], y[:1])  # a smaller batch is captured from the released model and runs


@pytest.mark.parametrize("codec", ["int8", "int4", "nf4"])
def test_frozen_weights_any_codec_exact_plan(codec):
    m = _model()
    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith("model.layers.0.mlp."))
    t = _trainer(["remat", "fused_update", ("quantize_weights", {"frozen_codec": codec, "double_quant": True})],
                 model=m)
    x, y = _batch()
    t.step(x, y)
    assert set(t.graph.info["quantize_weights"]["frozen"]) == {f"model.layers.0.mlp.{k}_proj.weight"
                                                              for k in ("gate", "up", "down")}
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes


@pytest.mark.parametrize("cfg, match", [
    ({"targets": "*.nope.weight"}, "glob matching at least one parameter"),
    ({"targets": "model.layers.0.input_layernorm.weight", "group": 512}, "groups of 512"),
    ({"codec": "int4"}, "trainable weights are INT8"),
    ({"group": 100}, "power of two"),
    ({"rounding": "up"}, "'stochastic' or 'nearest'"),
])
def test_bad_config_is_a_config_error(cfg, match):
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        _trainer(["remat", "fused_update", ("quantize_weights", cfg)], model=m)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_tied_weight_is_refused():
    torch.manual_seed(0)
    m = build_llama("tiny-llama", num_hidden_layers=1, tie_word_embeddings=True)
    with pytest.raises(ConfigError, match="tied"):
        _trainer(["remat", "fused_update", ("quantize_weights", {"targets": "lm_head.weight"})], model=m)


def test_state_saved_with_other_bits_is_refused_and_changes_nothing():
    x, y = _batch()
    q8 = _trainer(QW)
    q8.step(x, y)
    fp = _trainer(["remat", "fused_update", ("quantize_weights", {"targets": "model.layers.0.mlp.*"})])
    before = copy.deepcopy(fp.state_dict())
    with pytest.raises(ConfigError, match="other bits"):
        fp.load_state_dict(q8.state_dict())
    after = fp.state_dict()
    for group in ("params", "state"):
        for k, v in before[group].items():
            assert torch.equal(v, after[group][k])
