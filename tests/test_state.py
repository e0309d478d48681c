"""Trainer state: save / load through ``torch.save`` + ``torch.load(weights_only=True)`` resumes
bit-identically, a bad state is refused before anything changes, and ``export()`` hands back a plain
module with the trained weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit import models
from memfit.api import STATE_FORMAT

OPTIMIZERS = {
    "adamw": lambda: memfit.AdamW(lr=1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: memfit.SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
}
MODELS = {  # the CNN has BatchNorm buffers, which the state must carry too
    "mlp": (models.build_mlp, lambda gen: (torch.randn(8, 32, generator=gen),
                                           torch.randint(0, 10, (8,), generator=gen))),
    "cnn": (models.build_cnn, lambda gen: (torch.randn(4, 3, 8, 8, generator=gen),
                                           torch.randint(0, 10, (4,), generator=gen))),
}


def _batches(model_name: str, steps: int):
    gen = torch.Generator().manual_seed(1)
    return [MODELS[model_name][1](gen) for _ in range(steps)]


def _trainer(model, batch, opt_name: str) -> memfit.Trainer:
    return memfit.optimize(model, example_inputs=batch, loss_fn=F.cross_entropy, optimizer=OPTIMIZERS[opt_name]())


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["passes"] == b["passes"]
    for group in ("params", "buffers", "state"):
        assert a[group].keys() == b[group].keys(), group
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}[{k!r}] differs"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_resume_from_saved_state_is_bit_identical(tmp_path, model_name, opt_name):
    init = MODELS[model_name][0]()
    batches = _batches(model_name, 6)

    a = _trainer(copy.deepcopy(init), batches[0], opt_name)
    losses_a = [a.step(*b) for b in batches]

    b = _trainer(copy.deepcopy(init), batches[0], opt_name)
    losses_b = [b.step(*batch) for batch in batches[:3]]
    path = tmp_path / "trainer.pt"
    torch.save(b.state_dict(), path)

    c = _trainer(copy.deepcopy(init), batches[0], opt_name)
    c.load_state_dict(torch.load(path, weights_only=True))
    assert c.step_count == 3
    losses_c = [c.step(*batch) for batch in batches[3:]]

    assert c.step_count == a.step_count == 6
    for i, (got, want) in enumerate(zip(losses_b + losses_c, losses_a, strict=True)):
        assert torch.equal(got, want), f"step {i}: {got.item()!r} != {want.item()!r}"
    _assert_state_equal(c.state_dict(), a.state_dict())
    assert c.executor.state, "the optimizer state must be part of what is saved"
    for (name, p), q in zip(c.model.state_dict().items(), a.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, q) for p, q in zip(c.model.parameters(), init.parameters(), strict=True))


def test_state_dict_holds_only_what_weights_only_load_accepts(tmp_path):
    trainer = _trainer(models.build_mlp(), _batches("mlp", 1)[0], "adamw")
    trainer.step(*_batches("mlp", 1)[0])
    sd = trainer.state_dict()
    assert sd["format"] == STATE_FORMAT and sd["step"] == 1
    assert set(sd["state"]) == {f"{p}::{m}" for p in trainer.graph.trainable for m in ("exp_avg", "exp_avg_sq")}
    torch.save(sd, tmp_path / "s.pt")
    _assert_state_equal(torch.load(tmp_path / "s.pt", weights_only=True), sd)
    # a snapshot, not a view: training on does not change what was returned
    trainer.step(*_batches("mlp", 1)[0])
    assert not torch.equal(sd["params"]["0.weight"], trainer.executor.params["0.weight"])


# ---- a bad state is refused and changes nothing --------------------------------------------------------


@pytest.fixture
def trained():
    batch = _batches("cnn", 1)[0]
    trainer = _trainer(models.build_cnn(), batch, "adamw")
    trainer.step(*batch)
    return trainer


def _corrupt(kind: str, sd: dict) -> tuple[object, str]:
    """A bad state of the given kind (every tensor also perturbed, to see a partial load) and the match."""
    for group in ("params", "state"):
        for k, t in sd[group].items():
            sd[group][k] = t + 1
    if kind == "format":
        sd["format"] = "memfit.trainer/0"
        return sd, r"format 'memfit\.trainer/1', got memfit\.trainer/0"
    if kind == "not_a_dict":
        return [sd], r"format 'memfit\.trainer/1', got list"
    if kind == "passes":
        sd["passes"] = ["fused_update", "lowrank"]
        return sd, r"state saved with passes .*got \['fused_update', 'lowrank'\]"
    if kind == "shape":
        sd["params"]["0.weight"] = torch.zeros(3)
        return sd, r"\['params'\]\['0\.weight'\]: expected \(16, 3, 3, 3\) torch\.float32, got \(3,\)"
    if kind == "dtype":
        key = next(iter(sd["state"]))
        sd["state"][key] = sd["state"][key].double()
        return sd, r"\['state'\].*torch\.float32, got .*torch\.float64"
    if kind == "missing":
        del sd["state"][next(iter(sd["state"]))]
        return sd, r"\['state'\]: expected the same tensor names, got differences"
    if kind == "extra":
        sd["buffers"]["bogus.running_mean"] = torch.zeros(1)
        return sd, r"\['buffers'\]: expected the same tensor names, got differences \['bogus\.running_mean'\]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["format", "not_a_dict", "passes", "shape", "dtype", "missing", "extra"])
def test_bad_state_raises_config_error_and_changes_nothing(trained, kind):
    before = trained.state_dict()
    bad, match = _corrupt(kind, trained.state_dict())
    with pytest.raises(memfit.ConfigError, match=match):
        trained.load_state_dict(bad)
    _assert_state_equal(trained.state_dict(), before)
    assert trained.step_count == 1


def test_state_missing_a_top_level_group_raises_config_error(trained):
    sd = trained.state_dict()
    del sd["state"]
    with pytest.raises(memfit.ConfigError, match="state"):
        trained.load_state_dict(sd)


def test_bad_rng_raises_config_error_before_loading_anything(trained):
    before = trained.state_dict()
    sd = trained.state_dict()
    sd["params"] = {k: v + 1 for k, v in sd["params"].items()}
    sd["rng"] = torch.zeros(3)
    with pytest.raises(Exception) as err:  # the type is asserted below, after the state
        trained.load_state_dict(sd)
    _assert_state_equal(trained.state_dict(), before)
    assert err.type is memfit.ConfigError and "rng" in str(err.value)


# ---- export ------------------------------------------------------------------------------------------


def test_export_is_a_separate_module_with_the_trained_weights():
    init = models.build_cnn()
    model = copy.deepcopy(init)
    batches = _batches("cnn", 3)
    trainer = _trainer(model, batches[0], "adamw")
    for b in batches:
        trainer.step(*b)
    exported = trainer.export()
    assert isinstance(exported, torch.nn.Module) and type(exported) is type(model)
    assert exported is not model and exported is not trainer.model
    x = batches[0][0]
    exported.eval()
    trainer.model.eval()
    with torch.no_grad():
        out = exported(x)
    assert torch.equal(out, trainer(x))
    assert not torch.equal(out, init.eval()(x).detach())  # the weights are the trained ones
    mine = {p.data_ptr() for p in trainer.executor.params.values()}
    assert not mine & {p.data_ptr() for p in exported.parameters()}, "export shares storage with the trainer"
    # training on does not reach the exported copy
    trainer.model.train()
    trainer.step(*batches[1])
    with torch.no_grad():
        assert torch.equal(exported(x), out)
