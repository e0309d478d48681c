"""memfit: fit a PyTorch model's training into a memory budget by compiling the whole step."""

from . import ops as _ops  # noqa: F401  (registers memfit:: ops)
from . import passes as _passes  # noqa: F401  (registers the built-in passes)
from .api import Trainer, optimize, parse_budget, plan, size_model
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import (
                     BudgetError,
                     CollectiveError,
                     ConfigError,
                     KernelError,
                     MemfitError,
                     MemfitWarning,
                     NonFiniteError,
                     NonFiniteWarning,
                     StepError,
                     UnsupportedGraph,
)
from .frontends.dynamo import backend
from .graph import StateSpec, TrainGraph
from .measure import PeakMeasurement, measure_peak
from .passes.base import MemoryEffect, Pass, PassResult, Pipeline, register_pass, registered_passes
from .passes.fused_update import SGD, AdamW
from .runtime.memory import MemoryPlan
from .runtime.plot import plot_memory
from .search import search_sparse_update
from .sparsity import prune_model

__version__ = "0.1.0"
__all__ = [
                     "SGD",
                     "AdamW",
                     "BudgetError",
                     "CollectiveError",
                     "ConfigError",
                     "KernelError",
                     "MemfitError",
                     "MemfitWarning",
                     "MemoryEffect",
                     "MemoryPlan",
                     "NonFiniteError",
                     "NonFiniteWarning",
                     "Pass",
                     "PassResult",
                     "PeakMeasurement",
                     "Pipeline",
                     "StateSpec",
                     "StepError",
                     "TrainGraph",
                     "Trainer",
                     "UnsupportedGraph",
                     "backend",
                     "load_checkpoint",
                     "measure_peak",
                     "optimize",
                     "parse_budget",
                     "plan",
                     "plot_memory",
                     "prune_model",
                     "register_pass",
                     "registered_passes",
                     "save_checkpoint",
                     "search_sparse_update",
                     "size_model",
]
