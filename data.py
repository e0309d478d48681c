"""Byte-level text data with no downloads: the Python standard library's sources, or any text file.

``stdlib_corpus()`` concatenates the ``.py`` files under the running interpreter's stdlib directory
in sorted path order, so every machine with the same Python has the same bytes. ``ByteBatches``
draws (input, target) windows of ``seq`` bytes, targets shifted by one, from a seeded generator.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ConfigError, where_what_got

VOCAB_SIZE = 256


def stdlib_corpus(max_bytes: int | None = 8_000_000) -> torch.Tensor:
    """uint8 tensor of the stdlib's Python sources (sorted paths), truncated to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    if len(blob) < 1024:
        raise ConfigError(where_what_got("memfit.data.stdlib_corpus", f"Python sources under {root}",
                                         f"{len(blob)} bytes", "pass a text file with --text instead"))
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def text_file_corpus(path: str | Path) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(where_what_got("memfit.data.text_file_corpus", "an existing text file", str(p),
                                         "check the path"))
    blob = p.read_bytes()
    if len(blob) < 2:
        raise ConfigError(where_what_got("memfit.data.text_file_corpus", "at least 2 bytes", f"{len(blob)} in {p}",
                                         "use a longer file"))
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


class ByteBatches:
    """Endless seeded (input, target) int64 batches of shape (batch, seq) from a byte corpus."""

    def __init__(self, corpus: torch.Tensor, batch: int, seq: int, seed: int = 0):
        if corpus.numel() < seq + 2:
            raise ConfigError(where_what_got("ByteBatches", f"a corpus longer than seq + 1 = {seq + 1} bytes",
                                             f"{corpus.numel()} bytes", "use a shorter --seq or a longer text"))
        self.corpus, self.batch, self.seq = corpus, batch, seq
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.corpus.numel() - self.seq - 1, (self.batch,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq + 1)
        window = self.corpus[idx].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
