"""The `cuda` backend of vocabulary-parallel `topk_kd_loss` (docs/vocab_parallel.md).

The collectives of the torch launcher (kdkernels/topk/parallel.py), with the local O(N·W)
work in two CUDA kernels (csrc/topk_kd_parallel.cu,
csrc/include/kdkernels/topk_kd_parallel.cuh: one block per row) and the O(N·k) work
between them in float64 PyTorch, one copy shared with the Triton backend
(topk/parallel_triton.py) in topk/parallel_glue.py, on the torch launcher's own helpers
(`teacher_side`, `entry_logs`, `loss_and_r`):

  topk_vp_gather  the student's raw logits at the indices this rank owns (0 elsewhere) as
                  float64 into the [N, k (+1)] SUM buffer; tail="bucket": the local tail
                  statistics over the owned columns not among the indices (a class bitmap
                  in shared memory), the tail max m, Σ e^{a − m} and the NaN/+inf flag over
                  the owned row → tstat [N, 3]
  glue            bucket: all-reduce MAX of (m, flag) [N, 2], each rank rescales its sum to
                  the global tail max M (Σ·e^{m − M}) into the buffer's last column; the
                  all-reduce SUM; the entry distributions, divergence, loss and
                  r = scale·∂L/∂a per entry
  topk_vp_grad    the local gradient in the input dtype: 0 (renormalize) or
                  r_tail·softmax-within-the-tail (bucket) at every owned column, then r_i
                  at the owned selected ones; ignored rows 0, rows without a softmax NaN

The kernels compute in float32 for 16/32-bit students and in float64 for float64 ones
(CDT, the dtype of tstat, r and the tail normaliser); the collectives carry float64 and
are the torch path's tensors (the same bytes, one or two all-reduces per call).
"""

from __future__ import annotations

import torch

from .._core.codes import Div
from .._core.cuda import DTYPE_CODES, check_rows, device_index, module, row_outputs, stream
from .._core.validate import compute_dtype
from ..parallel import Shards
from .parallel_glue import entry_step


def topk_kd_fwd_vocab_parallel_cuda(s, scale, loss_out, grad_out, labels, idx, vals,
                                    code: int, w: float, inv_temp: float, logprobs: bool,
                                    bucket: bool, ignore_index: int, sh: Shards,
                                    soft_w: float = 1.0) -> None:
    """The contract of parallel.topk_kd_fwd_vocab_parallel, with CUDA kernels for the local
    work: loss_out[N] (float32, the same on every rank) and, when grad_out is non-empty,
    grad_out[N, W] = scale·∂L_n/∂s at this rank's columns. s: [N, W] CUDA tensor with unit
    column stride; idx: [N, k] global class ids (−1 = padding); vals: [N, k]. No
    hard-label term (refused before: function.py); code ZERO (soft_label_weight = 0) gives
    zero losses and gradients."""
    if code == int(Div.ZERO):  # every rank alike: no term, no collective
        loss_out.zero_()
        grad_out.zero_()
        return
    n, width = s.shape
    k = idx.shape[1]
    dev = s.device
    f64 = torch.float64
    cdt = compute_dtype(s)
    check_rows("student logits", s)
    want_grad, _, lab = row_outputs(s, width, loss_out, grad_out, scale, labels)
    has_labels = lab is not None
    idx64 = idx.to(torch.int64).contiguous()
    args = dict(
        s=s.data_ptr(), idx=idx64.data_ptr(), labels=lab.data_ptr() if has_labels else 0,
        labels_i64=has_labels and lab.dtype == torch.int64,
        stride_l=lab.stride(0) if has_labels else 0, sel=0, tstat=0, r=0, tail=0, mode=0,
        grad=0, n_rows=n, width=width, k=k, start=sh.start, stride_s=s.stride(0),
        stride_i=idx64.stride(0), stride_o=0, stride_r=0, stride_g=0,
        dtype=DTYPE_CODES.get(s.dtype, 0), is_double=cdt == f64, inv_temp=inv_temp,
        bucket=bucket, ignore_index=ignore_index, device=device_index(dev),
        stream=stream(dev))
    mod = module()
    sel = torch.empty(n, k + int(bucket), dtype=f64, device=dev)
    tstat = torch.empty(n, 3, dtype=cdt, device=dev) if bucket else None
    mod.topk_vp_gather(**{**args, "sel": sel.data_ptr(), "stride_o": sel.stride(0),
                          "tstat": tstat.data_ptr() if bucket else 0})

    # ---- the collectives and the O(N·k) entry math (float64, topk/parallel_glue.py)
    gi = entry_step(sel, tstat, idx, vals, labels, scale, loss_out, code, w, inv_temp,
                    logprobs, bucket, ignore_index, sh, soft_w, want_grad, cdt)
    if gi is None:
        return

    # ---- the local gradient (grad_out may be s itself: the fused losses' chunk buffer)
    mod.topk_vp_grad(**{**args, "r": gi.r.data_ptr(), "stride_r": gi.r.stride(0),
                        "tail": gi.tail.data_ptr() if bucket else 0,
                        "mode": gi.mode.data_ptr(), "grad": grad_out.data_ptr(),
                        "stride_g": grad_out.stride(0)})
