"""MEMFIT_TRITON_INTERPRET=1 makes the runtime lower memfit ops to the Triton launchers (run by the
interpreter on CPU); a whole Trainer then matches the reference path step for step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models


@pytest.mark.parametrize("optimizer", [memfit.AdamW(lr=1e-2), memfit.SGD(lr=1e-2, momentum=0.9, nesterov=True)])
def test_trainer_on_triton_kernels_matches_reference(monkeypatch, optimizer):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    ref_model = models.build_mlp()
    tri_model = copy.deepcopy(ref_model)
    ref = memfit.optimize(ref_model, example_inputs=(x, y), loss_fn=F.cross_entropy, optimizer=optimizer)
    monkeypatch.setenv("MEMFIT_TRITON_INTERPRET", "1")
    tri = memfit.optimize(tri_model, example_inputs=(x, y), loss_fn=F.cross_entropy, optimizer=optimizer)
    assert set(tri.lowered.kernels.values()) == {"triton"}
    assert set(ref.lowered.kernels.values()) == {"reference"}
    for _ in range(5):
        torch.testing.assert_close(tri.step(x, y), ref.step(x, y), rtol=1e-6, atol=1e-6)
    for a, b in zip(tri_model.parameters(), ref_model.parameters(), strict=True):
        # fp32: the kernel's IEEE sqrt may differ from torch's CPU sqrt by one ulp (tests/test_kernel_adamw.py)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
