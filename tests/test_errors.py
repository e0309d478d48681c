"""Every documented error: raised as the right MemfitError, in the house shape
``"<where>: expected <what>, got <actual>; <what to do>"``, and (where state exists) changing nothing."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import memfit
from memfit import models
from memfit.api import device_memory_bytes
from memfit.frontends.export import capture
from memfit.passes.base import Pipeline, make_pass
from memfit.passes.fused_update import FusedUpdate
from memfit.runtime.lower import lower

HOUSE_SHAPE = re.compile(r".+: expected .+, got .+; .+", re.DOTALL)


def _raises(exc: type[Exception], match: str):
    """pytest.raises that also checks the message's house shape."""
    return _ShapeChecked(pytest.raises(exc, match=match))


class _ShapeChecked:
    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        self.info = self.ctx.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self.ctx.__exit__(*exc)
        msg = str(self.info.value)
        assert HOUSE_SHAPE.fullmatch(msg), f"not '<where>: expected <what>, got <actual>; <todo>': {msg!r}"
        return suppressed


def _mlp_batch(n: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


# ---- the model gives no loss --------------------------------------------------------------------------


def test_hf_model_without_labels_and_no_loss_fn():
    model = models.build_llama("tiny-llama", num_hidden_layers=1)  # one layer: the error is about the output
    tokens = torch.randint(0, 256, (2, 32))
    with _raises(memfit.ConfigError, match=r"scalar loss.*got CausalLMOutputWithPast with keys \['logits'.*loss_fn"):
        memfit.optimize(model, example_inputs=(tokens,))


def test_model_returning_logits_without_loss_fn():
    x, _ = _mlp_batch()
    with _raises(memfit.ConfigError, match=r"scalar loss.*got a tensor of shape \(8, 10\); pass loss_fn="):
        memfit.optimize(models.build_mlp(), example_inputs=(x,))


def test_loss_fn_returning_a_non_scalar():
    with _raises(memfit.ConfigError, match=r"loss_fn: expected a 0-dim tensor, got a tensor of shape \(8,\); reduce"):
        memfit.optimize(models.build_mlp(), example_inputs=_mlp_batch(),
                        loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))


def test_model_with_nothing_to_train():
    model = models.build_mlp().requires_grad_(False)
    with _raises(memfit.ConfigError, match="at least one parameter with requires_grad=True, got none"):
        memfit.optimize(model, example_inputs=_mlp_batch(), loss_fn=F.cross_entropy)


# ---- an op the runtime cannot lower ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def noimpl_op():
    """``memfit_test::noimpl``: a fake (Meta) kernel for tracing, and no CPU kernel."""
    lib = torch.library.Library("memfit_test", "DEF")
    lib.define("noimpl(Tensor x) -> Tensor")

    def fake(x):
        return torch.empty_like(x)

    lib.impl("noimpl", fake, "Meta")
    torch.library.register_fake("memfit_test::noimpl", fake, lib=lib)
    yield torch.ops.memfit_test.noimpl.default
    lib._destroy()


class _UsesNoImpl(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x).sum() + torch.ops.memfit_test.noimpl(x).sum()  # the line the error must name


class _UsesNoImplFunctional(nn.Module):
    """The same step with the weight as an input, so make_fx can trace it on fake tensors only."""

    def forward(self, x, w):
        return (x @ w).sum() + torch.ops.memfit_test.noimpl(x).sum()  # the line the error must name


def test_unlowerable_op_names_the_op_the_node_and_the_source_line(noimpl_op):
    # a graph made directly with make_fx (stack traces recorded) names the line through lower() alone
    gm = make_fx(_UsesNoImplFunctional(), tracing_mode="fake", record_stack_traces=True)(torch.randn(2, 4),
                                                                                          torch.randn(4, 4))
    node = next(n for n in gm.graph.nodes if n.target is noimpl_op)
    with _raises(memfit.UnsupportedGraph, match="memfit_test::noimpl") as err:
        lower(gm, "cpu")
    msg = str(err.value)
    assert f"node {node.name!r}" in msg
    assert "test_errors.py" in msg and "torch.ops.memfit_test.noimpl(x)" in msg, msg
    lower(gm, "meta")  # the same graph lowers where the op has a kernel


def test_optimize_with_an_unlowerable_op_names_the_op_the_node_and_the_model_line(noimpl_op):
    # capture traces on fake tensors, so the op's fake kernel suffices; the CPU lowering then refuses it
    with _raises(memfit.UnsupportedGraph, match="memfit_test::noimpl") as err:
        memfit.optimize(_UsesNoImpl(), example_inputs=(torch.randn(2, 4),))
    msg = str(err.value)
    assert err.value.op == "memfit_test::noimpl" and f"node {err.value.node!r}" in msg
    assert "test_errors.py" in msg and "torch.ops.memfit_test.noimpl(x)" in msg, msg


# ---- budgets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["12 parsecs", "-1GB", "150%", "0%", "", "GB", "0", 0, -5, True, [12]])
def test_malformed_budget(budget):
    with _raises(memfit.ConfigError, match=r"^budget: expected "):
        memfit.parse_budget(budget)


@pytest.mark.parametrize(("budget", "expected"), [
    ("12GB", 12 * 10**9), ("12 gb", 12 * 10**9), ("512MiB", 512 * 2**20), ("1.5KiB", 1536), ("4096", 4096),
    ("2e9", 2 * 10**9), (1e9, 10**9), (12_000, 12_000), (None, None),
])
def test_valid_budget(budget, expected):
    assert memfit.parse_budget(budget) == expected


def test_percent_budget_is_a_share_of_memory():
    total = device_memory_bytes(None)
    got = memfit.parse_budget("80%")
    assert 0 < got < total
    assert got == int(0.8 * total)
    assert memfit.parse_budget("100%") == total


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), "1e999", "0.0000001", 1e-3])
def test_non_finite_or_sub_byte_budget(budget):
    with pytest.raises(memfit.ConfigError, match=r"^budget: expected "):
        memfit.parse_budget(budget)


def test_budget_too_small():
    with _raises(memfit.BudgetError, match=r"memfit planner: expected a step that fits the budget 1000 B, got a "
                                           r"floor of .* that no lever reduces yet \(parameters .*\); the smallest "
                                           r"peak reachable is .* \(that plan: fused_cross_entropy, remat, "
                                           r"fused_update, .*\); the lossless plan \(fused_cross_entropy, remat, "
                                           r"fused_update, sink\) peaks at .*; largest live at the peak "
                                           r"\(of the smallest plan\): .*weight.*; raise the budget above the floor"):
        memfit.optimize(models.build_mlp(), example_inputs=_mlp_batch(), loss_fn=F.cross_entropy, budget=1000)


# ---- a batch unlike the example at step(): refused, nothing changes -------------------------------------------


@pytest.fixture(scope="module")
def stepped():
    trainer = memfit.optimize(models.build_mlp(), example_inputs=_mlp_batch(), loss_fn=F.cross_entropy)
    trainer.step(*_mlp_batch(seed=2))
    return trainer


def _snapshot(trainer):
    ex = trainer.executor
    return {k: v.clone() for group in (ex.params, ex.buffers, ex.state) for k, v in group.items()}


@pytest.mark.parametrize(("make_batch", "match"), [
    (lambda x, y: (torch.cat([x, x[:1]]), torch.cat([y, y[:1]])),
     r"batch\[0\]: expected a shape of at most \(8, 32\) per dimension, the largest planned.*got shape \(9, 32\)"),
    (lambda x, y: (x.double(), y), r"batch\[0\]: expected dtype torch\.float32.*got torch\.float64"),
    (lambda x, y: (x, y.int()), r"batch\[1\]: expected dtype torch\.int64.*got torch\.int32"),
    (lambda x, y: (x,), r"a batch like example_inputs \(2 tensors\), got 1 tensors"),
    (lambda x, y: (x, y, y), r"a batch like example_inputs \(2 tensors\), got 3 tensors"),
    (lambda x, y: ({"x": x, "y": y},), r"got 2 tensors, keys \('x', 'y'\)"),
    (lambda x, y: (x, y.tolist()), r"batch\[1\] to be a tensor, got list"),
], ids=["shape", "dtype", "target_dtype", "too_few", "too_many", "dict", "not_a_tensor"])
def test_wrong_batch_at_step_changes_nothing(stepped, make_batch, match):
    before = _snapshot(stepped)
    with _raises(memfit.ConfigError, match=match):
        stepped.step(*make_batch(*_mlp_batch(seed=3)))
    after = _snapshot(stepped)
    assert stepped.step_count == 1
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed by a refused step"


def test_micro_steps_need_a_row_per_micro_batch_at_step():
    trainer = memfit.optimize(models.build_mlp(), example_inputs=_mlp_batch(16), loss_fn=F.cross_entropy,
                              micro_steps=4)
    with _raises(memfit.ConfigError, match=r"at most \(16, 32\) per dimension.*at least 4 rows for "
                                           r"micro_steps=4, got shape \(3, 32\)"):
        trainer.step(*_mlp_batch(3))
    assert trainer.step_count == 0


def test_micro_steps_must_divide_the_batch():
    with _raises(memfit.ConfigError, match=r"micro_steps=\): expected batch dim divisible by micro_steps"):
        memfit.optimize(models.build_mlp(), example_inputs=_mlp_batch(10), loss_fn=F.cross_entropy, micro_steps=4)


# ---- configuration --------------------------------------------------------------------------------------------


def test_torch_optimizer_instance_is_refused():
    model = models.build_mlp()
    opt = torch.optim.AdamW(model.parameters())
    with _raises(memfit.ConfigError, match=r"optimizer=\): expected memfit\.AdamW\(\.\.\.\) or memfit\.SGD\(\.\.\.\), "
                                           r"got AdamW"):
        memfit.optimize(model, example_inputs=_mlp_batch(), loss_fn=F.cross_entropy, optimizer=opt)
    with _raises(memfit.ConfigError, match=r"fused_update\.optimizer: .*got AdamW; torch\.optim objects"):
        FusedUpdate(optimizer=opt)


def test_example_inputs_must_be_a_tuple():
    x, _ = _mlp_batch()
    with _raises(memfit.ConfigError, match=r"example_inputs=\): expected a tuple \(one batch\), got Tensor"):
        memfit.optimize(models.build_mlp(), example_inputs=x)


def test_unknown_pass_name_lists_the_registered_passes():
    with _raises(memfit.ConfigError, match=r"^passes: expected one of \[.*'freeze'.*'fused_update'.*\], "
                                           r"got 'fused_updat'; register it"):
        make_pass("fused_updat")
    with _raises(memfit.ConfigError, match=r"got 'nope'"):
        memfit.optimize(models.build_mlp(), example_inputs=_mlp_batch(), loss_fn=F.cross_entropy, passes=["nope"])


def test_unknown_pass_config_key():
    with _raises(memfit.ConfigError, match=r"passes\['fused_update'\]: expected config keys among \[.*'micro_steps'"
                                           r".*\], got \['clip_norm'\]"):
        make_pass(("fused_update", {"clip_norm": 1.0}))


def test_pass_spec_of_the_wrong_type():
    with _raises(memfit.ConfigError, match=r"^passes: expected a pass name.*got int"):
        make_pass(3)


def test_duplicate_pass_name_with_another_class_is_refused():
    before = memfit.registered_passes()

    class Impostor(memfit.Pass):
        pass

    with _raises(memfit.ConfigError, match=r"register_pass: expected a new pass name \(taken: \[.*\]\), "
                                           r"got 'fused_update'; choose another name"):
        memfit.register_pass("fused_update")(Impostor)
    assert memfit.registered_passes() == before
    assert memfit.registered_passes()["fused_update"] is FusedUpdate


def test_register_pass_needs_a_pass_subclass():
    with _raises(memfit.ConfigError, match=r"expected a subclass of memfit\.Pass, got .*NotAPass"):
        @memfit.register_pass("memfit_test_not_a_pass")
        class NotAPass:
            pass
    assert "memfit_test_not_a_pass" not in memfit.registered_passes()


def test_pipeline_refuses_a_pass_whose_requirement_did_not_run():
    @dataclasses.dataclass(frozen=True)
    class NeedsFused(memfit.Pass):  # not registered: only the Pipeline's check is exercised
        name = "memfit_test_needs_fused"
        requires = ("fused_update",)

        def run(self, g):
            return memfit.PassResult(g, False)

    g = capture(models.build_mlp(), _mlp_batch(), F.cross_entropy)
    with _raises(memfit.ConfigError, match=r"pass 'memfit_test_needs_fused': expected \['fused_update'\] to run first"):
        Pipeline([NeedsFused()])(g)


def test_duplicate_passes_are_refused():
    with _raises(memfit.ConfigError, match=r"^passes: expected each pass once, got \['fused_update', 'fused_update'\]"):
        Pipeline([make_pass("fused_update"), make_pass("fused_update")])


@pytest.mark.parametrize(("make", "match"), [
    (lambda: memfit.AdamW(lr=0), r"memfit\.AdamW: expected lr > 0, got 0"),
    (lambda: memfit.AdamW(betas=(0.9, 1.0)), r"memfit\.AdamW: expected betas in \[0, 1\)"),
    (lambda: memfit.AdamW(weight_decay=-1), r"memfit\.AdamW: expected weight_decay >= 0"),
    (lambda: memfit.SGD(lr=-1), r"memfit\.SGD: expected lr > 0"),
    (lambda: memfit.SGD(momentum=-0.1), r"memfit\.SGD: expected momentum >= 0"),
    (lambda: memfit.SGD(nesterov=True), r"memfit\.SGD: expected momentum > 0 and dampening == 0 with nesterov"),
    (lambda: FusedUpdate(clip="layer"), r"fused_update\.clip: expected 'global' or 'per_param', got layer"),
    (lambda: FusedUpdate(clip_grad_norm=0.0), r"fused_update\.clip_grad_norm: expected a positive float or None"),
    (lambda: FusedUpdate(micro_steps=0), r"fused_update\.micro_steps: expected an int >= 1, got 0"),
    (lambda: make_pass(("freeze", {"frozen": (1,)})), r"freeze\.frozen: expected FQN glob strings"),
], ids=["adamw_lr", "adamw_betas", "adamw_wd", "sgd_lr", "sgd_momentum", "sgd_nesterov", "clip_mode", "clip_norm",
        "micro_steps", "freeze_globs"])
def test_invalid_optimizer_and_pass_settings(make, match):
    with _raises(memfit.ConfigError, match=match):
        make()
