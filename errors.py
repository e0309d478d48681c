"""memfit's one error hierarchy.

Every message reads ``"<where>: expected <what>, got <actual>; <what to do>"``.
"""

from __future__ import annotations


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
    """No choice of rewrites fits the memory budget."""


class KernelError(MemfitError, ValueError):
    """A kernel launcher was handed tensors it cannot run on."""


def where_what_got(where: str, expected: str, got: object, todo: str) -> str:
    """Format an error message in the house shape."""
    return f"{where}: expected {expected}, got {got}; {todo}"
