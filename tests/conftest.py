"""Test setup: Triton's interpreter when there is no GPU, fixed seeds, shared tiny models."""

from __future__ import annotations

import os
import random

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`

import sys
from pathlib import Path

import torch

import memfit

# The repository root is the package and holds an __init__.py, so pytest may import it a second time
# under the folder's name (e.g. `main`), re-registering memfit's ops and replacing the objects behind
# torch.ops.memfit.*. Aliasing that name to the installed package keeps one copy.
sys.modules.setdefault(Path(memfit.__file__).resolve().parent.name, memfit)

DEVICE = "cuda" if _HAS_CUDA else "cpu"

# Under pytest-xdist (`pytest -n N`) the workers share the cores: give each its share of threads, so two
# workers on two cores do not run four threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield
