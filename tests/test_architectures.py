"""The architecture matrix: every case of memfit.zoo through door 1 (optimize) and door 2 (torch.compile),
against eager AdamW after 3 steps, with its predicted and measured peak, one lossy setting and one budget."""

from __future__ import annotations

import pytest

from memfit import zoo

NAMES = list(zoo.CASES)


@pytest.mark.parametrize("name", NAMES)
def test_door1_matches_eager_and_predicts_its_peak(name):
    case = zoo.CASES[name](0)
    row = zoo.door1_row(case)
    assert row["door1_max_rel_diff"] <= 1e-5, row
    assert row["predicted_peak_bytes"] == row["measured_peak_bytes"], row
    assert row["loss_before_first_update"], row  # a NaN loss is caught before any parameter changes
    if case.unmasked is not None:  # the padding mask matters, and memfit follows it
        assert abs(row["eager_loss_masked"] - row["eager_loss_all_ones_mask"]) > 1e-6, row
        assert abs(row["loss_masked"] - row["eager_loss_masked"]) <= 1e-5 * abs(row["eager_loss_masked"]), row
        assert abs(row["loss_all_ones_mask"] - row["eager_loss_all_ones_mask"]) <= \
            1e-5 * abs(row["eager_loss_all_ones_mask"]), row


@pytest.mark.parametrize("name", NAMES)
def test_door2_matches_eager(name):
    case = zoo.CASES[name](0)
    row = zoo.door2_row(case)
    assert row["door2_max_rel_diff"] <= 1e-5, row
    if name != "lstm-lm":  # Dynamo runs nn.LSTM eagerly unless allow_rnn is set (the door warns)
        assert row["door2_memfit_graphs"] >= 1, row


@pytest.mark.parametrize("name", NAMES)
def test_lossy_setting_and_budget_hold(name):
    case = zoo.CASES[name](0)
    row = zoo.lossy_budget_row(case)
    assert row["lossy_projected"] >= 1, row
    assert row["lossy_measured_bytes"] <= row["lossy_budget_bytes"], row
    assert row["budget_measured_bytes"] <= row["budget_bytes"], row
