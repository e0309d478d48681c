"""Triton kernels with plain-torch references: ``name`` launches ``_name_kernel``, ``name_ref`` is the oracle.

Only torch, triton and ``memfit.errors`` are imported here; without triton the references still work.
"""

from .adamw import adamw, adamw_ref
from .sgd import sgd, sgd_ref

__all__ = ["adamw", "adamw_ref", "sgd", "sgd_ref"]
