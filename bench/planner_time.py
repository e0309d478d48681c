"""Wall time of ``memfit plan`` (the CLI's own timer, "planned in X s": capture + planner, after the model
is built on the meta device), old planner vs new, side by side: bf16, batch 1, seq 2048, at 80GB, at a
tight budget that fits and at one that does not. Each run is a fresh process, as a user runs it; the
two checkouts alternate call by call so machine load falls on both alike; the median of ``--repeats``.

    git worktree add /tmp/memfit-old/memfit 811e3b6    # the planner before the redesign
    python bench/planner_time.py --old /tmp/memfit-old [--repeats 3] [--old-max-s 60]

A case whose old run took longer than ``--old-max-s`` once is not repeated for the old checkout (its one
time is reported); old cases known to take minutes are skipped with ``--skip-old-tight``.
Writes ``bench/results/planner_time.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_table

CASES = [  # (model, budget, kind)
    ("llama-60m", "80GB", "loose"), ("llama-60m", "0.76GiB", "tight"), ("llama-60m", "100MiB", "infeasible"),
    ("llama-350m", "80GB", "loose"), ("llama-350m", "2.81GiB", "tight"), ("llama-350m", "600MiB", "infeasible"),
    ("llama-1b", "80GB", "loose"), ("llama-1b", "8.05GiB", "tight"), ("llama-1b", "2GiB", "infeasible"),
    ("llama-7b", "80GB", "loose"), ("llama-7b", "24GB", "tight"), ("llama-7b", "14GB", "infeasible"),
]


def run(checkout: str | None, model: str, budget: str) -> dict:
    env = dict(os.environ)
    if checkout:
        env["PYTHONPATH"] = checkout
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "memfit.cli", "plan", model, "--dtype", "bf16", "--batch", "1",
                               "--seq", "2048", "--budget", budget, "--out", f"{tmp}/p.png"],
                              capture_output=True, text=True, env=env, cwd=tmp)
    err, out = proc.stderr, proc.stdout
    t = re.search(r"planned in ([\d.]+) s", err)
    peak = re.search(r"predicted peak\s+([\d.]+ \w+)", out)
    smallest = re.search(r"smallest reachable peak of ([\d.]+ \w+)|the smallest peak reachable is ([\d.]+ \w+)", err)
    return {"seconds": float(t.group(1)) if t else None, "exit": proc.returncode,
            "peak": peak.group(1) if peak else "", "smallest": next((g for g in smallest.groups() if g), "")
            if smallest else "", "mismatch": "MISMATCH" in out, "tail": (err + out)[-300:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None, help="a checkout of the old planner (its parent folder on PYTHONPATH)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--old-max-s", type=float, default=60.0)
    ap.add_argument("--skip-old-tight", action="store_true", help="skip the old planner's tight/infeasible 350m+")
    ap.add_argument("--only", default=None, help="comma-separated models")
    args = ap.parse_args()
    rows = []
    for model, budget, kind in CASES:
        if args.only and model not in args.only.split(","):
            continue
        new, old = [], []
        skip_old = args.old is None or (args.skip_old_tight and kind != "loose" and model != "llama-60m")
        for _ in range(args.repeats):  # round-robin: old, new, old, new, ...
            if not skip_old and (not old or old[-1]["seconds"] is None or old[-1]["seconds"] < args.old_max_s):
                old.append(run(args.old, model, budget))
            new.append(run(None, model, budget))
        row = {"method": "memfit plan", "model": model, "budget": budget, "kind": kind,
               "new_s": round(statistics.median(r["seconds"] for r in new if r["seconds"] is not None), 2),
               "new_exit": new[-1]["exit"], "new_peak": new[-1]["peak"] or f"over: smallest {new[-1]['smallest']}",
               "new_mismatch": int(new[-1]["mismatch"])}
        if old and old[0]["seconds"] is not None:
            row.update(old_s=round(statistics.median(r["seconds"] for r in old if r["seconds"] is not None), 2),
                       old_runs=len(old), old_exit=old[-1]["exit"],
                       old_peak=old[-1]["peak"] or f"over: smallest {old[-1]['smallest']}",
                       old_mismatch=int(old[-1]["mismatch"]))
            row["speedup"] = round(row["old_s"] / row["new_s"], 1)
        print(row, flush=True)
        rows.append(row)
    md = write_table("planner_time", rows, [
        ("model", "model"), ("kind", "budget kind"), ("budget", "budget"), ("old_s", "old planner (s)"),
        ("new_s", "new planner (s)"), ("speedup", "speedup"), ("old_peak", "old: predicted peak"),
        ("new_peak", "new: predicted peak"), ("old_mismatch", "old [MISMATCH]"), ("new_mismatch", "new [MISMATCH]")],
        f"`memfit plan MODEL --dtype bf16 --batch 1 --seq 2048 --budget B` (CLI timer, median of {args.repeats} fresh "
        "processes; old = the planner before the redesign, one run only where it took over "
        f"{args.old_max_s:.0f} s; blank = not run)")
    print(md)


if __name__ == "__main__":
    main()
