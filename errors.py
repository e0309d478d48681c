"""memfit's one error hierarchy.

Every message reads ``"<where>: expected <what>, got <actual>; <what to do>"``.
"""

from __future__ import annotations

from typing import Any


class MemfitError(Exception):
    """Base of every error memfit raises on purpose."""


class ConfigError(MemfitError, ValueError):
    """A user-supplied setting or input is malformed or inconsistent."""


class UnsupportedGraph(MemfitError):
    """The captured graph holds something memfit cannot capture, rewrite or lower.

    ``op`` and ``node`` name the offending op and node when there is one.
    """

    def __init__(self, message: str, *, op: str | None = None, node: str | None = None):
        super().__init__(message)
        self.op = op
        self.node = node


class BudgetError(MemfitError):
    """No choice of rewrites fits the memory budget.

    ``plan`` is the MemoryPlan of the smallest peak reached, when the raiser has one (``memfit plan``
    prints and draws it); ``smallest_peak_bytes`` its peak and ``budget_bytes`` the budget. When the
    budget is below what no lever can reduce (parameters, optimizer state), ``floor_only`` is True: the
    planner skipped its search and verified only the plan with every lever at its smallest.
    """

    def __init__(self, message: str, *, plan: Any = None, budget_bytes: int | None = None,
                 floor_only: bool = False):
        super().__init__(message)
        self.plan = plan
        self.budget_bytes = budget_bytes
        self.floor_only = floor_only
        self.smallest_peak_bytes = getattr(plan, "peak_bytes", None)


class NonFiniteError(MemfitError, FloatingPointError):
    """A step met a NaN/inf loss or gradient (``Trainer(nonfinite="raise")``, or where it cannot be skipped).

    ``what`` names the value ("loss", "gradient of <fqn>"); ``before_updates`` says whether it was
    found before any parameter changed (then the step was undone exactly).
    """

    def __init__(self, message: str, *, what: str = "", before_updates: bool = True):
        super().__init__(message)
        self.what = what
        self.before_updates = before_updates


class StepError(MemfitError, RuntimeError):
    """A step failed after some parameters were already updated, and could not be undone.

    ``updated`` counts the update ops that had run. Reload the last checkpoint, or build the Trainer
    with ``transactional=True`` so such failures are undone exactly.
    """

    def __init__(self, message: str, *, updated: int = 0):
        super().__init__(message)
        self.updated = updated


class CollectiveError(MemfitError, RuntimeError):
    """A collective inside the step failed or timed out (a rank stopped, or ranks diverged): ``node`` names
    the op and the value it was communicating."""

    def __init__(self, message: str, *, node: str = ""):
        super().__init__(message)
        self.node = node


class KernelError(MemfitError, ValueError):
    """A kernel launcher was handed tensors it cannot run on."""


class MemfitWarning(UserWarning):
    """memfit did less than asked without failing: e.g. torch.compile ran a model (or part of it) eagerly,
    so memfit's backend never saw it."""


class NonFiniteWarning(UserWarning):
    """A step was skipped (or a parameter's update was) because of a NaN/inf loss or gradient."""


def where_what_got(where: str, expected: str, got: object, todo: str) -> str:
    """Format an error message in the house shape."""
    return f"{where}: expected {expected}, got {got}; {todo}"
