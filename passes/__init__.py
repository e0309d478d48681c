"""Graph rewrites, one file per family, each registered by name."""

from . import freeze, fused_update  # noqa: F401  (registration side effects)
