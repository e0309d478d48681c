"""memfit's own ops, as ``torch.library.custom_op`` so they survive tracing and carry FakeTensor meta.

Each op mutates its state in place and returns nothing; passes insert them into a TrainGraph and
the runtime's lowering swaps each one for a Triton launcher (CUDA) or its plain-torch reference (CPU).
The CPU implementation registered here is the reference, so a graph holding these ops also runs as is.

Gradient accumulation lives inside the update ops: with ``micro_steps > 1`` every micro-step but
the last adds the gradient into ``grad_acc`` and returns; the last one updates from the sum scaled
by ``1 / micro_steps`` and zeroes the accumulator.
"""

from __future__ import annotations

import torch

from .kernels.adamw import adamw_ref
from .kernels.sgd import sgd_ref

_LIB = "memfit"


def _accumulated(grad: torch.Tensor, grad_acc: torch.Tensor | None, micro_step: int, micro_steps: int):
    """Return the gradient to apply now (None while still accumulating) and its extra scale."""
    if micro_steps <= 1:
        return grad, 1.0
    assert grad_acc is not None, "micro_steps > 1 needs a gradient accumulator"
    grad_acc.add_(grad)
    if micro_step < micro_steps - 1:
        return None, 1.0
    return grad_acc, 1.0 / micro_steps


@torch.library.custom_op(f"{_LIB}::adamw_update", mutates_args=("param", "exp_avg", "exp_avg_sq", "grad_acc"))
def adamw_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    grad_acc: torch.Tensor | None,
    lr: float,
    step: int,
    micro_step: int,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    micro_steps: int = 1,
) -> None:
    run_adamw_update(adamw_ref, param, grad, exp_avg, exp_avg_sq, grad_acc, lr, step, micro_step,
                     beta1, beta2, eps, weight_decay, micro_steps)


@adamw_update.register_fake
def _(param, grad, exp_avg, exp_avg_sq, grad_acc, lr, step, micro_step, beta1, beta2, eps, weight_decay,
      micro_steps=1):
    return None


def run_adamw_update(kernel, param, grad, exp_avg, exp_avg_sq, grad_acc, lr, step, micro_step,
                     beta1, beta2, eps, weight_decay, micro_steps=1):
    """Body of ``memfit::adamw_update`` with the elementwise step supplied (Triton launcher or reference)."""
    g, scale = _accumulated(grad, grad_acc, micro_step, micro_steps)
    if g is None:
        return
    if not g.is_contiguous():
        g = g.contiguous()
    kernel(param, g, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
           weight_decay=weight_decay, step=step, grad_scale=scale)
    if grad_acc is not None and micro_steps > 1:
        grad_acc.zero_()


@torch.library.custom_op(f"{_LIB}::sgd_update", mutates_args=("param", "momentum_buffer", "grad_acc"))
def sgd_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    momentum_buffer: torch.Tensor | None,
    grad_acc: torch.Tensor | None,
    lr: float,
    step: int,
    micro_step: int,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    micro_steps: int = 1,
) -> None:
    run_sgd_update(sgd_ref, param, grad, momentum_buffer, grad_acc, lr, step, micro_step, momentum, dampening,
                   nesterov, weight_decay, micro_steps)


@sgd_update.register_fake
def _(param, grad, momentum_buffer, grad_acc, lr, step, micro_step, momentum, dampening, nesterov, weight_decay,
      micro_steps=1):
    return None


def run_sgd_update(kernel, param, grad, momentum_buffer, grad_acc, lr, step, micro_step, momentum, dampening,
                   nesterov, weight_decay, micro_steps=1):
    """Body of ``memfit::sgd_update`` with the elementwise step supplied (Triton launcher or reference)."""
    g, scale = _accumulated(grad, grad_acc, micro_step, micro_steps)
    if g is None:
        return
    if not g.is_contiguous():
        g = g.contiguous()
    kernel(param, g, momentum_buffer, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
           weight_decay=weight_decay, first_step=step == 1, grad_scale=scale)
    if grad_acc is not None and micro_steps > 1:
        grad_acc.zero_()

