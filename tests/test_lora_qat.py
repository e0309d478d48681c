"""lora and qat: adapters with a hand-written backward, NF4 bases, LQ-LoRA, LSQ fake quantization, QALoRA.

Each is checked against an eager reference trained with torch.optim.AdamW from the same start: the graph's
backward must give the same trajectory. The adapters round-trip through peft's on-disk layout; exports
reproduce the training graph's outputs; resume is bit-identical; bad targets are refused.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.func import functional_call

import memfit
from memfit.errors import ConfigError
from memfit.models import build_llama, lm_loss

QV = ("model.layers.*.self_attn.q_proj.weight", "model.layers.*.self_attn.v_proj.weight")


def _batches(n: int, batch: int = 2, seq: int = 16):
    out = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        x = torch.randint(0, 256, (batch, seq), generator=gen)
        out.append((x, torch.roll(x, -1, 1)))
    return out


def _model(layers: int = 1, **kw):
    torch.manual_seed(0)
    return build_llama("tiny-llama", num_hidden_layers=layers, **kw)


def _optimize(model, passes, lr=1e-2):
    return memfit.optimize(model, example_inputs=_batches(1)[0], loss_fn=lm_loss,
                           optimizer=memfit.AdamW(lr=lr, weight_decay=0.0), passes=passes)


def test_lora_trains_as_peft_with_torch_adamw():
    peft = pytest.importorskip("peft")
    m = _model(2)
    ref = peft.get_peft_model(copy.deepcopy(m), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                lora_dropout=0.0))
    t = _optimize(m, [("lora", {"rank": 4, "alpha": 8, "targets": QV}), "remat", "fused_update"])
    named = dict(ref.named_parameters())
    with torch.no_grad():  # the same start: memfit's A (B is zero in both)
        for name in t.graph.info["lora"]["adapters"]:
            named["base_model.model." + name.replace(".weight", ".default.weight")].copy_(t.executor.params[name])
    trainable = [p for p in ref.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(t.executor.params[n].numel() for n in t.graph.trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0, foreach=False)
    for x, y in _batches(6):
        loss = lm_loss(ref(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ours = t.step(x, y)
        assert float(ours) == pytest.approx(float(loss), rel=2e-5)


@pytest.mark.parametrize("base", ["fp", "nf4"])
def test_adapters_load_in_peft_with_equal_outputs(tmp_path, base):
    peft = pytest.importorskip("peft")
    m = _model(2)
    original = copy.deepcopy(m)
    t = _optimize(m, [("lora", {"rank": 4, "base": base, "targets": QV, "dropout": 0.1}), "remat", "fused_update"])
    for x, y in _batches(3):
        t.step(x, y)
    t.save_adapters(tmp_path)
    if base != "fp":
        sd = original.state_dict()
        sd.update(t.base_weights())
        original.load_state_dict(sd)
    loaded = peft.PeftModel.from_pretrained(original, tmp_path).eval()
    x = _batches(1)[0][0]
    with torch.no_grad():
        diff = (t(x).logits - loaded(x).logits).abs().max().item()
    assert diff <= 1e-6  # inference applies the adapters beside the weight, as peft does
    with torch.no_grad():  # export() merges them: W + s·BA, equal up to float reassociation
        torch.testing.assert_close(t.export()(x).logits, t(x).logits, rtol=1e-5, atol=1e-5)


def test_qlora_plan_is_exact_and_smaller_than_lora():
    x, y = _batches(1)[0]
    peaks = {}
    for base in ("fp", "nf4"):
        t = _optimize(_model(2), [("lora", {"rank": 4, "base": base, "double_quant": base == "nf4"}), "remat",
                                  "fused_update"])
        t.step(x, y)
        assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes
        peaks[base] = t.plan.persistent["parameters"]
    assert peaks["nf4"] < 0.5 * peaks["fp"]


def test_lq_lora_starts_closer_to_the_weights_than_qlora():
    errs = {}
    for init in ("lora", "lq"):
        m = _model()
        w0 = {k: v.clone() for k, v in m.named_parameters()}
        t = _optimize(m, [("lora", {"rank": 8, "base": "nf4", "init": init, "targets": QV}), "remat", "fused_update"])
        got = t.plain_weights()
        errs[init] = sum(float((got[k] - w0[k].detach()).norm()) for k in got)
    assert errs["lq"] < 0.9 * errs["lora"]


def test_lora_resume_with_dropout_and_nf4_is_bit_identical(tmp_path):
    passes = [("lora", {"rank": 4, "base": "nf4", "dropout": 0.2, "targets": QV}), "remat", "fused_update"]
    batches = _batches(6)
    a = _optimize(_model(), passes)
    for b in batches[:3]:
        a.step(*b)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    rest_a = [float(a.step(*b)) for b in batches[3:]]
    b_ = _optimize(_model(), passes)
    b_.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [float(b_.step(*b)) for b in batches[3:]] == rest_a


@pytest.mark.parametrize("cfg, match", [
    ({"targets": "model.embed_tokens.weight"}, "nn.Linear"),
    ({"targets": "model.layers.0.input_layernorm.weight"}, "nn.Linear"),
    ({"rank": 0}, "an int >= 1"),
    ({"base": "nf3"}, "'nf4'"),
    ({"targets": "*.nope"}, "glob matching"),
])
def test_lora_bad_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        _optimize(_model(), [("lora", cfg), "remat", "fused_update"])


def test_lora_on_tied_weight_is_refused():
    with pytest.raises(ConfigError, match="tied"):
        _optimize(_model(tie_word_embeddings=True), [("lora", {"targets": "lm_head.weight"}), "remat", "fused_update"])


class _LSQ(torch.autograd.Function):
    """LSQ in eager autograd (the reference the graph's hand-written backward must match)."""

    @staticmethod
    def forward(ctx, w, s, group, qmax):
        x = w.reshape(-1, group) / s[:, None]
        ctx.save_for_backward(x)
        ctx.group, ctx.qmax = group, qmax
        return (torch.clamp(torch.floor(x + 0.5), -qmax - 1, qmax) * s[:, None]).reshape(w.shape)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        gr = g.reshape(x.shape)
        inside = (x >= -ctx.qmax - 1) & (x <= ctx.qmax)
        dw = torch.where(inside, gr, 0.0).reshape(g.shape)
        ds = (gr * torch.where(inside, torch.floor(x + 0.5) - x, x.clamp(-ctx.qmax - 1, ctx.qmax))).sum(1)
        return dw, ds / math.sqrt(ctx.group * ctx.qmax), None, None


def test_qat_trains_as_eager_lsq():
    m = _model()
    ref = copy.deepcopy(m)
    t = _optimize(m, [("qat", {"bits": 4, "group": 128}), "remat", "fused_update"], lr=1e-3)
    targets = t.graph.info["qat"]["targets"]
    params = {k: v.detach().clone().requires_grad_(True) for k, v in ref.named_parameters()}
    steps = {f: t.executor.params[f"{f}.lsq_step"].clone().requires_grad_(True) for f in targets}
    opt = torch.optim.AdamW([*params.values(), *steps.values()], lr=1e-3, weight_decay=0.0, foreach=False)
    for x, y in _batches(4):
        weights = {k: (_LSQ.apply(v, steps[k], 128, 7) if k in steps else v) for k, v in params.items()}
        loss = lm_loss(functional_call(ref, weights, (x,)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert float(t.step(x, y)) == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16,) * 3,
                                    (torch.bfloat16, torch.float32, torch.float32)], ids=["fp32", "bf16", "bf16-w"])
def test_lsq_bodies_match_eager_lsq_and_hold_their_declared_workspace(dtypes):
    from memfit import ops
    from memfit.measure import measure_peak

    wd, gd, sd = dtypes
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(48, 64, generator=gen) * 3).to(wd)  # some values outside the clipping range
    g = torch.randn(48, 64, generator=gen).to(gd)
    s = (torch.rand(96, generator=gen) + 0.05).to(sd)
    w.view(-1)[:64] = torch.arange(64, dtype=wd) * 0.5 - 16  # ties (x + 0.5 exact) and both bounds
    s[0] = 1.0
    ref_w, ref_s = w.float().clone().requires_grad_(True), s.float().clone().requires_grad_(True)
    out = _LSQ.apply(ref_w, ref_s, 32, 7)
    out.backward(g.float())
    assert torch.equal(ops.run_lsq_quant(w, s, 32, 7), out.detach().to(wd))
    dw, ds = ops.run_lsq_quant_backward(g, w, s, 32, 7)
    assert torch.equal(dw, ref_w.grad.to(wd))
    torch.testing.assert_close(ds, ref_s.grad.to(sd), rtol=1e-6 if sd == torch.float32 else 8e-3, atol=0)
    held = sum(t.numel() * t.element_size() for t in (w, g, s))
    for target, fn, args, out_bytes in (
            (torch.ops.memfit.lsq_quant.default, ops.run_lsq_quant, (w, s, 32, 7), w.numel() * w.element_size()),
            (torch.ops.memfit.lsq_quant_backward.default, ops.run_lsq_quant_backward, (g, w, s, 32, 7),
             w.numel() * w.element_size() + s.numel() * s.element_size())):
        m = measure_peak(fn, *args, device="cpu", existing=iter([w, g, s]))
        assert m.peak_bytes - held - out_bytes == ops.lsq_workspace(
            target, w.numel(), s.numel(), w.element_size(), g.element_size(), s.element_size())


def test_qat_plan_is_exact_with_the_lsq_temporaries_seen():
    t = _optimize(_model(), [("qat", {"bits": 4, "group": 128}), "remat", "fused_update"], lr=1e-3)
    x, y = _batches(1)[0]
    lsq = [n for n in t.graph.graph.nodes if n.target in (torch.ops.memfit.lsq_quant.default,
                                                          torch.ops.memfit.lsq_quant_backward.default)]
    from memfit.ops import workspace_bytes

    backward = [n for n in lsq if n.target is torch.ops.memfit.lsq_quant_backward.default]
    assert backward and len(backward) < len(lsq)
    # fp32 weights: the forward rounds in its output's buffer (nothing more); the backward's peak is x, its
    # mask and the step factor, 9 bytes an element, beyond its outputs (dw, 4 an element; ds, 4 a group)
    for n in lsq:
        w = n.args[1 if n in backward else 0].meta["val"]
        groups = n.args[2 if n in backward else 1].meta["val"].numel()
        assert workspace_bytes(n, False) == (5 * w.numel() - 4 * groups if n in backward else 0)
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes


def test_qat_export_matches_the_training_graph_and_real_codes():
    t = _optimize(_model(), [("qat", {"bits": 4, "group": 128}), "remat", "fused_update"], lr=1e-3)
    for x, y in _batches(2):
        t.step(x, y)
    x, y = _batches(3)[2]
    exported = t.export()
    with torch.no_grad():
        want = float(lm_loss(exported(x), y))
    assert float(t.step(x, y)) == pytest.approx(want, rel=1e-6)  # the step's loss is before its update
    t2 = _optimize(_model(), [("qat", {"bits": 4, "group": 128}), "remat", "fused_update"], lr=1e-3)
    q = t2.export_quantized()
    e = dict(t2.export().named_parameters())
    for f, rec in q.items():
        assert rec["codec"] == "int4" and rec["codes"].dtype == torch.int8
        assert int(rec["codes"].min()) >= -8 and int(rec["codes"].max()) <= 7
        w = (rec["codes"].float().reshape(-1, rec["group"]) * rec["scales"][:, None]).reshape(e[f].shape)
        assert torch.equal(w, e[f].detach())


def test_qalora_trains_only_adapters_and_steps():
    t = _optimize(_model(), [("qat", {"bits": 4, "lora_rank": 4, "freeze_rest": True}), "remat", "fused_update"])
    assert all(n.endswith(("lora_A.weight", "lora_B.weight", ".lsq_step")) for n in t.graph.trainable)
    losses = [float(t.step(x, y)) for x, y in _batches(6)]
    assert losses[-1] < losses[0]
    x, y = _batches(1)[0]
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes


def test_qat_bad_config():
    with pytest.raises(ConfigError, match="2, 3, 4 or 8"):
        _optimize(_model(), [("qat", {"bits": 5}), "remat", "fused_update"])
    with pytest.raises(ConfigError, match="groups of 512"):
        _optimize(_model(), [("qat", {"group": 512, "targets": "model.layers.0.input_layernorm.weight"}), "remat",
                             "fused_update"])
