"""Peak-memory measurement: what a step really holds, not what a plan assumes.

Two ways to measure, one entry point (``measure_peak``):

- CUDA: the caching allocator's own counters (``torch.cuda.max_memory_allocated``).
- Anything else (CPU): ``LiveBytesTracker``, a ``TorchDispatchMode`` that counts the
  bytes of live tensor *storages*. After every ATen op it registers the storage of each
  output tensor (deduplicated by data pointer, so views count once) together with a
  ``StorageWeakRef``, and drops storages whose weak reference has expired. The weak
  reference watches the C++ refcount, so frees done by C++ (autograd releasing saved
  tensors, ``zero_grad(set_to_none=True)``) are seen as well as Python ``del``.

``profiler_peak_bytes`` is an independent check built on ``torch.profiler``'s
per-allocation memory events; the tests require the two CPU numbers to agree within 5%
on a full eager training step.

What the tracker cannot see (and the profiler can):

- scratch memory allocated and freed inside a single ATen kernel (reduction buffers,
  oneDNN/BLAS workspaces, im2col buffers); the tracker only sees op outputs;
- storages created outside the dispatcher (``torch.from_numpy``, ``torch.frombuffer``)
  until an op returns them, and ops run under ``no_dispatch()`` or by other modes that
  do not redispatch;
- allocator overhead (alignment, caching): it counts storage ``nbytes``.

Requires: eager execution (a ``TorchDispatchMode`` does not support higher-order ops).
Guarantees: ``peak_bytes >= baseline_bytes``; the measured function's return value is
passed through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ConfigError, where_what_got

__all__ = [
    "LiveBytesTracker",
    "PeakMeasurement",
    "measure_peak",
    "profiler_peak_bytes",
]


@dataclass(frozen=True)
class PeakMeasurement:
    """The result of ``measure_peak``.

    ``peak_bytes``, ``baseline_bytes`` and ``end_bytes`` are absolute levels of the same
    counter: on CPU, bytes of the tracked storages (``existing`` plus everything created
    while ``fn`` ran); on CUDA, ``torch.cuda.memory_allocated`` of the device. The memory
    ``fn`` itself added at its peak is ``peak_bytes - baseline_bytes``.
    """

    value: Any
    peak_bytes: int
    baseline_bytes: int
    end_bytes: int
    device: str
    method: Literal["cuda", "storage-tracker"]

    @property
    def added_peak_bytes(self) -> int:
        """Bytes above the starting level at the peak."""
        return self.peak_bytes - self.baseline_bytes

    def __str__(self) -> str:
        mib = 1 << 20
        return (
            f"PeakMeasurement({self.method} on {self.device}: peak {self.peak_bytes / mib:.2f} MiB, "
            f"baseline {self.baseline_bytes / mib:.2f} MiB, end {self.end_bytes / mib:.2f} MiB)"
        )


class _Entry:
    """One registered storage: its weak reference, its size and its StorageImpl address."""

    __slots__ = ("impl", "nbytes", "ref")

    def __init__(self, ref: StorageWeakRef, nbytes: int, impl: int) -> None:
        self.ref = ref
        self.nbytes = nbytes
        self.impl = impl


def _tensors_in(out: object) -> Iterator[torch.Tensor]:
    """The tensors an ATen op returned (a tensor, or tuples/lists of them, nested)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors_in(item)


class LiveBytesTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages on one device type, op by op.

    Use as a context manager::

        with LiveBytesTracker(existing=model.parameters()) as tracker:
            step()
        tracker.peak_bytes, tracker.baseline_bytes, tracker.live_bytes

    ``existing`` tensors are registered on entry: they make up ``baseline_bytes`` and
    their frees while the mode is active are seen. Tensors on other devices, meta and
    fake tensors, tensors without storage (sparse, opaque) and empty storages are
    ignored. With ``record_timeline=True``, ``timeline`` gets one ``(op name, live
    bytes)`` pair per op, after the op's outputs are counted.
    """

    def __init__(
        self,
        existing: Iterable[torch.Tensor | None] = (),
        *,
        device: str | torch.device = "cpu",
        record_timeline: bool = False,
    ) -> None:
        super().__init__()
        self.device_type = _device_of(device, "LiveBytesTracker").type
        self.record_timeline = record_timeline
        self.timeline: list[tuple[str, int]] = []
        self._existing = _tensor_list(existing, "LiveBytesTracker(existing=...)")
        self._by_ptr: dict[int, _Entry] = {}
        self._ptr_by_impl: dict[int, int] = {}
        self._live = 0
        self.baseline_bytes = 0
        self.peak_bytes = 0

    # ---- public surface -------------------------------------------------------------

    @property
    def live_bytes(self) -> int:
        """Bytes of the registered storages still alive now."""
        self._drop_expired()
        return self._live

    def register(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Count ``tensors``' storages from now on (for tensors made outside any op)."""
        self._drop_expired()
        for tensor in _tensor_list(tensors, "LiveBytesTracker.register"):
            storage = self._storage_of(tensor)
            if storage is not None:
                self._add(storage)
        self.peak_bytes = max(self.peak_bytes, self._live)

    def __enter__(self) -> LiveBytesTracker:
        self._by_ptr.clear()
        self._ptr_by_impl.clear()
        self._live = 0
        self.timeline.clear()
        self.peak_bytes = 0
        self.register(self._existing)
        self._existing = []  # hold no strong references while measuring
        self.baseline_bytes = self._live
        super().__enter__()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        super().__exit__(exc_type, exc, tb)
        self._drop_expired()

    # ---- the mode ---------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        fresh = []
        for tensor in _tensors_in(out):
            storage = self._storage_of(tensor)
            if storage is None:
                continue
            entry = self._by_ptr.get(storage.data_ptr())
            if entry is None or entry.impl != storage._cdata or entry.ref.expired():
                fresh.append(storage)
            elif entry.nbytes != storage.nbytes():  # resized in place
                fresh.append(storage)
        if fresh or self.record_timeline:
            # Frees since the last op happened before these outputs were allocated.
            self._drop_expired()
            for storage in fresh:
                self._add(storage)
            if self._live > self.peak_bytes:
                self.peak_bytes = self._live
        if self.record_timeline:
            self.timeline.append((str(func), self._live))
        return out

    # ---- bookkeeping ------------------------------------------------------------------

    def _storage_of(self, tensor: torch.Tensor) -> torch.UntypedStorage | None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            return None  # sparse, opaque (mkldnn) or wrapper-subclass tensors own no storage
        if storage.device.type != self.device_type or storage.nbytes() == 0:
            return None  # other devices, meta and fake tensors, empty storages
        try:
            storage.data_ptr()
        except RuntimeError:
            return None  # a wrapper subclass's placeholder storage (e.g. torchao's quantized optimizer state)
        return storage

    def _add(self, storage: torch.UntypedStorage) -> None:
        ptr, impl, nbytes = storage.data_ptr(), storage._cdata, storage.nbytes()
        moved_from = self._ptr_by_impl.get(impl)
        if moved_from is not None and moved_from != ptr:
            self._forget(moved_from)  # resize_ reallocated this storage: its old block is gone
        old = self._by_ptr.get(ptr)
        if old is not None:
            if old.impl == impl and old.nbytes == nbytes and not old.ref.expired():
                return
            # A new storage at an expired one's address, a resize, or a second storage
            # aliasing the same block (count the block once, at its current size).
            self._forget(ptr)
        self._by_ptr[ptr] = _Entry(StorageWeakRef(storage), nbytes, impl)
        self._ptr_by_impl[impl] = ptr
        self._live += nbytes

    def _forget(self, ptr: int) -> None:
        entry = self._by_ptr.pop(ptr)
        if self._ptr_by_impl.get(entry.impl) == ptr:
            del self._ptr_by_impl[entry.impl]
        self._live -= entry.nbytes

    def _drop_expired(self) -> None:
        expired = [ptr for ptr, entry in self._by_ptr.items() if entry.ref.expired()]
        for ptr in expired:
            self._forget(ptr)


def measure_peak(
    fn: Callable[..., Any],
    *args: Any,
    existing: Iterable[torch.Tensor | None] = (),
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> PeakMeasurement:
    """Run ``fn(*args, **kwargs)`` once and measure its peak memory.

    ``device`` picks the counter: CUDA uses the caching allocator's statistics (the
    baseline is everything allocated on the device at the start); any other device uses
    ``LiveBytesTracker`` over ``existing`` plus what ``fn`` creates. With ``device=None``
    the device is CUDA when any ``existing`` tensor is on CUDA, else CPU.

    The tracker can only see an ``existing`` tensor freed when ``fn`` drops its last
    reference, and a list passed as the argument stays referenced by the caller until
    ``measure_peak`` returns: pass an iterator (``model.parameters()``, ``iter(tensors)``)
    when ``fn`` frees some of them (e.g. ``zero_grad(set_to_none=True)`` on old grads).

    Raises ``ConfigError`` for an unknown device, CUDA without a GPU, the meta device,
    or ``existing`` holding something other than tensors and ``None``.
    """
    tensors = _tensor_list(existing, "measure_peak(existing=...)")
    del existing  # hold no reference of our own to the caller's container
    if device is None:
        on_cuda = next((t.device for t in tensors if t.device.type == "cuda"), None)
        dev = on_cuda if on_cuda is not None else torch.device("cpu")
    else:
        dev = _device_of(device, "measure_peak(device=...)")

    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                where_what_got(
                    "measure_peak(device=...)",
                    "a device this machine has",
                    f"{str(dev)!r} but torch.cuda.is_available() is False",
                    "pass device='cpu' (or None) to use the storage tracker",
                )
            )
        del tensors  # the CUDA counters see everything; hold no extra references
        torch.cuda.synchronize(dev)
        baseline = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        value = fn(*args, **kwargs)
        torch.cuda.synchronize(dev)
        return PeakMeasurement(
            value=value,
            peak_bytes=max(torch.cuda.max_memory_allocated(dev), baseline),
            baseline_bytes=baseline,
            end_bytes=torch.cuda.memory_allocated(dev),
            device=str(dev),
            method="cuda",
        )

    tracker = LiveBytesTracker(tensors, device=dev)
    del tensors  # the tracker must be the only holder, or frees of `existing` go unseen
    with tracker:
        value = fn(*args, **kwargs)
    return PeakMeasurement(
        value=value,
        peak_bytes=tracker.peak_bytes,
        baseline_bytes=tracker.baseline_bytes,
        end_bytes=tracker.live_bytes,
        device=str(dev),
        method="storage-tracker",
    )


def profiler_peak_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak CPU bytes ``fn`` adds, from ``torch.profiler``'s per-allocation events.

    Runs ``fn`` under ``torch.profiler.profile(activities=[CPU], profile_memory=True)``,
    walks the allocation events of the result's event tree in time order, and returns the
    highest running sum of allocation sizes above the level at the start (never below 0).
    A free only counts when its block was allocated inside the profiled region: the CPU
    allocator cannot size frees of older blocks, so they are not part of this number.
    This sees every CPU allocation, kernel scratch included; the tracker sees storages.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args, **kwargs)
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        raise RuntimeError(where_what_got("profiler_peak_bytes", "the profiler's results after fn ran", "none",
                                          "run on a torch build with the Kineto profiler"))

    events: list[tuple[int, int, int]] = []  # (time ns, order seen, index)
    sizes: list[tuple[int, int]] = []  # (pointer, signed size)
    stack = list(reversed(results.experimental_event_tree()))
    while stack:
        node = stack.pop()
        kind, fields = node.typed
        if kind == _EventType.Allocation and fields.device.type == "cpu":
            events.append((node.start_time_ns, len(events), len(sizes)))
            sizes.append((fields.ptr, fields.alloc_size))
        stack.extend(reversed(node.children))
    events.sort()

    level = peak = 0
    live: dict[int, int] = {}  # pointer -> size, for blocks allocated inside fn
    for _, _, index in events:
        ptr, size = sizes[index]
        if size > 0:
            live[ptr] = size
            level += size
            peak = max(peak, level)
        elif ptr in live:
            level -= live.pop(ptr)
    return peak


# ---- helpers --------------------------------------------------------------------------


def _device_of(device: str | torch.device, where: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            where_what_got(where, "a torch device such as 'cpu' or 'cuda:0'", repr(device), str(err))
        ) from err
    if dev.type == "meta":
        raise ConfigError(
            where_what_got(where, "a device that allocates memory", "'meta'", "measure on 'cpu' or 'cuda' instead")
        )
    return dev


def _tensor_list(tensors: Iterable[torch.Tensor | None], where: str) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    try:
        items = list(tensors)
    except TypeError:
        raise ConfigError(
            where_what_got(where, "an iterable of tensors", type(tensors).__name__, "wrap a single tensor in a list")
        ) from None
    for item in items:
        if item is not None and not isinstance(item, torch.Tensor):
            raise ConfigError(
                where_what_got(
                    where,
                    "tensors (or None)",
                    f"an item of type {type(item).__name__}",
                    "flatten nested state first, e.g. torch.utils._pytree.tree_leaves(optimizer.state)",
                )
            )
    return [t for t in items if t is not None]
