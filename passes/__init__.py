"""Graph rewrites, one file per family, each registered by name."""

from . import freeze, fused_update, remat  # noqa: F401  (registration side effects)
