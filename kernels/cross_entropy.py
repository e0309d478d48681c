"""Linear + cross-entropy without the logits: loss, hidden-state gradient and head-weight gradient by chunks.

``linear_cross_entropy(h, weight, target, bias=...)`` takes the last hidden states ``h`` (N, H), the head's
weight (V, H), optionally its bias (V,), and the targets (N,) and returns ``(loss, dh, dweight, dbias)``:
the cross-entropy of ``h @ weight.T + bias`` (in fp32, as ``F.cross_entropy(logits.float(), target)``) and
its gradients for an incoming gradient of 1 (``dbias`` empty without a bias). The logits exist one chunk
of ``chunk`` rows at a time, as one fp32 (chunk, V) buffer: the chunk's product is written into it, the row
kernel turns it into the chunk's gradient in place (softmax minus the smoothed one-hot, times the
reduction's scale) and writes each row's loss, and two matmuls take the chunk's ``dh`` rows and add its
share of ``dweight`` (and a column sum its share of ``dbias``).

Per row, with ``x`` the logits, ``t`` the target, ``eps`` the label smoothing and ``lse = log sum exp x``:

    loss_row = lse - (1 - eps) * x[t] - eps / V * sum_j x[j]      (0 for a row whose target is ignored)
    grad_row = (softmax(x) - (1 - eps) * onehot(t) - eps / V) * scale

``scale`` is ``1 / (rows not ignored)`` for ``reduction="mean"`` (torch's enum 1) and 1 for ``"sum"`` (2),
the torch semantics of ``cross_entropy(..., ignore_index, label_smoothing)``; an all-ignored mean is NaN
as in torch.

``linear_cross_entropy`` runs the row kernel in Triton (GPU, or CPU under ``TRITON_INTERPRET=1``);
``linear_cross_entropy_ref`` is the same chunk loop in plain torch: ``log_softmax`` and ATen's
``_log_softmax_backward_data`` per chunk, so each row's loss and gradient are the unfused step's to the bit
(without label smoothing), for two more (chunk, V) buffers. The matmuls stay on torch (cuBLAS / MKL)
in both. ``workspace_bytes`` is what each holds beyond its outputs.
"""

from __future__ import annotations

import torch

from ..errors import KernelError, where_what_got
from ._checks import require_gpu_or_interpreter, require_triton, to_f32

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton wheel on this platform; linear_cross_entropy_ref still works
    triton = None
    tl = None

_WHERE = "memfit.kernels.cross_entropy"
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # loss, dh, dweight, dbias
MEAN, SUM = 1, 2  # torch's reduction enum (nll_loss_forward's argument)
_BLOCK_V = 1024

if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, target_ptr, loss_ptr, row_scale_ptr, n_cols, stride_row, ignore_index,
                        smooth_keep, smooth_each, BLOCK_V: tl.constexpr):
        """One program per row: online max / sum-exp and the sum of the logits in one sweep, then the row's
        loss, then the gradient written over the logits in a second sweep."""
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        t = tl.load(target_ptr + row)
        scale = tl.load(row_scale_ptr + row)
        ignored = t == ignore_index
        cols = tl.arange(0, BLOCK_V)
        m = tl.full([BLOCK_V], -float("inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        total = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < n_cols, other=-float("inf"))
            m_new = tl.maximum(m, x)
            alive = m_new > -float("inf")
            s = tl.where(alive, s * tl.exp(m - m_new) + tl.exp(x - m_new), s)
            m = m_new
            total += tl.where(idx < n_cols, x, 0.0)
        mx = tl.max(m, axis=0)
        sum_exp = tl.sum(tl.where(m > -float("inf"), s * tl.exp(m - mx), 0.0), axis=0)
        lse = mx + tl.log(sum_exp)
        x_t = tl.load(base + tl.where(ignored, 0, t))
        loss = lse - smooth_keep * x_t - smooth_each * tl.sum(total, axis=0)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
        for start in range(0, n_cols, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < n_cols, other=0.0)
            g = tl.exp(x - lse) - smooth_each - tl.where(idx == t, smooth_keep, 0.0)
            g = tl.where(ignored, 0.0, g * scale)
            tl.store(base + idx, g, mask=idx < n_cols)


def _check(h, weight, target, reduction, chunk, label_smoothing, bias=None) -> None:
    for name, x in (("h", h), ("weight", weight), ("target", target)):
        if not isinstance(x, torch.Tensor):
            raise KernelError(where_what_got(_WHERE, f"`{name}` a torch.Tensor", type(x).__name__,
                                             "pass tensors"))
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise KernelError(where_what_got(_WHERE, "h (N, H) and weight (V, H)",
                                         f"h {tuple(h.shape)}, weight {tuple(weight.shape)}",
                                         "flatten the hidden states to (tokens, hidden)"))
    if target.shape != (h.shape[0],) or target.dtype not in (torch.int64, torch.int32):
        raise KernelError(where_what_got(_WHERE, f"target (N,) = ({h.shape[0]},) of int64",
                                         f"{tuple(target.shape)} {target.dtype}", "flatten the labels"))
    if not (h.is_floating_point() and weight.is_floating_point()):
        raise KernelError(where_what_got(_WHERE, "floating h and weight", f"{h.dtype}, {weight.dtype}",
                                         "cast them"))
    if len({h.device, weight.device, target.device}) != 1:
        raise KernelError(where_what_got(_WHERE, "h, weight and target on one device",
                                         f"{h.device}, {weight.device}, {target.device}", "move them"))
    if reduction not in (MEAN, SUM):
        raise KernelError(where_what_got(_WHERE, "reduction 1 (mean) or 2 (sum)", reduction,
                                         "reduction='none' keeps the logits: leave it unfused"))
    if not isinstance(chunk, int) or chunk < 1:
        raise KernelError(where_what_got(_WHERE, "chunk, a positive number of rows", chunk, "e.g. 1024"))
    if not 0.0 <= label_smoothing <= 1.0:
        raise KernelError(where_what_got(_WHERE, "label_smoothing in [0, 1]", label_smoothing, "as torch"))
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise KernelError(where_what_got(_WHERE, f"bias (V,) = ({weight.shape[0]},) or None",
                                         getattr(bias, "shape", type(bias).__name__), "pass the head's bias"))


def _row_scale(target: torch.Tensor, ignore_index: int, reduction: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row gradient scale (0 on ignored rows) and the loss's divisor (0-dim fp32)."""
    keep = target != ignore_index
    count = keep.sum().to(torch.float32)
    divisor = count if reduction == MEAN else torch.ones((), dtype=torch.float32, device=target.device)
    return keep.to(torch.float32) / divisor, divisor


def _run(h, weight, bias, target, ignore_index, label_smoothing, reduction, chunk, rows) -> tuple:
    """The chunk loop shared by both paths; ``rows(buf, t, scale) -> (chunk,) fp32 losses`` turns the
    chunk's logits in ``buf`` into its gradient in place (and may rebind the buffer: it returns it too)."""
    n, _ = h.shape
    scale, divisor = _row_scale(target, ignore_index, reduction)
    dh = torch.empty_like(h)
    dweight = torch.zeros_like(weight)
    dbias = torch.zeros_like(bias) if bias is not None else weight.new_empty(0)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        h_c = h[lo:hi]
        buf = torch.mm(h_c, weight.t()) if bias is None else torch.addmm(bias, h_c, weight.t())
        if buf.dtype != torch.float32:
            buf = buf.float()
        losses, buf = rows(buf, target[lo:hi], scale[lo:hi])
        total += losses.sum()
        del losses
        g = buf if buf.dtype == weight.dtype else buf.to(weight.dtype)
        del buf
        torch.mm(g, weight, out=dh[lo:hi])
        dweight.addmm_(g.t(), h_c)
        if bias is not None:
            torch.sum(g, 0, out=dbias) if lo == 0 else dbias.add_(g.sum(0))
        del g
    return total / divisor, dh, dweight, dbias


def linear_cross_entropy_ref(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                             bias: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                             reduction: int = MEAN, chunk: int = 1024) -> Outputs:
    """Plain-torch reference of :func:`linear_cross_entropy` (any device)."""
    _check(h, weight, target, reduction, chunk, label_smoothing, bias)
    v = weight.shape[0]
    keep_t, each = 1.0 - label_smoothing, label_smoothing / v

    def rows(buf, t, scale):
        logp = torch.log_softmax(buf, 1)
        ignored = t == ignore_index
        safe = t.masked_fill(ignored, 0).unsqueeze(1)
        losses = -logp.gather(1, safe).squeeze(1)
        if label_smoothing:
            losses.mul_(keep_t).sub_(logp.sum(1), alpha=each)
        losses.masked_fill_(ignored, 0.0)
        # the loss's gradient for the log-probabilities, written over the logits (no longer needed), then
        # ATen's own log-softmax backward: the unfused step's gradient to the bit (without smoothing)
        gout = buf.zero_()
        if label_smoothing:
            gout.add_((scale * -each).unsqueeze(1))
        gout.scatter_add_(1, safe, (scale * -keep_t).unsqueeze(1))
        return losses, torch._log_softmax_backward_data(gout, logp, 1, torch.float32)

    return _run(h, weight, bias, target, ignore_index, label_smoothing, reduction, chunk, rows)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, label_smoothing: float = 0.0,
                         reduction: int = MEAN, chunk: int = 1024) -> Outputs:
    """The chunk loop with the Triton row kernel (GPU, or CPU under ``TRITON_INTERPRET=1``)."""
    require_triton(_WHERE, triton, "linear_cross_entropy_ref")
    _check(h, weight, target, reduction, chunk, label_smoothing, bias)
    require_gpu_or_interpreter(_WHERE, _ce_rows_kernel, h.device)
    v = weight.shape[0]
    keep_t, each = to_f32(1.0 - label_smoothing), to_f32(label_smoothing / v)

    def rows(buf, t, scale):
        losses = torch.empty(buf.shape[0], dtype=torch.float32, device=buf.device)
        _ce_rows_kernel[(buf.shape[0],)](buf, t, losses, scale, v, buf.stride(0), ignore_index, keep_t, each,
                                         BLOCK_V=min(_BLOCK_V, triton.next_power_of_2(v)))
        return losses, buf

    return _run(h, weight, bias, target, ignore_index, label_smoothing, reduction, chunk, rows)


def workspace_bytes(n: int, hidden: int, vocab: int, chunk: int, h_size: int, w_size: int, triton: bool,
                    bias: bool = False) -> int:
    """Bytes either path holds beyond its outputs (loss, dh, dweight): the row scales and the loss's divisor
    (4n + 4) under the largest of the chunk's phases: the product in the weights' dtype beside its fp32 copy,
    the rows' work, the gradient beside its cast to the weights' dtype. The reference's rows hold the logits
    (then the loss's gradient in their place), ``log_softmax``'s output, ATen's backward's output and 13
    bytes a row (the ignored mask, the clamped targets, the losses); the Triton rows work on the logits in
    place beside the row losses (4 a row). Measured on CPU for the reference; the Triton figure is the same
    accounting for its allocations."""
    c = min(chunk, n)
    cv = c * vocab
    logits = 4 * cv
    product = logits + cv * w_size if w_size != 4 or h_size != 4 else 0
    rows = logits + 4 * c if triton else 3 * logits + 13 * c
    cast = logits + cv * w_size if w_size != 4 else 0
    # the bias's share of a chunk after the first: g.sum(0) beside the gradient (in the weights' dtype)
    column = (cv * w_size if w_size != 4 else logits) + vocab * w_size if bias and n > c else 0
    return 4 * n + 4 + max(product, rows, cast, column)
