"""Doors into memfit from other libraries' training loops.

``memfit.integrations.hf.MemfitTrainer``: a drop-in ``transformers.Trainer`` whose steps run as memfit's
compiled whole step. Each integration imports its library only when imported itself.
"""
