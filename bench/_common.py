"""Shared helpers for the bench scripts: timing medians, markdown/JSON tables."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every plain tensor reachable from ``obj``: containers, object attributes, subclass inner tensors."""
    out: list[torch.Tensor] = []
    seen: set[int] = set()

    def walk(o: Any) -> None:
        if id(o) in seen or o is None or isinstance(o, (int, float, str, bool, type, torch.nn.Module)):
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            flatten = getattr(type(o), "__tensor_flatten__", None)
            if flatten is not None:  # a wrapper subclass (torchao's OptimState8bit): its inner tensors
                names, _ = o.__tensor_flatten__()
                for n in names:
                    walk(getattr(o, n))
            else:
                out.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v)
        elif hasattr(o, "__dict__"):  # projector objects (GaLoreProjector.ortho_matrix, ...)
            for v in vars(o).values():
                walk(v)

    walk(obj)
    return out


def storage_bytes(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes of the distinct storages, bytes of the tensors' own elements) of ``tensors``."""
    storages: dict[tuple[str, int], int] = {}
    logical = 0
    for t in tensors:
        logical += t.numel() * t.element_size()
        s = t.untyped_storage()
        storages[(str(s.device), s.data_ptr())] = s.nbytes()
    return sum(storages.values()), logical


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view keeps its whole base alive)."""
    return storage_bytes(tensors)[0]
