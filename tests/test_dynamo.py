"""The torch.compile door: backend="memfit" inside an ordinary loop gives eager's gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models
from memfit.frontends import dynamo


def _case(name):
    g = torch.Generator().manual_seed(2)
    if name == "mlp":
        return models.build_mlp(), (torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)), \
            F.cross_entropy
    if name == "cnn":
        return models.build_cnn(), (torch.randn(8, 3, 16, 16, generator=g),
                                    torch.randint(0, 10, (8,), generator=g)), F.cross_entropy
    lm = (torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g))
    if name == "llama":
        return models.build_llama(), lm, models.lm_loss
    return models.build_gpt2_small(), lm, models.lm_loss


@pytest.mark.parametrize("name", ["mlp", "cnn", "llama", "gpt2"])
def test_compile_backend_gradients_match_eager(name):
    torch._dynamo.reset()
    model, (x, y), loss_fn = _case(name)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="memfit")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    eopt = torch.optim.SGD(eager.parameters(), lr=1e-2)
    for step in range(3):  # an ordinary loop: backward, step, zero_grad
        loss = loss_fn(compiled(x), y)
        loss.backward()
        eloss = loss_fn(eager(x), y)
        eloss.backward()
        torch.testing.assert_close(loss.detach(), eloss.detach(), rtol=1e-5, atol=1e-6)
        for (pname, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=f"{name}: grad of {pname}")
        opt.step()
        eopt.step()
        opt.zero_grad(set_to_none=True)
        eopt.zero_grad(set_to_none=True)
        if step == 0:
            stats = dict(dynamo.LAST_STATS)
            assert stats["joint_ops"] > 0, "memfit's partition hook never saw the joint graph"
            assert stats["passes"] == ["remat"], stats
            assert set(stats["params"]) == {n for n, _ in model.named_parameters()}
            if name in ("llama", "gpt2", "mlp"):  # remat fires and frees saved bytes; the CNN has nothing free
                assert stats["saved_bytes_after"] < stats["saved_bytes_before"], stats
    for (bname, b), c in zip(model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=f"{name}: buffer {bname}")


def test_backend_object_and_entry_point():
    torch._dynamo.reset()
    assert "memfit" in torch._dynamo.list_backends(), "entry point torch_dynamo_backends:memfit not installed"
    model, (x, _), _ = _case("mlp")
    compiled = torch.compile(copy.deepcopy(model), backend=memfit.backend())
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_backend_refuses_what_it_cannot_honour():
    with pytest.raises(memfit.ConfigError, match=r"memfit\.backend: expected no budget"):
        memfit.backend(budget="8GB")
    with pytest.raises(memfit.ConfigError, match=r"passes that keep the joint graph's outputs.*fused_update"):
        memfit.backend(passes=["fused_update"])


def test_backend_without_passes_uses_min_cut_and_still_matches():
    torch._dynamo.reset()
    model, (x, y), loss_fn = _case("mlp")
    eager = copy.deepcopy(model)
    loss_fn(torch.compile(model, backend=memfit.backend(passes=[]))(x), y).backward()
    loss_fn(eager(x), y).backward()
    assert "passes" not in dynamo.LAST_STATS
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_fqn_from_dynamo_source():
    assert dynamo.fqn_from_source("L['self']._modules['model']._modules['0']._parameters['weight']") == "model.0.weight"
    assert dynamo.fqn_from_source("L['args'][0]") is None
