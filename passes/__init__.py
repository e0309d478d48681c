"""Graph rewrites, one file per family, each registered by name."""

from . import freeze, fused_update, lora, lowrank, qat, quantize, quantize_weights, remat, sink  # noqa: F401  (registration side effects)
