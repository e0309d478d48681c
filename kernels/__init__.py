"""Triton kernels with plain-torch references: ``name`` launches ``_name_kernel``, ``name_ref`` is the oracle.

Import them from their modules (``from memfit.kernels.adamw import adamw, adamw_ref``). This file
imports nothing on purpose: with a clone's root on ``sys.path`` (``python -m pytest`` or ``python -c``
run from the clone), this folder also answers to the top-level name ``kernels``, which ``transformers``
probes for (the Hugging Face package of that name); an empty, version-less package reads as "not
installed" there instead of failing on the relative imports below it.
"""
