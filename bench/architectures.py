"""The architecture matrix (memfit.zoo): every case through both doors, a lossy setting and a budget.

Per architecture (tiny config, dropout off, padded masked batch where the model takes a mask):
door 1 (``memfit.optimize``, fp32 AdamW) and door 2 (``torch.compile(backend="memfit")`` in an eager AdamW
loop) against eager ``torch.optim.AdamW`` after 3 steps (largest relative loss difference); door 1's
predicted and measured peak (CPU storage tracker); the loss with the padding mask and with an all-ones
mask (memfit and eager), which must differ; GaLore rank 4 on every eligible weight under a budget of
its own predicted peak; the planner under 0.85x the lossless peak. Writes
bench/results/architectures.{md,json}.

    python bench/architectures.py [--only gpt2,t5]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from memfit import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mib, write_table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(zoo.CASES)
    rows = []
    warnings.filterwarnings("ignore", module="transformers")
    for name in names:
        case = zoo.CASES[name](0)
        row = {"method": name}
        for part in (zoo.door1_row, zoo.door2_row, zoo.lossy_budget_row):
            row.update(part(zoo.CASES[name](0)))
        masked = case.unmasked is not None
        row["mask"] = (f"{row['loss_masked']:.5f} vs {row['loss_all_ones_mask']:.5f} "
                       f"(eager {row['eager_loss_masked']:.5f} vs {row['eager_loss_all_ones_mask']:.5f})"
                       ) if masked else "no mask"
        row["door1"] = f"{row['door1_max_rel_diff']:.1e}"
        eager_note = "" if row["door2_memfit_graphs"] else " (Dynamo ran it eagerly)"
        row["door2"] = f"{row['door2_max_rel_diff']:.1e}" + eager_note
        row["peak"] = (f"{mib(row['predicted_peak_bytes'])} / {mib(row['measured_peak_bytes'])}"
                       f" ({'equal' if row['predicted_peak_bytes'] == row['measured_peak_bytes'] else 'DIFFER'})")
        row["lossy"] = (f"{mib(row['lossy_measured_bytes'])} <= {mib(row['lossy_budget_bytes'])}, "
                        f"{row['lossy_projected']} projected")
        row["budget"] = (f"{mib(row['budget_measured_bytes'])} <= {mib(row['budget_bytes'])} "
                         f"({row['budget_passes']})")
        rows.append(row)
        print(name, {k: row[k] for k in ("door1", "door2", "peak", "lossy", "budget", "mask")}, flush=True)
    header = ("### Architecture matrix: tiny configs, padded masked batches, 3 steps vs eager AdamW (fp32, cpu)\n\n"
              "Door 1: `memfit.optimize`; door 2: `torch.compile(model, backend=\"memfit\")` with torch.optim.AdamW. "
              "Differences are the largest relative loss difference over 3 steps. Mask: the first-step loss with "
              "the padding mask vs with an all-ones mask (memfit, and eager in brackets). Lossy: GaLore rank 4 "
              "under a budget of its own predicted peak. Budget: the planner under 0.85x the lossless peak.")
    cols = [("method", "architecture"), ("door1", "door 1 vs eager"), ("door2", "door 2 vs eager"),
            ("peak", "predicted / measured peak"), ("mask", "loss masked vs all-ones mask"),
            ("lossy", "lossy: measured <= budget"), ("budget", "budget: measured <= budget (passes)")]
    print(write_table("architectures", rows, cols, header))


if __name__ == "__main__":
    main()
