"""The `cuda` backend of vocabulary-parallel `kd_loss` (docs/vocab_parallel.md).

The three phases of the torch launcher (kdkernels/kd/parallel.py), with the local work of
each in one CUDA kernel (csrc/kd_parallel.cu, csrc/include/kdkernels/kd_parallel.cuh: one
block per row streaming this rank's [N, W] shard) and the O(N) glue between them
(kd/parallel_glue.py):

  kd_vp_stats     per distribution the local max, Σ e^{d − m} without one argmax, the
                  NaN/+inf flag, a's local argmax (pivot candidate) and b there
                  → stats [N, 8], piv [N]
  glue            all-reduce MAX of the maxima and the flag; each rank rescales its sums to
                  the global max M (a rank whose max is M claims the row and keeps its
                  argmax out; the others add it back: (1 + Z'_loc)·e^{m − M}); all-reduce
                  SUM of those sums, the claim counts (and b at the pivot); the normalisers
                  M + log1p(Z') → norm [N, 9], flags [N] (bad row, owns the pivot)
  kd_vp_partials  Σ d, G', P, x_y with the global normalisers → part [N, 4], all-reduced
  kd_vp_grad      the local gradient, written once in the input dtype (the pivot's entry
                  from the closed forms), ignored rows 0, rows without a softmax NaN

The buffers, their columns, the glue and the collectives are the Triton backend's, one
copy in kd/parallel_glue.py; the kernels' arithmetic is that of kd/parallel_triton.py:
float32 for 16/32-bit students, float64 for float64 ones (the buffers' dtype, CDT); the
collectives carry float64 and are the torch path's (the same tensors and bytes, three
all-reduces per call), through kdkernels.parallel.all_reduce.
Student and teacher of different dtypes are both copied to CDT first (the gradient then
goes through a CDT buffer, rounded once into the student's dtype).
"""

from __future__ import annotations

import torch

from .._core.cuda import DTYPE_CODES, check_rows, device_index, module, row_outputs, stream
from .._core.validate import compute_dtype
from ..parallel import Shards
from .parallel_glue import N_PART, N_STATS, dists, global_normalisers, reduce_partials
from .params import KDParams


def _operands(s, t, grad_out, cdt):
    """(student, teacher, gradient buffer) as the kernels take them: one dtype, CDT when
    the two differ (then the gradient goes through a CDT buffer)."""
    if t.dtype == s.dtype:
        return s, t, grad_out
    s_k, t_k = s.to(cdt), t.to(cdt)
    g_k = grad_out if grad_out.numel() == 0 or grad_out.dtype == cdt else torch.empty_like(s_k)
    return s_k, t_k, g_k


def kd_fwd_vocab_parallel_cuda(s, scale, loss_out, grad_out, labels, t, prm: KDParams,
                               sh: Shards, parts=None) -> None:
    """The contract of parallel.kd_fwd_vocab_parallel, with CUDA kernels for the local
    work: loss_out[N] (float32, the same on every rank) and, when grad_out is non-empty,
    grad_out[N, W] = scale·∂L_n/∂s at this rank's columns (grad_out may be s itself: the
    fused losses' chunk buffer). s, t: [N, W] CUDA tensors with unit column stride. Three
    all-reduces per call (every rank must use this backend)."""
    n, width = s.shape
    dev = s.device
    cdt = compute_dtype(s)
    code = prm.div
    d = dists(prm)
    s_k, t_k, g_k = _operands(s, t, grad_out, cdt)
    check_rows("student logits", s_k)
    check_rows("teacher logits", t_k)
    want_grad, _, lab = row_outputs(s_k, width, loss_out, g_k, scale, labels)
    has_labels = lab is not None
    args = dict(
        s=s_k.data_ptr(), t=t_k.data_ptr(), labels=lab.data_ptr() if has_labels else 0,
        labels_i64=has_labels and lab.dtype == torch.int64,
        stride_l=lab.stride(0) if has_labels else 0, stats=0, piv=0, norm=0, flags=0, part=0,
        scale=0, grad=0, n_rows=n, width=width, start=sh.start, stride_s=s_k.stride(0),
        stride_t=t_k.stride(0), stride_g=0, dtype=DTYPE_CODES.get(s_k.dtype, 0),
        is_double=cdt == torch.float64, div=code, inv_temp=prm.inv_temp,
        inv_temp_t=prm.teacher_inv_temp, w=prm.w,
        log_w=prm.log_w, log_1mw=prm.log_1mw, soft_w=prm.soft_w, hard_w=prm.hard_w,
        ignore_index=prm.ignore_index, use_x=d.use_x, device=device_index(dev),
        stream=stream(dev))
    mod = module()

    # --- phase 1: local statistics, then the global normalisers
    stats = torch.empty(n, N_STATS, dtype=cdt, device=dev)
    piv = torch.empty(n, dtype=torch.int32, device=dev)
    mod.kd_vp_stats(**{**args, "stats": stats.data_ptr(), "piv": piv.data_ptr()})
    nz = global_normalisers(stats, code, d, sh.group)
    args.update(piv=piv.data_ptr(), norm=nz.norm.data_ptr(), flags=nz.flags.data_ptr())

    # --- phase 2: partial sums with the global normalisers
    part = torch.empty(n, N_PART, dtype=cdt, device=dev)
    mod.kd_vp_partials(**{**args, "part": part.data_ptr()})
    reduce_partials(part, prm, d, nz, labels, loss_out, sh.group, parts)
    if not want_grad:
        return

    # --- phase 3: the local gradient (no communication)
    scale_c = scale.to(device=dev, dtype=cdt)
    mod.kd_vp_grad(**{**args, "scale": scale_c.data_ptr(), "grad": g_k.data_ptr(),
                      "stride_g": g_k.stride(0)})
    if g_k is not grad_out:
        grad_out.copy_(g_k)
