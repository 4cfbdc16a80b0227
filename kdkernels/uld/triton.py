"""The `triton` backend of `uld_loss` (docs/spec.md §7; the math: pytorch.py).

Sorting a 128k-column row on chip is not practical, so the order comes from the library
first, per block of rows (order.py): the student's K largest logits with their classes
(torch.sort, a segmented radix sort on a GPU, or a top-k when K < V_s) and the teacher's
K largest values. Then one program per row:

  pass 1  the raw student row: its maximum M, Z = Σ e^{(s−M)/τ} (online, rescaled when the
          maximum moves), NaN/+inf counts; when K < V_s the same sum over the classes
          beyond position K (a class is among the first K iff it orders at or before the
          K-th one: (s_v, −v) ≥ (s_thr, −thr), no list searched); with a hard label, the
          untempered Σ_{v≠y} e^{s−M}. Then the raw teacher row: its maximum and normaliser.
  pass 2  the sorted positions i < K, both arrays read in order: p_(i), r_(i) from the
          sorted logits and the normalisers, D += |p_(i) − r_(i)|, and the student masses
          P₊, P₋, P₀ by sign (P₀ plus the mass beyond K from pass 1).
  pass 3  (gradient) the sorted positions i < K_s again: (1/τ)·p_(i)·(g − ḡ) in the
          cancellation-free form of pytorch.py (+ the hard label's term), scattered to the
          class holding position i.
  pass 4  (gradient, K < V_s) the raw row again: (1/τ)·p_v·(P₋ − P₊) (+ the hard label's
          term) at the classes beyond position K.

Positions and classes beyond K are disjoint, so every gradient address is written once.
Global traffic per row besides the sorts: the raw rows read once (twice for the student
when K < V_s), the sorted arrays twice, the gradient written once. Arithmetic is float32
on logits shifted by the row maximum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.chunking import chunk_rows
from .._triton.math import nonfinite_count, safe_max
from .._triton.rows import store_zeros
from .._triton.tiles import row_tile
from .order import student_order, teacher_sorted

# Rows per block on a GPU: the sorts' outputs and scratch ([rows, V] values and int64
# indices, both sides) stay near this many bytes.
GPU_BLOCK_BYTES = 256 << 20
MAX_BLOCK_K = 2048


@triton.jit
def _exact(x):
    """x as float32, or float64 when it is: a widening that keeps every value distinct."""
    return x.to(tl.float64 if x.dtype == tl.float64 else tl.float32)


@triton.jit
def _uld_kernel(
    S, T, XS, IDX, TS, LABELS, SCALE, LOSS, GRAD,
    stride_s, stride_t, stride_xs, stride_i, stride_ts, stride_g,
    VS, VT, KS, KT, inv_s, inv_t, soft_w, hard_w, ignore_index,
    HAS_LABELS: tl.constexpr, HARD: tl.constexpr, SOFT: tl.constexpr,
    HAS_TAIL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    xs_row = XS + row * stride_xs
    i_row = IDX + row * stride_i
    ts_row = TS + row * stride_ts
    g_row = GRAD + row * stride_g
    lanes = tl.arange(0, BLOCK_V)
    klanes = tl.arange(0, BLOCK_K)
    NEG_INF: tl.constexpr = float("-inf")

    y = -1
    valid = True
    if HAS_LABELS:
        y = tl.load(LABELS + row).to(tl.int64)
        valid = y != ignore_index

    if valid:
        # the K-th class of the student's order (−1: none is ordered) and its logit
        thr = tl.load(i_row + tl.maximum(KS - 1, 0), mask=KS > 0, other=-1).to(tl.int64)
        s_thr = _exact(tl.load(s_row + tl.maximum(thr, 0)))
        # ---- pass 1: the student's maximum and normalisers, the mass beyond K
        m_s = NEG_INF
        z_s = 0.0
        z_tail = 0.0
        z_ex = 0.0  # Σ_{v≠y} e^{s_v − M}, untempered (hard label)
        n_bad = 0
        for off in range(0, VS, BLOCK_V):
            cols = off + lanes
            msk = cols < VS
            xr = _exact(tl.load(s_row + cols, mask=msk, other=NEG_INF))
            x = xr.to(tl.float32)
            n_bad += nonfinite_count(x)
            m_new = tl.maximum(m_s, tl.max(x, 0))
            m_safe = safe_max(m_new)
            r = tl.exp((m_s - m_safe) * inv_s)
            e = tl.exp((x - m_safe) * inv_s)
            z_s = z_s * r + tl.sum(e, 0)
            if HAS_TAIL:
                top = (thr >= 0) & ((xr > s_thr) | ((xr == s_thr) & (cols <= thr)))
                z_tail = z_tail * r + tl.sum(tl.where(top, 0.0, e), 0)
            if HARD:
                e1 = tl.where(cols == y, 0.0, tl.exp(x - m_safe))
                z_ex = z_ex * tl.exp(m_s - m_safe) + tl.sum(e1, 0)
            m_s = m_new
        bad = (n_bad > 0) | (m_s == NEG_INF)
        m_t = NEG_INF
        z_t = 1.0  # (log 1: no teacher is read without the soft term)
        if SOFT:
            z_t = 0.0
            for off in range(0, VT, BLOCK_V):
                cols = off + lanes
                tv = tl.load(t_row + cols, mask=cols < VT, other=NEG_INF).to(tl.float32)
                n_bad += nonfinite_count(tv)
                m_new = tl.maximum(m_t, tl.max(tv, 0))
                m_safe = safe_max(m_new)
                z_t = z_t * tl.exp((m_t - m_safe) * inv_t) + tl.sum(
                    tl.exp((tv - m_safe) * inv_t), 0)
                m_t = m_new
            bad = (n_bad > 0) | (m_s == NEG_INF) | (m_t == NEG_INF)
        if bad:  # no softmax on a side the loss reads: a NaN row (the policy)
            tl.store(LOSS + row, float("nan"))
            if COMPUTE_GRAD:
                for off in range(0, VS, BLOCK_V):
                    cols = off + lanes
                    tl.store(g_row + cols, tl.full([BLOCK_V], float("nan"),
                                                   GRAD.dtype.element_ty), mask=cols < VS)
        else:
            lz_s = tl.log(z_s)
            lz_t = tl.log(z_t)
            loss = 0.0
            z1 = 1.0
            if HARD:
                d_y = tl.load(s_row + y).to(tl.float32) - m_s
                z1 = z_ex + tl.exp(d_y)
                loss += hard_w * (tl.log(z1) - d_y)
            # ---- pass 2: D and the student's masses by sign
            p_pos = 0.0
            p_neg = 0.0
            p_zero = 0.0
            if HAS_TAIL:
                p_zero = z_tail / z_s
            if SOFT:
                dist = 0.0
                for off in range(0, tl.maximum(KS, KT), BLOCK_K):
                    pos = off + klanes
                    xs = tl.load(xs_row + pos, mask=pos < KS, other=NEG_INF).to(tl.float32)
                    ts = tl.load(ts_row + pos, mask=pos < KT, other=NEG_INF).to(tl.float32)
                    ps = tl.exp((xs - m_s) * inv_s - lz_s)
                    pt = tl.exp((ts - m_t) * inv_t - lz_t)
                    diff = ps - pt
                    dist += tl.sum(tl.abs(diff), 0)
                    p_pos += tl.sum(tl.where(diff > 0, ps, 0.0), 0)
                    p_neg += tl.sum(tl.where(diff < 0, ps, 0.0), 0)
                    p_zero += tl.sum(tl.where(diff == 0, ps, 0.0), 0)
                loss += soft_w * dist
            tl.store(LOSS + row, loss)
            if COMPUTE_GRAD:
                sc = tl.load(SCALE).to(tl.float32)
                c_soft = soft_w * inv_s
                c_pos = 2.0 * p_neg + p_zero  # g − ḡ at g = +1, −1, 0 (pytorch.py)
                c_neg = -(2.0 * p_pos + p_zero)
                c_zero = p_neg - p_pos
                h_y = -z_ex / z1  # softmax(s)_y − 1 without its 1 − 1
                # ---- pass 3: the classes at the sorted positions
                for off in range(0, KS, BLOCK_K):
                    pos = off + klanes
                    kmsk = pos < KS
                    xs = tl.load(xs_row + pos, mask=kmsk, other=NEG_INF).to(tl.float32)
                    ts = tl.load(ts_row + pos, mask=pos < KT, other=NEG_INF).to(tl.float32)
                    ps = tl.exp((xs - m_s) * inv_s - lz_s)
                    pt = tl.exp((ts - m_t) * inv_t - lz_t)
                    coef = tl.where(ps > pt, c_pos, tl.where(ps < pt, c_neg, c_zero))
                    cls = tl.load(i_row + pos, mask=kmsk, other=0).to(tl.int64)
                    g = c_soft * ps * coef
                    if HARD:
                        h = tl.where(cls == y, h_y, tl.exp(xs - m_s) / z1)
                        g += hard_w * h
                    tl.store(g_row + cls, (g * sc).to(GRAD.dtype.element_ty), mask=kmsk)
                # ---- pass 4: the classes beyond position K
                if HAS_TAIL:
                    for off in range(0, VS, BLOCK_V):
                        cols = off + lanes
                        msk = cols < VS
                        xr = _exact(tl.load(s_row + cols, mask=msk, other=NEG_INF))
                        top = (thr >= 0) & ((xr > s_thr) | ((xr == s_thr) & (cols <= thr)))
                        x = xr.to(tl.float32)
                        g = c_soft * c_zero * tl.exp((x - m_s) * inv_s - lz_s)
                        if HARD:
                            h = tl.where(cols == y, h_y, tl.exp(x - m_s) / z1)
                            g += hard_w * h
                        tl.store(g_row + cols, (g * sc).to(GRAD.dtype.element_ty),
                                 mask=msk & (top == 0))
    else:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, 0, VS, BLOCK_V)


def _block_rows(vs: int, vt: int, on_cpu: bool) -> int:
    """Rows per sorting block (see GPU_BLOCK_BYTES): ~24 bytes per column of each side."""
    return chunk_rows(vs + vt, itemsize=24, budget=None if on_cpu else GPU_BLOCK_BYTES)


def uld_fwd_triton(s, scale, loss_out, grad_out, labels, t, inv_temp: float, inv_temp_t: float,
                   top_k: int, soft_w: float, hard_w: float, ignore_index: int) -> None:
    """Same contract as pytorch.uld_fwd_torch; s/t/grad rows have unit column stride."""
    n, vs = s.shape
    vt = t.shape[1]
    if n == 0:
        return
    soft = soft_w != 0.0
    ks, kt = (min(top_k, vs), min(top_k, vt)) if soft else (0, 0)
    on_cpu = s.device.type == "cpu"
    compute_grad = grad_out.numel() > 0
    block_v, warps = row_tile(max(vs, vt), on_cpu)
    block_k = max(16, min(triton.next_power_of_2(max(ks, kt, 1)), MAX_BLOCK_K))
    rows = _block_rows(vs, vt, on_cpu)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        y = labels[r0:r1] if labels is not None else None
        if soft:
            xs, idx = student_order(s[r0:r1], ks, "triton")
            xs, idx = xs.contiguous(), idx.contiguous()
            ts = teacher_sorted(t[r0:r1], kt).contiguous()
        else:  # nothing is ordered: every class is "beyond K" (pass 4 writes them all)
            xs, ts = s[r0:r1], t[r0:r1]
            idx = torch.zeros(r1 - r0, 1, dtype=torch.int64, device=s.device)
        g = grad_out[r0:r1] if compute_grad else s
        _uld_kernel[(r1 - r0,)](
            s[r0:r1], t[r0:r1], xs, idx, ts, y if y is not None else idx, scale,
            loss_out[r0:r1], g, s.stride(0), t.stride(0), xs.stride(0), idx.stride(0),
            ts.stride(0), grad_out.stride(0) if compute_grad else 0, vs, vt, ks, kt,
            inv_temp, inv_temp_t, soft_w, hard_w, ignore_index,
            HAS_LABELS=y is not None, HARD=hard_w != 0.0, SOFT=soft, HAS_TAIL=ks < vs,
            COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps,
        )


def aot_variants():
    """Compile variants for tests/triton_aot_check.py (name, fn, signature, constexprs, warps)."""
    for dt in ("bf16", "fp32", "fp64"):
        sig = {"S": f"*{dt}", "T": f"*{dt}", "XS": f"*{dt}", "IDX": "*i64", "TS": f"*{dt}",
               "LABELS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32", "GRAD": f"*{dt}",
               "stride_s": "i64", "stride_t": "i64", "stride_xs": "i64", "stride_i": "i64",
               "stride_ts": "i64", "stride_g": "i64", "VS": "i32", "VT": "i32", "KS": "i32",
               "KT": "i32", "inv_s": "fp32", "inv_t": "fp32", "soft_w": "fp32",
               "hard_w": "fp32", "ignore_index": "i32"}
        # (labels, hard, soft, tail, grad)
        flags = ((True, True, True, True, True), (False, False, True, False, True),
                 (True, False, True, True, False), (True, True, False, True, True))
        for lab, hard, soft, tail, grad in flags if dt != "fp64" else flags[:1]:
            const = dict(HAS_LABELS=lab, HARD=hard, SOFT=soft, HAS_TAIL=tail, COMPUTE_GRAD=grad,
                         BLOCK_V=4096, BLOCK_K=MAX_BLOCK_K)
            yield (f"uld {dt} labels={lab} hard={hard} soft={soft} tail={tail} grad={grad}",
                   _uld_kernel, sig, const, 8)
