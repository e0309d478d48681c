"""memfit.integrations.hf.MemfitTrainer against transformers.Trainer with torch AdamW.

One tiny LLaMA (2 layers, hidden 64, bytes), 74 byte sequences of 8..48 bytes padded per batch to a multiple
of 16 (labels -100 on the padding), batch 4, gradient accumulation 2: 19 batches, so 10 optimizer steps whose
last window is one partial batch of 2 rows. The module runs each trainer once and the tests read the runs:
per-step losses match Hugging Face's, evaluation reports the trained model's loss, the checkpoint at step 5
holds model.safetensors and memfit's optimizer state, and a run resumed from it ends bit-identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from memfit import ConfigError  # noqa: E402
from memfit.data import stdlib_corpus  # noqa: E402
from memfit.integrations.hf import MemfitOptimizer, MemfitTrainer  # noqa: E402
from memfit.models import build_llama  # noqa: E402

N_TRAIN, N_EVAL, BATCH, K, MULTIPLE = 74, 8, 4, 2, 16


class PadCollator:
    """Pads input_ids (0) and attention_mask (0) to the batch's longest sequence rounded up to
    ``pad_to_multiple_of``; labels are the input ids, -100 on the padding."""

    pad_to_multiple_of = MULTIPLE

    def __call__(self, features):
        n = max(len(f["input_ids"]) for f in features)
        n = -(-n // MULTIPLE) * MULTIPLE
        ids = torch.zeros(len(features), n, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, f in enumerate(features):
            row = torch.tensor(f["input_ids"], dtype=torch.long)
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
            labels[i, : len(row)] = row
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _sequences(n: int, seed: int) -> list[dict]:
    corpus = stdlib_corpus(max_bytes=200_000)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 49, (n,), generator=g).tolist()
    starts = torch.randint(0, corpus.numel() - 64, (n,), generator=g).tolist()
    return [{"input_ids": corpus[s: s + n_].tolist()} for s, n_ in zip(starts, lengths, strict=True)]


def _model():
    return build_llama("tiny-llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128)


def _args(out, **overrides):
    kw = dict(output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
              gradient_accumulation_steps=K, learning_rate=3e-3, num_train_epochs=1, lr_scheduler_type="linear",
              warmup_steps=2, logging_steps=1, save_strategy="steps", save_steps=5, eval_strategy="steps",
              eval_steps=5, optim="adamw_torch", weight_decay=0.0, max_grad_norm=0.0, report_to=[], use_cpu=True,
              dataloader_num_workers=0, seed=0, disable_tqdm=True)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def _train(cls, out, resume=None, **kwargs):
    model = _model()
    trainer = cls(model=model, args=_args(out), train_dataset=_sequences(N_TRAIN, 1),
                  eval_dataset=_sequences(N_EVAL, 2), data_collator=PadCollator(), **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def _eval_losses(trainer) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf = _train(transformers.Trainer, root / "hf")
    mf = _train(MemfitTrainer, root / "memfit")
    return {"root": root, "hf": hf, "memfit": mf}


def test_per_step_losses_match_transformers_trainer(runs):
    hf, mf = _losses(runs["hf"]), _losses(runs["memfit"])
    assert sorted(hf) == sorted(mf) == list(range(1, 11))
    for step, expected in hf.items():
        assert mf[step] == pytest.approx(expected, rel=1e-4), (step, mf, hf)
    lrs = [[h["learning_rate"] for h in t.state.log_history if "loss" in h] for t in (runs["hf"], runs["memfit"])]
    assert lrs[0] == lrs[1]
    for (name, p), (_, q) in zip(runs["hf"].model.named_parameters(), runs["memfit"].model.named_parameters(),
                                 strict=True):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-5, msg=name)


def test_evaluation_reports_the_trained_model_and_costs_no_recompile(runs):
    hf, mf = _eval_losses(runs["hf"]), _eval_losses(runs["memfit"])
    assert sorted(mf) == [5, 10]
    for step in mf:
        assert mf[step] == pytest.approx(hf[step], rel=1e-4)
    shapes = runs["memfit"].memfit_trainer.compiled_shapes
    assert all(all(modes) for _, modes in shapes), "a step was compiled in eval mode"


def test_checkpoint_holds_safetensors_and_memfit_state(runs):
    ckpt = runs["root"] / "memfit" / "checkpoint-5"
    assert (ckpt / "model.safetensors").is_file()
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sd["memfit"]["step"] == 5 and "params" not in sd["memfit"]
    assert any(k.endswith("::exp_avg_sq") for k in sd["memfit"]["state"])
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)


def test_resume_from_checkpoint_is_bit_identical(runs):
    root = runs["root"]
    resumed = _train(MemfitTrainer, root / "resumed", resume=str(root / "memfit" / "checkpoint-5"))
    assert resumed.memfit_trainer.step_count == 10
    for (name, p), (_, q) in zip(runs["memfit"].model.named_parameters(), resumed.model.named_parameters(),
                                 strict=True):
        assert torch.equal(p, q), name
    full, again = _losses(runs["memfit"]), _losses(resumed)
    assert again == full  # steps 1-5 come from the checkpoint's trainer_state.json, 6-10 were trained again
    state = runs["memfit"].memfit_trainer.executor.state
    for name, t in resumed.memfit_trainer.executor.state.items():
        assert torch.equal(t, state[name]), name


def test_a_transformers_checkpoint_is_refused_clearly(runs):
    with pytest.raises(ConfigError, match="MemfitTrainer"):
        _train(MemfitTrainer, runs["root"] / "wrong", resume=str(runs["root"] / "hf" / "checkpoint-5"))


@pytest.mark.parametrize("overrides, match", [
    (dict(weight_decay=0.1), "weight_decay"),
    (dict(max_grad_norm=1.0), "max_grad_norm"),
    (dict(optim="sgd"), "optim"),
])
def test_settings_memfit_cannot_honour_are_refused(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        MemfitTrainer(model=_model(), args=_args(tmp_path, eval_strategy="no", **overrides),
                      train_dataset=_sequences(8, 1), data_collator=PadCollator())


def test_optimizer_state_round_trips_before_the_step_exists():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = MemfitOptimizer([p], lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 5e-4
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 5e-4 and opt.param_groups[0]["params"] == [p]
    with pytest.raises(ConfigError, match=r"optimizer\.pt"):
        opt.load_state_dict(torch.optim.AdamW([p]).state_dict())


@pytest.mark.parametrize("kwargs, match", [
    (dict(memfit_passes=[("lora", {"rank": 4}), "fused_update"]), "model.safetensors"),
    (dict(memfit_passes=["fused_update", "quantize_weights"]), "model.safetensors"),
    (dict(memfit_passes=["fused_update", ("prune", {"schedule": "fixed", "compress": True,
                                                     "compress_weights": True})]), r"prune\(compress_weights=True\)"),
    (dict(memfit_levers="adapters"), "memfit_levers"),
])
def test_weight_passes_are_refused_at_this_door(tmp_path, kwargs, match):
    """Hugging Face saves the model's own tensors; passes holding weights as codes or adapters go through
    memfit.optimize (the planner here takes optimizer-state levers only)."""
    with pytest.raises(ConfigError, match=match):
        MemfitTrainer(model=_model(), args=_args(tmp_path, eval_strategy="no"), train_dataset=_sequences(8, 1),
                      data_collator=PadCollator(), **kwargs)
