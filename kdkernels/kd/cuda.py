"""The `cuda` backend of `kd_loss`: thin wrappers over the compiled `kdkernels_cuda` module.

Same contract as the Triton launchers in triton.py (see pytorch.kd_fwd_torch): per-row
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

from .._core.codes import KdPath
from .._core.cuda import (
    DTYPE_CODES,
    check_rows,
    device_index,
    dtype_reason,
    module,
    row_outputs,
    stream,
)
from .params import FWD_KL, KDParams

_PATHS = {"auto": int(KdPath.AUTO), "stream": int(KdPath.STREAM), "smem": int(KdPath.SMEM)}


def unsupported_reason(s_dtype: torch.dtype, t_dtype: torch.dtype) -> str | None:
    """None when the CUDA kd kernels take logits of these dtypes, else why not (and what
    to do). The dispatch table's verifier for backend='cuda'."""
    reason = dtype_reason("kd kernels", s_dtype)
    if reason is None and t_dtype != s_dtype:
        reason = (
            f"the cuda kd kernels need student and teacher logits of one dtype, got {s_dtype} "
            f"and {t_dtype}; cast the teacher (teacher_logits.to(student_logits.dtype)) or use "
            "backend='triton' or 'torch'"
        )
    return reason


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


def kd_fwd_cuda(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int,
                parts=None) -> None:
    """Fill loss_out[N] (float32) and, if grad_out is non-empty, grad_out[N, Vg] =
    scale·∂L_n/∂s (zero at ignored rows and at columns >= v).

    s: [N, Vs], t: [N, Vt] (same dtype, >= v columns each, unit column stride, rows at one
    stride: ops.kd_fwd hands a [N1, N2, V] row view over one outer index at a time),
    labels: [N] int32/int64 or None, scale: 0-dim float32 on the device (read there),
    loss_out: [N] float32 contiguous, grad_out: [N, Vg] in s's dtype or empty; it may
    alias s. parts: None or [N, 2] float32 (each row's soft and hard addends).
    """
    n = s.shape[0]
    if n == 0:
        return
    reason = unsupported_reason(s.dtype, t.dtype)
    if reason:
        raise TypeError(reason)
    check_rows("student logits", s)
    check_rows("teacher logits", t)
    # return_components: the kernel writes the loss and its two addends as rows of one
    # [3, N] buffer (loss[n + k·N], one base pointer: kd.cuh says why), copied out after
    buf = None if parts is None else torch.empty(3, n, dtype=torch.float32, device=s.device)
    loss_k = loss_out if buf is None else buf[0]
    compute_grad, scale, labels = row_outputs(s, v, loss_k, grad_out, scale, labels,
                                              wider_grad=True)
    force_path, force_cluster = plan_override()
    dev = s.device
    module().kd_fwd(
        s.data_ptr(),
        t.data_ptr(),
        labels.data_ptr() if labels is not None else 0,
        labels is not None and labels.dtype == torch.int64,
        labels.stride(0) if labels is not None else 0,
        scale.data_ptr(),
        loss_k.data_ptr(),
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
        stream(dev),
        force_path,
        force_cluster,
        inv_temp_t=prm.teacher_inv_temp,
        parts_stride=0 if buf is None else n,
    )
    if buf is not None:
        loss_out.copy_(buf[0])
        parts.copy_(buf[1:].t())


def kd_plan(v: int, dtype: torch.dtype, div: int = FWD_KL, device=None) -> dict:
    """The kernel plan for rows of v columns (path, cluster, threads, cols_per_cta,
    smem_bytes), honouring KDKERNELS_CUDA_KD_PLAN; for benchmarks and docs."""
    force_path, force_cluster = plan_override()
    dev = torch.device("cuda") if device is None else torch.device(device)
    return module().kd_fwd_plan(v, DTYPE_CODES[dtype], div, device_index(dev), force_path,
                                force_cluster)
