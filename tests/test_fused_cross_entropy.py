"""fused_cross_entropy: the head matmul + log-softmax + NLL (and their backward) found in the captured step and
replaced by one chunked op: the same training, an exact plan with a lower peak, the logits never whole;
unsupported heads left unfused with the reason."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memfit
from memfit.errors import ConfigError
from memfit.models import build_gpt2_small, build_llama, lm_loss

PASSES = ["fused_cross_entropy", "remat", "fused_update"]
BASE = ["remat", "fused_update"]


def _batch(vocab, b=4, s=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (b, s), generator=gen)
    return x, torch.roll(x, -1, 1)


def _run(model, batches, loss_fn, passes, lr=0.5, **kw):
    """SGD, so a weight differs from the unfused run's by lr times the gradients' difference (Adam would
    normalise a near-zero gradient's rounding into a whole step)."""
    t = memfit.optimize(model, example_inputs=batches[0], loss_fn=loss_fn, optimizer=memfit.SGD(lr=lr),
                        passes=passes, **kw)
    return t, [float(t.step(*b)) for b in batches]


def _smooth_loss(out, t):
    return F.cross_entropy(out.logits.flatten(0, 1).float(), t.flatten(), label_smoothing=0.1, ignore_index=3)


def _sum_half_loss(out, t):  # a sum reduction, scaled after the head: the loss's gradient is not 1
    return 0.5 * F.cross_entropy(out.logits.flatten(0, 1).float(), t.flatten(), reduction="sum") / t.numel()


@pytest.mark.parametrize("loss_fn", [lm_loss, _smooth_loss, _sum_half_loss], ids=["lm_loss", "smooth", "sum-scaled"])
def test_llama_trains_as_unfused_with_a_lower_exact_peak(loss_fn):
    model = build_llama("tiny-llama", num_hidden_layers=1, vocab_size=2048)
    batches = [_batch(2048, seed=i) for i in range(3)]
    ref, want = _run(copy.deepcopy(model), batches, loss_fn, BASE)
    t, got = _run(copy.deepcopy(model), batches, loss_fn, PASSES)
    assert got == pytest.approx(want, rel=1e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(t.executor.params[f], p, rtol=1e-5, atol=1e-6)
    info = t.graph.info["fused_cross_entropy"]
    assert len(info["fused"]) == 1 and not info["skipped"]
    assert info["fused"][0]["scaled"] == (loss_fn is _sum_half_loss)
    x, y = batches[0]
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes
    # more tokens than hidden units: the logits (and their copies) outweigh the head's gradient the op makes
    # in the forward; the head's update follows it there
    assert t.plan.peak_bytes < ref.plan.peak_bytes - info["fused"][0]["logits_bytes"]
    nodes = list(t.graph.graph.nodes)
    op = next(i for i, v in enumerate(nodes) if v.target is torch.ops.memfit.linear_cross_entropy.default)
    between = nodes[op:nodes.index(t.graph.updates["lm_head.weight"])]
    assert not [v for v in between if v.target is torch.ops.aten.mm.default]  # before any other backward matmul
    # no (tokens, vocabulary) value is left in the step
    n = x.numel()
    assert not [v for v in t.graph.graph.nodes if v.op == "call_function"
                and isinstance(v.meta.get("val"), torch.Tensor) and v.meta["val"].numel() >= n * 2048]


def test_hf_gpt2_own_loss_with_tied_head_and_ignored_labels():
    model = build_gpt2_small(n_layer=1, vocab=1000)
    x, _ = _batch(1000, b=2, s=24)
    labels = x.clone()
    labels[:, :5] = -100
    batch = {"input_ids": x, "labels": labels}
    ref = memfit.optimize(copy.deepcopy(model), example_inputs=(batch,), passes=BASE, optimizer=memfit.SGD(lr=0.5))
    t = memfit.optimize(copy.deepcopy(model), example_inputs=(batch,), passes=PASSES, optimizer=memfit.SGD(lr=0.5))
    assert len(t.graph.info["fused_cross_entropy"]["fused"]) == 1
    for _ in range(3):
        assert float(t.step(batch)) == pytest.approx(float(ref.step(batch)), rel=1e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(t.executor.params[f], p, rtol=1e-5, atol=1e-6)
    assert t.measure_step(batch).peak_bytes == t.plan.peak_bytes


class _BiasHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, x):
        return self.head(self.emb(x))


def test_a_head_with_a_bias_is_fused_and_trains_as_unfused():
    x, y = _batch(50, b=2, s=40)
    batches = [(x, y), _batch(50, b=2, s=40, seed=1)]
    model = _BiasHead()
    ref, want = _run(copy.deepcopy(model), batches, lm_loss, BASE)
    t, got = _run(copy.deepcopy(model), batches, lm_loss, [("fused_cross_entropy", {"chunk": 16}), *BASE])
    site = t.graph.info["fused_cross_entropy"]["fused"][0]
    assert site["bias"] and site["chunk"] == 16
    assert got == pytest.approx(want, rel=1e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(t.executor.params[f], p, rtol=1e-5, atol=1e-6)
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes


def _per_token_loss(out, t):
    return F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="none").mean()


def test_an_unsupported_loss_is_left_unfused_and_logged(caplog):
    x, y = _batch(50, b=2, s=8)
    with caplog.at_level(logging.INFO, logger="memfit.passes"):
        t = memfit.optimize(_BiasHead(), example_inputs=(x, y), loss_fn=_per_token_loss, passes=PASSES)
    info = t.graph.info["fused_cross_entropy"]
    assert not info["fused"] and "reduction='none'" in info["skipped"][0]
    assert "left unfused" in caplog.text and "reduction='none'" in caplog.text
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes


def test_bad_chunk_is_a_config_error():
    with pytest.raises(ConfigError, match="a number of rows per chunk"):
        memfit.optimize(_BiasHead(), example_inputs=_batch(50, b=2, s=8), loss_fn=lm_loss,
                        passes=[("fused_cross_entropy", {"chunk": -1}), "remat", "fused_update"])


def test_composes_with_a_projected_head():
    """GaLore on the head itself: its update projects the fused op's weight gradient."""
    model = build_llama("tiny-llama", num_hidden_layers=1)
    batches = [_batch(256, seed=i) for i in range(4)]
    lowrank = ("lowrank", {"rank": 8, "targets": "lm_head.weight", "gap": 2})
    runs = [memfit.optimize(copy.deepcopy(model), example_inputs=batches[0], loss_fn=lm_loss, passes=passes,
                            optimizer=memfit.AdamW(lr=1e-2)) for passes in ([*BASE, lowrank], [*PASSES, lowrank])]
    want, got = ([float(r.step(*b)) for b in batches] for r in runs)
    t = runs[1]
    assert len(t.graph.info["fused_cross_entropy"]["fused"]) == 1
    assert t.graph.updates["lm_head.weight"].target is torch.ops.memfit.lowrank_update.default
    assert got == pytest.approx(want, rel=1e-5)
    assert t.measure_step(*batches[0]).peak_bytes == t.plan.peak_bytes


class _WideHead(nn.Module):
    """A hidden size of 8 under 8192 classes: the fused loss's chunk, not the hidden states, sets the peak."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(8192, 8)
        self.head = nn.Linear(8, 8192, bias=False)

    def forward(self, x):
        return self.head(self.emb(x))


def test_the_planner_shrinks_the_chunk_when_the_fused_loss_sets_the_peak():
    torch.manual_seed(0)
    x, y = _batch(8192, b=2, s=64)
    free = memfit.optimize(_WideHead(), example_inputs=(x, y), loss_fn=lm_loss)
    assert free.plan.peak_node.startswith("linear_cross_entropy")
    chunk = free.graph.info["fused_cross_entropy"]["fused"][0]["chunk"]
    budget = free.plan.peak_bytes - 256 * 1024
    torch.manual_seed(0)
    t = memfit.optimize(_WideHead(), example_inputs=(x, y), loss_fn=lm_loss, budget=budget, levers="lossless")
    got = t.graph.info["fused_cross_entropy"]["fused"][0]["chunk"]
    assert got < chunk and t.plan.peak_bytes <= budget
    assert float(t.step(x, y)) == pytest.approx(float(free.step(x, y)), rel=1e-6)  # the same numbers
    assert t.measure_step(x, y).peak_bytes == t.plan.peak_bytes
