"""fused_update: the optimizer update as in-place graph nodes placed where each gradient is produced.

Structural before/expected on a captured 2-layer MLP (the pass fired, what it inserted and where),
one case where it must not fire, the gradient memory it saves on tiny-llama, and the numerics of
what it adds on top of a plain update (global / per-parameter clipping, gradient accumulation, SGD).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit import models
from memfit.frontends.export import capture
from memfit.ops import args_of
from memfit.passes.base import make_pass
from memfit.runtime.memory import plan_memory

# Ops are matched by schema name, not by object: pytest imports the repository root's __init__.py a
# second time (as the package named after the checkout directory), which re-registers memfit's custom
# ops and replaces the OpOverload objects that module-level handles would hold.
ADAMW_UPDATE = "memfit::adamw_update"
SGD_UPDATE = "memfit::sgd_update"


def _mlp2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _mlp2_batch(n: int = 6, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _mlp_batches(steps: int, n: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for _ in range(steps)]


def _fused(g, **cfg):
    return memfit.Pipeline([make_pass("fused_update", **cfg)])(g)


def _is_op(node: torch.fx.Node, name: str) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.name() == name


def _calls(g, name: str) -> list[torch.fx.Node]:
    return [n for n in g.graph.nodes if _is_op(n, name)]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---- structure: before / expected ---------------------------------------------------------------


def test_before_has_one_gradient_output_per_param_and_no_update():
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    assert [k for k, _ in g.output_layout()] == ["loss"] + ["grad"] * 4
    assert g.grad_outputs == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not _calls(g, ADAMW_UPDATE) and not g.updates and not g.state_specs


def test_adamw_update_node_per_param_placed_after_its_gradient_and_every_read():
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    trainable = list(g.trainable)
    g = _fused(g, optimizer=memfit.AdamW(lr=1e-3))

    updates = _calls(g, ADAMW_UPDATE)
    assert len(updates) == len(trainable) == 4
    assert sorted(g.updates) == sorted(trainable)
    assert set(g.updates.values()) == set(updates)
    assert all(kind != "grad" for kind, _ in g.output_layout()), g.output_layout()
    assert g.grad_outputs == []
    out = next(n for n in g.graph.nodes if n.op == "output")
    assert not set(out.all_input_nodes) & set(g.grad_of.values())

    order = {n: i for i, n in enumerate(g.graph.nodes)}
    for fqn, upd in g.updates.items():
        assert args_of(upd).param is g.params[fqn]
        assert order[upd] > order[g.grad_of[fqn]], f"{fqn}: update before its gradient"
        readers = [r for r in g.param_readers(fqn) if r is not upd]
        assert readers, f"{fqn}: the forward reads the parameter"
        late = [r.name for r in readers if order[r] > order[upd]]
        assert not late, f"{fqn}: {late} read the parameter after its in-place update"

    for fqn in trainable:
        shape = tuple(g.params[fqn].meta["val"].shape)
        for name in ("exp_avg", "exp_avg_sq"):
            spec = g.state_specs[f"{fqn}::{name}"]
            assert (spec.shape, spec.dtype, spec.owner, spec.kind) == (shape, torch.float32, fqn, "optimizer")
    assert len(g.state_specs) == 2 * len(trainable)
    assert set(g.hparams) == {"lr", "step", "micro_step"}
    assert g.info["pass_stats"]["fused_update"]["modified"] is True
    assert g.applied == ["fused_update"]


def test_no_gradient_left_to_update_so_the_pass_does_not_fire():
    """The targets name real parameters, but their gradients are gone (frozen): nothing to rewrite."""
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    g = memfit.Pipeline([make_pass("freeze", frozen=("*",))])(g)
    ops_before = [n.target for n in g.graph.nodes]
    g = _fused(g, targets="0.*")
    assert g.info["pass_stats"]["fused_update"]["modified"] is False
    assert not _calls(g, ADAMW_UPDATE) and not _calls(g, SGD_UPDATE)
    assert not g.updates and not g.state_specs and not g.hparams
    assert [n.target for n in g.graph.nodes] == ops_before


def test_targets_matching_no_parameter_are_a_config_error():
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    with pytest.raises(memfit.ConfigError, match=r"fused_update'\]\.targets: expected a glob matching at least one "
                                                 r"parameter FQN, got 'nomatch\.\*'"):
        _fused(g, targets="nomatch.*")


def test_sgd_momentum_nesterov_inserts_sgd_update_with_a_momentum_buffer():
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    g = _fused(g, optimizer=memfit.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3))
    updates = _calls(g, SGD_UPDATE)
    assert len(updates) == 4 and not _calls(g, ADAMW_UPDATE)
    for fqn, upd in g.updates.items():
        assert _is_op(upd, SGD_UPDATE)
        a = args_of(upd)
        assert a.param is g.params[fqn] and a.grad_acc is None
        assert a.momentum_buffer is g.state[f"{fqn}::momentum_buffer"]
        assert (a.momentum, a.dampening, a.nesterov, a.weight_decay, a.micro_steps) == (0.9, 0.0, True, 1e-3, 1)
        spec = g.state_specs[f"{fqn}::momentum_buffer"]
        assert (spec.shape, spec.dtype) == (tuple(g.params[fqn].meta["val"].shape), torch.float32)
    assert len(g.state_specs) == 4


def test_sgd_without_momentum_has_no_state():
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    g = _fused(g, optimizer=memfit.SGD(lr=0.1))
    assert len(_calls(g, SGD_UPDATE)) == 4
    assert all(args_of(upd).momentum_buffer is None for upd in g.updates.values())
    assert g.state_specs == {}


def test_sgd_nesterov_one_step_matches_torch_optim_sgd():
    model = _mlp2()
    eager = copy.deepcopy(model)
    init = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = _mlp2_batch()
    trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=F.cross_entropy,
                              optimizer=memfit.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3))
    loss = trainer.step(x, y)
    opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False)
    eloss = F.cross_entropy(eager(x), y)
    eloss.backward()
    opt.step()
    torch.testing.assert_close(loss, eloss.detach())
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert not torch.equal(p, init[name]), f"{name} did not move"
        torch.testing.assert_close(p, q, msg=name)
        buf = trainer.executor.state[f"{name}::momentum_buffer"]
        torch.testing.assert_close(buf, opt.state[q]["momentum_buffer"], msg=name)


# ---- memory: the point of the pass ----------------------------------------------------------------


def test_fused_update_keeps_at_most_one_gradient_live_at_the_peak_on_tiny_llama():
    model = models.build_llama("tiny-llama")
    gen = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 256, (2, 32), generator=gen), torch.randint(0, 256, (2, 32), generator=gen))
    g = capture(model, batch, models.lm_loss)
    param_bytes = {f: n.meta["val"].numel() * n.meta["val"].element_size() for f, n in g.params.items()}
    largest = max(param_bytes[f] for f in g.trainable)
    before = plan_memory(g)
    assert before.gradient_bytes == sum(param_bytes.values())
    assert before.at_peak["gradients"] > 10 * largest  # without the pass, most gradients are live at once

    g = _fused(g, optimizer=memfit.AdamW())
    after = plan_memory(g)
    assert len(g.updates) == len(g.trainable) == len(param_bytes)
    assert after.at_peak["gradients"] <= largest, (str(before), str(after))
    assert after.gradient_bytes == before.gradient_bytes  # the same gradients exist; they just die early
    intermediates = ("gradients", "saved activations", "temporaries")
    assert sum(after.at_peak[k] for k in intermediates) < sum(before.at_peak[k] for k in intermediates)
    assert after.persistent["optimizer state"] == 2 * sum(param_bytes.values())  # fp32 params: 2 moments


# ---- clipping ---------------------------------------------------------------------------------------

CLIP = 0.5  # global: the MLP's total gradient norm starts near 0.5, so this binds on some steps
# per-parameter: the MLP's gradient norms are 0.03-0.3 each, so 0.1 clips some and leaves others
CLIP_PER_PARAM = 0.1
STEPS = 5


def _clip_case(clip: str, max_norm: float):
    model = models.build_mlp()
    eager = copy.deepcopy(model)
    batches = _mlp_batches(STEPS)
    trainer = memfit.optimize(model, example_inputs=batches[0], loss_fn=F.cross_entropy,
                              optimizer=memfit.AdamW(lr=1e-2, weight_decay=0.1), clip_grad_norm=max_norm,
                              clip=clip)
    opt = torch.optim.AdamW(eager.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    return model, eager, trainer, opt, batches


def _check_weights(model, eager, label):
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{label}: {name}")


def test_global_clip_matches_eager_clip_grad_norm():
    model, eager, trainer, opt, batches = _clip_case("global", CLIP)
    norms = []
    for i, (x, y) in enumerate(batches):
        loss = trainer.step(x, y)
        opt.zero_grad(set_to_none=True)
        eloss = F.cross_entropy(eager(x), y)
        eloss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(eager.parameters(), CLIP).item())
        opt.step()
        torch.testing.assert_close(loss, eloss.detach(), rtol=1e-5, atol=0, msg=f"step {i}")
    assert max(norms) > CLIP, f"clipping never bound (norms {norms}): the test would not see it"
    _check_weights(model, eager, "global clip")


def test_per_param_clip_matches_eager_clipping_each_gradient_by_its_own_norm():
    model, eager, trainer, opt, batches = _clip_case("per_param", CLIP_PER_PARAM)
    bound, free = 0, 0
    for i, (x, y) in enumerate(batches):
        loss = trainer.step(x, y)
        opt.zero_grad(set_to_none=True)
        eloss = F.cross_entropy(eager(x), y)
        eloss.backward()
        for p in eager.parameters():
            clipped = torch.nn.utils.clip_grad_norm_([p], CLIP_PER_PARAM).item() > CLIP_PER_PARAM
            bound, free = bound + clipped, free + (not clipped)
        opt.step()
        torch.testing.assert_close(loss, eloss.detach(), rtol=1e-5, atol=0, msg=f"step {i}")
    assert bound and free, f"{bound} clipped, {free} not: the test needs both to tell per-param from global"
    _check_weights(model, eager, "per-param clip")


def test_global_clip_places_every_update_after_the_last_gradient():
    g = capture(_mlp2(), _mlp2_batch(), F.cross_entropy)
    g = _fused(g, clip_grad_norm=CLIP)
    order = {n: i for i, n in enumerate(g.graph.nodes)}
    last_grad = max(order[n] for n in g.grad_of.values())
    assert min(order[u] for u in g.updates.values()) > last_grad
    # each update consumes grad * coef, not the raw gradient
    for fqn, upd in g.updates.items():
        assert args_of(upd).grad is not g.grad_of[fqn] and args_of(upd).grad.target is torch.ops.aten.mul.Tensor


# ---- gradient accumulation ---------------------------------------------------------------------------


# Measured relative L2 after 3 steps: ~5e-8 (AdamW) and ~1e-8 (SGD), while the weights move by 1e-2..3e-1.
# AdamW is nearly invariant to the gradient's scale, so only SGD would catch a missing 1/micro_steps.
@pytest.mark.parametrize(("opt", "tol"), [("adamw", 3e-3), ("sgd", 1e-5)])
def test_micro_steps_match_one_full_batch_step(opt, tol):
    make_opt = {"adamw": lambda: memfit.AdamW(lr=1e-2, weight_decay=0.1),
                "sgd": lambda: memfit.SGD(lr=0.1, momentum=0.9)}[opt]
    full_model = models.build_mlp()
    micro_model = copy.deepcopy(full_model)
    batches = _mlp_batches(3, n=16)
    full = memfit.optimize(full_model, example_inputs=batches[0], loss_fn=F.cross_entropy, optimizer=make_opt())
    micro = memfit.optimize(micro_model, example_inputs=batches[0], loss_fn=F.cross_entropy, optimizer=make_opt(),
                            micro_steps=4)
    accs = {k: s for k, s in micro.graph.state_specs.items() if s.kind == "accumulator"}
    assert len(accs) == len(micro.graph.trainable)
    for i, (x, y) in enumerate(batches):
        with torch.no_grad():
            expected = torch.stack([F.cross_entropy(micro_model(xc), yc)
                                    for xc, yc in zip(x.chunk(4), y.chunk(4), strict=True)]).mean()
        loss = micro.step(x, y)
        full.step(x, y)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0, msg=f"step {i}: mean of micro losses")
    assert micro.step_count == full.step_count == 3
    for (name, a), b in zip(micro_model.named_parameters(), full_model.parameters(), strict=True):
        assert _rel_l2(a, b) < tol, f"{opt}: {name} relative L2 {_rel_l2(a, b):.2e} (micro_steps=4 vs 1)"
    for name, acc in micro.executor.state.items():
        if name.endswith("::grad_acc"):
            assert not acc.any(), f"{name} not zeroed after the update"
