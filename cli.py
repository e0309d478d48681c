"""``memfit`` command line: ``memfit plan`` predicts a step's memory, ``memfit train`` trains under a budget.

    memfit plan MODEL --budget 16GB --batch 1 --seq 2048 [--dtype fp32|bf16] [--optimizer adamw|sgd]
                      [--out step.png] [--fuse]
    memfit train --model tiny-llama --steps 200 [--text FILE] [--budget 300MB] [--save ckpt.pt] [--resume ckpt.pt]

``memfit plan`` builds the model on the ``meta`` device and captures the step with fake tensors, so a
7B model is planned on a laptop; it exits 0 when the predicted peak fits the budget, 3 when it does not
and 2 on a usage error. Every usage error is one line on stderr, ``memfit: error: <where>: expected <what>,
got <actual>; <what to do>``; settings are checked before any model is built.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch

if TYPE_CHECKING:
    from torch import nn

    from memfit.passes.fused_update import SGD, AdamW
    from memfit.runtime.memory import MemoryPlan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXIT_USAGE = 2
EXIT_OVER_BUDGET = 3


class UsageError(Exception):
    """A command line argparse rejected: ``where`` (the command and option) and argparse's message."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message

    def line(self) -> str:
        """One line, ``memfit: error: <where>: <message>; see <command> --help`` (the hint when it has none)."""
        where, message = self.where, " ".join(self.message.split())
        m = re.match(r"argument (\S+): (.*)", message)
        if m:  # "argument --steps: ..." -> "memfit train --steps: ..."
            where, message = f"{where} {m.group(1)}", m.group(2)
        text = message if where == "memfit" else f"{where}: {message}"
        if ";" not in message:
            text += f"; see {self.where} --help"
        return f"memfit: error: {text}"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (``main`` prints one line and returns 2) instead of printing
    the usage block and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)


def _count(text: str) -> int:
    """argparse type: an int >= 1 (steps, batch, seq, micro-steps)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}; pass a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}; pass 1 or more")
    return value


def _learning_rate(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}; e.g. --lr 3e-3")
    return value


def _budget(text: str) -> str:
    """argparse type: a budget memfit.parse_budget reads (kept as text: a share is of the device planned for)."""
    from memfit.api import parse_budget
    from memfit.errors import ConfigError

    try:
        parse_budget(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("budget: ")) from None
    return text


def _check_output_path(where: str, path: str, *, picture: bool = False) -> None:
    """Raise ConfigError unless ``path`` can be written: a file name (not a folder) in an existing, writable
    folder; for a ``picture``, a suffix matplotlib draws (when matplotlib is installed)."""
    from memfit.errors import ConfigError, where_what_got

    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise ConfigError(where_what_got(where, "a file name", f"{path} (a directory)",
                                         f"name a file in it, e.g. {p / ('step.png' if picture else 'ckpt.pt')}"))
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise ConfigError(where_what_got(where, "a file in an existing directory", f"{path} ({folder} {what})",
                                         f"create the directory first (mkdir -p {folder}) or pick another path"))
    if not os.access(folder, os.W_OK):
        raise ConfigError(where_what_got(where, "a file in a writable directory", f"{path} ({folder} is read-only)",
                                         "pick another path"))
    suffix = p.suffix.lower().removeprefix(".")
    if picture and suffix:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:  # no picture will be drawn: _plan warns and still prints the table
            return
        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            raise ConfigError(where_what_got(where, f"a picture suffix, one of {sorted(formats)}", repr(p.suffix),
                                             "e.g. --out step.png"))


def meta_model(spec: str, dtype: str = "fp32") -> nn.Module:
    """``spec`` (a preset, a config.json or module:factory) built under ``torch.device("meta")``, cast to
    ``dtype`` there and in training mode: shapes and dtypes only, nothing of its size allocated."""
    from memfit import models
    from memfit.errors import ConfigError, where_what_got

    if dtype not in DTYPES:
        raise ConfigError(where_what_got("memfit plan --dtype", f"one of {sorted(DTYPES)}", repr(dtype), "fix it"))
    with torch.device("meta"):
        model = models.build(spec)
    return model.to(DTYPES[dtype]).train()


def plan_on_meta(model: nn.Module, *, batch: int, seq: int, optimizer: str = "adamw",
                 budget: str | None = None, device: str = "cpu", levers: str = "lossy",
                 replicate: bool | str = "auto", fuse: bool = False, world_size: int = 1,
                 shard: str = "state") -> MemoryPlan:
    """``memfit.plan`` of one language-model step of ``model``: ``batch x seq`` int64 token ids (inputs and
    targets) on meta, ``models.lm_loss``, planned for the ``device`` runtime (``cuda``: Triton kernels, no
    CPU-reference workspaces). Raises BudgetError when nothing fits."""
    import memfit
    from memfit import models
    from memfit.errors import ConfigError, where_what_got

    for name, v in (("--batch", batch), ("--seq", seq)):
        if not (isinstance(v, int) and v >= 1):
            raise ConfigError(where_what_got(f"memfit plan {name}", "an int >= 1", v, "e.g. --batch 1 --seq 2048"))
    tokens = torch.zeros((batch, seq), dtype=torch.int64, device="meta")
    return memfit.plan(model, example_inputs=(tokens, tokens), loss_fn=models.lm_loss, budget=budget,
                       optimizer=_optimizer(optimizer), device=device, levers=levers, replicate=replicate,
                       fuse=fuse, world_size=world_size, shard=shard)


def _optimizer(name: str) -> AdamW | SGD:
    import memfit
    from memfit.errors import ConfigError, where_what_got

    opts = {"adamw": memfit.AdamW, "sgd": memfit.SGD}
    if name not in opts:
        raise ConfigError(where_what_got("memfit plan --optimizer", f"one of {sorted(opts)}", repr(name), "fix it"))
    return opts[name]()


def hand_check(model: nn.Module, plan: MemoryPlan, optimizer: str = "adamw") -> tuple[str, bool]:
    """One line comparing the plan's parameter and optimizer-state bytes with arithmetic on the model.

    Parameters: numel x bytes per element, tied tensors once (``model.parameters()`` deduplicates).
    Optimizer state, per trainable parameter, under the setting the planner chose for it
    (``plan.state_choice``, by FQN or by layer class for a replicated plan): fp32 moments, one per state
    name (AdamW 2, SGD with momentum 1, plain SGD 0); ``8-bit``: two uint8 moments plus one fp32 absmax
    per block of 256 each; ``svd r=R``: two 8-bit moments of the projected (R x n) gradient, the fp32
    projector and the 10-float64 schedule; ``apollo-mini``: the same at rank 1 without a stored projector;
    ``lora r=R nf4``: fp32 moments of the adapters only. Parameter bytes follow the weight setting
    (``int8 sr``, ``nf4``, the adapters of ``lora``; see ``weight_of``); a setting may combine one state and
    one weight setting (``apollo-mini + int8 sr``).
    """
    from memfit import projection as pj
    from memfit.runtime.blocks import param_class
    from memfit.runtime.memory import fmt_bytes

    named = dict(model.named_parameters())
    params = list(named.values())
    count = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    sizes = {p.element_size() for p in params}
    per = f"{sizes.pop()} B" if len(sizes) == 1 else "mixed dtypes"
    if any(q in label for label in plan.state_choice.values() for q in ("int8 sr", "nf4")):
        per += " (as held: int8 sr and nf4 weights in codes plus scales, lora adapters added)"
    n_states = len(_optimizer(optimizer).state_names())

    def eight_bit(numel: int) -> int:
        return 2 * numel + 2 * 4 * -(-numel // 256)

    def label_of(fqn: str) -> str | None:
        return plan.state_choice.get(fqn) or plan.state_choice.get(param_class(fqn)) if plan.replicated else \
            plan.state_choice.get(fqn)

    def weight_of(fqn: str, p) -> int:
        """The parameter's own bytes under its weight setting: ``int8 sr`` codes plus one fp32 scale per 128;
        ``nf4`` two codes a byte plus one fp32 absmax per 64; ``lora r=R nf4`` that base plus the adapters."""
        parts = (label_of(fqn) or "").split(" + ")
        own = p.numel() * p.element_size()
        for part in parts:
            if part == "int8 sr":
                return p.numel() + 4 * (p.numel() // 128)
            if part.endswith("nf4"):
                base = p.numel() // 2 + 4 * (p.numel() // 64)
                if part.startswith("lora r="):
                    base += int(part.split("=")[1].split()[0]) * sum(p.shape) * p.element_size()
                return base
        return own

    def state_of(fqn: str, p) -> tuple[int, str]:
        label = label_of(fqn)
        parts = [q for q in (label or "").split(" + ") if q and q not in ("int8 sr", "nf4")]
        if not parts:
            return n_states * 4 * p.numel(), "fp32"
        part = parts[0]
        if part == "8-bit":
            return eight_bit(p.numel()), label
        if part.startswith("lora r="):  # fp32 AdamW moments of the adapters; the weight itself is frozen
            return n_states * 4 * int(part.split("=")[1].split()[0]) * sum(p.shape), label
        m, n = p.shape
        rank = 1 if part == "apollo-mini" else int(part.split("=")[1])
        low = math.prod(pj.low_shape((m, n), rank))
        proj = 0 if part == "apollo-mini" else 4 * pj.proj_shape((m, n), rank)[0] * rank
        return eight_bit(low) + proj + 8 * 10, label

    state_bytes, kinds = 0, {}
    for fqn, p in named.items():
        if p.requires_grad:
            b, kind = state_of(fqn, p)
            state_bytes += b
            kinds[kind] = kinds.get(kind, 0) + 1
    param_bytes = sum(weight_of(f, p) for f, p in named.items())
    got_params = plan.persistent.get("parameters", 0)
    got_state = plan.persistent.get("optimizer state", 0) + plan.persistent.get("pass state", 0)
    shard = ""
    if plan.ranks:  # sharded state: the ranks' shares together are the model's state
        mine = got_state
        got_state = sum(r["state_bytes"] for r in plan.ranks)
        shard = f" summed over the {plan.world} ranks' shares (this rank's: {fmt_bytes(mine)})"
        if plan.shard == "params":  # the weights too are shares
            got_params = sum(r["param_bytes"] for r in plan.ranks)

    def verdict(want: int, got: int) -> str:
        return "matches" if want == got else f"MISMATCH: plan has {got:,} B, {got - want:+,} B"

    how = (f"{n_states} x 4 B x {trainable:,}" if set(kinds) <= {"fp32"} else
           "per parameter: " + ", ".join(f"{k} x {v}" for k, v in sorted(kinds.items())))
    line = (f"parameters: {count:,} ({trainable:,} trainable) x {per} = {fmt_bytes(param_bytes)} "
            f"[{verdict(param_bytes, got_params)}]; {optimizer} state: {how} = "
            f"{fmt_bytes(state_bytes)} [{verdict(state_bytes, got_state)}]{shard}")
    return line, param_bytes == got_params and state_bytes == got_state


def _plan(args: argparse.Namespace) -> int:
    from memfit.errors import BudgetError, MemfitError, where_what_got
    from memfit.runtime.memory import fmt_bytes
    from memfit.runtime.plot import plot_memory

    _check_output_path("memfit plan --out", args.out, picture=True)  # before the capture, not after it
    model = meta_model(args.model, args.dtype)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    from memfit.runtime.blocks import BASE_LAYERS

    how = (f"; {BASE_LAYERS} and {BASE_LAYERS + 1} of them, replicated"
           if layers and layers >= BASE_LAYERS + 2 and not args.full and args.world_size == 1 else "")
    print(f"capturing {args.model}{f' ({layers} layers{how})' if layers else ''}...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    over: BudgetError | None = None
    try:
        plan = plan_on_meta(model, batch=args.batch, seq=args.seq, optimizer=args.optimizer, budget=args.budget,
                            device=args.device, levers=args.levers, replicate=False if args.full else "auto",
                            fuse=args.fuse, world_size=args.world_size, shard=args.shard)
    except BudgetError as e:  # the planner tried its levers; e.plan is the smallest peak it reached
        over, plan = e, e.plan
        if plan is None:
            print(f"memfit: {e}", file=sys.stderr)
            return EXIT_OVER_BUDGET
    print(f"planned in {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
    print(plan)
    print(hand_check(model, plan, args.optimizer)[0])
    title = f"{args.model}, {args.dtype}, {args.optimizer}, batch {args.batch} x seq {args.seq}"
    if args.world_size > 1:
        title += f", rank of {args.world_size}" + {"state": " (state sharded)", "params": " (weights sharded)"
                                                   }.get(plan.shard, "")
    try:
        print(f"picture: {plot_memory(plan, args.out, title=title)}")
    except MemfitError as e:  # matplotlib missing: the table and the exit code still stand
        print(f"memfit: warning: no picture: {e}", file=sys.stderr)
    if over is not None:
        print(f"memfit: {over}", file=sys.stderr)
        return EXIT_OVER_BUDGET
    if plan.budget_bytes is not None and plan.peak_bytes > plan.budget_bytes:
        print("memfit: " + where_what_got(
            "memfit plan", f"a predicted peak within the budget {fmt_bytes(plan.budget_bytes)}",
            f"a smallest peak of {fmt_bytes(plan.peak_bytes)} with passes {', '.join(plan.passes) or 'none'} "
            f"(at peak: {', '.join(f'{k} {fmt_bytes(v)}' for k, v in plan.at_peak.items() if v)}); "
            f"largest live at the peak: {plan.describe_largest()}",
            "raise the budget, lower --batch or --seq, or use --dtype bf16 / --optimizer sgd"), file=sys.stderr)
        return EXIT_OVER_BUDGET
    return 0


def _load_checkpoint(path: str, steps: int) -> dict[str, Any]:
    """The state ``memfit train --save`` wrote to ``path``, read and checked before any model is built."""
    from memfit.api import STATE_FORMAT
    from memfit.errors import ConfigError, where_what_got

    where, what = "memfit train --resume", "a checkpoint written by memfit train --save"
    todo = "pass a file saved by memfit train --save, or drop --resume to start from step 0"
    p = Path(path)
    if not p.is_file():
        got = f"{path} (a directory)" if p.is_dir() else f"{path} (no such file)"
        raise ConfigError(where_what_got(where, what, got, todo))
    try:
        state = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:  # whatever the file holds that torch cannot read is the user's input, not a bug
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
        raise ConfigError(where_what_got(where, what, f"{path}, which torch.load cannot read "
                                         f"({type(e).__name__}: {reason})", todo)) from e
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and isinstance(state.get("step"), int)):
        got = f"a dict with format {state.get('format')!r}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise ConfigError(where_what_got(where, f"{what} (a dict with format {STATE_FORMAT!r})", f"{got} in {path}",
                                         todo))
    if state["step"] >= steps:
        raise ConfigError(where_what_got("memfit train --steps", f"more than the {state['step']} steps {path} holds",
                                         steps, f"pass --steps {state['step'] + 1} or more (it counts all steps)"))
    return state


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import memfit
    from memfit import data, models
    from memfit.errors import ConfigError, where_what_got

    # everything the user typed is checked before the model is built and compiled
    if args.batch % args.micro_steps:
        raise ConfigError(where_what_got("memfit train --micro-steps", f"a divisor of --batch {args.batch}",
                                         args.micro_steps, "e.g. --batch 8 --micro-steps 2"))
    if args.save:
        _check_output_path("memfit train --save", args.save)
    if args.text and not Path(args.text).is_file():
        got = f"{args.text} (a directory)" if Path(args.text).is_dir() else f"{args.text} (no such file)"
        raise ConfigError(where_what_got("memfit train --text", "an existing text file", got,
                                         "check the path, or drop --text to train on the stdlib's sources"))
    state = _load_checkpoint(args.resume, args.steps) if args.resume else None
    corpus = data.text_file_corpus(args.text) if args.text else data.stdlib_corpus()
    batches = data.ByteBatches(corpus, args.batch, args.seq, seed=args.seed)
    model = models.build(args.model, seed=args.seed)
    trainer = memfit.optimize(model, example_inputs=next(batches), loss_fn=models.lm_loss, budget=args.budget,
                              optimizer=memfit.AdamW(lr=args.lr, weight_decay=0.1), micro_steps=args.micro_steps)
    if state is not None:
        trainer.load_state_dict(state)
        for _ in range(trainer.step_count):  # the data stream resumes where it stopped
            next(batches)
        print(f"resumed from {args.resume} at step {trainer.step_count}")
    first = trainer.measure_step(*next(batches))
    print(trainer.plan)
    loss = float(first.value)
    bar = tqdm(range(trainer.step_count, args.steps), desc="train", unit="step", disable=not sys.stderr.isatty())
    for _ in bar:
        loss = float(trainer.step(*next(batches)))
        bar.set_postfix(loss=f"{loss:.3f}")
    print(f"step {trainer.step_count}: loss {loss:.4f}")
    if args.save:
        torch.save(trainer.state_dict(), args.save)
        print(f"saved to {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog="memfit", description="Fit PyTorch training into a memory budget.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict one training step's memory without allocating the model",
                       description="Predict one training step's memory (model on the meta device: nothing large "
                                   "is allocated); exit 0 if it fits --budget, 3 if not.")
    p.add_argument("model", help="preset (tiny-llama, llama-60m, ..., llama-7b, llama-70b), a HF config.json "
                                 "(or its folder) or module:factory")
    p.add_argument("--budget", type=_budget, default=None, help="e.g. 16GB, 512MiB, 80%% (of this machine's memory)")
    p.add_argument("--batch", type=_count, default=1, help="sequences per step")
    p.add_argument("--seq", type=_count, default=2048, help="tokens per sequence")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype (optimizer state is fp32)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--out", default="memfit-plan.png", help="where to draw the memory timeline")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the runtime planned for (cuda: Triton kernels; planning itself allocates nothing)")
    p.add_argument("--levers", choices=("lossless", "near-lossless", "lossy", "adapters"), default="lossy",
                   help="how far the planner may change the numerics to fit: recomputation only, also 8-bit "
                        "optimizer state, also low-rank projection (default)")
    p.add_argument("--fuse", action="store_true",
                   help="plan with the step's pointwise chains fused (generated kernels; the fuse pass)")
    p.add_argument("--world-size", type=_count, default=1,
                   help="plan one rank of this many training data parallel, --batch sequences each (the whole "
                        "step is captured)")
    p.add_argument("--shard", choices=("state", "params", "none", "auto"), default="state",
                   help="with --world-size: each parameter's optimizer state on one rank (ZeRO-1/2, default), "
                        "its weights too (FSDP-style, fetched for use), all replicated, or the least sharding "
                        "that fits --budget (auto)")
    p.add_argument("--full", action="store_true",
                   help="capture every layer (default: a model of identical layers is planned from captures of 1 "
                        "and 2 layers and extrapolated, exact and much faster)")
    t = sub.add_parser("train", help="train a preset model on the stdlib corpus or a text file")
    t.add_argument("--model", default="tiny-llama", help="preset (tiny-llama, llama-60m, ...) or module:factory")
    t.add_argument("--steps", type=_count, default=200, help="train until this many optimizer steps in total")
    t.add_argument("--batch", type=_count, default=8)
    t.add_argument("--seq", type=_count, default=128)
    t.add_argument("--micro-steps", type=_count, default=1,
                   help="gradient accumulation micro-batches per step (must divide --batch)")
    t.add_argument("--lr", type=_learning_rate, default=3e-3)
    t.add_argument("--budget", type=_budget, default=None)
    t.add_argument("--text", default=None, help="a text file to train on (default: the stdlib's sources)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None, help="write the trainer state here at the end")
    t.add_argument("--resume", default=None, help="continue from a state written by --save")
    from memfit.errors import MemfitError

    try:
        args = ap.parse_args(argv)
        return _plan(args) if args.command == "plan" else _train(args)
    except UsageError as e:
        print(e.line(), file=sys.stderr)
    except MemfitError as e:
        print(f"memfit: error: {e}", file=sys.stderr)
    except (OSError, ValueError) as e:  # from what the user passed (a file, a number); other errors are bugs
        print(f"memfit: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
