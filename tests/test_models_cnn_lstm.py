"""The depthwise-separable CNN and the LSTM language model: shapes, and memfit.optimize's AdamW steps
matching torch.optim.AdamW on an eager copy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models


def test_mobilenet_tiny_shapes_and_layers():
    model = models.build_mobilenet_tiny()
    out = model(torch.randn(8, 1, 8, 8))
    assert out.shape == (8, 10) and out.dtype == torch.float32
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    pointwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert len(pointwise) == len(depthwise)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert models.build_mobilenet_tiny(classes=4, in_channels=3, width=8)(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_mobilenet_tiny_on_sklearn_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images[:16], dtype=torch.float32).unsqueeze(1) / 16.0  # NCHW, 8x8, one channel
    assert models.build_mobilenet_tiny()(x).shape == (16, 10)


def test_lstm_lm_shapes_and_loss():
    model = models.build_lstm_lm()
    assert isinstance(model.lstm, torch.nn.LSTM) and model.lstm.batch_first and model.lstm.num_layers == 2
    x = torch.randint(0, 256, (4, 16))
    logits = model(x)
    assert logits.shape == (4, 16, 256)
    assert models.lm_loss(logits, torch.randint(0, 256, (4, 16))).shape == ()
    small = models.build_lstm_lm(vocab=32, embed=8, hidden=16, layers=1)
    assert small(torch.randint(0, 32, (2, 5))).shape == (2, 5, 32)


def _case(name):
    g = torch.Generator().manual_seed(3)
    if name == "mobilenet":
        x = torch.randint(0, 17, (8, 1, 8, 8), generator=g).float() / 16.0  # digits-like: 0..16 scaled to [0, 1]
        return models.build_mobilenet_tiny(), (x, torch.randint(0, 10, (8,), generator=g)), F.cross_entropy
    x = torch.randint(0, 256, (4, 16), generator=g)
    return models.build_lstm_lm(), (x, torch.randint(0, 256, (4, 16), generator=g)), models.lm_loss


@pytest.mark.parametrize("name", ["mobilenet", "lstm"])
def test_optimize_adamw_matches_torch_adamw(name):
    model, (x, y), loss_fn = _case(name)
    eager = copy.deepcopy(model)
    opt = memfit.AdamW(lr=1e-3)
    trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=loss_fn, optimizer=opt)
    torch_opt = torch.optim.AdamW(eager.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                  weight_decay=opt.weight_decay, foreach=False)
    for step in range(3):
        loss = float(trainer.step(x, y))
        torch_opt.zero_grad(set_to_none=True)
        eloss = loss_fn(eager(x), y)
        eloss.backward()
        torch_opt.step()
        rel = abs(loss - eloss.item()) / max(abs(eloss.item()), 1e-12)
        assert rel <= 1e-5, f"{name} step {step}: memfit loss {loss} vs torch {eloss.item()} (rel {rel:.2e})"
