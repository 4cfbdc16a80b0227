"""The `cuda` backend of `topk_kd_loss`: a thin wrapper over the compiled kernel
(csrc/topk_kd.cu, csrc/include/kdkernels/topk_kd.cuh; docs/cuda.md).

Same contract as the exact PyTorch path (pytorch.topk_kd_fwd_torch): per-row losses and,
when asked, the scaled gradient written into preallocated outputs, on the current CUDA
stream, without a host synchronisation; float32 arithmetic. One block per row: the
selected classes are marked in a shared-memory bitmap (the exact log-sum-exp over the
unselected classes for tail="bucket", and one write per gradient address), the k entries
sit in shared memory (in tiles when k is large), and for tail="bucket" the student row is
held in shared memory when it fits, so each student logit is read from global memory once.

Student logits must be float32, float16 or bfloat16 (`unsupported_reason` refuses float64:
use backend='torch' or 'triton'). The kernel computes forward KL, reverse KL and jsd;
`soft_label_weight` scales its loss and gradient here (the scale it reads, the losses
after), while divergence='taid', `hard_label_weight` > 0 and `soft_label_weight` = 0 are
refused by `unsupported_reason` (backend='torch' or 'triton' compute them). Indices become
int64 and values float32 (both [N, k], small) before the launch.
`KDKERNELS_CUDA_TOPK_KD_PLAN` forces where the student row lives (tail="bucket" only), for
tests and benchmarks: `auto` (default), `stream` or `smem`.
"""

from __future__ import annotations

import os

import torch

from .._core.codes import Div, KdPath
from .._core.cuda import (
    DTYPE_CODES,
    check_rows,
    device_index,
    dtype_reason,
    module,
    row_outputs,
    stream,
)

_PATHS = {"auto": int(KdPath.AUTO), "stream": int(KdPath.STREAM), "smem": int(KdPath.SMEM)}
_DIVS = (int(Div.FWD_KL), int(Div.REV_KL), int(Div.JSD))


def unsupported_reason(s_dtype: torch.dtype | None = None, div: int | None = None,
                       hard_label: bool = False, **_facts) -> str | None:
    """None when the CUDA top-k KD kernel takes student logits of `s_dtype`, the divergence
    code `div` and the hard-label term (`hard_label`), else why not (and what to do). The
    dispatch table's verifier for backend='cuda' (function.topk_facts says what it is
    told); the other facts (any k, either tail, teacher values of any float dtype) need
    nothing."""
    if div is not None and int(div) not in _DIVS:
        what = ("divergence='taid'" if int(div) == int(Div.TAID)
                else "soft_label_weight=0 (no divergence term)")
        return (f"the cuda top-k KD kernel computes forward_kl, reverse_kl and jsd only, not "
                f"{what}; use backend='torch' or 'triton'")
    if hard_label:
        return ("the cuda top-k KD kernel has no hard-label term (hard_label_weight > 0); "
                "use backend='torch' or 'triton'")
    dtype = s_dtype
    if dtype is None:
        return None
    if dtype == torch.float64:
        return (
            "the cuda top-k KD kernel computes in float32 and takes float32, float16 or "
            "bfloat16 student logits, got torch.float64; use backend='torch' or 'triton' "
            "(or cast the logits)"
        )
    return dtype_reason("top-k KD kernel", dtype)


def plan_override() -> int:
    """force_path from KDKERNELS_CUDA_TOPK_KD_PLAN."""
    text = os.environ.get("KDKERNELS_CUDA_TOPK_KD_PLAN", "auto").strip().lower() or "auto"
    if text not in _PATHS:
        raise ValueError(
            f"KDKERNELS_CUDA_TOPK_KD_PLAN must be 'auto', 'stream' or 'smem'; got {text!r}"
        )
    return _PATHS[text]


def topk_kd_fwd_cuda(s, scale, loss_out, grad_out, labels, idx, vals, code: int, w: float,
                     inv_temp: float, logprobs: bool, bucket: bool, ignore_index: int,
                     soft_w: float = 1.0, hard_w: float = 0.0) -> None:
    """Fill loss_out[N] (float32, 0 at ignored rows) and, if grad_out is non-empty,
    grad_out[N, V] = scale·∂L_n/∂s (0 at ignored rows).

    s: [N, V] student logits (unit column stride); idx: [N, k] int (−1 = padding);
    vals: [N, k] teacher logits or log-probabilities; labels: [N] or None; scale: 0-dim
    float tensor on the device (read there); grad_out: [N, V] in s's dtype or empty; it
    may alias s. `code` is Div.FWD_KL, REV_KL or JSD (then 0 < w = β < 1); soft_w > 0
    scales the loss and gradient; hard_w must be 0.
    """
    n, v = s.shape
    if n == 0:
        return
    reason = unsupported_reason(s.dtype)
    if reason:
        raise TypeError(reason)
    if int(code) not in _DIVS:
        raise ValueError(f"topk_kd_fwd_cuda: divergence code must be one of {_DIVS}, got {code}")
    if hard_w != 0.0:
        raise ValueError("topk_kd_fwd_cuda: the kernel has no hard-label term (hard_w != 0)")
    if soft_w != 1.0:  # L = soft_w·D: the gradient through the scale the kernel reads
        scale = scale * soft_w
    check_rows("student logits", s)
    k = idx.shape[1]
    if idx.dim() != 2 or idx.shape[0] != n or tuple(vals.shape) != (n, k):
        raise ValueError("idx and vals must be [N, k] with the student's N rows")
    if idx.dtype != torch.int64 or (k > 1 and idx.stride(1) != 1):
        idx = idx.to(torch.int64).contiguous()
    if vals.dtype != torch.float32 or (k > 1 and vals.stride(1) != 1):
        vals = vals.to(torch.float32).contiguous()
    compute_grad, scale, labels = row_outputs(s, v, loss_out, grad_out, scale, labels)
    dev = s.device
    module().topk_kd_fwd(
        s.data_ptr(),
        s.stride(0),
        idx.data_ptr(),
        idx.stride(0),
        vals.data_ptr(),
        vals.stride(0),
        labels.data_ptr() if labels is not None else 0,
        labels is not None and labels.dtype == torch.int64,
        labels.stride(0) if labels is not None else 0,
        scale.data_ptr(),
        loss_out.data_ptr(),
        grad_out.data_ptr() if compute_grad else 0,
        grad_out.stride(0) if compute_grad else 0,
        n,
        v,
        k,
        DTYPE_CODES[s.dtype],
        int(code),
        float(w),
        float(inv_temp),
        bool(logprobs),
        bool(bucket),
        int(ignore_index),
        compute_grad,
        device_index(dev),
        stream(dev),
        plan_override(),
    )
    if soft_w != 1.0:
        loss_out.mul_(soft_w)


def topk_kd_plan(v: int, k: int, dtype: torch.dtype, bucket: bool = True, device=None) -> dict:
    """The kernel plan for rows of v columns and k entries (path, threads, bitmap_words,
    entries, smem_bytes), honouring KDKERNELS_CUDA_TOPK_KD_PLAN; for tests and benchmarks."""
    dev = torch.device("cuda") if device is None else torch.device(device)
    return module().topk_kd_plan(v, k, DTYPE_CODES[dtype], bucket, device_index(dev),
                                 plan_override())
