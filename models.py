"""Models built from configs, no weights downloaded: presets, HF configs and ``module:factory`` specs.

LLaMA presets follow the GaLore paper's table (60M ... 7B, vocabulary 32000); ``tiny-llama`` is the
byte-level model the demo, the tests and the benchmarks share.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, where_what_got

# name -> (hidden, intermediate, heads, layers, vocab)
LLAMA_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny-llama": (256, 688, 4, 4, 256),
    "llama-60m": (512, 1376, 8, 8, 32000),
    "llama-130m": (768, 2048, 12, 12, 32000),
    "llama-350m": (1024, 2736, 16, 24, 32000),
    "llama-1b": (2048, 5461, 32, 24, 32000),
    "llama-7b": (4096, 11008, 32, 32, 32000),
    "llama-70b": (8192, 28672, 64, 80, 32000),
}
# presets with grouped-query attention: key/value heads (the others have one per query head)
LLAMA_KV_HEADS: dict[str, int] = {"llama-70b": 8}


def _no_transformers(where: str, e: ImportError) -> ConfigError:
    """The ConfigError for a ``transformers`` import that failed (missing, or broken next to this torch)."""
    return ConfigError(where_what_got(where, "the transformers package (a memfit dependency) importable",
                                      f"{type(e).__name__}: {e}",
                                      "install it: pip install 'transformers>=4.45' (or reinstall memfit)"))


def llama_config(name: str = "tiny-llama", max_seq: int = 2048, **overrides: Any):
    try:
        from transformers import LlamaConfig
    except ImportError as e:
        raise _no_transformers("memfit.models.llama_config", e) from e

    if name not in LLAMA_PRESETS:
        raise ConfigError(where_what_got("memfit.models.llama_config", f"one of {sorted(LLAMA_PRESETS)}",
                                         repr(name), "pick a preset or pass a transformers config"))
    hidden, inter, heads, layers, vocab = LLAMA_PRESETS[name]
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
               num_key_value_heads=LLAMA_KV_HEADS.get(name, heads), num_hidden_layers=layers,
               max_position_embeddings=max_seq, attention_dropout=0.0, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_llama(name: str = "tiny-llama", seed: int = 0, **overrides: Any) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` from a preset (seeded, eager attention off: SDPA)."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError as e:
        raise _no_transformers("memfit.models.build_llama", e) from e

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(name, **overrides))


def build_gpt2_small(seed: int = 0, n_layer: int = 2, n_embd: int = 128, n_head: int = 4,
                     vocab: int = 256) -> nn.Module:
    """A small byte-level ``GPT2LMHeadModel`` (dropout off so it is deterministic)."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise _no_transformers("memfit.models.build_gpt2_small", e) from e

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=512,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def build_from_hf_config(path: str | os.PathLike, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM from a Hugging Face ``config.json`` (or the folder holding one)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise _no_transformers("memfit.models.build_from_hf_config", e) from e

    where = "memfit.models.build_from_hf_config"
    p = Path(path)
    if not p.exists():
        raise ConfigError(where_what_got(where, "an existing config.json or a folder holding one", str(p),
                                         "check the path"))
    try:
        cfg = AutoConfig.from_pretrained(str(p))
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(where_what_got(where, "a Hugging Face causal-LM config", f"{p} ({e})",
                                         "point at a config.json with a model_type transformers builds "
                                         "as AutoModelForCausalLM")) from e


def build(spec: str, **kwargs: Any) -> nn.Module:
    """A model from a preset name, a Hugging Face ``config.json`` (file or folder) or ``package.module:factory``."""
    if spec in LLAMA_PRESETS:
        return build_llama(spec, **kwargs)
    if spec.endswith(".json") or os.path.isdir(spec):
        return build_from_hf_config(spec, **kwargs)
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        where = "memfit.models.build"
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(where_what_got(where, "an importable module:factory", spec,
                                             f"check the spelling ({e})")) from e
        if not callable(factory):
            raise ConfigError(where_what_got(where, f"{spec} to name a function returning a torch.nn.Module",
                                             f"a {type(factory).__name__}", "name a factory function"))
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as e:
            call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ConfigError(where_what_got(
                where, f"a factory callable as {fn}({call})", f"{spec}{inspect.signature(factory)} ({e})",
                "give its parameters defaults" + (f" and accept {', '.join(kwargs)}" if kwargs else ""))) from e
        except ValueError:  # no signature to read (some builtins): the call itself says what is wrong
            pass
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(where_what_got(where, f"{spec} to return a torch.nn.Module",
                                             f"a {type(model).__name__} ({_short(model)})",
                                             "make the factory return an nn.Module"))
        return model
    raise ConfigError(where_what_got("memfit.models.build",
                                     f"a preset {sorted(LLAMA_PRESETS)}, a config.json path or module:factory",
                                     repr(spec), "fix the model name"))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lm_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Next-byte cross entropy for a causal LM's output (``.logits`` or a tensor)."""
    logits = output.logits if hasattr(output, "logits") else output
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def build_mlp(seed: int = 0, d_in: int = 32, hidden: int = 64, d_out: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


def build_cnn(seed: int = 0, channels: int = 16, classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU x2, pooled, linear head: a CNN whose BatchNorm buffers the step must update."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), nn.BatchNorm2d(channels * 2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels * 2, classes))


class _DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 (groups=channels) then pointwise 1x1, each followed by BatchNorm and ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def build_mobilenet_tiny(seed: int = 0, classes: int = 10, in_channels: int = 1, width: int = 16) -> nn.Module:
    """A MobileNet-style CNN for 8x8 images (sklearn's digits, NCHW float32): a 3x3 stem, three
    depthwise-separable blocks (8x8 -> 4x4 -> 2x2), global average pool, linear head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        _DepthwiseSeparable(width, 2 * width),
        _DepthwiseSeparable(2 * width, 4 * width, stride=2),
        _DepthwiseSeparable(4 * width, 4 * width, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


class LSTMLanguageModel(nn.Module):
    """Embedding -> ``nn.LSTM(batch_first=True)`` -> Linear to the vocabulary; returns logits (B, S, vocab)."""

    def __init__(self, vocab: int = 256, embed: int = 64, hidden: int = 128, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(input_ids))
        return self.head(out)


def build_lstm_lm(seed: int = 0, vocab: int = 256, embed: int = 64, hidden: int = 128, layers: int = 2) -> nn.Module:
    """A byte-level LSTM language model (use with :func:`lm_loss`)."""
    torch.manual_seed(seed)
    return LSTMLanguageModel(vocab, embed, hidden, layers)
