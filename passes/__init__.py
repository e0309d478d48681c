"""Graph rewrites, one file per family, each registered by name."""

from . import (  # noqa: F401  (registration side effects)
    data_parallel,
    freeze,
    fuse,
    fused_cross_entropy,
    fused_update,
    lora,
    lowrank,
    prune,
    qat,
    quantize,
    quantize_weights,
    remat,
    sink,
    sparse_update,
)
