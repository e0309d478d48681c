"""Train a byte-level LLaMA (Hugging Face LlamaForCausalLM built from a config) with memfit.

The whole step (forward, backward, AdamW update) is one compiled graph; memfit prints the memory plan,
measures the real peak of a step, then trains with a progress bar. Data: the Python standard
library's sources (no download), or any text file with --text.

    python examples/train_tiny_llama.py --steps 200
    python examples/train_tiny_llama.py --text my_notes.txt --budget 300MB --save ckpt.pt
"""

from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

import memfit
from memfit import data, models


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget", default=None, help="e.g. 300MB, 2GiB, 80%% (default: none)")
    ap.add_argument("--text", default=None, help="train on this text file instead of the stdlib corpus")
    ap.add_argument("--save", default=None, help="write the Trainer state here at the end")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    corpus = data.text_file_corpus(args.text) if args.text else data.stdlib_corpus()
    batches = data.ByteBatches(corpus, args.batch, args.seq, seed=args.seed)
    model = models.build_llama("tiny-llama", seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny-llama: {params / 1e6:.2f}M parameters, corpus {corpus.numel() / 1e6:.1f} MB, "
          f"batch {args.batch} x {args.seq}")

    warmup = max(1, args.steps // 20)
    trainer = memfit.optimize(
        model, example_inputs=next(batches), loss_fn=models.lm_loss, budget=args.budget,
        optimizer=memfit.AdamW(lr=args.lr, weight_decay=0.1),
        lr_schedule=lambda step: args.lr * min(1.0, step / warmup))
    print(trainer.graph)

    measured = trainer.measure_step(*next(batches))
    print(trainer.plan)

    losses = [float(measured.value)]
    bar = tqdm(range(1, args.steps), desc="train", unit="step")
    for _ in bar:
        losses.append(float(trainer.step(*next(batches))))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    tail = losses[-min(20, len(losses)):]
    final = sum(tail) / len(tail)
    print(f"loss: first {losses[0]:.3f}, mean of last {len(tail)} {final:.3f} "
          f"(uniform bytes would be {torch.log(torch.tensor(256.0)):.3f})")

    prompt = torch.tensor([list(b"def ")], dtype=torch.long)
    with torch.no_grad():
        for _ in range(48):
            nxt = trainer(prompt).logits[0, -1].argmax()
            prompt = torch.cat([prompt, nxt.view(1, 1)], dim=1)
    print("sample:", bytes(prompt[0].tolist()).decode("utf-8", errors="replace").replace("\n", "\\n"))
    if args.save:
        torch.save(trainer.state_dict(), args.save)
        print(f"saved trainer state to {args.save}")
    return final


if __name__ == "__main__":
    main()
