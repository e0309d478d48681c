"""Tests for memfit.measure: the storage tracker's bookkeeping, and its cross-check
against torch.profiler's allocation events on full eager training steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memfit.errors import ConfigError
from memfit.measure import LiveBytesTracker, PeakMeasurement, measure_peak, profiler_peak_bytes

MIB = 1 << 20
FLOATS_PER_MIB = MIB // 4


def one_mib() -> torch.Tensor:
    return torch.empty(FLOATS_PER_MIB)


# ---- the tracker's bookkeeping ---------------------------------------------------------


def test_one_mib_allocation_raises_peak_by_exactly_one_mib():
    m = measure_peak(one_mib)
    assert isinstance(m, PeakMeasurement)
    assert (m.method, m.device) == ("storage-tracker", "cpu")
    assert m.baseline_bytes == 0
    assert m.peak_bytes - m.baseline_bytes == MIB
    assert m.end_bytes == MIB  # the returned tensor is still alive
    assert m.value.numel() == FLOATS_PER_MIB


def test_views_share_their_storage_and_count_once():
    def fn():
        a = one_mib()
        return a, a.view(512, 512), a[::2], a.view(512, 512).t(), a.detach(), a.unsqueeze(0).expand(3, -1)

    m = measure_peak(fn)
    assert m.peak_bytes == MIB
    assert m.end_bytes == MIB


def test_peak_is_the_max_of_live_bytes_not_the_sum_of_allocations():
    def fn():
        a = one_mib()
        del a  # freed before the next allocation (often at the very same address)
        b = one_mib()
        c = torch.empty(2 * FLOATS_PER_MIB)
        del b
        return c, one_mib()

    m = measure_peak(fn)
    assert m.peak_bytes == 3 * MIB  # b and c together
    assert m.end_bytes == 3 * MIB  # c and the last 1 MiB


def test_existing_tensors_make_the_baseline_and_their_frees_are_seen():
    held = [one_mib(), torch.empty(2 * FLOATS_PER_MIB)]
    held.append(held[0].view(512, 512))  # a view of an existing tensor counts once
    held.append(None)  # an unset .grad is fine in `existing`

    def fn():
        held.clear()  # drops the last references to both existing storages
        return one_mib()

    # An iterator, not the list itself: the caller's argument would keep the tensors alive.
    m = measure_peak(fn, existing=iter(held))
    assert m.baseline_bytes == 3 * MIB
    assert m.peak_bytes == 3 * MIB  # the new tensor fits in the space the old ones left
    assert m.end_bytes == MIB


def test_zero_grad_set_to_none_frees_existing_grads():
    w = torch.zeros(512, 512, requires_grad=True)
    w.grad = torch.ones(512, 512)
    optimizer = torch.optim.SGD([w], lr=0.1)

    def fn():
        optimizer.zero_grad(set_to_none=True)
        return one_mib()

    m = measure_peak(fn, existing=iter([w, w.grad]))
    assert (m.baseline_bytes, m.peak_bytes, m.end_bytes) == (2 * MIB, 2 * MIB, 2 * MIB)


def test_autograd_saved_tensors_freed_by_cpp_are_seen():
    w = torch.randn(256, 256, requires_grad=True)
    x = torch.randn(1024, 256)

    def fn():
        loss = torch.tanh(x @ w).sum()  # tanh saves its 1 MiB output for backward
        loss.backward()

    m = measure_peak(fn, existing=[w, x])
    # After backward: only w.grad (256 KiB) is new; saved activations have been released.
    assert m.end_bytes - m.baseline_bytes == 256 * 256 * 4
    assert m.peak_bytes - m.baseline_bytes >= 2 * MIB


def test_resize_in_place_is_followed():
    def fn():
        a = torch.empty(0)
        a.resize_(FLOATS_PER_MIB)
        a.resize_(2 * FLOATS_PER_MIB)
        return a

    m = measure_peak(fn)
    assert m.end_bytes == 2 * MIB


def test_fake_and_meta_tensors_are_ignored():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def fn():
        torch.empty(4 * FLOATS_PER_MIB, device="meta")
        with FakeTensorMode():
            torch.empty(4 * FLOATS_PER_MIB) @ torch.empty(4 * FLOATS_PER_MIB)
        return one_mib()

    assert measure_peak(fn).peak_bytes == MIB


def test_tracker_as_context_manager_records_a_timeline():
    with LiveBytesTracker(record_timeline=True) as tracker:
        a = one_mib()
        b = a + 1
        del a
        c = b * 2
    assert tracker.peak_bytes == 2 * MIB
    assert tracker.live_bytes == 2 * MIB  # b and c
    names = [name for name, _ in tracker.timeline]
    assert names == ["aten.empty.memory_format", "aten.add.Tensor", "aten.mul.Tensor"]
    assert [live for _, live in tracker.timeline] == [MIB, 2 * MIB, 2 * MIB]
    del b, c


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_uses_the_allocator_counters():
    m = measure_peak(lambda: torch.empty(FLOATS_PER_MIB, device="cuda"), device="cuda")
    assert m.method == "cuda"
    assert m.peak_bytes - m.baseline_bytes == MIB


def test_profiler_peak_counts_what_fn_adds():
    assert profiler_peak_bytes(one_mib) == MIB


# ---- documented errors -----------------------------------------------------------------


def test_meta_device_is_rejected():
    with pytest.raises(ConfigError, match=r"measure_peak\(device=...\): expected a device that allocates memory"):
        measure_peak(one_mib, device="meta")


def test_unknown_device_is_rejected():
    with pytest.raises(ConfigError, match=r"expected a torch device such as 'cpu'"):
        measure_peak(one_mib, device="not-a-device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_rejected():
    with pytest.raises(ConfigError, match=r"torch.cuda.is_available\(\) is False; pass device='cpu'"):
        measure_peak(one_mib, device="cuda")


def test_non_tensor_in_existing_is_rejected():
    with pytest.raises(ConfigError, match=r"expected tensors \(or None\), got an item of type dict"):
        measure_peak(one_mib, existing=[{"exp_avg": torch.zeros(1)}])


# ---- cross-check against torch.profiler on full training steps --------------------------


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn):
    def step() -> torch.Tensor:
        loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, *inputs: torch.Tensor) -> list[torch.Tensor]:
    tensors = [*model.parameters(), *model.buffers(), *inputs]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _cross_check(name: str, model: nn.Module, loss_fn, *inputs: torch.Tensor) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = _train_step(model, optimizer, loss_fn)
    step()  # warm-up: the optimizer state exists from here on

    m = measure_peak(step, existing=iter(_state_tensors(model, optimizer, *inputs)))
    tracked = m.peak_bytes - m.baseline_bytes
    profiled = profiler_peak_bytes(step)
    diff = (tracked - profiled) / profiled
    print(
        f"\n{name}: tracker {tracked} B, profiler {profiled} B, difference {100 * diff:+.3f}% "
        f"(baseline {m.baseline_bytes} B, end {m.end_bytes} B)"
    )
    assert abs(diff) <= 0.05
    assert m.end_bytes - m.baseline_bytes <= 4  # only the returned 0-dim loss survives the step
    assert tracked > m.baseline_bytes // 2  # activations and gradients were really counted


def test_tracker_matches_profiler_on_llama_training_step():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (4, 64))
    _cross_check("llama", model, lambda m: m(input_ids=ids, labels=ids).loss, ids)


def test_tracker_matches_profiler_on_cnn_training_step():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 32 * 32, 10),
    )
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _cross_check("cnn", model, lambda m: nn.functional.cross_entropy(m(x), y), x, y)
