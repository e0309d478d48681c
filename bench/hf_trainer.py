"""transformers.Trainer with torch AdamW vs memfit's MemfitTrainer, the one-line switch, on tiny-llama.

Same model init (``build_llama("tiny-llama")``: 4 layers, hidden 256, bytes), same data: byte sequences of
random length (``--min-len``..``--max-len``) from ``stdlib_corpus()``, padded per batch to a multiple of
``--multiple`` (labels -100 on the padding), batch ``--batch``, gradient accumulation ``--accum``, one epoch of
``--steps`` optimizer steps, linear lr schedule, AdamW (weight decay 0, ``max_grad_norm=0``: memfit refuses
clipping with accumulation, see memfit/integrations/hf.py). Each trainer runs twice: uninterrupted, saving a
checkpoint at ``--save-at``, then a new trainer (new model object) resumed from that checkpoint.

Columns: ``max_rel_loss_diff`` is the largest relative difference of the per-step logged training loss
(``logging_steps=1``) from the eager run's; ``final_loss`` the loss logged at the last step;
``resumed_bit_identical`` whether every parameter of the resumed run's final model equals the uninterrupted
run's (``torch.equal``); ``peak_bytes`` one optimizer step (``--accum`` micro-batches of the largest shape,
batch x ``--max-len`` rounded up to ``--multiple``, through each trainer's own ``training_step`` and, for eager,
``optimizer.step()`` and ``model.zero_grad()``) measured after training with ``memfit.measure_peak`` (CPU: live
bytes over tensor storages; CUDA: max_memory_allocated), counting parameters, buffers, optimizer state and
the batch; ``train_s`` the uninterrupted run's ``train_runtime`` (memfit's includes compiling each batch shape).

    python bench/hf_trainer.py [--steps 50 --save-at 25 --batch 4 --accum 2 --max-len 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import memfit
from memfit import data, models
from memfit.integrations.hf import MemfitTrainer
from memfit.runtime.memory import fmt_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_table


class PadCollator:
    """Pads input_ids and attention_mask with 0 to the batch's longest sequence rounded up to
    ``pad_to_multiple_of``; labels are the ids, -100 on the padding."""

    def __init__(self, multiple: int):
        self.pad_to_multiple_of = multiple

    def __call__(self, features):
        n = max(len(f["input_ids"]) for f in features)
        n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.zeros(len(features), n, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, f in enumerate(features):
            row = torch.tensor(f["input_ids"], dtype=torch.long)
            ids[i, : len(row)], mask[i, : len(row)], labels[i, : len(row)] = row, 1, row
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequences(n: int, lo: int, hi: int, seed: int) -> list[dict]:
    corpus = data.stdlib_corpus()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    starts = torch.randint(0, corpus.numel() - hi - 1, (n,), generator=g).tolist()
    return [{"input_ids": corpus[s: s + k].tolist()} for s, k in zip(starts, lengths, strict=True)]


def train(cls, out: Path, args, dataset, resume: str | None = None, seed: int = 0):
    model = models.build_llama("tiny-llama", seed=seed, num_hidden_layers=args.layers, hidden_size=args.hidden,
                               intermediate_size=args.intermediate)
    targs = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
        learning_rate=args.lr, num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=args.steps // 10,
        logging_steps=1, save_strategy="steps", save_steps=args.save_at, optim="adamw_torch", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], use_cpu=args.device == "cpu", dataloader_num_workers=0, seed=seed,
        disable_tqdm=True, log_level="warning")
    trainer = cls(model=model, args=targs, train_dataset=dataset, data_collator=PadCollator(args.multiple))
    out_ = trainer.train(resume_from_checkpoint=resume)
    return trainer, out_.metrics.get("train_runtime")


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def bit_identical(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def measure_window(trainer, batches: list[dict], memfit_step: bool) -> int:
    """Peak of one optimizer step (len(batches) micro-batches) through the trainer's own training_step."""
    model = trainer.model
    model.train()
    batches = [trainer._prepare_inputs(b) for b in batches]
    trainer.current_gradient_accumulation_steps = len(batches)
    n_items = trainer._get_num_items_in_batch(batches, trainer.args.device)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)

    def window():
        out = [trainer.training_step(model, b, n_items) for b in batches]
        if not memfit_step:
            inner.step()
            model.zero_grad()
        return out

    held = [t for b in batches for t in b.values()]
    if memfit_step:
        held += trainer.memfit_trainer.executor.persistent_tensors()
    else:
        held += [*model.parameters(), *model.buffers(),
                 *(t for s in inner.state.values() for t in s.values() if isinstance(t, torch.Tensor))]
    m = memfit.measure_peak(window, existing=iter(held), device=trainer.args.device)
    return m.peak_bytes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--save-at", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--multiple", type=int, default=32, help="the collator's pad_to_multiple_of")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--name", default="hf_trainer", help="results file stem")
    args = ap.parse_args(argv)
    if not 1 <= args.save_at < args.steps:
        ap.error("--save-at must be in [1, --steps)")
    dataset = sequences(args.steps * args.accum * args.batch, args.min_len, args.max_len, seed=1)
    longest = -(-args.max_len // args.multiple) * args.multiple
    window = [PadCollator(args.multiple)(sequences(args.batch, args.max_len, args.max_len, seed=2 + i))
              for i in range(args.accum)]

    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = {}
        for key, cls in (("eager", transformers.Trainer), ("memfit", MemfitTrainer)):
            full, seconds = train(cls, root / key, args, dataset)
            resumed, _ = train(cls, root / f"{key}-resumed", args, dataset,
                               resume=str(root / key / f"checkpoint-{args.save_at}"))
            runs[key] = (full, resumed, seconds)
            print(f"    {key}: trained and resumed ({time.perf_counter() - t0:.0f} s so far)", flush=True)
        base = losses(runs["eager"][0])
        for key, label in (("eager", "transformers.Trainer + torch AdamW"), ("memfit", "MemfitTrainer (memfit)")):
            full, resumed, seconds = runs[key]
            mine = losses(full)
            rel = max(abs(mine[s] - base[s]) / abs(base[s]) for s in base)
            row = dict(method=label, peak_bytes=measure_window(full, window, key == "memfit"),
                       final_loss=round(mine[args.steps], 6), max_rel_loss_diff=rel,
                       resumed_bit_identical=bit_identical(full, resumed), train_s=round(seconds, 2),
                       steps=len(mine))
            if key == "memfit":
                mt = full.memfit_trainer
                row["predicted_peak_bytes"] = mt.plan.peak_bytes
                row["passes"] = list(mt.graph.applied)
                row["compiled_shapes"] = len(mt.compiled_shapes)
            rows.append(row)
    eager_peak = rows[0]["peak_bytes"]
    md_rows = [dict(r, peak=fmt_bytes(r["peak_bytes"]), ratio=f"{r['peak_bytes'] / eager_peak:.2f}",
                    rel=f"{r['max_rel_loss_diff']:.2e}", loss=f"{r['final_loss']:.4f}",
                    predicted=fmt_bytes(r["predicted_peak_bytes"]) if "predicted_peak_bytes" in r else "",
                    bit=str(r["resumed_bit_identical"])) for r in rows]
    method = "CUDA max_memory_allocated" if args.device == "cuda" else "live bytes over tensor storages"
    header = (
        f"### transformers.Trainer vs MemfitTrainer on tiny-llama ({args.layers} layers, hidden {args.hidden}), "
        f"{args.device}: {args.steps} steps, batch {args.batch} x accumulation {args.accum}\n\n"
        f"Byte sequences of {args.min_len}..{args.max_len} bytes padded per batch to a multiple of {args.multiple} "
        f"(labels -100 on the padding), AdamW lr {args.lr:g} (linear schedule), weight decay 0, max_grad_norm 0, "
        f"same init and data. Loss difference: the largest relative difference of the {args.steps} per-step logged "
        f"losses from the eager run's. Resumed: a new trainer resumed from checkpoint-{args.save_at} "
        f"(model.safetensors, optimizer.pt, scheduler.pt, rng_state.pth) ends with parameters equal to the "
        f"uninterrupted run's (torch.equal). Peak: one optimizer step ({args.accum} micro-batches of "
        f"{args.batch}x{longest}) through the trainer's own training_step, `memfit.measure_peak` ({method}), "
        f"counting parameters, buffers, optimizer state and batch. Train time includes memfit's compiles.")
    columns = [("method", "method"), ("peak", "measured peak (one step)"), ("ratio", "peak vs eager"),
               ("predicted", "memfit predicted"), ("loss", f"final loss (step {args.steps})"),
               ("rel", "max rel. loss diff vs eager"), ("bit", f"resumed at {args.save_at} == uninterrupted"),
               ("train_s", "train time (s)")]
    md = write_table(args.name, md_rows, columns, header)
    # write_table wrote the display rows as JSON; the JSON holds the raw numbers, one object per method
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md)


if __name__ == "__main__":
    main()
