"""Peak memory as a function of batch size and sequence length: fitted exactly, checked at held-out sizes."""

from __future__ import annotations

import pytest
import sympy
import torch

import memfit
from memfit import models


@pytest.fixture(scope="module")
def llama():
    return models.build_llama(num_hidden_layers=2)


def _tokens(b, s):
    return (torch.randint(0, 256, (b, s)), torch.randint(0, 256, (b, s)))


@pytest.mark.parametrize(("dim", "held_out"), [("batch", [(3, 32), (7, 32)]), ("seq", [(2, 40), (2, 100)])])
def test_size_model_is_exact_at_sizes_it_was_not_fitted_on(llama, dim, held_out):
    sm = memfit.size_model(llama, example_inputs=_tokens(2, 32), loss_fn=models.lm_loss, dim=dim)
    assert sm is not None and isinstance(sm.expr, sympy.Expr)
    assert sm.expr.free_symbols == {sympy.Symbol(dim, positive=True, integer=True)}
    for b, s in held_out:
        want = memfit.plan(llama, example_inputs=_tokens(b, s), loss_fn=models.lm_loss).peak_bytes
        size = b if dim == "batch" else s
        assert sm.peak_at(size) == want, (dim, size)
        assert round(float(sm.expr.subs(sympy.Symbol(dim, positive=True, integer=True), size))) == want


def test_largest_fitting_batch_is_the_boundary(llama):
    sm = memfit.size_model(llama, example_inputs=_tokens(2, 32), loss_fn=models.lm_loss, dim="batch")
    budget = sm.peak_at(5) + 1
    n = sm.largest_fitting(budget)
    assert n == 5 and sm.peak_at(n) <= budget < sm.peak_at(n + 1)
    assert sm.largest_fitting(sm.peak_at(1) - 1) == 0


def test_size_model_rejects_bad_dim(llama):
    with pytest.raises(memfit.ConfigError, match=r"size_model\(dim=\): expected 'batch' or 'seq'"):
        memfit.size_model(llama, example_inputs=_tokens(2, 32), loss_fn=models.lm_loss, dim="width")
