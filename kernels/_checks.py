"""What the kernel launchers check before they launch (tensors, devices, triton), and scalar rounding."""

from __future__ import annotations

import struct

import torch

from ..errors import KernelError, where_what_got

try:
    import triton
except ImportError:  # no triton wheel on this platform; the *_ref functions still work
    triton = None

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


def check_tensor(where: str, name: str, tensor: object, dtypes: tuple[torch.dtype, ...], todo: str) -> None:
    """``tensor`` is a torch.Tensor of one of ``dtypes``, contiguous, with at least one element."""
    if not isinstance(tensor, torch.Tensor):
        raise KernelError(where_what_got(where, f"`{name}` to be a torch.Tensor", type(tensor).__name__,
                                         "pass the tensor itself"))
    if tensor.dtype not in dtypes:
        allowed = " or ".join(str(dtype) for dtype in dtypes)
        raise KernelError(where_what_got(where, f"`{name}` of dtype {allowed}", tensor.dtype, todo))
    if not tensor.is_contiguous():
        raise KernelError(where_what_got(where, f"contiguous `{name}`",
                                         f"strides {tuple(tensor.stride())} for shape {tuple(tensor.shape)}",
                                         "call .contiguous() first"))
    if tensor.numel() < 1:
        raise KernelError(where_what_got(where, f"`{name}` with at least one element", tuple(tensor.shape),
                                         "skip empty tensors before calling the kernel"))


def check_same_device(where: str, named: dict[str, torch.Tensor]) -> None:
    """Every tensor in ``named`` on the device of the first."""
    first_name, first = next(iter(named.items()))
    for name, tensor in named.items():
        if tensor.device != first.device:
            raise KernelError(where_what_got(where, f"`{name}` on the device of `{first_name}` ({first.device})",
                                             tensor.device, "move all tensors to one device"))


def require_triton(where: str, triton_module: object, ref_name: str) -> None:
    """The launcher's module imported triton (pass that module's global, which tests may patch)."""
    if triton_module is None:
        raise KernelError(where_what_got(where, "triton to be importable", "ImportError",
                                         f"install triton, or use {ref_name} on this platform"))


def require_gpu_or_interpreter(where: str, kernel: object, device: torch.device) -> None:
    """Tensors on a GPU, unless the kernel runs under TRITON_INTERPRET=1."""
    if device.type == "cpu" and isinstance(kernel, triton.runtime.JITFunction):
        raise KernelError(where_what_got(where, "tensors on a GPU", device,
                                         "set TRITON_INTERPRET=1 before importing triton to run on CPU"))
