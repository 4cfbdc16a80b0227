"""The `cuda` backend of `topk_select`: a wrapper over the compiled radix-select kernel
(csrc/topk.cu; docs/cuda.md)."""

from __future__ import annotations

import torch

from .._core.cuda import DTYPE_CODES, device_index, dtype_reason, module, stream

MAX_K = 256


def unsupported_reason(dtype: torch.dtype, k: int) -> str | None:
    """None when the CUDA kernel takes this input, else why not (and what to do)."""
    reason = dtype_reason("top-k kernel", dtype)
    if reason is None and k > MAX_K:
        reason = f"the cuda top-k kernel supports k <= {MAX_K}, got k={k}; use backend='torch'"
    return reason


def topk_select_cuda(x: torch.Tensor, k: int, values: torch.Tensor,
                     indices: torch.Tensor) -> None:
    """x: [N, V] (unit column stride) -> values [N, k] (x's dtype), indices [N, k] (int64),
    both contiguous and preallocated; written on the current stream."""
    n, v = x.shape
    if n == 0:
        return
    dev = x.device
    module().topk(
        x.data_ptr(), x.stride(0), n, v, k, DTYPE_CODES[x.dtype], values.data_ptr(),
        indices.data_ptr(), device_index(dev), stream(dev),
    )
