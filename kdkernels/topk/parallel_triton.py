"""Triton kernels of vocabulary-parallel `topk_kd_loss` (docs/vocab_parallel.md).

The same collectives as the torch launcher (kdkernels/topk/parallel.py), with the local
O(N·W) work in two kernels, one program per row, and the O(N·k) work between them in
PyTorch (float64, the torch launcher's helpers `teacher_side`, `entry_logs`,
`loss_and_r`; one copy shared with the CUDA launcher in topk/parallel_glue.py):

  gather    (k tiles) the student's raw logits at the indices this rank owns, 0 at the
            others (and at padding), written as float64 into the [N, k (+1)] buffer of
            the all-reduce SUM (x + 0 = x: every rank then holds all k exactly, NaN and
            ±inf included; τ is applied after, in float64). Bucket only (W tiles): the
            local tail statistics over the owned columns whose bit is clear in the
            row's class bitmap (`class_bitmap` of the indices shifted by −start: the
            other ranks' classes fall outside [0, W) and set nothing): the tail max m,
            Σ e^{a − m} (online, rescaled as the max grows) and the NaN/+inf flag over
            the whole owned row. → TSTAT [N, 3]
  glue      bucket: all-reduce MAX of (m, flag) [N, 2]; each rank rescales its sum to
            the global tail max M, Σ·e^{m − M}, into the last column of the SUM buffer.
            All-reduce SUM; then the entry distributions, the divergence, the loss and
            r = scale·∂L/∂a per entry (O(N·k), float64, shared with the torch path).
  gradient  (W tiles, then k tiles) the local gradient written once in the input dtype:
            at the unselected owned columns 0 (renormalize) or r_tail·e^{(a − M) − log Σ}
            (bucket: r_tail times the softmax within the tail), then r_i at the owned
            selected columns; ignored rows 0, rows without a softmax NaN.

Ignored rows skip the W-wide passes (every rank skips them alike: the labels are
replicated). The kernels compute in float32, or float64 for float64 students (CDT, the
dtype of the [1] tensor holding 1/τ); the collectives carry float64 and are the torch
path's tensors (the same bytes), issued once per call instead of once per row block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.codes import Div
from .._triton.math import safe_max
from .._triton.tiles import MIN_BLOCK, row_tile
from ..parallel import Shards
from .parallel_glue import entry_step
from .triton import _unselected, class_bitmap

GPU_BLOCK_K = 1024
CPU_BLOCK_K = 2048


@triton.jit
def _vp_topk_gather_kernel(
    S, IDX, LABELS, BITS, PRM, SEL, TSTAT, stride_s, stride_i, stride_ik, stride_b,
    stride_o, W, K, start, ignore_index,
    BUCKET: tl.constexpr, HAS_LABELS: tl.constexpr, CDT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    i_row = IDX + row * stride_i
    b_row = BITS + row * stride_b
    o_row = SEL + row * stride_o
    lk = tl.arange(0, BLOCK_K)
    lv = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    valid = True
    if HAS_LABELS:
        valid = tl.load(LABELS + row).to(tl.int64) != ignore_index
    w_own = tl.where(valid, W, 0)  # ignored rows: nothing owned, all 0
    for k0 in range(0, K, BLOCK_K):
        slot = k0 + lk
        in_k = slot < K
        loc = tl.load(i_row + slot * stride_ik, mask=in_k, other=-1).to(tl.int64) - start
        own = in_k & (loc >= 0) & (loc < w_own)
        x = tl.load(s_row + loc, mask=own, other=0.0).to(tl.float64)
        tl.store(o_row + slot, tl.where(own, x, 0.0), mask=in_k)
    if BUCKET:
        inv_temp = tl.load(PRM).to(CDT)
        m = tl.full([], NEG_INF, CDT)
        z = tl.zeros([], CDT)
        n_bad = tl.zeros([], tl.int32)
        if valid:
            for off in range(0, W, BLOCK_V):
                cols = off + lv
                msk = cols < W
                a = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(CDT) * inv_temp
                nb = (a != a) | (a == float("inf"))
                n_bad += tl.sum(nb.to(tl.int32), 0)
                a = tl.where(_unselected(b_row, cols, msk) & (nb == 0), a, NEG_INF)
                m_new = tl.maximum(m, tl.max(a, 0))
                ms = safe_max(m_new)
                z = z * tl.exp(m - ms) + tl.sum(tl.exp(a - ms), 0)
                m = m_new
        st = TSTAT + row * 3
        tl.store(st + 0, m)
        tl.store(st + 1, (n_bad > 0).to(CDT))
        tl.store(st + 2, z)


@triton.jit
def _vp_topk_grad_kernel(
    S, IDX, BITS, PRM, R, TAIL, MODE, GRAD, stride_s, stride_i, stride_ik, stride_b,
    stride_r, stride_g, W, K, start,
    BUCKET: tl.constexpr, CDT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    i_row = IDX + row * stride_i
    b_row = BITS + row * stride_b
    r_row = R + row * stride_r
    g_row = GRAD + row * stride_g
    lk = tl.arange(0, BLOCK_K)
    lv = tl.arange(0, BLOCK_V)
    mode = tl.load(MODE + row)  # 0: the gradient, 1: a bad row (NaN), 2: ignored (0)
    if mode == 0:
        # ---- the unselected owned columns: 0, or r_tail · softmax within the tail
        if BUCKET:
            inv_temp = tl.load(PRM).to(CDT)
            r_t = tl.load(r_row + K).to(CDT)
            m_t = tl.load(TAIL + row * 2).to(CDT)
            c_t = tl.load(TAIL + row * 2 + 1).to(CDT)
            for off in range(0, W, BLOCK_V):
                cols = off + lv
                msk = cols < W
                a = tl.load(s_row + cols, mask=msk, other=float("-inf")).to(CDT) * inv_temp
                g = r_t * tl.exp((a - m_t) - c_t)
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty),
                         mask=_unselected(b_row, cols, msk))
        else:
            for off in range(0, W, BLOCK_V):
                cols = off + lv
                msk = cols < W
                tl.store(g_row + cols, tl.zeros([BLOCK_V], GRAD.dtype.element_ty),
                         mask=_unselected(b_row, cols, msk))
        # ---- the owned selected columns: r_i (each index once per row)
        for k0 in range(0, K, BLOCK_K):
            slot = k0 + lk
            in_k = slot < K
            loc = tl.load(i_row + slot * stride_ik, mask=in_k, other=-1).to(tl.int64) - start
            own = in_k & (loc >= 0) & (loc < W)
            r = tl.load(r_row + slot, mask=own, other=0.0)
            tl.store(g_row + loc, r.to(GRAD.dtype.element_ty), mask=own)
    else:
        fill = tl.where(mode == 1, float("nan"), 0.0)
        for off in range(0, W, BLOCK_V):
            cols = off + lv
            vals = tl.zeros([BLOCK_V], tl.float32) + fill
            tl.store(g_row + cols, vals.to(GRAD.dtype.element_ty), mask=cols < W)


def launch_config(w: int, k: int, on_cpu: bool) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_V, num_warps) for a shard of w columns and k entries."""
    block_v, warps = row_tile(w, on_cpu)
    cap = CPU_BLOCK_K if on_cpu else GPU_BLOCK_K
    block_k = max(MIN_BLOCK, min(triton.next_power_of_2(max(k, 1)), cap))
    return block_k, block_v, warps


def topk_kd_fwd_vocab_parallel_triton(s, scale, loss_out, grad_out, labels, idx, vals,
                                      code: int, w: float, inv_temp: float,
                                      logprobs: bool, bucket: bool, ignore_index: int,
                                      sh: Shards, soft_w: float = 1.0) -> None:
    """The contract of parallel.topk_kd_fwd_vocab_parallel, with Triton kernels for the
    local work: loss_out[N] (float32, the same on every rank) and, when grad_out is
    non-empty, grad_out[N, W] = scale·∂L_n/∂s at this rank's columns (every address
    written once, in grad_out's dtype). No hard-label term (refused before: function.py);
    code ZERO (soft_label_weight = 0) gives zero losses and gradients."""
    if code == int(Div.ZERO):  # every rank alike: no term, no collective
        loss_out.zero_()
        grad_out.zero_()
        return
    n, width = s.shape
    k = idx.shape[1]
    dev = s.device
    f64 = torch.float64
    cdt = f64 if s.dtype == f64 else torch.float32
    tl_cdt = tl.float64 if cdt == f64 else tl.float32
    want_grad = grad_out.numel() > 0
    if s.stride(1) != 1:
        s = s.contiguous()
    if idx.dtype not in (torch.int64, torch.int32):
        idx = idx.long()
    has_labels = labels is not None
    lab = labels if has_labels else idx
    prm = torch.tensor([inv_temp], dtype=cdt, device=dev)
    block_k, block_v, warps = launch_config(width, k, dev.type == "cpu")
    # the class bitmap of this rank's columns: indices shifted to local ids
    bits = class_bitmap(idx.long() - sh.start, width) if bucket or want_grad else None
    bits_arg = bits if bits is not None else prm
    stride_b = bits.stride(0) if bits is not None else 0
    sel = torch.empty(n, k + int(bucket), dtype=f64, device=dev)
    tstat = torch.empty(n, 3, dtype=cdt, device=dev) if bucket else prm
    if n > 0:
        _vp_topk_gather_kernel[(n,)](
            s, idx, lab, bits_arg, prm, sel, tstat, s.stride(0), idx.stride(0),
            idx.stride(1), stride_b, sel.stride(0), width, k, sh.start, ignore_index,
            BUCKET=bucket, HAS_LABELS=has_labels, CDT=tl_cdt, BLOCK_K=block_k,
            BLOCK_V=block_v, num_warps=warps)

    # ---- the collectives and the O(N·k) entry math (float64, topk/parallel_glue.py)
    gi = entry_step(sel, tstat, idx, vals, labels, scale, loss_out, code, w, inv_temp,
                    logprobs, bucket, ignore_index, sh, soft_w, want_grad, cdt)
    if gi is None or n == 0:
        return

    # ---- the local gradient
    tail = gi.tail if bucket else prm
    _vp_topk_grad_kernel[(n,)](
        s, idx, bits, prm, gi.r, tail, gi.mode, grad_out, s.stride(0), idx.stride(0),
        idx.stride(1), bits.stride(0), gi.r.stride(0), grad_out.stride(0), width, k,
        sh.start, BUCKET=bucket, CDT=tl_cdt, BLOCK_K=block_k, BLOCK_V=block_v,
        num_warps=warps)


# --- ahead-of-time compile variants --------------------------------------------------

def aot_variants():
    """(name, jit function, signature, constexprs, num_warps) for tests/triton_aot_check.py:
    both kernels for both tails with labels (bf16 student, fp32 compute), without labels
    (fp32, int32 indices), and float64."""
    def sig(kernel: str, dt: str, it: str, cdt: str):
        if kernel == "gather":
            return {"S": f"*{dt}", "IDX": f"*{it}", "LABELS": "*i64", "BITS": "*i32",
                    "PRM": f"*{cdt}", "SEL": "*fp64", "TSTAT": f"*{cdt}", "stride_s": "i64",
                    "stride_i": "i64", "stride_ik": "i64", "stride_b": "i64",
                    "stride_o": "i64", "W": "i32", "K": "i32", "start": "i32",
                    "ignore_index": "i32"}
        return {"S": f"*{dt}", "IDX": f"*{it}", "BITS": "*i32", "PRM": f"*{cdt}",
                "R": f"*{cdt}", "TAIL": f"*{cdt}", "MODE": "*i32", "GRAD": f"*{dt}",
                "stride_s": "i64", "stride_i": "i64", "stride_ik": "i64", "stride_b": "i64",
                "stride_r": "i64", "stride_g": "i64", "W": "i32", "K": "i32", "start": "i32"}

    block_k, block_v, warps = launch_config(151936 // 8, 100, on_cpu=False)
    cases = [(bucket, True, "bf16", "i64", "fp32") for bucket in (False, True)]
    cases += [(True, False, "fp32", "i32", "fp32"), (True, True, "fp64", "i64", "fp64")]
    for bucket, lab, dt, it, cdt in cases:
        tcdt = tl.float64 if cdt == "fp64" else tl.float32
        const = dict(BUCKET=bucket, HAS_LABELS=lab, CDT=tcdt, BLOCK_K=block_k,
                     BLOCK_V=block_v)
        tail = "bucket" if bucket else "renorm"
        yield (f"topk_vocab_parallel gather {tail} labels={lab} {dt} {it}",
               _vp_topk_gather_kernel, sig("gather", dt, it, cdt), const, warps)
        if lab:
            const = dict(BUCKET=bucket, CDT=tcdt, BLOCK_K=block_k, BLOCK_V=block_v)
            yield (f"topk_vocab_parallel grad {tail} {dt} {it}", _vp_topk_grad_kernel,
                   sig("grad", dt, it, cdt), const, warps)
