"""fuse: the step's pointwise chains as one generated kernel each; fused and unfused steps train alike (the
tiny LLaMA, GPT-2, the digits CNN), the plan stays exact, and the generated kernels run a whole step under
the Triton interpreter as the CPU evaluation does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit.errors import ConfigError
from memfit.models import build_gpt2_small, build_llama, build_mobilenet_tiny, lm_loss

BASE = ["remat", "fused_update"]


def _case(name):
    gen = torch.Generator().manual_seed(0)
    if name == "cnn":
        return build_mobilenet_tiny(), (torch.randn(16, 1, 8, 8, generator=gen),
                                        torch.randint(0, 10, (16,), generator=gen)), F.cross_entropy
    x = torch.randint(0, 256, (2, 32), generator=gen)
    model = build_llama("tiny-llama", num_hidden_layers=1) if name == "llama" else build_gpt2_small(n_layer=1)
    return model, (x, torch.roll(x, -1, 1)), lm_loss


@pytest.mark.parametrize("name", ["llama", "gpt2", "cnn"])
def test_fused_step_trains_as_unfused_and_plans_exactly(name):
    model, batch, loss_fn = _case(name)
    # SGD: a weight then differs by lr times the gradients' difference (Adam would blow a near-zero
    # gradient's last-ulp difference up to a whole step)
    ref = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, passes=BASE,
                          optimizer=memfit.SGD(lr=0.1))
    t = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, "fuse"],
                        optimizer=memfit.SGD(lr=0.1))
    info = t.graph.info["fuse"]
    assert info["groups"] >= 1 and info["kernels"] <= info["groups"] and 0 < info["share"] <= 1
    assert info["bytes_not_materialised"] > 0
    fused = [n for n in t.graph.graph.nodes if n.target is torch.ops.memfit.fused.default]
    assert len(fused) == info["groups"] and sum(len(n.meta["fused"]) for n in fused) == info["nodes_fused"]
    for _ in range(3):
        assert float(t.step(*batch)) == pytest.approx(float(ref.step(*batch)), rel=1e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(t.executor.params[f], p, rtol=1e-5, atol=1e-6)
    assert t.measure_step(*batch).peak_bytes == t.plan.peak_bytes


def test_generated_kernels_run_a_whole_step_like_the_cpu_evaluation(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, batch, loss_fn = _case("llama")
    opt = memfit.SGD(lr=0.1)
    ref = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, "fuse"],
                          optimizer=opt)
    monkeypatch.setenv("MEMFIT_TRITON_INTERPRET", "1")
    tri = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, "fuse"],
                          optimizer=opt)
    fused = [n for n, k in tri.lowered.kernels.items() if n.startswith("fused")]
    assert fused and all(tri.lowered.kernels[n] == "triton" for n in fused)
    for _ in range(2):
        torch.testing.assert_close(tri.step(*batch), ref.step(*batch), rtol=2e-6, atol=2e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(tri.executor.params[f], p, rtol=1e-5, atol=1e-6)


def test_groups_never_compute_a_value_twice_nor_cross_the_loss():
    model, batch, loss_fn = _case("llama")
    t = memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, "fuse"])
    names = [m for n in t.graph.graph.nodes if n.target is torch.ops.memfit.fused.default for m in n.meta["fused"]]
    assert len(names) == len(set(names))  # each original node in one group at most
    forward = t.graph.forward_nodes()
    for n in t.graph.graph.nodes:
        if n.target is torch.ops.memfit.fused.default and n in forward:
            assert all(i in forward or i.op == "placeholder" for i in n.all_input_nodes)


def test_bad_min_ops_is_a_config_error():
    model, batch, loss_fn = _case("cnn")
    with pytest.raises(ConfigError, match="ops per fused kernel"):
        memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, ("fuse", {"min_ops": 1})])


def test_fuse_flag_of_optimize_and_plan_is_the_pass():
    model, batch, loss_fn = _case("gpt2")
    t = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, fuse=True)
    assert "fuse" in t.graph.applied and t.graph.applied[-2:] == ["fuse", "sink"]
    p = memfit.plan(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, fuse=True)
    assert p.peak_bytes == t.plan.peak_bytes and p.fusion["fuse"] == t.graph.info["fuse"]
    assert any("fused pointwise" in line for line in str(p).splitlines())


def test_what_stays_on_aten_is_logged_with_the_reason(caplog):
    import logging

    model, batch, loss_fn = _case("llama")
    with caplog.at_level(logging.INFO, logger="memfit.passes"):
        t = memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, "fuse"])
    left = t.graph.info["fuse"]["left_to_aten"]
    assert any(k.startswith("cat.default: not pointwise") for k in left)  # rotary embeddings' concatenation
    assert sum(left.values()) + t.graph.info["fuse"]["nodes_fused"] == t.graph.info["fuse"]["compute_nodes"]
    assert "left to ATen: " in caplog.text and "cat.default" in caplog.text
    # RMSNorm's mean of squares and the norm weights' gradient sums end fused groups
    programs = [n.args[1] for n in t.graph.graph.nodes if n.target is torch.ops.memfit.fused.default]
    assert any('"mean.dim"' in p for p in programs) and any('"sum.dim_IntList"' in p for p in programs)
