"""data_parallel: two ranks (gloo on loopback, launched as torchrun would) training data parallel match one
process on the concatenated batch; ranks that disagree fail fast at optimize(), naming the rank."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memfit
from memfit.models import build_llama, lm_loss
from memfit.ops import args_of
from memfit.passes.base import make_pass

WORKER = Path(__file__).with_name("_dp_worker.py")
STEPS, PER_RANK = 10, 4  # a multiple of GaLore's gap (5): every weight refreshes STEPS // 5 times
CONFIGS = {
    "adamw": (None, STEPS, PER_RANK),
    "8-bit": (["remat", "fused_update", ["quantize_state", {"bits": 8, "min_numel": 1}]], STEPS, PER_RANK),
    "galore": (["remat", "fused_update", ["lowrank", {"rank": 16, "gap": 5}]], STEPS, PER_RANK),
    # GaLore with its gradients' factors all-gathered (projected communication off)
    "galore-factors": (["remat", "fused_update", ["lowrank", {"rank": 16, "gap": 5}],
                        ["data_parallel", {"projected": False}]], STEPS, PER_RANK),
    "apollo-mini": (["remat", "fused_update", ["lowrank", {"rule": "apollo", "rank": 1, "gap": 5, "scale": 128.0,
                                                          "scaling": "tensor", "projector": "random"}]],
                    STEPS, PER_RANK),
}
# the same four with each parameter's optimizer state on one rank (ZeRO-1/2): gradients reduced onto the owner,
# the parameter broadcast from it after its update
SHARDED = {f"{name}/sharded": (*spec, {"shard": "state"}) for name, spec in CONFIGS.items()
           if name != "galore-factors"}
# parameters sharded too (FSDP-style): each fetched from its owner before its first read in the forward and
# again in the backward (recomputations included)
SHARDED["adamw/params-sharded"] = (None, STEPS, PER_RANK, {"shard": "params"})
# with every saved activation recomputed that can be (remat's budget mode, asked to free everything): the
# backward's recomputations read fetched weights too
SHARDED["adamw/params-sharded-remat"] = (["fused_cross_entropy", ["remat", {"mode": "budget", "free_bytes": 1 << 40}],
                                          "fused_update"], 8, PER_RANK, {"shard": "params"})
# sharded state with weights the update writes as INT8 codes and scales, and with LoRA over an NF4 base
COMPOSED = {"int8-weights": (["remat", "fused_update", ["quantize_weights", {}]], 5, PER_RANK),
            "qlora": ([["lora", {"base": "nf4", "rank": 4}], "remat", "fused_update"], 5, PER_RANK)}
COMPOSED.update({f"{n}/sharded": (*spec, {"shard": "state"}) for n, spec in list(COMPOSED.items())})
# gradient accumulation (each rank's 4 sequences as 2 micro-batches: one all-reduce per step, on the last) and
# global-norm clipping (the norm of the reduced gradients), against one process with the same settings
OPTIONS = {"adamw/micro-steps": (None, STEPS, PER_RANK, {"micro_steps": 2}),
           "adamw/clipped": (None, STEPS, PER_RANK, {"clip_grad_norm": 0.5})}
# each gradient all-reduced alone and synchronously (bucket_bytes=0) against the default buckets; the planner
# choosing the sharding from a budget (shard="auto"; the budget is set in the fixture), fewer steps
BUCKETS = {"adamw/unbucketed": (["fused_cross_entropy", "remat", "fused_update",
                                 ["data_parallel", {"bucket_bytes": 0}]], 8, PER_RANK),
           "adamw/auto": (None, 8, PER_RANK, {"shard": "auto"})}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, configs: dict, world: int = 2) -> dict:
    out = str(tmp_path / "dp")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), out, json.dumps(configs)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    failed = [f"rank {r}:\n{log[-3000:]}" for r, (p, log) in enumerate(zip(procs, logs, strict=True)) if p.returncode]
    assert not failed, "\n".join(failed[::-1])  # the last rank's first: the others often fail because it did
    return json.loads(Path(f"{out}.json").read_text()), out, logs


def _ranks(code: str, world: int = 2) -> list[str]:
    """Run ``code`` (python -c) as ``world`` ranks, as torchrun would; their outputs."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    return [p.communicate(timeout=300)[0] for p in procs]


@functools.cache
def _auto_budget() -> int:
    """A per-rank budget between the parameters-sharded and the state-sharded plans of the launch's step."""
    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (PER_RANK, 32))
    peak = {s: memfit.plan(model, example_inputs=(x, x), loss_fn=lm_loss, world_size=2, shard=s).peak_bytes
            for s in ("state", "params")}
    return (peak["state"] + peak["params"]) // 2


def _single(passes, steps=STEPS, **opts):
    torch.manual_seed(0)
    model = build_llama("tiny-llama", num_hidden_layers=1)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (PER_RANK * 2, 32), generator=gen) for _ in range(steps)]
    passes = [p if isinstance(p, str) else tuple(p) for p in passes if p[0] != "data_parallel"] if passes else None
    t = memfit.optimize(model, example_inputs=(batches[0], torch.roll(batches[0], -1, 1)), loss_fn=lm_loss,
                        optimizer=memfit.AdamW(lr=1e-3), passes=passes, **opts)
    losses = [float(t.step(x, torch.roll(x, -1, 1))) for x in batches]
    return losses, {f: p.detach() for f, p in model.named_parameters()}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every configuration, plain and sharded, trained by two ranks in one launch: once per test session,
    pytest-xdist's workers sharing it through a directory and a lock beside their own temporary ones."""
    from filelock import FileLock

    configs = {**CONFIGS, **SHARDED, **OPTIONS, **COMPOSED, **BUCKETS}
    configs["adamw/auto"] = (*BUCKETS["adamw/auto"][:3], {"shard": "auto", "budget": _auto_budget()})
    base = tmp_path_factory.getbasetemp()  # under xdist: this session's directory holds each worker's
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "memfit-data-parallel"
    with FileLock(f"{root}.lock"):
        if (root / "dp.json").exists() and json.loads((root / "configs.json").read_text()) == json.loads(
                json.dumps(configs)):
            return json.loads((root / "dp.json").read_text()), str(root / "dp"), []
        root.mkdir(exist_ok=True)
        got = _launch(root, configs)
        (root / "configs.json").write_text(json.dumps(configs))
        return got


def test_two_ranks_match_one_process_on_the_whole_batch(launched):
    results, out, _ = launched
    for name, (passes, _, _) in CONFIGS.items():
        got = results[name]
        want_losses, want_params = _single(passes)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want_losses, strict=True))
        params = torch.load(f"{out}.{name}.pt")
        diff = max(float((params[f] - p).abs().max()) for f, p in want_params.items())
        l2 = max(float((params[f] - p).norm() / p.norm()) for f, p in want_params.items())
        print(f"{name}: loss rel diff {rel:.2e}, max weight diff {diff:.2e}, largest relative L2 {l2:.2e}, "
              f"{got['bytes_per_step']} B sent per rank per step")
        # fp32 AdamW and APOLLO-Mini: the ranks' mean gradient differs from the whole batch's by summation order
        # only (measured: loss 1.7e-7 / 2.6e-7, weights 2.3e-6 / 1.1e-7 relative L2). 8-bit moments and GaLore's
        # SVD refreshes carry that difference through their own rounding (measured: loss 4.2e-5 / 1.1e-4,
        # weights 6.4e-3 / 7.8e-3); a GaLore gradient averaged wrongly (its factors each reduced) shows 5.8e-4
        exact = name in ("adamw", "apollo-mini")
        assert rel <= (1e-5 if exact else 2e-4), f"{name}: loss rel diff {rel:.2e}"
        assert l2 <= (1e-5 if exact else 2e-2), f"{name}: weight relative L2 {l2:.2e}"
        # what each rank sends per step: one all-reduce per gradient, the bytes the plan's pass declared; GaLore's
        # projections between refreshes, and on each weight's STEPS // 5 refreshes (gap 5, staggered
        # per weight) its whole gradient
        declared, total = got["declared"], got["bytes_total"]
        if declared["projected_all_reduces"]:
            least = STEPS * declared["bytes_per_step"] + STEPS // 5 * declared["extra_bytes_on_refresh"]
            assert least <= total <= least + declared["extra_bytes_on_refresh"], (name, total, declared)
        else:
            assert total == STEPS * declared["bytes_per_step"] > 0, (name, total, declared)
        # the plan is each rank's own, all-reduce copies included; the 8-bit and low-rank plans are for their
        # worst step (the first, a subspace refresh), the one measured here is the one after the last
        assert got["measured"] == got["peak"] if name == "adamw" else got["measured"] <= got["peak"]
    assert results["galore-factors"]["declared"]["factor_gathers"] > 0  # factored gradients: gathered, not formed
    assert results["galore"]["declared"]["projected_all_reduces"] > 0
    full = results["adamw"]["bytes_per_step"]
    print(f"sent per rank per step: full all-reduce {full} B, GaLore r=16 factors "
          f"{results['galore-factors']['bytes_per_step']} B, GaLore r=16 projected "
          f"{results['galore']['bytes_per_step']} B (between refreshes "
          f"{results['galore']['declared']['bytes_per_step']} B), APOLLO-Mini "
          f"{results['apollo-mini']['bytes_per_step']} B")
    assert results["galore"]["bytes_per_step"] < results["galore-factors"]["bytes_per_step"] < full


def test_sharded_parameters_train_as_replicated_fetched_in_forward_and_backward(launched):
    """shard="params" (FSDP-style, whole parameters): a rank keeps only the parameters it owns and fetches the
    others from their owners just before their first read in the forward and again in the backward; STEPS steps
    equal the replicated run bit for bit, each rank's plan is exact and below the state-sharded one."""
    results, out, _ = launched
    got, plain, state = results["adamw/params-sharded"], results["adamw"], results["adamw/sharded"]
    a, b = torch.load(f"{out}.adamw.pt"), torch.load(f"{out}.adamw-params-sharded.pt")
    assert got["losses"] == plain["losses"] and all(torch.equal(a[f], b[f]) for f in a)
    declared = got["declared"]
    elsewhere = [sum(1 for o in declared["owners"].values() if o != r) for r in range(2)]
    # every parameter another rank owns is fetched in the forward; those the backward reads, again there
    assert min(elsewhere) < declared["fetches"] < 2 * max(elsewhere) + 1
    for r, s in zip(got["ranks"], state["ranks"], strict=True):  # at a rank's peak some fetched copies may live
        assert r["measured"] == r["peak"] <= s["peak"], (r, s)
    assert max(r["peak"] for r in got["ranks"]) < max(s["peak"] for s in state["ranks"])
    print(f"params sharded: peak per rank {[r['measured'] for r in got['ranks']]} vs state sharded "
          f"{[r['measured'] for r in state['ranks']]} vs replicated {[r['measured'] for r in plain['ranks']]}; "
          f"{declared['fetches']} fetches on rank 0")


def test_sharded_parameters_compose_with_recomputation(launched):
    """shard="params" under remat's budget mode (everything recomputable recomputed): the recomputed forward
    ops in the backward read weights fetched there; 8 steps equal the replicated run bit for bit, the plan
    is exact and below the same sharding with remat's default."""
    results, _, _ = launched
    got, plain, default = results["adamw/params-sharded-remat"], results["adamw"], results["adamw/params-sharded"]
    assert got["losses"] == plain["losses"][:8]
    assert got["recomputed_flops"] > default["recomputed_flops"]
    for r, d in zip(got["ranks"], default["ranks"], strict=True):
        assert r["measured"] == r["peak"] < d["peak"], (r, d)
    assert got["declared"]["fetches"] >= default["declared"]["fetches"]
    print(f"params sharded + recompute everything: peak per rank {[r['measured'] for r in got['ranks']]} vs "
          f"{[r['measured'] for r in default['ranks']]} with remat's default ({got['recomputed_flops']} FLOPs "
          f"recomputed, was {default['recomputed_flops']}); fetches on rank 0 "
          f"{got['declared']['fetches']} vs {default['declared']['fetches']}")


def test_sharded_state_composes_with_int8_weights_and_qlora(launched):
    """shard="state" with INT8 weights (the owner's update writes codes and scales, both broadcast) and with
    LoRA over NF4 bases (only the adapters have state): bit-equal to the replicated run after 5 steps."""
    results, out, _ = launched
    for name in ("int8-weights", "qlora"):
        plain, sharded = results[name], results[f"{name}/sharded"]
        a, b = torch.load(f"{out}.{name}.pt"), torch.load(f"{out}.{name}-sharded.pt")
        assert sharded["losses"] == plain["losses"], name
        assert all(torch.equal(a[f], b[f]) for f in a), name
        assert max(r["state_bytes"] for r in sharded["ranks"]) < plain["ranks"][0]["state_bytes"], name
        assert all(r["measured"] <= r["peak"] for r in sharded["ranks"]), name


def test_micro_steps_communicate_once_and_clipping_reads_the_reduced_norm(launched):
    """2 ranks x 2 micro-batches of 2 sequences, and 2 ranks with clip_grad_norm=0.5, each against one process
    on the whole batches with the same setting: losses within 1e-5, weights 1e-5 relative L2; accumulation
    all-reduces each gradient once per step (the bytes of one all-reduce per gradient per step)."""
    results, out, _ = launched
    for name, (_, _, _, opts) in OPTIONS.items():
        got = results[name]
        want_losses, want_params = _single(None, **opts)
        rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], want_losses, strict=True))
        params = torch.load(f"{out}.{name.replace('/', '-')}.pt")
        l2 = max(float((params[f] - p).norm() / p.norm()) for f, p in want_params.items())
        print(f"{name}: loss rel diff {rel:.2e}, largest relative L2 {l2:.2e}, {got['bytes_per_step']} B per step")
        assert rel <= 1e-5 and l2 <= 1e-5, (name, rel, l2)
        assert got["bytes_total"] == STEPS * got["declared"]["bytes_per_step"] == STEPS * results["adamw"][
            "bytes_per_step"], name
    assert results["adamw/clipped"]["declared"]["reduced_before_clipping"]
    assert results["adamw/clipped"]["losses"][5:] != results["adamw"]["losses"][5:]  # the clip did act


def test_sharded_state_trains_as_replicated_and_each_rank_holds_its_share(launched):
    """shard="state": the weights after STEPS steps equal the replicated data-parallel run's bit for bit (the
    same mean gradient, the same update op on the owner) for fp32 AdamW, 8-bit and APOLLO-Mini, and GaLore's
    within its rounding (the replicated run averages projections); each rank holds only the state
    of the parameters it owns, and its plan is its own."""
    results, out, _ = launched
    for name in (n.removesuffix("/sharded") for n in SHARDED if n.endswith("/sharded")):
        plain, sharded = results[name], results[f"{name}/sharded"]
        a, b = torch.load(f"{out}.{name}.pt"), torch.load(f"{out}.{name}-sharded.pt")
        whole = plain["declared"]["all_reduces"] + plain["declared"]["bucketed"]
        if whole == len(a):  # every gradient all-reduced whole: the same mean gradient
            assert sharded["losses"] == plain["losses"], name
            assert all(torch.equal(a[f], b[f]) for f in a), name
        else:  # replicated GaLore steps its projected mean gradient, the owner the whole one: rounding apart
            rel = max(abs(x - y) / abs(y) for x, y in zip(sharded["losses"], plain["losses"], strict=True))
            l2 = max(float((b[f] - a[f]).norm() / a[f].norm()) for f in a)
            print(f"{name}/sharded vs replicated: loss rel diff {rel:.2e}, weight relative L2 {l2:.2e}")
            assert rel <= 2e-4 and l2 <= 2e-2, (name, rel, l2)
        ranks, declared = sharded["ranks"], sharded["declared"]
        full = plain["ranks"][0]["state_bytes"]
        # the ranks' shares partition the replicated state; the larger share is what balance allows
        assert sum(r["state_bytes"] for r in ranks) == full == declared["state_bytes_all"], name
        assert max(r["state_bytes"] for r in ranks) < full, name
        assert set(declared["owners"].values()) == {0, 1}
        for r, p in zip(ranks, plain["ranks"], strict=True):
            assert r["peak"] < p["peak"], name  # each rank's plan drops the state it does not own
            assert r["measured"] == r["peak"] if name == "adamw" else r["measured"] <= r["peak"], (name, r)
        print(f"{name}/sharded: state per rank {[r['state_bytes'] for r in ranks]} of {full}; peak per rank "
              f"{[r['measured'] for r in ranks]} vs replicated {[r['measured'] for r in plain['ranks']]}; "
              f"sent per step {[r['bytes_per_step'] for r in ranks]}")


def test_ranks_that_disagree_fail_fast_naming_the_rank():
    """Rank 1 brings sequences half as long: both ranks raise, before any step, naming rank 1."""
    code = (
        "import os, sys, torch, torch.distributed as dist, memfit\n"
        "from memfit.models import build_llama, lm_loss\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "torch.manual_seed(0)\n"
        "m = build_llama('tiny-llama', num_hidden_layers=1)\n"
        "x = torch.randint(0, 256, (4, 32 if r == 0 else 16))\n"
        "try:\n"
        "    memfit.optimize(m, example_inputs=(x, x), loss_fn=lm_loss, process_group='world')\n"
        "    print('NO ERROR')\n"
        "except memfit.ConfigError as e:\n"
        "    print('ERROR', e)\n"
    )
    logs = _ranks(code)
    for log in logs:
        assert "ERROR memfit.optimize(process_group=): settings, parameters and batch" in log, log[-2000:]
        assert "rank 1 with batch=" in log


def test_every_rank_starts_from_the_first_ranks_weights():
    """Ranks whose models were initialised with different seeds: optimize() broadcasts rank 0's weights (as
    DDP does at construction), so the ranks train one model."""
    code = (
        "import torch, torch.distributed as dist, memfit\n"
        "from memfit.models import build_llama, lm_loss\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "torch.manual_seed(r)\n"
        "m = build_llama('tiny-llama', num_hidden_layers=1, seed=r)\n"
        "x = torch.randint(0, 256, (2, 16))\n"
        "before = float(sum(p.double().sum() for p in m.parameters()))\n"
        "t = memfit.optimize(m, example_inputs=(x, x), loss_fn=lm_loss, process_group='world')\n"
        "t.step(x, x)\n"
        "sums = [None, None]\n"
        "dist.all_gather_object(sums, [float(p.double().sum()) for p in m.parameters()])\n"
        "print('SUMS', r, before, sums[0] == sums[1])\n"
    )
    lines = [next((x for x in log.splitlines() if x.startswith("SUMS")), log[-2000:]) for log in _ranks(code)]
    assert all(line.startswith("SUMS") and line.endswith("True") for line in lines), lines
    assert lines[0].split()[2] != lines[1].split()[2]  # they did start apart


def test_process_group_without_torch_distributed_is_a_config_error():
    x = torch.randint(0, 256, (2, 16))
    with pytest.raises(memfit.ConfigError, match=r"torch\.distributed initialised on every rank"):
        memfit.optimize(build_llama("tiny-llama", num_hidden_layers=1), example_inputs=(x, x), loss_fn=lm_loss,
                        process_group="world")


def test_batchnorm_buffers_follow_pytorch_ddp():
    """A BatchNorm CNN trained data parallel: each rank's running statistics equal those of PyTorch DDP
    (``broadcast_buffers=True``: every step starts from rank 0's buffers) on the same rank and batches."""
    code = (
        "import copy, torch, torch.distributed as dist, torch.nn.functional as F, memfit\n"
        "from memfit.models import build_cnn\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "torch.manual_seed(0)\n"
        "m = build_cnn()\n"
        "gen = torch.Generator().manual_seed(r)\n"
        "data = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen))"
        " for _ in range(4)]\n"
        "ddp = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(m))\n"
        "opt = torch.optim.SGD(ddp.parameters(), lr=0.1)\n"
        "t = memfit.optimize(m, example_inputs=data[0], loss_fn=F.cross_entropy, optimizer=memfit.SGD(lr=0.1),"
        " process_group='world')\n"
        "for x, y in data:\n"
        "    t.step(x, y)\n"
        "    F.cross_entropy(ddp(x), y).backward(); opt.step(); opt.zero_grad()\n"
        "worst = max(float((a - b).abs().max()) for (n, a), b in zip(m.state_dict().items(),"
        " ddp.module.state_dict().values()) if 'running' in n)\n"
        "print('WORST', r, worst)\n"
    )
    logs = _ranks(code)
    for log in logs:
        line = next((x for x in log.splitlines() if x.startswith("WORST")), None)
        assert line is not None, log[-2000:]
        assert float(line.split()[2]) <= 1e-5, line  # the ranks' statistics differ (by a batch) without it


@pytest.mark.parametrize("model,first", [
    ("build_llama('tiny-llama', num_hidden_layers=1); x = torch.randint(0, 256, (2, 16)); y = x; lf = lm_loss",
     "broadcast (buffers, before the step) of the buffer "),
    # nonfinite="ignore": no vote on the loss, so the first collective is a bucket of gradients
    ("build_mlp(); x = torch.randn(4, 32); y = torch.randint(0, 10, (4,)); lf = F.cross_entropy; "
     "kw = dict(nonfinite='ignore')",
     ("bucket_wait of a bucket of ", "all_reduce_start of a bucket of ")),
], ids=["buffers-first", "gradients-first"])
def test_a_rank_that_stops_is_a_collective_error_naming_the_value(model, first):
    """Rank 1 compiles the step and leaves; rank 0's step fails in its first collective (the buffers'
    broadcast; without buffers or the vote on the loss, a bucket of gradients) with an error naming the op
    and the value it waited on, and changes nothing."""
    code = (
        "import datetime, torch, torch.distributed as dist, torch.nn.functional as F, memfit\n"
        "from memfit.models import build_llama, build_mlp, lm_loss\n"
        "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=20))\n"
        "r = dist.get_rank()\n"
        "torch.manual_seed(0)\n"
        f"kw = {{}}; m = {model}\n"
        "t = memfit.optimize(m, example_inputs=(x, y), loss_fn=lf, process_group='world', **kw)\n"
        "if r == 1:\n"
        "    dist.destroy_process_group()\n"
        "    raise SystemExit(0)\n"
        "before = {k: v.clone() for k, v in m.state_dict().items()}\n"
        "try:\n"
        "    t.step(x, y)\n"
        "    print('NO ERROR')\n"
        "except memfit.CollectiveError as e:\n"
        "    same = all(torch.equal(before[k], v) for k, v in m.state_dict().items())\n"
        "    print('ERROR', e, '| unchanged', same)\n"
    )
    logs = _ranks(code)
    line = next((x for x in logs[0].splitlines() if x.startswith(("ERROR", "NO ERROR"))), logs[0][-2000:])
    firsts = (first,) if isinstance(first, str) else first
    assert line.startswith(tuple(f"ERROR memfit::{f}" for f in firsts)), line
    assert "expected every rank of the group in this collective" in line and line.endswith("| unchanged True")


_RESUME = (
    "import sys, torch, torch.distributed as dist, memfit\n"
    "from memfit.models import build_llama, lm_loss\n"
    "dist.init_process_group('gloo')\n"
    "r, ckpt = dist.get_rank(), sys.argv[1]\n"
    "passes, shard = PASSES, SHARD\n"
    "gen = torch.Generator().manual_seed(1)\n"
    "batches = [torch.randint(0, 256, (8, 32), generator=gen) for _ in range(6)]\n"
    "mine = [b[4 * r:4 * r + 4] for b in batches]\n"
    "def trainer():\n"
    "    torch.manual_seed(0)\n"
    "    m = build_llama('tiny-llama', num_hidden_layers=1)\n"
    "    return m, memfit.optimize(m, example_inputs=(mine[0], mine[0]), loss_fn=lm_loss, passes=passes,\n"
    "                              process_group='world', shard=shard)\n"
    "def mean(loss):\n"
    "    loss = loss.detach().clone(); dist.all_reduce(loss); return float(loss) / 2\n"
    "m, t = trainer()\n"
    "for x in mine[:3]:\n"
    "    t.step(x, torch.roll(x, -1, 1))\n"
    "memfit.save_checkpoint(t, ckpt)\n"
    "first = [mean(t.step(x, torch.roll(x, -1, 1))) for x in mine[3:]]\n"
    "m2, t2 = trainer()\n"
    "memfit.load_checkpoint(t2, ckpt)\n"
    "again = [mean(t2.step(x, torch.roll(x, -1, 1))) for x in mine[3:]]\n"
    "t.gather_parameters(); t2.gather_parameters()\n"
    "same = all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))\n"
    "print('RESUME', r, first, again, same, sorted(t.executor.state) == sorted(t2.executor.state))\n"
)


@pytest.mark.parametrize("passes,shard", [(["remat", "fused_update", ("lowrank", {"rank": 16, "gap": 2})], "state"),
                                          (None, "params")], ids=["galore-state-sharded", "adamw-params-sharded"])
def test_sharded_checkpoint_resumes_bit_identically_and_loads_on_one_process(tmp_path, passes, shard):
    """Two ranks with sharded GaLore state (or sharded parameters) save after 3 steps: resuming at world
    size 2 repeats the next 3 steps bit for bit (losses and weights); one process (no process group) loads
    the same checkpoint and its next 3 steps on the whole batches give the same losses (to the reduction
    order)."""
    ckpt = tmp_path / "ckpt"
    code = _RESUME.replace("sys.argv[1]", repr(str(ckpt))).replace("PASSES", repr(passes)).replace(
        "SHARD", repr(shard))
    logs = _ranks(code)
    lines = [next((x for x in log.splitlines() if x.startswith("RESUME")), log[-3000:]) for log in logs]
    first = None
    for line in lines:
        assert line.startswith("RESUME"), line
        rest = line.split(" ", 2)[2]
        a, b = rest.split("] [")
        first = [float(v) for v in a.strip("[").split(", ")]
        again = [float(v) for v in b.split("]")[0].split(", ")]
        assert again == first and rest.endswith("] True True"), line
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world"] == 2 and manifest["shard"] == shard and set(manifest["state"].values()) == {0, 1}
    assert set(manifest["params"].values()) == ({0, 1} if shard == "params" else {0})
    # world size 2 -> 1: the single process holds every parameter's state, read from both ranks' files
    torch.manual_seed(0)
    model = build_llama("tiny-llama", num_hidden_layers=1)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (8, 32), generator=gen) for _ in range(6)]
    t = memfit.optimize(model, example_inputs=(batches[0], batches[0]), loss_fn=lm_loss, passes=passes)
    before = {k: v.clone() for k, v in t.state_dict()["state"].items()}
    with pytest.raises(memfit.ConfigError, match=r"rank1\.pt"):  # a rank's file missing: nothing loaded
        (ckpt / "rank1.pt").rename(ckpt / "moved.pt")
        try:
            memfit.load_checkpoint(t, ckpt)
        finally:
            (ckpt / "moved.pt").rename(ckpt / "rank1.pt")
    assert all(torch.equal(before[k], v) for k, v in t.state_dict()["state"].items()) and t.step_count == 0
    memfit.load_checkpoint(t, ckpt)
    assert t.step_count == 3
    one = [float(t.step(x, torch.roll(x, -1, 1))) for x in batches[3:]]
    rel = max(abs(a - b) / abs(b) for a, b in zip(one, first, strict=True))
    print(f"resume 2 -> 1 ranks: losses {one} vs {first}, max rel diff {rel:.2e}")
    assert rel <= 1e-5


def test_compile_door_under_ddp_and_fsdp2_matches_the_default_backend():
    """torch.compile(backend="memfit") on a model wrapped by PyTorch's DDP, or sharded by FSDP2's
    ``fully_shard`` (per layer and whole), trains as the same wrapper under Dynamo with the ``eager`` backend
    (the same graph breaks, PyTorch's own kernels; Inductor's C++ builds would double the test's time for no
    other check): 3 steps of torch AdamW on 2 ranks, losses within 1e-6 relative; memfit compiled graphs of
    the step (Dynamo runs FSDP2's hooks eagerly: the graphs between them are memfit's). Both wrappers in one
    launch of the two ranks."""
    code = (
        "import copy, torch, torch.distributed as dist, memfit\n"
        "from memfit.frontends import dynamo\n"
        "from memfit.models import build_llama, lm_loss\n"
        "dist.init_process_group('gloo')\n"
        "r = dist.get_rank()\n"
        "torch.manual_seed(0)\n"
        "base = build_llama('tiny-llama', num_hidden_layers=1)\n"
        "gen = torch.Generator().manual_seed(1 + r)\n"
        "data = [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(3)]\n"
        "def wrap(m, wrapper):\n"
        "    if wrapper == 'ddp':\n"
        "        return torch.nn.parallel.DistributedDataParallel(m)\n"
        "    from torch.distributed.device_mesh import init_device_mesh\n"
        "    from torch.distributed.fsdp import fully_shard\n"
        "    mesh = init_device_mesh('cpu', (dist.get_world_size(),))\n"
        "    for layer in m.model.layers:\n"
        "        fully_shard(layer, mesh=mesh)\n"
        "    return fully_shard(m, mesh=mesh)\n"
        "for wrapper in ('ddp', 'fsdp2'):\n"
        "    out = {}\n"
        "    for backend in ('eager', 'memfit'):\n"
        "        torch._dynamo.reset()\n"
        "        graphs = dynamo.TOTALS['memfit_graphs']\n"
        "        m = wrap(copy.deepcopy(base), wrapper)\n"
        "        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)\n"
        "        c = torch.compile(m, backend=backend)\n"
        "        out[backend] = []\n"
        "        for x in data:\n"
        "            loss = lm_loss(c(x), torch.roll(x, -1, 1))\n"
        "            loss.backward(); opt.step(); opt.zero_grad()\n"
        "            out[backend].append(float(loss))\n"
        "    rel = max(abs(a - b) / abs(b) for a, b in zip(out['memfit'], out['eager']))\n"
        "    print('RESULT', wrapper, r, rel, dynamo.TOTALS['memfit_graphs'] - graphs, out)\n"
    )
    logs = _ranks(code)
    for log in logs:
        lines = [x for x in log.splitlines() if x.startswith("RESULT")]
        assert [x.split(" ")[1] for x in lines] == ["ddp", "fsdp2"], log[-3000:]
        for line in lines:
            _, _, _, rel, graphs, _ = line.split(" ", 5)
            print(line)
            assert float(rel) <= 1e-6 and int(graphs) >= 1, line


def test_shard_without_a_process_group_or_unknown_is_a_config_error():
    """shard= needs a process group to shard over; an unknown value names the choices; nothing is built."""
    x = torch.randint(0, 256, (2, 16))
    model = build_llama("tiny-llama", num_hidden_layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(memfit.ConfigError, match=r"shard=.*expected a process_group to shard over"):
        memfit.optimize(model, example_inputs=(x, x), loss_fn=lm_loss, shard="state")
    with pytest.raises(memfit.ConfigError, match=r"expected one of \('none', 'state', 'params', 'auto'\), got 'zero3'"):
        memfit.optimize(model, example_inputs=(x, x), loss_fn=lm_loss, process_group="world", shard="zero3")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_sharded_weights_refuse_encoded_weights_in_the_plan():
    """shard='params' with INT8 weights (the update writes codes and scales, not one parameter): a ConfigError
    naming what the update writes and what to use instead, from memfit.plan without any process group."""
    x = torch.randint(0, 256, (2, 16))
    with pytest.raises(memfit.ConfigError, match=r"updates that write their own parameter only.*use shard='state'"):
        memfit.plan(build_llama("tiny-llama", num_hidden_layers=1), example_inputs=(x, x), loss_fn=lm_loss,
                    passes=["remat", "fused_update", "quantize_weights"], world_size=2, shard="params")


def test_buckets_train_bit_for_bit_as_one_all_reduce_per_gradient(launched):
    """The default buckets (overlapped with the backward) and one synchronous all-reduce per gradient
    (bucket_bytes=0) give the same mean gradients: 8 steps' losses equal bit for bit, the same bytes sent,
    fewer collectives; both plans exact on every rank."""
    results, out, _ = launched
    got, one = results["adamw"], results["adamw/unbucketed"]
    a = torch.load(f"{out}.adamw.pt")
    assert got["losses"][:8] == one["losses"]
    assert got["bytes_per_step"] == one["bytes_per_step"]
    d, e = got["declared"], one["declared"]
    assert d["bucketed"] == e["all_reduces"] == len(a) and 1 < d["buckets"] < len(a) and e["buckets"] == 0
    for r, s in zip(got["ranks"], one["ranks"], strict=True):
        assert r["measured"] == r["peak"] and s["measured"] == s["peak"], (r, s)
    print(f"buckets: {d['buckets']} for {len(a)} gradients (cap {d['bucket_cap']} B); peak per rank "
          f"{[r['measured'] for r in got['ranks']]} vs unbucketed {[r['measured'] for r in one['ranks']]}")


def test_auto_shard_picks_the_least_sharding_that_fits_and_trains_as_replicated(launched):
    """shard="auto" with a budget below the state-sharded plan and above the weights-sharded one: every rank
    chooses weights sharding, fits, and trains as the replicated run (8 steps, losses bit for bit)."""
    results, _, _ = launched
    got, plain = results["adamw/auto"], results["adamw"]
    budget = _auto_budget()
    assert got["declared"]["shard"] == "params", got["declared"]["shard"]
    assert got["losses"] == plain["losses"][:8]
    assert all(r["measured"] == r["peak"] <= budget for r in got["ranks"]), (got["ranks"], budget)


def test_bucketed_all_reduces_overlap_the_backward_and_are_planned():
    """The replicated step's gradients go out in buckets in backward order: each bucket's all-reduce starts
    where its last gradient is complete, backward ops run before it is waited on (after the next bucket
    started), its updates read views of it; the plan counts the buckets (at most about two alive more than
    without), and a bucket cap of 0 gives one all-reduce per gradient."""
    from memfit.api import build_graph

    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (2, 32))
    ops = torch.ops.memfit
    g, plan = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2))
    nodes = list(g.graph.nodes)
    at = {n: i for i, n in enumerate(nodes)}
    starts = [n for n in nodes if n.target is ops.all_reduce_start.default]
    waits = {n.args[0]: n for n in nodes if n.target is ops.bucket_wait.default}
    info = g.info["data_parallel"]
    assert len(starts) == info["buckets"] > 2 and info["bucketed"] == len(g.updates) == sum(len(s.args[0])
                                                                                           for s in starts)
    for k, start in enumerate(starts):
        wait = waits[start]
        assert at[max(start.args[0], key=at.__getitem__)] < at[start] < at[wait]
        between = [n for n in nodes[at[start] + 1:at[wait]] if n.op == "call_function"
                   and n.target not in (ops.all_reduce_start.default, ops.bucket_wait.default)]
        if k + 1 < len(starts):  # the backward goes on while the bucket is on the wire
            assert at[starts[k + 1]] < at[wait] and any(n in g.backward_nodes() for n in between)
        readers = [u for v in start.users if v is not wait for w in v.users for u in w.users]
        assert readers and all(at[u] > at[wait] for u in readers)
        assert all(args_of(u).grad.args[0].args[0] is start for u in readers)
    unbucketed, plan0 = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2),
                                    passes=["fused_cross_entropy", "remat", "fused_update",
                                            ("data_parallel", {"bucket_bytes": 0})])
    assert unbucketed.info["data_parallel"]["all_reduces"] == len(g.updates)
    assert not any(n.target is ops.all_reduce_start.default for n in unbucketed.graph.nodes)
    assert plan0.peak_bytes <= plan.peak_bytes <= plan0.peak_bytes + 3 * info["bucket_cap"]
    print(f"{len(starts)} buckets (cap {info['bucket_cap']} B) for {len(g.updates)} gradients; peak "
          f"{plan.peak_bytes} B vs {plan0.peak_bytes} B one all-reduce per gradient")


def test_bucket_bytes_must_be_a_size():
    with pytest.raises(memfit.ConfigError, match=r"bucket_bytes: expected an int: bytes per bucket.*got 'big'"):
        make_pass(("data_parallel", {"bucket_bytes": "big"}), process_group="0", world=2)


def test_auto_shard_plans_the_least_sharding_that_fits_before_lossy_levers():
    """memfit.plan(world_size=2, shard="auto"): a budget the replicated step fits stays replicated; below it,
    state sharding; below that, weights sharding; below that, lossy levers on the sharded step, every rank
    fitting. Sharding is lossless: it comes before 8-bit or low-rank state."""
    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (4, 32))
    kw = dict(example_inputs=(x, x), loss_fn=lm_loss, world_size=2)
    peak = {s: memfit.plan(model, shard=s, **kw).peak_bytes for s in ("none", "state", "params")}
    assert peak["params"] < peak["state"] < peak["none"]
    for budget, want in ((peak["none"], "none"), ((peak["none"] + peak["state"]) // 2, "state"),
                         ((peak["state"] + peak["params"]) // 2, "params")):
        p = memfit.plan(model, shard="auto", budget=budget, **kw)
        assert p.shard == want and p.peak_bytes <= budget, (want, p.shard, p.peak_bytes, budget)
        assert not {"quantize_state", "lowrank", "quantize_weights"} & set(p.passes), p.passes
    tight = peak["params"] * 7 // 10  # below what recomputation reaches on the weights-sharded step
    p = memfit.plan(model, shard="auto", budget=tight, **kw)
    assert p.shard in ("state", "params") and {"quantize_state", "lowrank", "quantize_weights"} & set(p.passes)
    assert max(r["peak_bytes"] for r in p.ranks) <= tight
    with pytest.raises(memfit.BudgetError, match=r"shard='auto', 2 ranks.*smallest replicated peak of .* and "
                                                 r"sharding \('params'\) saving"):
        memfit.plan(model, shard="auto", budget=peak["params"] // 20, **kw)


# one rank of a 2-rank MLP run: rank r, model m, a 20 s collective timeout (a wait shows as an error, not a hang)
_MLP_RANK = ("import datetime, warnings, torch, torch.distributed as dist, torch.nn.functional as F, memfit\n"
             "from memfit.models import build_mlp\n"
             "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=20))\n"
             "r = dist.get_rank()\n"
             "torch.manual_seed(0)\n"
             "m = build_mlp()\n")


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank():
    """Rank 1's batch holds a NaN: both ranks skip that step (rank 0 told by the vote on the loss, not left
    waiting in the backward's all-reduces), their weights unchanged; the next step trains on both alike."""
    code = _MLP_RANK + (
        "x, y = torch.randn(4, 32, generator=torch.Generator().manual_seed(r)), torch.randint(0, 10, (4,))\n"
        "t = memfit.optimize(m, example_inputs=(x, y), loss_fn=F.cross_entropy, process_group='world')\n"
        "before = {k: v.clone() for k, v in m.state_dict().items()}\n"
        "bad = x.clone()\n"
        "if r == 1:\n"
        "    bad[0, 0] = float('nan')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    first = t.step(bad, y)\n"
        "same = all(torch.equal(before[k], v) for k, v in m.state_dict().items())\n"
        "second = float(t.step(x, y))\n"
        "total = torch.cat([p.detach().flatten() for p in m.parameters()]).sum()\n"
        "sums = [None, None]\n"
        "dist.all_gather_object(sums, float(total))\n"
        "print('RESULT', r, float(first), same, t.skipped_steps, str(w[0].message) if w else '', second, "
        "sums[0] == sums[1])\n"
    )
    logs = _ranks(code)
    for r, log in enumerate(logs):
        line = next((x for x in log.splitlines() if x.startswith("RESULT")), log[-3000:])
        assert line.startswith(f"RESULT {r} nan True 1 "), line
        assert ("non-finite loss (on another rank)" if r == 0 else "non-finite loss;") in line, line
        assert line.endswith("True") and "nan True 1" in line and line.split()[-2] != "nan", line


@pytest.mark.parametrize("shard", ["state", "params"])
def test_sharded_buckets_issue_the_same_collectives_in_the_same_order_on_every_rank(shard):
    """Sharded, the gradients go out in buckets too (one async reduce per owner's run, waited for after the
    next bucket started; with shard="state" each owner's broadcasts left running until the step's end; with
    "params" each weight's fetch started before the previous fetch is waited for): each
    rank's step differs (its own updates and state only) but issues the same collectives in the same order,
    which is what keeps gloo and NCCL from waiting forever; the owner's updates read views of the bucket."""
    from memfit.api import build_graph

    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (2, 32))
    ops = torch.ops.memfit
    kinds = (ops.reduce_start.default, ops.bucket_wait.default, ops.broadcast_start_.default,
             ops.broadcasts_wait.default, ops.fetch_start.default, ops.lend_start_.default)
    seqs, owned = [], []
    for rank in range(2):
        g, _ = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2), group_rank=rank, shard=shard)
        info = g.info["data_parallel"]
        nodes = list(g.graph.nodes)
        starts = [n for n in nodes if n.target is ops.reduce_start.default]
        assert len(starts) == info["buckets"] > 2 and info["bucketed"] == len(info["owners"])
        assert not any(n.target in (ops.reduce_mean.default, ops.reduce_send_.default) for n in nodes)
        if shard == "state":
            assert nodes[-2].target is ops.broadcasts_wait.default  # the broadcasts end with the step
        mine = [f for f, o in info["owners"].items() if o == rank]
        updates = [n for n in nodes if n.target is ops.adamw_update.default]
        assert len(updates) == len(mine)
        assert all(args_of(u).grad.args[0].args[0] in starts for u in updates)  # views of a bucket
        pair = {ops.fetch_start.default: "broadcast", ops.lend_start_.default: "broadcast"}  # the two ends of one
        if shard == "params":  # each weight's fetch starts one fetch ahead: S0 S1 W0 S2 W1 ... W(n-1)
            events = "".join("S" if n.target in kinds[4:] else "W" for n in nodes
                             if n.target in (*kinds[4:], ops.fetch_wait_.default))
            k = events.count("S")
            assert k > 2 and events == "S" + "SW" * (k - 1) + "W", events
        seqs.append([(pair.get(n.target, str(n.target)), n.kwargs.get("name", ""),
                      n.args[1:] if n.target is ops.reduce_start.default else ())
                     for n in nodes if n.target in kinds and n.target is not ops.bucket_wait.default])
        owned.append(mine)
    assert seqs[0] == seqs[1] and len(seqs[0]) > 2 * len(starts)
    assert owned[0] and owned[1] and not set(owned[0]) & set(owned[1])


def test_sharded_weights_without_prefetch_fetch_where_they_are_read():
    """prefetch=False: each fetch starts right where it is waited for, so no fetched copy lives ahead of its
    reader: the plan's peak is no higher than with prefetching (which holds one copy more in flight)."""
    from memfit.api import build_graph

    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (2, 32))
    ops = torch.ops.memfit
    peaks = {}
    for prefetch in (True, False):
        passes = ["fused_cross_entropy", "remat", "fused_update", ("data_parallel", {"prefetch": prefetch})]
        g, plan = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2), shard="params", passes=passes)
        nodes = list(g.graph.nodes)
        events = "".join("S" if n.target in (ops.fetch_start.default, ops.lend_start_.default) else "W"
                         for n in nodes if n.target in (ops.fetch_start.default, ops.lend_start_.default,
                                                        ops.fetch_wait_.default))
        k = events.count("S")
        assert events == ("S" + "SW" * (k - 1) + "W" if prefetch else "SW" * k), events
        peaks[prefetch] = plan.peak_bytes
    assert peaks[False] <= peaks[True]
    with pytest.raises(memfit.ConfigError, match=r"prefetch: expected True or False, got 1"):
        make_pass(("data_parallel", {"prefetch": 1}), process_group="0", world=2)


@pytest.mark.parametrize("shard", ["none", "state"])
def test_a_non_finite_gradient_on_one_rank_never_leaves_the_others_waiting(shard):
    """Rank 1's batch makes every gradient NaN while both losses are finite (0 * sqrt(0) in the loss).
    Replicated, every rank sees the same reduced NaN at its first update and skips the whole step (the
    buckets still in flight finished first); sharded, each owner skips its own parameters' updates and
    broadcasts them unchanged. Either way no rank waits for another, the weights are unchanged, and the
    next step trains on both ranks alike."""
    code = _MLP_RANK + (
        "def lf(out, y):\n"
        "    keep = (y != 0).to(out.dtype)[:, None]\n"
        "    return F.cross_entropy(out, y) + 0.0 * torch.sqrt(out.abs() * keep).sum()\n"
        "x = torch.randn(4, 32, generator=torch.Generator().manual_seed(r))\n"
        "y = torch.randint(1, 10, (4,), generator=torch.Generator().manual_seed(r))\n"
        f"t = memfit.optimize(m, example_inputs=(x, y), loss_fn=lf, process_group='world', shard={shard!r})\n"
        "before = {k: v.clone() for k, v in m.state_dict().items()}\n"
        "p0 = float(torch.cat([p.detach().flatten() for p in m.parameters()]).sum())\n"
        "bad = torch.zeros_like(y) if r == 1 else y\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    first = float(t.step(x, bad))\n"
        "t.gather_parameters()\n"
        "same = all(torch.equal(before[k], v) for k, v in m.state_dict().items())\n"
        "second = float(t.step(x, y))\n"
        "t.gather_parameters()\n"
        "total = float(torch.cat([p.detach().flatten() for p in m.parameters()]).sum())\n"
        "sums = [None, None]\n"
        "dist.all_gather_object(sums, total)\n"
        "print('RESULT', r, same, len(w) > 0, second == second, sums[0] == sums[1], total != p0)\n"
    )
    logs = _ranks(code)
    for r, log in enumerate(logs):
        line = next((x for x in log.splitlines() if x.startswith("RESULT")), log[-3000:])
        assert line == f"RESULT {r} True True True True True", line


def test_projected_all_reduces_are_overlapped_in_the_bucket_sequence():
    """GaLore with projected communication: each projection's all-reduce starts where its gradient is complete
    (memfit::projected_start) and is waited for after the next start of any kind, the update reading the
    tensor the wait projected back into; with bucket_bytes=0 it is the synchronous all_reduce_projected."""
    from memfit.api import build_graph

    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (2, 32))
    ops = torch.ops.memfit
    passes = ["fused_cross_entropy", "remat", "fused_update", ("lowrank", {"rank": 16, "gap": 5})]
    g, _ = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2), passes=passes)
    nodes = list(g.graph.nodes)
    at = {n: i for i, n in enumerate(nodes)}
    starts = [n for n in nodes if n.target in (ops.all_reduce_start.default, ops.projected_start.default)]
    projected = [n for n in starts if n.target is ops.projected_start.default]
    assert len(projected) == g.info["data_parallel"]["projected_all_reduces"] > 0
    for k, start in enumerate(starts):
        if start.target is not ops.projected_start.default:
            continue
        wait = next(u for u in start.users if u.target is ops.projected_wait.default)
        upd = next(u for u in start.users if u is not wait)
        after = starts[k + 1] if k + 1 < len(starts) else start
        assert at[start] < at[after] < at[wait] < at[upd] if after is not start else at[start] < at[wait] < at[upd]
        assert args_of(upd).grad is start and args_of(upd).grad_right is None
    sync, _ = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2),
                          passes=[*passes, ("data_parallel", {"bucket_bytes": 0})])
    targets = {n.target for n in sync.graph.nodes}
    assert ops.all_reduce_projected.default in targets and ops.projected_start.default not in targets


def test_a_ranks_own_auto_sharded_plan_says_whose_it_is():
    """optimize() plans every rank under shard="auto" (their choice must agree) but keeps its own rank's graph
    and plan: the plan says which rank it is, and which rank peaks highest when that is another."""
    from memfit.api import build_graph

    model = build_llama("tiny-llama", num_hidden_layers=1)
    x = torch.randint(0, 256, (PER_RANK, 32))
    _, plan = build_graph(model, (x, x), loss_fn=lm_loss, group=("plan", 2), group_rank=1, shard="auto",
                          budget_bytes=_auto_budget())
    assert plan.shard == "params" and plan.rank == 1 and [r["rank"] for r in plan.ranks] == [0, 1]
    assert plan.peak_bytes == plan.ranks[1]["peak_bytes"]
    top = max(plan.ranks, key=lambda r: r["peak_bytes"])["rank"]
    line = plan.describe_ranks()[0]
    assert "this plan is rank 1's" in line and (f"rank {top} peaks highest" in line if top != 1 else
                                                 "the highest peak" in line), line


@pytest.mark.parametrize("wait", ["bucket_wait", "fetch_wait_", "projected_wait"])
def test_a_wait_without_its_start_names_the_op_and_what_to_do(wait):
    """The waits of memfit's asynchronous collectives on a tensor nothing started a collective on: an error
    naming the op, what it expected and what to do, the tensor unchanged (no process group needed)."""
    t = torch.ones(4, 4)
    args = {"bucket_wait": (t, 2), "fetch_wait_": (t,), "projected_wait": (t, torch.eye(4), "left", 2)}[wait]
    with pytest.raises(RuntimeError, match=rf"memfit::{wait}: expected a tensor .* started a collective on .*"
                                           r"got none in flight on it; run the step's graph in its order"):
        getattr(torch.ops.memfit, wait)(*args)
    assert torch.equal(t, torch.ones(4, 4))
