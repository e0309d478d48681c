"""Tiny configs of the architectures users train, each with a padded, masked batch: the test matrix.

Every case builds a randomly initialised model from a config (no downloads) with dropout off, so a
compiled step and eager PyTorch can be compared number for number, and a batch the model takes as
users give it: ``attention_mask`` with padding (and ``token_type_ids``, ``decoder_attention_mask``,
``labels`` with -100 on padding) where the model takes a mask, images from scikit-learn's bundled
digits for the vision models, byte tokens for the LSTM.

``CASES[name](seed) -> Case``; ``Case.batch`` is what ``memfit.optimize(example_inputs=...)`` and
``Trainer.step`` take, ``Case.loss_fn`` is None when the model returns its loss. ``unmasked`` is the
same batch with an all-ones mask (None for models without one): the mask must change the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

VOCAB = 96


@dataclass
class Case:
    name: str
    model: nn.Module
    batch: tuple[Any, ...]
    loss_fn: Callable | None
    unmasked: tuple[Any, ...] | None = None
    kind: str = "text"


def _tokens(seed: int, batch: int = 4, seq: int = 12, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a padded attention mask (row i keeps seq - 3i tokens, at least 4), padded on the right,
    or on the left (``left=True``: for causal models, where right padding can never change a real token's
    loss, since no real token attends to a later position)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        keep = max(4, seq - 3 * i)
        if left:
            mask[i, :seq - keep] = 0
        else:
            mask[i, keep:] = 0
    ids = ids.masked_fill(mask == 0, 0)  # pad id 0
    return ids, mask


def _causal_lm(name: str, model: nn.Module, seed: int) -> Case:
    ids, mask = _tokens(seed, left=True)
    labels = ids.masked_fill(mask == 0, -100)
    batch = ({"input_ids": ids, "attention_mask": mask, "labels": labels},)
    unmasked = ({"input_ids": ids, "attention_mask": torch.ones_like(mask), "labels": labels},)
    return Case(name, model, batch, None, unmasked)


def gpt2(seed: int = 0) -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return _causal_lm("gpt2", GPT2LMHeadModel(cfg), seed)


def opt(seed: int = 0) -> Case:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _causal_lm("opt", OPTForCausalLM(cfg), seed)


def qwen2(seed: int = 0) -> Case:
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_dropout=0.0, tie_word_embeddings=True)
    return _causal_lm("qwen2", Qwen2ForCausalLM(cfg), seed)


def mistral(seed: int = 0) -> Case:
    """Sliding-window attention (window 4, shorter than the sequence, so it changes the result)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=4, attention_dropout=0.0)
    return _causal_lm("mistral", MistralForCausalLM(cfg), seed)


def bert_mlm(seed: int = 0) -> Case:
    """Masked LM: 15% of the real tokens replaced by [MASK] (id 1) and predicted; its output bias is tied."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = BertForMaskedLM(cfg)
    ids, mask = _tokens(seed)
    g = torch.Generator().manual_seed(seed + 1)
    chosen = (torch.rand(ids.shape, generator=g) < 0.3) & (mask == 1)
    chosen[:, 1] = True
    labels = ids.masked_fill(~chosen, -100)
    inputs = ids.masked_fill(chosen, 1)
    types = torch.zeros_like(ids)
    types[:, ids.shape[1] // 2:] = 1
    batch = ({"input_ids": inputs, "attention_mask": mask, "token_type_ids": types, "labels": labels},)
    unmasked = ({"input_ids": inputs, "attention_mask": torch.ones_like(mask), "token_type_ids": types,
                 "labels": labels},)
    return Case("bert-mlm", model, batch, None, unmasked)


def t5(seed: int = 0) -> Case:
    """Encoder-decoder: padded encoder input and padded targets (decoder mask, labels -100 on padding)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    model = T5ForConditionalGeneration(cfg)
    ids, mask = _tokens(seed)
    tgt, tgt_mask = _tokens(seed + 1, seq=8)
    labels = tgt.masked_fill(tgt_mask == 0, -100)
    batch = ({"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": tgt_mask},)
    unmasked = ({"input_ids": ids, "attention_mask": torch.ones_like(mask), "labels": labels,
                 "decoder_attention_mask": tgt_mask},)
    return Case("t5", model, batch, None, unmasked)


def _digits(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d.target), generator=g)[:n]
    images = torch.tensor(d.images[idx.numpy()], dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(d.target[idx.numpy()], dtype=torch.long)


def vit(seed: int = 0) -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(cfg)
    x, y = _digits(seed)
    return Case("vit", model, ({"pixel_values": x, "labels": y},), None, kind="image")


def cnn(seed: int = 0) -> Case:
    """Depthwise-separable convolutions with BatchNorm (whose running statistics the step updates)."""
    from . import models

    model = models.build_mobilenet_tiny(seed=seed, classes=10, in_channels=1)
    x, y = _digits(seed)
    return Case("cnn-depthwise-bn", model, (x, y), nn.functional.cross_entropy, kind="image")


def lstm(seed: int = 0) -> Case:
    from . import models
    from .data import ByteBatches, stdlib_corpus

    model = models.build_lstm_lm(seed=seed, vocab=256, embed=32, hidden=48, layers=2)
    x, y = next(ByteBatches(stdlib_corpus(max_bytes=100_000), 4, 16, seed=seed))
    return Case("lstm-lm", model, (x, y), models.lm_loss)


CASES: dict[str, Callable[[int], Case]] = {
    "gpt2": gpt2, "bert-mlm": bert_mlm, "t5": t5, "opt": opt, "qwen2": qwen2, "mistral": mistral, "vit": vit,
    "cnn-depthwise-bn": cnn, "lstm-lm": lstm,
}


def loss_of(model: nn.Module, batch: tuple[Any, ...], loss_fn: Callable | None) -> torch.Tensor:
    """The eager loss of ``batch`` under memfit's batch convention."""
    if len(batch) == 1 and isinstance(batch[0], dict):
        return model(**batch[0]).loss
    if loss_fn is None:
        out = model(*batch)
        return out.loss if hasattr(out, "loss") else out
    return loss_fn(model(*batch[:-1]), batch[-1])


# ---- the matrix: one architecture through both doors, a lossy setting and a budget ----------------------

def _eager_losses(case: Case, steps: int, lr: float) -> list[float]:
    import copy

    model = copy.deepcopy(case.model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, case.batch, case.loss_fn)
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return out


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def door1_row(case: Case, steps: int = 3, lr: float = 1e-3) -> dict[str, Any]:
    """``memfit.optimize`` (fp32 AdamW, lossless defaults) vs eager ``torch.optim.AdamW``: the largest relative
    loss difference over ``steps`` steps, predicted vs measured peak, and the masked/unmasked losses."""
    import copy
    import time

    import memfit

    t = time.perf_counter()
    tr = memfit.optimize(copy.deepcopy(case.model), example_inputs=case.batch, loss_fn=case.loss_fn,
                         optimizer=memfit.AdamW(lr=lr))
    setup = time.perf_counter() - t
    losses = [float(tr.step(*case.batch)) for _ in range(steps)]
    order = {n: i for i, n in enumerate(tr.graph.graph.nodes)}
    # the non-finite loss guard sits right after the loss: it must come before the first in-place update
    guard_first = order[tr.graph.loss] < min(order[n] for n in tr.graph.updates.values())
    row: dict[str, Any] = {"door1_max_rel_diff": _rel(losses, _eager_losses(case, steps, lr)), "door1_setup_s": setup,
                           "loss_before_first_update": guard_first,
                           "predicted_peak_bytes": tr.plan.peak_bytes,
                           "measured_peak_bytes": tr.measure_step(*case.batch).peak_bytes}
    if case.unmasked is not None:
        fresh = memfit.optimize(copy.deepcopy(case.model), example_inputs=case.unmasked, loss_fn=case.loss_fn,
                                optimizer=memfit.AdamW(lr=lr))
        eager = copy.deepcopy(case.model)
        row.update(loss_masked=losses[0], loss_all_ones_mask=float(fresh.step(*case.unmasked)),
                   eager_loss_masked=float(loss_of(eager, case.batch, None).detach()),
                   eager_loss_all_ones_mask=float(loss_of(eager, case.unmasked, None).detach()))
    return row


def door2_row(case: Case, steps: int = 3, lr: float = 1e-3) -> dict[str, Any]:
    """``torch.compile(model, backend="memfit")`` in an eager AdamW loop vs the same loop uncompiled; how many
    graphs memfit's backend compiled (0: Dynamo ran the model eagerly, e.g. an LSTM)."""
    import copy

    from .frontends import dynamo

    torch._dynamo.reset()
    dynamo.LAST_STATS.clear()
    model = copy.deepcopy(case.model)
    compiled = torch.compile(model, backend="memfit")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(compiled, case.batch, case.loss_fn)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    reached = bool(dynamo.LAST_STATS)
    torch._dynamo.reset()
    return {"door2_max_rel_diff": _rel(losses, _eager_losses(case, steps, lr)), "door2_memfit_graphs": int(reached)}


def lossy_budget_row(case: Case, budget_share: float = 0.85, lr: float = 1e-3) -> dict[str, Any]:
    """GaLore (rank 4) on every eligible weight under a budget of its own predicted peak, and the planner
    under ``budget_share`` of the lossless plan's peak: measured peak against each budget."""
    import copy

    import memfit

    tr = memfit.optimize(copy.deepcopy(case.model), example_inputs=case.batch, loss_fn=case.loss_fn,
                         optimizer=memfit.AdamW(lr=lr), passes=["remat", "fused_update", ("lowrank", {"rank": 4})])
    lossy_budget = tr.plan.peak_bytes
    for _ in range(3):
        lossy_loss = float(tr.step(*case.batch))
    row = {"lossy_budget_bytes": lossy_budget, "lossy_measured_bytes": tr.measure_step(*case.batch).peak_bytes,
           "lossy_loss": lossy_loss, "lossy_projected": len(tr.graph.info.get("lowrank", {}).get("projected", []))}
    full = memfit.plan(copy.deepcopy(case.model), example_inputs=case.batch, loss_fn=case.loss_fn).peak_bytes
    budget = int(budget_share * full)
    tr = memfit.optimize(copy.deepcopy(case.model), example_inputs=case.batch, loss_fn=case.loss_fn,
                         optimizer=memfit.AdamW(lr=lr), budget=budget)
    tr.step(*case.batch)
    row.update(budget_bytes=budget, budget_predicted_bytes=tr.plan.peak_bytes,
               budget_measured_bytes=tr.measure_step(*case.batch).peak_bytes, budget_passes=",".join(tr.graph.applied))
    return row
