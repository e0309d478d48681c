"""fuse: the step's pointwise chains as one generated kernel each; fused and unfused steps train alike (the
tiny LLaMA, GPT-2, the digits CNN), the plan stays exact, and the generated kernels run a whole step under
the Triton interpreter as the CPU evaluation does."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import memfit
from memfit.errors import ConfigError
from memfit.graph import storage_root
from memfit.models import build_gpt2_small, build_llama, build_mobilenet_tiny, lm_loss

BASE = ["remat", "fused_update"]


def _case(name, batch=2, seq=32, **config):
    gen = torch.Generator().manual_seed(0)
    if name == "cnn":
        return build_mobilenet_tiny(), (torch.randn(16, 1, 8, 8, generator=gen),
                                        torch.randint(0, 10, (16,), generator=gen)), F.cross_entropy
    x = torch.randint(0, 256, (batch, seq), generator=gen)
    model = (build_llama("tiny-llama", num_hidden_layers=1, **config) if name == "llama" else
             build_gpt2_small(n_layer=1, **config))
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
    assert info["groups"] >= 1 and info["kernels"] <= info["groups"] + info["prologues"] and 0 < info["share"] <= 1
    assert info["bytes_not_materialised"] > 0
    fused = [n for n in t.graph.graph.nodes if n.target is torch.ops.memfit.fused.default]
    prologues = [n for n in _updates(t) if n.kwargs.get("grad_program")]
    assert len(fused) == info["groups"] and len(prologues) == info["prologues"]
    assert sum(len(n.meta["fused"]) for n in fused + prologues) == info["nodes_fused"]
    if name == "gpt2":  # the tied embedding's two gradients are summed inside its update
        assert [p for p in prologues if '"add.Tensor"' in p.kwargs["grad_program"]]
    for _ in range(3):
        assert float(t.step(*batch)) == pytest.approx(float(ref.step(*batch)), rel=1e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(t.executor.params[f], p, rtol=1e-5, atol=1e-6)
    assert t.measure_step(*batch).peak_bytes == t.plan.peak_bytes


def test_generated_kernels_run_a_whole_step_like_the_cpu_evaluation(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # 64 wide: the interpreter runs each kernel program in Python, and a reduction has one per output element
    model, batch, loss_fn = _case("llama", hidden_size=64, intermediate_size=172)
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


class _Views(torch.nn.Module):
    """Pointwise chains with views between their ops (none saved for the backward): two slices of one value
    (read through two chains, so computed twice in registers), a transpose, an unsqueeze and an expand in a
    chain that ends in a sum; and a ``view`` of a sum with a broadcast parameter, which may not be pushed to
    that parameter (the view joins, the sum does not)."""

    def __init__(self, h=12, s=6):
        super().__init__()
        self.lin = torch.nn.Linear(h, 2 * h)
        self.gain = torch.nn.Parameter(torch.randn(h))
        self.scale = torch.nn.Parameter(torch.randn(2 * h))
        self.head = torch.nn.Linear(h * s, 10)

    def forward(self, x):
        y = self.lin(x)  # (b, s, 2h)
        p = y * 0.5
        z = p[..., : y.shape[-1] // 2] - p[..., y.shape[-1] // 2:]  # (b, s, h)
        t = (z * 2).transpose(1, 2)  # (b, h, s)
        u = (t.unsqueeze(-1).expand(*t.shape, 3) + self.gain[:, None, None]).sum(-1)  # (b, h, s)
        m = ((y + self.scale).view(y.shape[0], -1) * 3 - 1)[:, : u[0].numel()]
        return self.head(torch.tanh(u).transpose(1, 2).reshape(x.shape[0], -1) + m)


def test_views_join_groups_and_the_step_is_unchanged(monkeypatch):
    torch.manual_seed(0)
    model = _Views()
    batch = (torch.randn(4, 6, 12), torch.randint(0, 10, (4,)))
    runs = {}
    for label, extra in (("unfused", []), ("fused", ["fuse"])):
        runs[label] = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=F.cross_entropy,
                                      passes=[*BASE, *extra], optimizer=memfit.SGD(lr=0.1))
    info = runs["fused"].graph.info["fuse"]
    fused = [n for n in runs["fused"].graph.graph.nodes if n.target is torch.ops.memfit.fused.default]
    # the forward's chain from the linear layer's output to the sum: one group, p computed through both slices
    # (two steps), the linear layer's output read through two views of it
    chain = next(n for n in fused if "sum" in {m.split("_")[0] for m in n.meta["fused"]} and "sub" in
                 {m.split("_")[0] for m in n.meta["fused"]})
    steps = json.loads(chain.args[1])["steps"]
    assert [s[0] for s in steps].count("mul.Tensor") == 3  # y * 0.5 twice (one per slice), then z * 2
    roots = [storage_root(i).target for i in chain.args[0]]
    assert roots.count(torch.ops.aten.addmm.default) == 2  # two views of the linear layer's output
    # view(y + scale): the view joins its users' group; the sum with the broadcast scale does not, and is read
    # through the view (and the slice after it)
    view_group = next(n for n in fused if any(storage_root(i).target is torch.ops.aten.add.Tensor
                                              for i in n.args[0]))
    assert {s[0] for s in json.loads(view_group.args[1])["steps"]} >= {"mul.Tensor", "sub.Tensor"}
    assert info["views_fused"] >= 6
    for _ in range(3):
        assert float(runs["fused"].step(*batch)) == float(runs["unfused"].step(*batch))
    for f, p in runs["unfused"].executor.params.items():
        torch.testing.assert_close(runs["fused"].executor.params[f], p, rtol=0, atol=0)
    assert runs["fused"].measure_step(*batch).peak_bytes == runs["fused"].plan.peak_bytes
    # the generated kernels (under the interpreter on CPU) read the views through their strides alike
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEMFIT_TRITON_INTERPRET", "1")
    tri = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=F.cross_entropy,
                          passes=[*BASE, "fuse"], optimizer=memfit.SGD(lr=0.1))
    ref = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=F.cross_entropy, passes=BASE,
                          optimizer=memfit.SGD(lr=0.1))
    assert all(tri.lowered.kernels[n] == "triton" for n in tri.lowered.kernels if n.startswith("fused"))
    for _ in range(2):
        torch.testing.assert_close(tri.step(*batch), ref.step(*batch), rtol=2e-6, atol=2e-6)


def _updates(t):
    ops = (torch.ops.memfit.adamw_update.default, torch.ops.memfit.sgd_update.default)
    return [n for n in t.graph.graph.nodes if n.target in ops]


@pytest.mark.parametrize(("clip", "opt"), [("global", "adamw"), ("per_param", "sgd")])
def test_a_clipped_gradient_is_made_inside_its_update(clip, opt):
    """clip_grad_norm's ``g * coef`` is the pointwise prologue of each update: folded into the op, which makes
    the clipped gradient chunk by chunk (never whole) and steps each chunk; the same training as unfused (as
    the fused groups: to the last ulp on a few elements, which AdamW's ``m / sqrt(v)`` may then carry), an
    exact plan, and per parameter the peak (at a clipped copy) falls."""
    model, batch, loss_fn = _case("llama")

    def make(fuse):
        o = memfit.AdamW(lr=1e-3) if opt == "adamw" else memfit.SGD(lr=0.1, momentum=0.9)
        return memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, optimizer=o,
                               clip_grad_norm=0.5, clip=clip, fuse=fuse)

    runs = {fuse: make(fuse) for fuse in (False, True)}
    ups = _updates(runs[True])
    assert ups and all(n.kwargs.get("grad_program") and n.args[1] is None for n in ups)
    assert runs[True].graph.info["fuse"]["prologues"] == len(ups)
    for _ in range(3):
        assert float(runs[True].step(*batch)) == pytest.approx(float(runs[False].step(*batch)), rel=1e-6)
    if opt == "sgd":
        for f, p in runs[False].executor.params.items():
            torch.testing.assert_close(runs[True].executor.params[f], p, rtol=1e-5, atol=1e-6)
    measured = runs[True].measure_step(*batch).peak_bytes
    print(f"clip {clip}: peak {runs[False].plan.peak_bytes} B unfused, {runs[True].plan.peak_bytes} B with "
          f"{len(ups)} update prologues (measured {measured} B)")
    assert measured == runs[True].plan.peak_bytes
    if clip == "per_param":
        assert runs[True].plan.peak_bytes < runs[False].plan.peak_bytes


def test_the_generated_prologue_kernel_steps_as_the_cpu_evaluation(monkeypatch):
    """SGD with momentum and a clipped gradient on the MLP: the prologue run by its generated kernel (under
    the interpreter on CPU) and by the chunked evaluation give the same weights."""
    from memfit.models import build_mlp

    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    opt = memfit.SGD(lr=0.1, momentum=0.9)
    ref = memfit.optimize(build_mlp(seed=0), example_inputs=batch, loss_fn=F.cross_entropy, optimizer=opt,
                          clip_grad_norm=0.1, clip="per_param", fuse=True)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEMFIT_TRITON_INTERPRET", "1")
    tri = memfit.optimize(build_mlp(seed=0), example_inputs=batch, loss_fn=F.cross_entropy, optimizer=opt,
                          clip_grad_norm=0.1, clip="per_param", fuse=True)
    assert all(n.kwargs.get("grad_program") for n in _updates(tri))
    assert all(tri.lowered.kernels[n.name] == "triton" for n in _updates(tri))
    for _ in range(2):
        torch.testing.assert_close(tri.step(*batch), ref.step(*batch), rtol=2e-6, atol=2e-6)
    for f, p in ref.executor.params.items():
        torch.testing.assert_close(tri.executor.params[f], p, rtol=1e-6, atol=1e-7)


def test_a_budget_below_the_fused_peak_shrinks_the_cpu_chunk():
    """GPT-2's fused step peaks at a fused op whose 64 Ki-element chunk's intermediates lift it above the
    unfused peak: at the unfused peak as the budget the planner asks ``fuse`` for a smaller chunk (a lossless
    lever of FLOPs 0), which fits, measures as planned and trains alike."""
    model, batch, loss_fn = _case("gpt2", batch=8, seq=128)
    unfused = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, optimizer=memfit.SGD(lr=0.1))
    free = memfit.plan(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, fuse=True)
    assert free.peak_bytes > unfused.plan.peak_bytes
    t = memfit.optimize(copy.deepcopy(model), example_inputs=batch, loss_fn=loss_fn, optimizer=memfit.SGD(lr=0.1),
                        fuse=True, budget=unfused.plan.peak_bytes)
    programs = [n.args[1] for n in t.graph.graph.nodes if n.target is torch.ops.memfit.fused.default]
    assert programs and all(json.loads(p)["chunk"] < 1 << 16 for p in programs)
    assert t.plan.peak_bytes <= unfused.plan.peak_bytes
    for _ in range(2):
        assert float(t.step(*batch)) == pytest.approx(float(unfused.step(*batch)), rel=1e-6)
    assert t.measure_step(*batch).peak_bytes == t.plan.peak_bytes


def test_bad_chunk_is_a_config_error():
    model, batch, loss_fn = _case("cnn")
    with pytest.raises(ConfigError, match="elements per CPU chunk"):
        memfit.optimize(model, example_inputs=batch, loss_fn=loss_fn, passes=[*BASE, ("fuse", {"chunk": -1})])


def test_a_gradient_that_reads_its_own_weight_is_no_prologue():
    """An L2 penalty on a weight: its gradient reads the weight. Made inside the update, chunk k could read an
    element an earlier chunk already stepped (through a view), so the group stays a fused op of its own before
    the update; the step trains as unfused."""

    class Penalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.lin(x), self.lin.weight.pow(2).sum()

    def loss_fn(out, y):
        return F.cross_entropy(out[0], y) + 1e-3 * out[1]

    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen))
    runs = {fuse: memfit.optimize(Penalized(), example_inputs=batch, loss_fn=loss_fn, fuse=fuse,
                                  optimizer=memfit.SGD(lr=0.1)) for fuse in (False, True)}
    ups = _updates(runs[True])
    assert len(ups) == 2 and not any(n.kwargs.get("grad_program") for n in ups)
    fused = [n for n in runs[True].graph.graph.nodes if n.target is torch.ops.memfit.fused.default]
    assert any(i.op == "placeholder" and i in runs[True].graph.params.values() for n in fused for i in n.args[0])
    for _ in range(3):
        assert float(runs[True].step(*batch)) == pytest.approx(float(runs[False].step(*batch)), rel=1e-6)
