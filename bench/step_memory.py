"""One training step of tiny-llama: memfit's whole-step graph vs eager PyTorch AdamW, side by side.

Same model init, same batch, same process. Eager runs forward, backward, ``AdamW.step()`` and
``zero_grad(set_to_none=True)``; memfit runs ``Trainer.step``. Peak memory is measured with
``memfit.measure_peak`` (CPU: live bytes over tensor storages; CUDA: max_memory_allocated), counting
parameters, buffers, optimizer state and the batch. Step time is the median over repeats, reported
as a ratio to eager. Also: the same with only the last 2 blocks trainable (freeze).

    python bench/step_memory.py [--batch 8 --seq 128 --repeats 10]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import sys

import torch

import memfit
from memfit import models
from memfit.frontends.export import capture
from memfit.graph import saved_activations
from memfit.runtime.memory import fmt_bytes

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import median_time, write_table


def eager_step(model, opt, x, y):
    loss = models.lm_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def measure_eager(model, x, y, device, repeats):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    eager_step(model, opt, x, y)  # creates the optimizer state
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    m = memfit.measure_peak(eager_step, model, opt, x, y, device=device,
                            existing=iter([*model.parameters(), *model.buffers(), *state, x, y]))
    t = median_time(lambda: eager_step(model, opt, x, y), repeats)
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    largest = max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return m, t, grads, largest


def measure_memfit(model, x, y, device, repeats, passes=None, frozen=()):
    trainer = memfit.optimize(model, example_inputs=(x, y), loss_fn=models.lm_loss,
                              optimizer=memfit.AdamW(lr=1e-3), frozen=frozen, passes=passes)
    trainer.step(x, y)
    m = trainer.measure_step(x, y)
    t = median_time(lambda: trainer.step(x, y), repeats)
    return m, t, trainer


def run_shape(base, batch, seq, device, repeats):
    """Rows for one batch shape: eager, memfit fused_update only, memfit default; then the frozen variant."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, seq), generator=g).to(device)
    y = torch.randint(0, 256, (batch, seq), generator=g).to(device)
    shape = f"{batch}x{seq}"
    rows, notes = [], []
    em, et, grads, largest = measure_eager(copy.deepcopy(base), x, y, device, repeats)
    rows.append(dict(shape=shape, setup="all trainable", method="eager AdamW", peak=fmt_bytes(em.peak_bytes),
                     peak_bytes=em.peak_bytes, saving="", time_ratio="1.00"))
    for label, passes in (("memfit fused_update", ["fused_update"]), ("memfit default (remat + fused_update)", None)):
        mm, mt, trainer = measure_memfit(copy.deepcopy(base), x, y, device, repeats, passes=passes)
        rows.append(dict(shape=shape, setup="all trainable", method=label, peak=fmt_bytes(mm.peak_bytes),
                         peak_bytes=mm.peak_bytes, predicted=fmt_bytes(trainer.plan.peak_bytes),
                         predicted_bytes=trainer.plan.peak_bytes, saving=fmt_bytes(em.peak_bytes - mm.peak_bytes),
                         saving_bytes=em.peak_bytes - mm.peak_bytes, time_ratio=f"{mt / et:.2f}"))
    notes.append(f"{shape}: gradient bytes total {fmt_bytes(grads)}, largest {fmt_bytes(largest)}, "
                 f"total - largest = {fmt_bytes(grads - largest)} ({grads - largest} B)")
    notes.append(f"{shape}: memfit default plan:\n{trainer.plan}")

    frozen = (*(f"model.layers.{i}.*" for i in range(2)), "model.embed_tokens.*")
    feager = copy.deepcopy(base)
    for name, p in feager.named_parameters():
        if any(fnmatch.fnmatchcase(name, pat) for pat in frozen):
            p.requires_grad_(False)
    fem, fet, _, _ = measure_eager(feager, x, y, device, repeats)
    fmm, fmt, ftrainer = measure_memfit(copy.deepcopy(base), x, y, device, repeats, frozen=frozen)
    info = ftrainer.graph.info["freeze"]
    setup = "layers 2-3 + head trainable"
    rows.append(dict(shape=shape, setup=setup, method="eager AdamW (requires_grad=False)",
                     peak=fmt_bytes(fem.peak_bytes), peak_bytes=fem.peak_bytes, saving="", time_ratio="1.00"))
    rows.append(dict(shape=shape, setup=setup, method="memfit default + freeze", peak=fmt_bytes(fmm.peak_bytes),
                     peak_bytes=fmm.peak_bytes, predicted=fmt_bytes(ftrainer.plan.peak_bytes),
                     predicted_bytes=ftrainer.plan.peak_bytes, saving=fmt_bytes(fem.peak_bytes - fmm.peak_bytes),
                     saving_bytes=fem.peak_bytes - fmm.peak_bytes, time_ratio=f"{fmt / fet:.2f}"))
    # eager's saved activations with the same requires_grad settings: its autograd graph, captured as is
    eager_saved = sum(saved_activations(capture(copy.deepcopy(feager), (x, y), models.lm_loss)).values())
    notes.append(f"{shape}: freeze: saved activations {fmt_bytes(info['saved_bytes_before'])} -> "
                 f"{fmt_bytes(info['saved_bytes_after'])} ({info['removed_nodes']} backward nodes removed); "
                 f"eager with requires_grad=False saves {fmt_bytes(eager_saved)}, memfit after freeze + remat "
                 f"saves {fmt_bytes(ftrainer.plan.saved_activation_bytes)}")
    return rows, notes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8x128,1x32", help="comma-separated batch x seq shapes")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="step_memory", help="results file stem")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    base = models.build_llama("tiny-llama").to(device)
    rows, notes = [], []
    for shape in args.shapes.split(","):
        b, s = (int(v) for v in shape.lower().split("x"))
        r, n = run_shape(base, b, s, device, args.repeats)
        rows += r
        notes += n
    method = "CUDA max_memory_allocated" if device.type == "cuda" else "live bytes over tensor storages"
    header = (f"### One training step of tiny-llama (4 layers, hidden 256), {device.type}\n\n"
              f"Peak measured with `memfit.measure_peak` ({method}), counting parameters, optimizer state, "
              f"buffers and batch. Step time: median of {args.repeats}, as a ratio to eager's in the same run.")
    md = write_table(args.name, rows, [("shape", "batch x seq"), ("setup", "setup"), ("method", "method"),
                                       ("peak", "measured peak"), ("predicted", "memfit predicted"),
                                       ("saving", "saving vs eager"), ("time_ratio", "step time vs eager")], header)
    print(md)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
