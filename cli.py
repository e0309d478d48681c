"""``memfit`` command line: ``memfit plan`` predicts a step's memory, ``memfit train`` trains under a budget.

    memfit plan MODEL --budget 16GB --batch 1 --seq 2048 [--dtype fp32|bf16] [--optimizer adamw|sgd] [--out step.png]
    memfit train --model tiny-llama --steps 200 [--text FILE] [--budget 300MB] [--save ckpt.pt] [--resume ckpt.pt]

``memfit plan`` builds the model on the ``meta`` device and captures the step with fake tensors, so a
7B model is planned on a laptop; it exits 0 when the predicted peak fits the budget, 3 when it does not
and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from memfit.passes.fused_update import SGD, AdamW
    from memfit.runtime.memory import MemoryPlan

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXIT_OVER_BUDGET = 3


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
                 budget: str | None = None, device: str = "cpu", levers: str = "lossy") -> MemoryPlan:
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
                       optimizer=_optimizer(optimizer), device=device, levers=levers)


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
    Optimizer state: fp32 moments, one per state name (AdamW 2, SGD with momentum 1, plain SGD 0).
    """
    from memfit.runtime.memory import fmt_bytes

    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    sizes = {p.element_size() for p in params}
    per = f"{sizes.pop()} B" if len(sizes) == 1 else "mixed dtypes"
    n_states = len(_optimizer(optimizer).state_names())
    state_bytes = n_states * 4 * trainable
    got_params = plan.persistent.get("parameters", 0)
    got_state = plan.persistent.get("optimizer state", 0)

    def verdict(want: int, got: int) -> str:
        return "matches" if want == got else f"MISMATCH: plan has {got:,} B, {got - want:+,} B"

    line = (f"parameters: {count:,} ({trainable:,} trainable) x {per} = {fmt_bytes(param_bytes)} "
            f"[{verdict(param_bytes, got_params)}]; {optimizer} state: {n_states} x 4 B x {trainable:,} = "
            f"{fmt_bytes(state_bytes)} [{verdict(state_bytes, got_state)}]")
    return line, param_bytes == got_params and state_bytes == got_state


def _plan(args: argparse.Namespace) -> int:
    from memfit.errors import BudgetError, MemfitError, where_what_got
    from memfit.runtime.memory import fmt_bytes
    from memfit.runtime.plot import plot_memory

    model = meta_model(args.model, args.dtype)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    print(f"capturing {args.model}{f' ({layers} layers)' if layers else ''}...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    over: BudgetError | None = None
    try:
        plan = plan_on_meta(model, batch=args.batch, seq=args.seq, optimizer=args.optimizer, budget=args.budget,
                            device=args.device, levers=args.levers)
    except BudgetError as e:  # the planner tried its levers; e.plan is the smallest peak it reached
        over, plan = e, e.plan
        if plan is None:
            print(f"memfit: {e}", file=sys.stderr)
            return EXIT_OVER_BUDGET
    print(f"planned in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(plan)
    print(hand_check(model, plan, args.optimizer)[0])
    title = f"{args.model}, {args.dtype}, {args.optimizer}, batch {args.batch} x seq {args.seq}"
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


def _train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    import memfit
    from memfit import data, models

    corpus = data.text_file_corpus(args.text) if args.text else data.stdlib_corpus()
    batches = data.ByteBatches(corpus, args.batch, args.seq, seed=args.seed)
    model = models.build(args.model, seed=args.seed)
    trainer = memfit.optimize(model, example_inputs=next(batches), loss_fn=models.lm_loss, budget=args.budget,
                              optimizer=memfit.AdamW(lr=args.lr, weight_decay=0.1), micro_steps=args.micro_steps)
    if args.resume:
        trainer.load_state_dict(torch.load(args.resume, weights_only=True))
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
    ap = argparse.ArgumentParser(prog="memfit", description="Fit PyTorch training into a memory budget.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict one training step's memory without allocating the model",
                       description="Predict one training step's memory (model on the meta device: nothing large "
                                   "is allocated); exit 0 if it fits --budget, 3 if not.")
    p.add_argument("model", help="preset (tiny-llama, llama-60m, ..., llama-7b), a HF config.json (or its folder) "
                                 "or module:factory")
    p.add_argument("--budget", default=None, help="e.g. 16GB, 512MiB, 80%% (of this machine's memory)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter dtype (optimizer state is fp32)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--out", default="memfit-plan.png", help="where to draw the memory timeline")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the runtime planned for (cuda: Triton kernels; planning itself allocates nothing)")
    p.add_argument("--levers", choices=("lossless", "near-lossless", "lossy"), default="lossy",
                   help="how far the planner may change the numerics to fit: recomputation only, also 8-bit "
                        "optimizer state, also low-rank projection (default)")
    t = sub.add_parser("train", help="train a preset model on the stdlib corpus or a text file")
    t.add_argument("--model", default="tiny-llama", help="preset (tiny-llama, llama-60m, ...) or module:factory")
    t.add_argument("--steps", type=int, default=200, help="train until this many optimizer steps in total")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--micro-steps", type=int, default=1, help="gradient accumulation micro-batches per step")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--budget", default=None)
    t.add_argument("--text", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save", default=None)
    t.add_argument("--resume", default=None)
    args = ap.parse_args(argv)
    from memfit.errors import MemfitError

    try:
        return _plan(args) if args.command == "plan" else _train(args)
    except MemfitError as e:
        print(f"memfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
