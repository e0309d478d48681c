"""How long ``memfit.optimize()`` takes (capture, passes, plan, lowering) on tiny-llama and an LSTM language
model: the median of ``--repeats`` fresh calls, with the share spent in capture (``frontends.export.capture``).

The LSTM is defined here (embedding 64, 2 x LSTM 128, head to 256 bytes, sequence ``--lstm-seq``) so the
script runs unchanged on older memfit checkouts for a before/after comparison:

    python bench/optimize_time.py [--repeats 3]            # this checkout
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old/.. python bench/optimize_time.py --label old
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import memfit
from memfit import models
from memfit.frontends import export

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_table


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 256, embed: int = 64, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def time_optimize(build, batch, repeats: int) -> tuple[float, float]:
    captured = []
    real_capture = export.capture

    def timed_capture(*a, **k):
        t = time.perf_counter()
        try:
            return real_capture(*a, **k)
        finally:
            captured.append(time.perf_counter() - t)

    import memfit.api as api

    api.capture = timed_capture
    totals = []
    try:
        for _ in range(repeats):
            captured.clear()
            model = build()
            t = time.perf_counter()
            memfit.optimize(model, example_inputs=batch, loss_fn=models.lm_loss)
            totals.append(time.perf_counter() - t)
    finally:
        api.capture = real_capture
    return statistics.median(totals), sum(captured)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lstm-seq", type=int, default=64)
    ap.add_argument("--label", default="this checkout")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (8, 128))
    lstm_tokens = torch.randint(0, 256, (4, args.lstm_seq))
    rows = []
    for name, build, batch in (("tiny-llama 8x128", lambda: models.build_llama("tiny-llama"), (tokens, tokens)),
                               (f"lstm-lm 4x{args.lstm_seq}", LSTMLM, (lstm_tokens, lstm_tokens))):
        total, cap = time_optimize(build, batch, args.repeats)
        rows.append({"method": f"{name} ({args.label})", "optimize_s": round(total, 2), "capture_s": round(cap, 2)})
        print(rows[-1], flush=True)
    out = RESULTS / "optimize_time.json"
    old = json.loads(out.read_text()) if out.exists() else []
    rows = [r for r in old if not r["method"].endswith(f"({args.label})")] + rows
    header = (f"### Time of `memfit.optimize()` (median of {args.repeats} fresh calls, cpu; capture = the last "
              "call's `frontends.export.capture`, AOTAutograd tracing)\n\nRows labelled by the checkout they ran "
              "on; compare rows run back to back on the same machine only.")
    write_table("optimize_time", rows, [("method", "model (checkout)"), ("optimize_s", "optimize() s"),
                                        ("capture_s", "of which capture s")], header)


if __name__ == "__main__":
    main()
