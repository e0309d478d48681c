"""``memfit plan`` and the memory-timeline picture: exit codes, the table, hand arithmetic, a real PNG."""

from __future__ import annotations

import struct
import sys

import pytest
import torch

import memfit
from memfit import cli, models
from memfit.runtime.plot import plot_memory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG (starts {data[:8]!r})"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plan_tiny_llama_fits_prints_the_table_and_draws(tmp_path, capsys):
    out = tmp_path / "step.png"
    rc = cli.main(["plan", "tiny-llama", "--budget", "1GB", "--batch", "2", "--seq", "64", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "MemoryPlan (passes:" in captured.out and "predicted peak" in captured.out
    assert "parameters: 3,295,488 (3,295,488 trainable) x 4 B" in captured.out
    assert captured.out.count("[matches]") == 2, captured.out
    assert "capturing tiny-llama (4 layers)..." in captured.err  # fewer than 5 layers: captured whole
    assert "planned in" in captured.err
    assert _png_size(out) == (1200, 600)
    assert out.stat().st_size > 10_000


def test_plan_fuse_prints_what_was_fused(tmp_path, capsys):
    rc = cli.main(["plan", "tiny-llama", "--batch", "2", "--seq", "64", "--fuse", "--out", str(tmp_path / "s.png")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "fused linear + cross-entropy on lm_head.weight: 128 tokens x 256 classes" in out
    line = next(x for x in out.splitlines() if "fused pointwise:" in x)
    groups = int(line.split("fused pointwise: ")[1].split(" groups")[0])
    assert groups > 0 and "generated kernels" in line and "never materialised" in line
    assert "fuse" in out.splitlines()[0]  # the plan's passes


def test_plan_world_size_prints_each_ranks_share(tmp_path, capsys):
    """--world-size 4: every rank planned with its own share of the optimizer state; the shares partition
    the model's state (the hand check), each rank's peak is below the one-process plan's."""
    args = ["plan", "tiny-llama", "--batch", "2", "--seq", "64", "--out", str(tmp_path / "s.png")]
    assert cli.main(args) == 0
    one = capsys.readouterr().out
    assert cli.main([*args, "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "per rank (world size 4, optimizer state sharded by parameter" in out
    rows = [x for x in out.splitlines() if x.strip().startswith("rank ")]
    assert len(rows) == 4 and all("of 25.14 MiB" in x for x in rows), rows  # 2 x 4 B x 3,295,488
    assert out.count("[matches]") == 2 and "summed over the 4 ranks' shares" in out

    def peak(text):
        line = next(x for x in text.splitlines() if "predicted peak" in x)
        return memfit.parse_budget(line.split("predicted peak")[1].strip().replace(" ", ""))

    assert peak(out) < peak(one) - 12 * 2**20  # three quarters of the state gone, less the reduced copy
    assert cli.main([*args, "--world-size", "4", "--shard", "params"]) == 0  # the weights sharded too
    fsdp = capsys.readouterr().out
    assert "optimizer state and weights sharded by parameter" in fsdp and fsdp.count("[matches]") == 2, fsdp
    assert peak(fsdp) < peak(out)
    assert cli.main([*args, "--world-size", "4", "--shard", "none"]) == 0  # replicated: no less than one process
    assert peak(capsys.readouterr().out) >= peak(one)


def test_plan_over_budget_exits_3_naming_the_largest_tensors(tmp_path, capsys):
    out = tmp_path / "over.png"
    rc = cli.main(["plan", "tiny-llama", "--budget", "1MB", "--batch", "1", "--seq", "16", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_OVER_BUDGET
    assert "largest live at the peak" in captured.err and "model.layers." in captured.err
    assert "976.56 KiB" in captured.err  # the budget, as the error names it
    assert "predicted peak" in captured.out  # the step is still shown: what to cut is the point
    assert _png_size(out) == (1200, 600)


def test_plan_reads_a_hugging_face_config_json(tmp_path, capsys):
    models.llama_config("tiny-llama").save_pretrained(tmp_path)
    rc = cli.main(["plan", str(tmp_path / "config.json"), "--batch", "1", "--seq", "16",
                   "--out", str(tmp_path / "hf.png")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "parameters: 3,295,488 (3,295,488 trainable)" in captured.out


def test_plan_rejects_an_unknown_model_with_exit_2(tmp_path, capsys):
    assert cli.main(["plan", "llama-9000b", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "memfit.models.build: expected a preset" in err and "llama-7b" in err
    assert not (tmp_path / "x.png").exists()


# llama-60m: hidden 512, MLP 1376, 8 layers, vocabulary 32000 (models.LLAMA_PRESETS)
EMBED = 32000 * 512
LAYER = 4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512  # q k v o, gate up down, two RMSNorms
LLAMA_60M_PARAMS = 2 * EMBED + 8 * LAYER + 512  # embeddings, lm_head (untied), layers, final norm


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_60m_bf16_plan_matches_hand_arithmetic(tied):
    """Parameter bytes = numel x 2 (bf16), a tied embedding once; AdamW state = 2 fp32 moments per parameter."""
    assert LLAMA_60M_PARAMS == 58_073_600
    with torch.device("meta"):
        model = models.build_llama("llama-60m", tie_word_embeddings=tied)
    model = model.to(torch.bfloat16)
    plan = cli.plan_on_meta(model, batch=1, seq=256)
    params = LLAMA_60M_PARAMS - (EMBED if tied else 0)
    assert sum(p.numel() for p in model.parameters()) == params
    assert plan.persistent["parameters"] == params * 2
    assert plan.persistent["optimizer state"] == 2 * 4 * params
    assert plan.persistent["batch"] == 2 * 256 * 8  # inputs and targets, int64
    line, ok = cli.hand_check(model, plan)
    assert ok and line.count("[matches]") == 2, line
    assert next(iter(model.parameters())).device.type == "meta"  # planned without allocating


def _small_plan(budget: str = "160KiB"):
    """An MLP step planned on meta (a few hundred milliseconds)."""
    x, y = torch.randn(4, 32, device="meta"), torch.randint(0, 10, (4,), device="meta")
    with torch.device("meta"):
        model = models.build_mlp()
    return memfit.plan(model, example_inputs=(x, y), loss_fn=torch.nn.functional.cross_entropy, budget=budget)


def test_plot_memory_draws_budget_and_measured_peak(tmp_path):
    plan = _small_plan().with_measured(130_000)
    assert plan.budget_bytes == 160 * 1024 and plan.peak_bytes < plan.budget_bytes
    path = plot_memory(plan, tmp_path / "mlp.png", title="MLP, batch 4")
    assert path == tmp_path / "mlp.png"
    assert _png_size(path) == (1200, 600)
    assert path.stat().st_size > 10_000
    # a budget far above the peak is written as text (the chart is not flattened); an explicit backward line
    far = plot_memory(_small_plan("1GB"), str(tmp_path / "far.png"), backward_start=10)
    assert _png_size(far) == (1200, 600)


def test_plot_memory_errors(tmp_path, monkeypatch):
    with pytest.raises(memfit.ConfigError, match=r"memfit.plot_memory: expected a MemoryPlan, got dict"):
        plot_memory({}, tmp_path / "x.png")
    plan = _small_plan()
    with pytest.raises(memfit.ConfigError, match=r"expected a plan with a per-node timeline, got an empty timeline"):
        plot_memory(memfit.MemoryPlan(0, {}, {}, "-", 0, 0, ()), tmp_path / "x.png")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(memfit.ConfigError, match=r"expected matplotlib installed.*pip install memfit\[plot\]"):
        plot_memory(plan, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
