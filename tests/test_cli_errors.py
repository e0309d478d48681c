"""Every ``memfit`` command-line error is one line on stderr and exit code 2, caught before any model is built."""

from __future__ import annotations

import sys

import pytest
import torch

from memfit import cli, models
from memfit.api import STATE_FORMAT
from memfit.errors import ConfigError


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("memfit: error: "), err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if a command gets as far as building or capturing a model (validation must come first)."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(models, "build", boom)
    monkeypatch.setattr(cli, "meta_model", boom)


def test_plan_out_in_a_missing_directory_fails_before_capturing(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, ["plan", "tiny-llama", "--out", "missing_dir/x.png"])
    assert "memfit plan --out" in line and "missing_dir/x.png" in line
    assert "create the directory" in line and "mkdir -p missing_dir" in line
    assert not (tmp_path / "missing_dir").exists()


def test_plan_out_that_is_a_directory_or_an_unknown_format(tmp_path, capsys, no_model):
    line = _one_line_error(capsys, ["plan", "tiny-llama", "--out", str(tmp_path)])
    assert "a directory" in line and "name a file in it" in line
    pytest.importorskip("matplotlib")
    line = _one_line_error(capsys, ["plan", "tiny-llama", "--out", str(tmp_path / "x.xyz")])
    assert "picture suffix" in line and "'.xyz'" in line and "png" in line


def test_train_resume_missing_file_names_it(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, ["train", "--resume", "missing.pt"])
    assert "memfit train --resume" in line and "missing.pt (no such file)" in line and "memfit train --save" in line


def test_train_resume_rejects_files_that_are_not_memfit_checkpoints(tmp_path, capsys, no_model):
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    line = _one_line_error(capsys, ["train", "--resume", str(listed)])
    assert "memfit train --resume" in line and f"got a list in {listed}" in line and STATE_FORMAT in line

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    line = _one_line_error(capsys, ["train", "--resume", str(foreign)])
    assert "got a dict with format None" in line

    text = tmp_path / "notes.pt"
    text.write_text("not a pickle at all")
    line = _one_line_error(capsys, ["train", "--resume", str(text)])
    assert "torch.load cannot read" in line and str(text) in line

    line = _one_line_error(capsys, ["train", "--resume", str(tmp_path)])
    assert "(a directory)" in line


def test_train_resume_needs_more_steps_than_the_checkpoint_holds(tmp_path, capsys, no_model):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": STATE_FORMAT, "step": 5}, ckpt)
    line = _one_line_error(capsys, ["train", "--steps", "5", "--resume", str(ckpt)])
    assert "memfit train --steps" in line and "pass --steps 6 or more" in line


def test_plan_factory_that_returns_no_module(tmp_path, capsys):
    line = _one_line_error(capsys, ["plan", "os:getcwd", "--out", str(tmp_path / "x.png")])
    assert "os:getcwd to return a torch.nn.Module" in line and "got a str" in line
    assert "make the factory return an nn.Module" in line
    line = _one_line_error(capsys, ["plan", "os:sep", "--out", str(tmp_path / "x.png")])
    assert "got a str" in line and "name a factory function" in line


def test_train_factory_without_a_seed_parameter(capsys):
    line = _one_line_error(capsys, ["train", "--model", "os:getcwd", "--steps", "1"])
    assert "getcwd(seed=0)" in line and "accept seed" in line


@pytest.mark.parametrize("argv, where", [
    (["train", "--steps", "0"], "memfit train --steps: expected an int >= 1, got 0"),
    (["train", "--steps", "-3"], "memfit train --steps: expected an int >= 1, got -3"),
    (["train", "--steps", "two"], "memfit train --steps: expected an int >= 1, got 'two'"),
    (["train", "--batch", "0"], "memfit train --batch: expected an int >= 1"),
    (["train", "--seq", "0"], "memfit train --seq: expected an int >= 1"),
    (["train", "--micro-steps", "0"], "memfit train --micro-steps: expected an int >= 1"),
    (["train", "--lr", "0"], "memfit train --lr: expected a finite number > 0, got '0'"),
    (["train", "--lr=-1e-3"], "memfit train --lr: expected a finite number > 0"),
    (["train", "--lr", "nan"], "memfit train --lr: expected a finite number > 0, got 'nan'"),
    (["train", "--budget", "12 parsecs"], "memfit train --budget: expected bytes"),
    (["plan", "tiny-llama", "--batch", "0"], "memfit plan --batch: expected an int >= 1, got 0"),
    (["plan", "tiny-llama", "--seq", "0"], "memfit plan --seq: expected an int >= 1, got 0"),
    (["plan", "tiny-llama", "--budget", "150%"], "memfit plan --budget: expected a percentage in (0, 100]"),
])
def test_numbers_are_checked_by_the_parser(capsys, no_model, argv, where):
    line = _one_line_error(capsys, argv)
    assert where in line and ";" in line


@pytest.mark.parametrize("argv, hint", [
    (["plan"], "memfit plan: the following arguments are required: model; see memfit plan --help"),
    ([], "the following arguments are required: command; see memfit --help"),
    (["fit"], "invalid choice: 'fit'"),
    (["plan", "tiny-llama", "--levers", "all"], "memfit plan --levers: invalid choice: 'all'"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_argparse_errors_are_one_line(capsys, no_model, argv, hint):
    assert hint in _one_line_error(capsys, argv)


def test_train_micro_steps_must_divide_the_batch(capsys, no_model):
    line = _one_line_error(capsys, ["train", "--batch", "8", "--micro-steps", "3"])
    assert "memfit train --micro-steps: expected a divisor of --batch 8, got 3" in line


def test_train_text_missing_file(tmp_path, capsys, no_model):
    missing = tmp_path / "notes.txt"
    line = _one_line_error(capsys, ["train", "--text", str(missing)])
    assert "memfit train --text" in line and f"{missing} (no such file)" in line and "check the path" in line


def test_train_save_into_a_missing_directory_fails_before_training(tmp_path, capsys, no_model):
    line = _one_line_error(capsys, ["train", "--save", str(tmp_path / "nope" / "ckpt.pt")])
    assert "memfit train --save" in line and "does not exist" in line and "create the directory" in line


def test_missing_transformers_is_a_config_error_with_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    line = _one_line_error(capsys, ["plan", "tiny-llama", "--out", str(tmp_path / "x.png")])
    assert "memfit.models.build_llama: expected the transformers package" in line
    assert "pip install 'transformers>=4.45'" in line
    for build in (lambda: models.llama_config(), lambda: models.build_gpt2_small(),
                  lambda: models.build_from_hf_config(tmp_path)):
        with pytest.raises(ConfigError, match=r"expected the transformers package.*pip install"):
            build()


def test_os_and_value_errors_are_one_line_other_errors_are_not_swallowed(monkeypatch, capsys):
    def raiser(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(cli, "_plan", raiser(PermissionError(13, "Permission denied", "/ro/x.png")))
    line = _one_line_error(capsys, ["plan", "tiny-llama"])
    assert line == "memfit: error: PermissionError: [Errno 13] Permission denied: '/ro/x.png'"

    monkeypatch.setattr(cli, "_plan", raiser(ValueError("bad value\n  on two lines")))
    assert _one_line_error(capsys, ["plan", "tiny-llama"]) == "memfit: error: ValueError: bad value on two lines"

    monkeypatch.setattr(cli, "_plan", raiser(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback (and a non-zero exit)
        cli.main(["plan", "tiny-llama"])
    monkeypatch.setattr(cli, "_plan", raiser(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["plan", "tiny-llama"])
