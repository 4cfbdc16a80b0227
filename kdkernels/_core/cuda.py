"""Calling the compiled `kdkernels_cuda` module: loading, dtypes, devices, streams.

Every CUDA launcher in the op folders goes through these helpers: the module (or
BackendUnavailableError with the reason and the fix), the element-type codes, the device
index and the caller's current stream (kernels never synchronise the host).
"""

from __future__ import annotations

import torch

from .. import _ext
from .backend import BackendUnavailableError
from .codes import DType

DTYPE_CODES = {
    torch.float32: int(DType.FLOAT32),
    torch.float16: int(DType.FLOAT16),
    torch.bfloat16: int(DType.BFLOAT16),
}


def module():
    """The loaded extension, or BackendUnavailableError with the reason and the fix."""
    mod = _ext.load()
    if mod is None:
        raise BackendUnavailableError(f"backend='cuda' cannot run: {_ext.unavailable_reason()}")
    return mod


def device_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


def stream(dev: torch.device) -> int:
    """The raw handle of the current CUDA stream on `dev`."""
    return torch.cuda.current_stream(dev).cuda_stream


def dtype_reason(what: str, dtype: torch.dtype) -> str | None:
    """None when CUDA kernels take `dtype`, else why not (and what to do)."""
    if dtype in DTYPE_CODES:
        return None
    return (
        f"the cuda {what} takes float32, float16 or bfloat16, got {dtype}; "
        "use backend='torch' (exact, any dtype) or cast the input"
    )


def check_rows(name: str, x: torch.Tensor) -> None:
    """A 2-D tensor whose rows have unit column stride (what the kernels index)."""
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{name} must be a 2-D tensor with unit column stride")


def scale_rows_cuda(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[N, V] *= scale ([N] or 0-dim float32 on the device), in place; rows whose
    factor is exactly 1 are skipped on the device."""
    n, v = grad.shape
    if n == 0 or v == 0:
        return
    if grad.dtype not in DTYPE_CODES:  # float64 gradients: one device-side multiply
        grad.mul_(scale if scale.dim() == 0 else scale.unsqueeze(-1).to(grad.dtype))
        return
    check_rows("grad", grad)
    scale = scale.to(torch.float32).contiguous()
    dev = grad.device
    module().scale_rows(
        grad.data_ptr(), scale.data_ptr(), scale.dim() > 0, n, v, grad.stride(0),
        DTYPE_CODES[grad.dtype], device_index(dev), stream(dev),
    )


def row_outputs(s: torch.Tensor, v: int, loss_out: torch.Tensor, grad_out: torch.Tensor,
                scale: torch.Tensor, labels: torch.Tensor | None, *, wider_grad: bool = False):
    """The checks of a row launcher's outputs, and its scalar conversions.

    loss_out must be [N] float32 contiguous; grad_out empty (no gradient) or [N, v]
    (wider_grad: [N, >= v]) rows of s's dtype. Returns (compute_grad, scale as float32,
    labels as int32/int64 or None)."""
    n = s.shape[0]
    if loss_out.dtype != torch.float32 or not loss_out.is_contiguous() or loss_out.numel() != n:
        raise ValueError("loss_out must be a contiguous float32 tensor with one entry per row")
    compute_grad = grad_out.numel() > 0
    if compute_grad:
        check_rows("grad_out", grad_out)
        cols_ok = grad_out.shape[1] >= v if wider_grad else grad_out.shape[1] == v
        if grad_out.dtype != s.dtype or grad_out.shape[0] != n or not cols_ok:
            width = ">= v" if wider_grad else "V"
            raise ValueError(f"grad_out must be [N, {width}] in the student logits' dtype")
    if scale.dtype != torch.float32:
        scale = scale.float()
    if labels is not None and labels.dtype not in (torch.int32, torch.int64):
        labels = labels.long()
    return compute_grad, scale, labels
