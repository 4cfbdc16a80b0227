"""The `cuda` backend of `kd_loss`: thin wrappers over the compiled `kdkernels_cuda` module.

Same contract as the Triton launchers in triton.py (see chunked.kd_fwd_torch): per-row
losses and, when asked, the scaled gradient written into preallocated outputs, on the
current CUDA stream, without a host synchronisation. The kernels (csrc/kd.cu) hold a row
in shared memory, across a thread-block cluster on sm_90, when it fits, so each logit is
read from HBM once and each gradient written once; longer rows are streamed like the
Triton kernel. docs/cuda.md describes the design.

Student and teacher logits must share one dtype among float32, float16 and bfloat16
(`unsupported_reason` says so before any kernel runs). `KDKERNELS_CUDA_KD_PLAN` forces the
kernel path for tests and benchmarks: `auto` (default), `stream`, `smem` (any cluster
size that fits) or `smem:<c>` with c in 1, 2, 4, 8.
"""

from __future__ import annotations

import os

import torch

from .. import _ext
from .._backend import BackendUnavailableError
from .params import FWD_KL, KDParams

DTYPE_CODES = {
    torch.float32: _ext.DTYPE_CODES["float32"],
    torch.float16: _ext.DTYPE_CODES["float16"],
    torch.bfloat16: _ext.DTYPE_CODES["bfloat16"],
}
_PATHS = {"auto": -1, "stream": 0, "smem": 1}


def module():
    """The loaded extension, or BackendUnavailableError with the reason and the fix."""
    mod = _ext.load()
    if mod is None:
        raise BackendUnavailableError(f"backend='cuda' cannot run: {_ext.unavailable_reason()}")
    return mod


def unsupported_reason(s: torch.Tensor, t: torch.Tensor) -> str | None:
    """None when the CUDA kd kernels take these logits, else why not (and what to do)."""
    if s.dtype not in DTYPE_CODES:
        return (
            f"the cuda kd kernels take float32, float16 or bfloat16 logits, got {s.dtype}; "
            "use backend='torch' (exact, any dtype) or cast the logits"
        )
    if t.dtype != s.dtype:
        return (
            f"the cuda kd kernels need student and teacher logits of one dtype, got {s.dtype} "
            f"and {t.dtype}; cast the teacher (teacher_logits.to(student_logits.dtype)) or use "
            "backend='triton' or 'torch'"
        )
    return None


def plan_override() -> tuple[int, int]:
    """(force_path, force_cluster) from KDKERNELS_CUDA_KD_PLAN."""
    text = os.environ.get("KDKERNELS_CUDA_KD_PLAN", "auto").strip().lower() or "auto"
    name, _, cluster = text.partition(":")
    if name not in _PATHS or (cluster and (name != "smem" or cluster not in ("1", "2", "4", "8"))):
        raise ValueError(
            "KDKERNELS_CUDA_KD_PLAN must be 'auto', 'stream', 'smem' or 'smem:<c>' with c in "
            f"1, 2, 4, 8; got {text!r}"
        )
    return _PATHS[name], int(cluster) if cluster else 0


def device_index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _row_tensor(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"{name} must be a 2-D tensor with unit column stride")


def kd_fwd_cuda(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int) -> None:
    """Fill loss_out[N] (float32) and, if grad_out is non-empty, grad_out[N, Vg] =
    scale·∂L_n/∂s (zero at ignored rows and at columns >= v).

    s: [N, Vs], t: [N, Vt] (same dtype, >= v columns each, unit column stride),
    labels: [N] int32/int64 or None, scale: 0-dim float32 on the device (read there),
    loss_out: [N] float32 contiguous, grad_out: [N, Vg] in s's dtype or empty; it may
    alias s.
    """
    n = s.shape[0]
    if n == 0:
        return
    reason = unsupported_reason(s, t)
    if reason:
        raise TypeError(reason)
    _row_tensor("student logits", s)
    _row_tensor("teacher logits", t)
    if loss_out.dtype != torch.float32 or not loss_out.is_contiguous() or loss_out.numel() != n:
        raise ValueError("loss_out must be a contiguous float32 tensor with one entry per row")
    compute_grad = grad_out.numel() > 0
    if compute_grad:
        _row_tensor("grad_out", grad_out)
        if grad_out.dtype != s.dtype or grad_out.shape[0] != n or grad_out.shape[1] < v:
            raise ValueError("grad_out must be [N, >= v] in the student logits' dtype")
    if scale.dtype != torch.float32:
        scale = scale.float()
    if labels is not None and labels.dtype not in (torch.int32, torch.int64):
        labels = labels.long()
    force_path, force_cluster = plan_override()
    mod = module()
    dev = s.device
    stream = torch.cuda.current_stream(dev).cuda_stream
    mod.kd_fwd(
        s.data_ptr(),
        t.data_ptr(),
        labels.data_ptr() if labels is not None else 0,
        labels is not None and labels.dtype == torch.int64,
        labels.stride(0) if labels is not None else 0,
        scale.data_ptr(),
        loss_out.data_ptr(),
        grad_out.data_ptr() if compute_grad else 0,
        n,
        v,
        grad_out.shape[1] if compute_grad else v,
        s.stride(0),
        t.stride(0),
        grad_out.stride(0) if compute_grad else 0,
        DTYPE_CODES[s.dtype],
        prm.div,
        prm.inv_temp,
        prm.w,
        prm.log_w,
        prm.log_1mw,
        prm.soft_w,
        prm.hard_w,
        prm.ignore_index,
        compute_grad,
        device_index(dev),
        stream,
        force_path,
        force_cluster,
    )


def scale_rows_cuda(grad, scale) -> None:
    """grad[N, V] *= scale ([N] or 0-dim float32 on the device), in place; rows whose
    factor is exactly 1 are skipped on the device."""
    n, v = grad.shape
    if n == 0 or v == 0:
        return
    if grad.dtype not in DTYPE_CODES:
        if scale.dim() == 0:
            grad.mul_(scale)
        else:
            grad.mul_(scale.unsqueeze(-1).to(grad.dtype))
        return
    _row_tensor("grad", grad)
    scale = scale.to(torch.float32).contiguous()
    mod = module()
    dev = grad.device
    mod.scale_rows(
        grad.data_ptr(), scale.data_ptr(), scale.dim() > 0, n, v, grad.stride(0),
        DTYPE_CODES[grad.dtype], device_index(dev), torch.cuda.current_stream(dev).cuda_stream,
    )


def kd_plan(v: int, dtype: torch.dtype, div: int = FWD_KL, device=None) -> dict:
    """The kernel plan for rows of v columns (path, cluster, threads, cols_per_cta,
    smem_bytes), honouring KDKERNELS_CUDA_KD_PLAN; for benchmarks and docs."""
    force_path, force_cluster = plan_override()
    dev = torch.device("cuda") if device is None else torch.device(device)
    return module().kd_fwd_plan(v, DTYPE_CODES[dtype], div, device_index(dev), force_path,
                                force_cluster)
