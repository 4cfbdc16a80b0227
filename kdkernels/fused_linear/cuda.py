"""The `cuda` backend of the fused linear loss's element-wise steps: the logit softcap
and its chain rule (csrc/softcap.cu), on the current stream, without a host sync. (The
divergence step is `kd_loss`'s CUDA kernel; the GEMMs are cuBLAS in every backend.)"""

from __future__ import annotations

import torch

from .._core.cuda import DTYPE_CODES, check_rows, device_index, dtype_reason, module, stream


def _check_dtype(x: torch.Tensor) -> None:
    reason = dtype_reason("softcap kernels", x.dtype)
    if reason:
        raise TypeError(reason)


def softcap_fwd_cuda(u: torch.Tensor, out: torch.Tensor, cap: float) -> None:
    """out[M, V] = cap·tanh(u[M, V]); rows with unit column stride; out may be u."""
    _check_dtype(u)
    m, v = u.shape
    check_rows("u", u)
    check_rows("out", out)
    dev = u.device
    module().softcap_fwd(u.data_ptr(), out.data_ptr(), m, v, u.stride(0), out.stride(0), cap,
                         DTYPE_CODES[u.dtype], device_index(dev), stream(dev))


def softcap_bwd_cuda(g: torch.Tensor, u, k: float, row_scale) -> None:
    """g[M, V] *= k·sech²(u[M, V]) (when u is not None) · row_scale[M] (when not None)."""
    _check_dtype(g)
    m, v = g.shape
    check_rows("g", g)
    if u is not None:
        check_rows("u", u)
    rs = row_scale.to(torch.float32).contiguous() if row_scale is not None else None
    dev = g.device
    module().softcap_bwd(
        g.data_ptr(), u.data_ptr() if u is not None else 0, rs.data_ptr() if rs is not None else 0,
        m, v, g.stride(0), u.stride(0) if u is not None else 0, k, DTYPE_CODES[g.dtype],
        device_index(dev), stream(dev),
    )
