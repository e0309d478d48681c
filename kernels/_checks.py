"""What every elementwise optimizer-update launcher checks before it launches, and scalar rounding."""

from __future__ import annotations

import struct

import torch

from ..errors import KernelError, where_what_got

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def to_f32(x: float) -> float:
    """Round a Python double to the nearest fp32 value, as torch does with scalar arguments."""
    return struct.unpack("f", struct.pack("f", x))[0]


def check_update_tensors(where: str, peer: str, param: torch.Tensor, grad: torch.Tensor,
                         state: dict[str, torch.Tensor]) -> None:
    """``param``, ``grad`` and the fp32 ``state`` tensors: same shape and device, contiguous, right dtypes.

    ``peer`` names the torch optimizer to keep using for dtypes the kernel does not take.
    """
    named = {"param": param, "grad": grad, **state}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise KernelError(where_what_got(where, f"`{name}` to be a torch.Tensor", type(tensor).__name__,
                                             "pass the tensor itself"))
    if param.numel() < 1:
        raise KernelError(where_what_got(where, "`param` with at least one element", tuple(param.shape),
                                         "skip empty parameters before calling the kernel"))
    for name, tensor in named.items():
        if tensor.shape != param.shape:
            raise KernelError(where_what_got(where, f"`{name}` of the same shape as `param` {tuple(param.shape)}",
                                             tuple(tensor.shape), "pass state allocated with torch.zeros_like(param)"))
        if tensor.device != param.device:
            raise KernelError(where_what_got(where, f"`{name}` on the device of `param` ({param.device})",
                                             tensor.device, "move all tensors to one device"))
        if not tensor.is_contiguous():
            raise KernelError(where_what_got(where, f"contiguous `{name}`",
                                             f"strides {tuple(tensor.stride())} for shape {tuple(tensor.shape)}",
                                             "call .contiguous() first"))
    if param.dtype not in PARAM_DTYPES:
        raise KernelError(where_what_got(where, "`param` of dtype float32, bfloat16 or float16", param.dtype,
                                         f"keep other dtypes on {peer}"))
    if grad.dtype not in (param.dtype, torch.float32):
        allowed = " or ".join(str(dtype) for dtype in dict.fromkeys((param.dtype, torch.float32)))
        raise KernelError(where_what_got(where, f"`grad` of dtype {allowed}", grad.dtype,
                                         "cast the gradient to the param dtype or to float32"))
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise KernelError(where_what_got(where, f"`{name}` of dtype float32", tensor.dtype,
                                             "keep optimizer state in float32"))
