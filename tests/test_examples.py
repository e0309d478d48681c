"""The example and the CLI run end to end on the embedded corpus (a few steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from memfit import cli

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("train_tiny_llama", ROOT / "examples" / "train_tiny_llama.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_trains_on_a_user_text_file(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    final = _load_example().main(["--steps", "12", "--batch", "4", "--seq", "32", "--text", str(text),
                                  "--lr", "1e-2"])
    out = capsys.readouterr().out
    assert "measured peak" in out and "predicted peak" in out
    assert final < 5.0, f"loss did not fall below uniform-ish on a repetitive text: {final}"


def test_cli_train_saves_and_resumes(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    args = ["train", "--steps", "3", "--batch", "2", "--seq", "32", "--save", str(ckpt)]
    assert cli.main(args) == 0
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 3
    assert cli.main(["train", "--steps", "5", "--batch", "2", "--seq", "32", "--resume", str(ckpt)]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_cli_reports_memfit_errors(capsys):
    assert cli.main(["train", "--steps", "1", "--batch", "2", "--seq", "32", "--budget", "12 parsecs"]) == 2
    assert "budget: expected" in capsys.readouterr().err


def test_data_parallel_example_trains_saves_and_resumes_at_another_world_size(tmp_path):
    """examples/train_data_parallel.py as torchrun runs it: 2 ranks with sharded state save after 4 steps,
    1 rank resumes to 6."""
    import os
    import socket
    import subprocess
    import sys

    def launch(world, *args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(ROOT / "examples" / "train_data_parallel.py"), "--batch", "4", "--seq", "32",
               "--layers", "1", *args]
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(world)]
        logs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), logs[0][-3000:]
        return logs[0]

    ckpt = tmp_path / "ckpt"
    first = launch(2, "--steps", "4", "--shard", "state", "--save", str(ckpt))
    assert "step 4: loss" in first and (ckpt / "manifest.json").exists()
    second = launch(1, "--steps", "6", "--resume", str(ckpt))
    assert "step 6: loss" in second
