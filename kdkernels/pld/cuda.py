"""The `cuda` backend of `plackett_luce_loss`: the ranking (ranking.rank_rows, shared with
the Triton backend; `topk_select`'s CUDA kernel for K <= 256, a library sort above), then
the compiled loss kernel (csrc/pld.cu, csrc/include/kdkernels/pld.cuh; docs/cuda.md).

Same contract as the exact PyTorch path (pytorch.pld_fwd_torch): per-row losses and, when
asked, the scaled gradient written into preallocated outputs, on the current CUDA stream,
without a host synchronisation; float32 arithmetic. Rows go in chunks so that the [rows, K]
ranking temporaries (and, for K > 4096, the kernel's [rows, 3K] float32 scratch) stay
bounded. Student and teacher logits must share one dtype among float32, float16 and
bfloat16 (`unsupported_reason` says so before any kernel runs).
"""

from __future__ import annotations

import functools

import torch

from .._core.chunking import chunk_rows
from .._core.cuda import (
    DTYPE_CODES,
    check_rows,
    device_index,
    dtype_reason,
    module,
    row_outputs,
    stream,
)

# Bytes of the ranking temporaries per chunk: [rows, K] (K <= 256: topk_select and the
# label move, ~32 bytes per entry; larger K: the library sort over [rows, V] int64 keys
# and its buffers, ~32 bytes per column), and the kernel's scratch.
_CHUNK_BYTES = 64 << 20
_SELECT_MAX_K = 256


def unsupported_reason(s_dtype: torch.dtype | None = None, t_dtype: torch.dtype | None = None,
                       **_facts) -> str | None:
    """None when the CUDA PLD kernel takes logits of these dtypes, else why not (and what
    to do). The dispatch table's verifier for backend='cuda'; other facts are ignored."""
    if s_dtype is None:
        return None
    if s_dtype == torch.float64:
        return (
            "the cuda PLD kernel computes in float32 and takes float32, float16 or bfloat16 "
            "logits, got torch.float64; use backend='torch' or 'triton' (or cast the logits)"
        )
    reason = dtype_reason("PLD kernel", s_dtype)
    if reason is None and t_dtype is not None and t_dtype != s_dtype:
        reason = (
            f"the cuda PLD kernel needs student and teacher logits of one dtype, got {s_dtype} "
            f"and {t_dtype}; cast the teacher (teacher_logits.to(student_logits.dtype)) or use "
            "backend='torch'"
        )
    return reason


@functools.cache
def _smem_k() -> int:
    """The largest K whose scratch the kernel keeps in shared memory (api.h kPldSmemK)."""
    return int(module().build_info()["pld_smem_k"])


def rows_per_chunk(v: int, k: int, smem_k: int) -> int:
    """Rows per kernel launch: the ranking's and the scratch's temporaries near _CHUNK_BYTES."""
    per_row = 32 * (k if k <= _SELECT_MAX_K else v)
    if k > smem_k:
        per_row += 12 * k
    return chunk_rows(per_row, itemsize=1, budget=_CHUNK_BYTES)


def pld_fwd_cuda(s, scale, loss_out, grad_out, labels, t, inv_temp: float, top_k: int,
                 ignore_index: int) -> None:
    """Fill loss_out[N] (float32 per-row losses, 0 at ignored rows) and, if grad_out is
    non-empty, grad_out[N, V] = scale·∂L_n/∂s (0 at ignored rows).

    s: [N, V] student logits, t: [N, V] teacher logits (same dtype, unit column stride),
    labels: [N] or None, scale: 0-dim float tensor on the device (read there),
    top_k: K in [1, V]; grad_out: [N, V] in s's dtype or empty.
    """
    from .ranking import rank_rows

    n, v = s.shape
    if n == 0:
        return
    reason = unsupported_reason(s.dtype, t.dtype)
    if reason:
        raise TypeError(reason)
    check_rows("student logits", s)
    check_rows("teacher logits", t)
    if tuple(t.shape) != (n, v):
        raise ValueError("teacher logits must have the student logits' shape [N, V]")
    k = int(top_k)
    if not 1 <= k <= v:
        raise ValueError(f"top_k must be in [1, {v}], got {k}")
    compute_grad, scale, labels = row_outputs(s, v, loss_out, grad_out, scale, labels)
    mod = module()
    smem_k = _smem_k()
    dev = s.device
    dev_index, stream_ptr, dtype = device_index(dev), stream(dev), DTYPE_CODES[s.dtype]
    step = rows_per_chunk(v, k, smem_k)
    scratch = None
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        y = labels[r0:r1] if labels is not None else None
        rank, thr = rank_rows(t[r0:r1], y, k, ignore_index, "cuda")
        rank = rank.contiguous()
        thr = thr.to(torch.int64).contiguous()
        if k > smem_k and scratch is None:
            scratch = torch.empty(min(step, n), 3 * k, dtype=torch.float32, device=dev)
        g = grad_out[r0:r1] if compute_grad else None
        mod.pld_fwd(
            s[r0:r1].data_ptr(),
            t[r0:r1].data_ptr(),
            rank.data_ptr(),
            rank.stride(0),
            thr.data_ptr(),
            y.data_ptr() if y is not None else 0,
            y is not None and y.dtype == torch.int64,
            y.stride(0) if y is not None else 0,
            scale.data_ptr(),
            loss_out[r0:r1].data_ptr(),
            g.data_ptr() if g is not None else 0,
            scratch.data_ptr() if scratch is not None else 0,
            scratch.stride(0) if scratch is not None else 0,
            r1 - r0,
            v,
            k,
            s.stride(0),
            t.stride(0),
            grad_out.stride(0) if compute_grad else 0,
            dtype,
            float(inv_temp),
            int(ignore_index),
            compute_grad,
            dev_index,
            stream_ptr,
        )
