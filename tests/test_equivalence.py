"""memfit's whole-step Trainer vs eager PyTorch: same init, same batches, 20 steps, per-step match."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models

STEPS = 20


def _cases():
    def llama():
        m = models.build_llama("tiny-llama")
        return m, models.lm_loss, lambda g: (torch.randint(0, 256, (2, 64), generator=g),
                                             torch.randint(0, 256, (2, 64), generator=g))

    def gpt2():
        m = models.build_gpt2_small()
        return m, models.lm_loss, lambda g: (torch.randint(0, 256, (2, 64), generator=g),
                                             torch.randint(0, 256, (2, 64), generator=g))

    def mlp():
        return models.build_mlp(), F.cross_entropy, lambda g: (torch.randn(16, 32, generator=g),
                                                              torch.randint(0, 10, (16,), generator=g))

    def cnn():
        return models.build_cnn(), F.cross_entropy, lambda g: (torch.randn(8, 3, 16, 16, generator=g),
                                                              torch.randint(0, 10, (8,), generator=g))

    return {"llama": llama, "gpt2": gpt2, "mlp": mlp, "cnn": cnn}


CASES = _cases()


def _eager_opt(kind, params):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1, foreach=False)
    return torch.optim.SGD(params, lr=3e-2, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)


def _memfit_opt(kind):
    if kind == "adamw":
        return memfit.AdamW(lr=3e-3, weight_decay=0.1)
    return memfit.SGD(lr=3e-2, momentum=0.9, nesterov=True, weight_decay=1e-3)


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("case", list(CASES))
def test_trainer_matches_eager(case, opt):
    model, loss_fn, make_batch = CASES[case]()
    eager = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(gen) for _ in range(STEPS)]
    trainer = memfit.optimize(model, example_inputs=batches[0], loss_fn=loss_fn, optimizer=_memfit_opt(opt))
    assert trainer.graph.updates, "fused_update did not fire"
    eopt = _eager_opt(opt, eager.parameters())
    for i, batch in enumerate(batches):
        loss = trainer.step(*batch)
        eopt.zero_grad(set_to_none=True)
        eloss = loss_fn(eager(*batch[:-1]), batch[-1])
        eloss.backward()
        eopt.step()
        torch.testing.assert_close(loss, eloss.detach(), rtol=1e-4, atol=1e-6, msg=f"{case}/{opt} step {i}")
    # Weights by relative L2 error. Adam divides by sqrt(v) + eps, so where a gradient is ~1e-9 (eps scale)
    # last-ulp differences between AOT's decomposed matmuls and eager's become visible weight differences
    # (measured on tiny-llama: 3e-5 after 1 step, 2e-3 after 20; GPT-2, the MLP and the CNN stay bitwise
    # equal). SGD has no such amplification and is held to 1e-4.
    tol = 5e-3 if opt == "adamw" else 1e-4
    for (name, a), b in zip(model.state_dict().items(), eager.state_dict().values(), strict=True):
        if a.is_floating_point():
            rel = (a - b).norm() / b.norm().clamp_min(1e-12)
            assert rel < tol, f"{case}/{opt}: {name} relative L2 error {rel:.2e} after {STEPS} steps"
        else:
            assert torch.equal(a, b), f"{case}/{opt}: {name}"
