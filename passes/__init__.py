"""Graph rewrites, one file per family, each registered by name."""

from . import freeze, fused_update, lowrank, quantize, remat, sink  # noqa: F401  (registration side effects)
