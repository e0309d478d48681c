"""``memfit`` command line: ``memfit train`` trains a preset LLaMA under a budget, resumable.

    memfit train --model tiny-llama --steps 200 [--text FILE] [--budget 300MB] [--save ckpt.pt] [--resume ckpt.pt]
"""

from __future__ import annotations

import argparse
import sys

import torch


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
        return _train(args)
    except MemfitError as e:
        print(f"memfit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
