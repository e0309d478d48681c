"""The compile door tells the truth: a model Dynamo runs eagerly or splits at graph breaks warns
(MemfitWarning) with the reason and the counts; a model memfit compiles whole stays silent."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import memfit
from memfit import models
from memfit.frontends import dynamo
from memfit.frontends.dynamo import MemfitWarning


@pytest.fixture(autouse=True)
def fresh_dynamo():
    allow_rnn = torch._dynamo.config.allow_rnn
    torch._dynamo.reset()
    yield
    torch._dynamo.config.allow_rnn = allow_rnn
    torch._dynamo.reset()


class ItemBreak(nn.Module):
    """A deliberate graph break: ``.item()`` (Dynamo does not capture scalar outputs by default)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        scale = h.abs().mean().item()
        return self.b(h) * scale


def _memfit_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, MemfitWarning)]


def test_lstm_runs_eagerly_and_says_why():
    model = models.build_lstm_lm(hidden=32, embed=16)
    x = torch.randint(0, 256, (2, 8))
    compiled = torch.compile(model, backend=memfit.backend())
    with pytest.warns(MemfitWarning, match=r"ran forward \(models\.py:\d+\) eagerly.*0 graph\(s\) compiled.*"
                                           r"RNN, GRU, or LSTM.*allow_rnn = True"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))  # it still runs, eagerly
    rep = dynamo.report(compiled, x, warn=False)
    assert (rep.graphs, rep.memfit_graphs, rep.eager_frames) == (0, 0, 1) and not rep.whole
    assert any("RNN, GRU, or LSTM" in r for r in rep.eager_reasons)


def test_lstm_string_backend_warns_in_a_fresh_process(tmp_path):
    """The plain user flow: backend="memfit" by name, nothing else called, in a process of its own (so the
    entry point is looked up for the first time, as for a user)."""
    code = textwrap.dedent("""
        import warnings
        import torch
        from memfit import models
        from memfit.frontends.dynamo import MemfitWarning
        model = models.build_lstm_lm(hidden=32, embed=16)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.compile(model, backend="memfit")(torch.randint(0, 256, (2, 8)))
        print("\\n".join(str(w.message) for w in rec if issubclass(w.category, MemfitWarning)))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eagerly" in done.stdout and "RNN, GRU, or LSTM" in done.stdout and "allow_rnn" in done.stdout, done.stdout


def test_allow_rnn_lets_memfit_compile_the_lstm():
    torch._dynamo.config.allow_rnn = True
    model = models.build_lstm_lm(hidden=32, embed=16)
    eager = copy.deepcopy(model)
    x, y = torch.randint(0, 256, (2, 8)), torch.randint(0, 256, (2, 8))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = models.lm_loss(torch.compile(model, backend=memfit.backend())(x), y)
        loss.backward()
    assert _memfit_warnings(record) == []
    eloss = models.lm_loss(eager(x), y)
    eloss.backward()
    torch.testing.assert_close(loss, eloss, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


def test_graph_break_warns_with_the_count():
    model = ItemBreak()
    x = torch.randn(8, 16)
    compiled = torch.compile(model, backend=memfit.backend())
    with pytest.warns(MemfitWarning, match=r"split forward \(test_dynamo_report\.py:\d+\) at 1 graph break\(s\): "
                                           r"memfit compiled 1 graph\(s\).*item\(\).*capture_scalar_outputs"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    with pytest.warns(MemfitWarning, match=r"reached memfit as 2 graph\(s\) with 1 graph break\(s\)"):
        rep = dynamo.report(compiled, x)
    assert (rep.graphs, rep.memfit_graphs, rep.graph_breaks, rep.eager_frames) == (2, 2, 1, 0)
    assert len(rep.break_reasons) == 1 and "item()" in rep.break_reasons[0]


@pytest.mark.parametrize("how", ["name", "object"])
def test_clean_mlp_is_silent(how):
    model = models.build_mlp()
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="memfit" if how == "name" else memfit.backend())
        torch.nn.functional.cross_entropy(compiled(x), y).backward()
        compiled(x)
        rep = dynamo.report(compiled, x)
    assert _memfit_warnings(record) == []
    assert rep.whole and (rep.graphs, rep.memfit_graphs, rep.graph_breaks, rep.eager_frames) == (1, 1, 0, 0)


def test_backend_object_counts_its_graphs():
    compiler = memfit.backend()
    assert isinstance(compiler, dynamo.MemfitCompiler) and compiler.graphs == 0
    with pytest.warns(MemfitWarning):
        torch.compile(ItemBreak(), backend=compiler)(torch.randn(4, 16))
    assert compiler.graphs == 2 and len(compiler.break_reasons) == 1


def test_report_names_another_backend_and_reads_compiled_functions():
    compiled = torch.compile(models.build_mlp(), backend="eager")
    with pytest.warns(MemfitWarning, match=r"backend eager, not memfit's"):
        rep = dynamo.report(compiled, torch.randn(4, 32))
    assert rep.memfit_graphs == 0 and rep.graphs == 1 and rep.backend == "eager"
    weight = torch.randn(32, 8, requires_grad=True)

    def fn(x):
        return torch.tanh(x @ weight).sum()

    rep = dynamo.report(torch.compile(fn, backend=memfit.backend()), torch.randn(4, 32))
    assert rep.whole and rep.backend == "memfit" and rep.memfit_graphs == 1
