"""Shared helpers for the bench scripts: timing medians, markdown/JSON tables."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def write_table(name: str, rows: list[dict], columns: list[tuple[str, str]], header: str) -> str:
    """Write ``results/<name>.md`` and ``results/<name>.json``; return the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [header, "", "| " + " | ".join(title for _, title in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(key, "")) for key, _ in columns) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return md
