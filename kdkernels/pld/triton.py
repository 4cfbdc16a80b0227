"""The `triton` backend of `plackett_luce_loss` (docs/spec.md §3; the math: pytorch.py).

The ranking (ranking.py) comes first, per block of rows: the first K classes of each
row's order and the row's threshold class thr. Then one program per row:

  pass 1  all V columns: online log-sum-exp of b = t/τ (the weights' normaliser), the
          maxima of s and b (the non-finite policy), and, when K < V, the online
          log-sum-exp of s over the unranked tail, whose membership is a comparison
          with (t_thr, thr) and the label (ranking.py), not a list.
  pass 2  ranked positions from the last to the first, BLOCK_K at a time: gathers
          x_k = s[π_k], b[π_k]; the suffix log-sum-exp without position k, E_k, as a
          log-add-exp scan inside the tile plus a running carry (starting at the tail's
          LSE); LSE_k − x_k = softplus(E_k − x_k); the loss Σ w_k (LSE_k − x_k); into a
          [rows, 2K] float32 scratch d_k = log w_k − LSE_k and w_k·expm1(x_k − LSE_k).
  pass 3  (gradient) ranked positions from the first: c_{j−1}, the exclusive prefix
          log-add-exp scan of d with a carry; ∂L/∂s[π_j] = exp(x_j + c_{j−1}) +
          w_j·expm1(x_j − LSE_j) (= exp(x_j + c_j) − w_j, without the cancellation of
          its two terms where π_j dominates), scattered to π_j.
  pass 4  (gradient, K < V) all columns again: exp(s_v + c_{K−1}) at unranked classes.

Ranked and unranked columns are disjoint, so every gradient address is written once.
Global traffic per row: ranking (topk_select: one read of t; a sort for large K), pass 1
reads s and t, passes 2–3 gather 2K entries each, pass 4 reads s and writes the gradient:
about 4·V elements read + V written, against the floor's 2·V read + V written.
Arithmetic is float32, on student logits shifted by the row's maximum (x − max s), so
the log-sum-exps that carry the weight are near 0 and their rounding is absolute, not
relative to logits of magnitude ~100; the scans only add non-negative terms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.chunking import chunk_rows
from .._triton.math import expm1, nonfinite_count, online_step, safe_max, softplus
from .._triton.rows import store_zeros
from .._triton.tiles import row_tile
from .ranking import rank_rows

# Rows per ranking block: the ranking's temporaries ([rows, K] int64 and float32, and
# for large K the [rows, V] int64 sort keys) stay near this many bytes on a GPU.
GPU_BLOCK_BYTES = 256 << 20
MAX_BLOCK_K = 1024


def unsupported_reason(**_facts) -> str | None:
    """The Triton PLD kernel takes every input the op accepts."""
    return None


@triton.jit
def _lae(x, y):
    """log(e^x + e^y) as a scan combine (exact −inf when both are −inf)."""
    m = safe_max(tl.maximum(x, y))
    return m + tl.log(tl.exp(x - m) + tl.exp(y - m))


@triton.jit
def _lse_tile(x, carry):
    """logaddexp(carry, LSE of the tile x)."""
    m = tl.maximum(tl.max(x, 0), carry)
    m_s = safe_max(m)
    return m_s + tl.log(tl.sum(tl.exp(x - m_s), 0) + tl.exp(carry - m_s))


@triton.jit
def _exact(x):
    """x as float32, or float64 when it is: a widening that keeps every value distinct."""
    return x.to(tl.float64 if x.dtype == tl.float64 else tl.float32)


@triton.jit
def _ranked(tv, t_thr, thr, y, cols, HAS_LABELS: tl.constexpr):
    """Is class `cols` (teacher logits tv, and t_thr, widened by _exact) among the row's
    ranked classes? (see ranking.py)"""
    hit = (thr >= 0) & ((tv > t_thr) | ((tv == t_thr) & (cols <= thr)))
    if HAS_LABELS:
        hit = hit | (cols == y)
    return hit


@triton.jit
def _pld_kernel(
    S, T, RANK, THR, LABELS, SCALE, LOSS, GRAD, D,
    stride_s, stride_t, stride_r, stride_g, stride_d, V, K, inv_temp, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_TAIL: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    r_row = RANK + row * stride_r
    g_row = GRAD + row * stride_g
    d_row = D + row * stride_d
    lanes = tl.arange(0, BLOCK_V)
    klanes = tl.arange(0, BLOCK_K)
    NEG_INF: tl.constexpr = float("-inf")

    y = -1
    valid = True
    if HAS_LABELS:
        y = tl.load(LABELS + row).to(tl.int64)
        valid = y != ignore_index

    if valid:
        thr = tl.load(THR + row).to(tl.int64)
        t_thr = _exact(tl.load(t_row + tl.maximum(thr, 0)))
        # ---- pass 1: normaliser of b, maxima, the tail's log-sum-exp
        m_b = NEG_INF
        z_b = 0.0
        m_s = NEG_INF
        m_t = NEG_INF
        z_t = 0.0
        n_bad = 0  # NaN / +inf entries (tl.max drops NaN: counted apart)
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            msk = cols < V
            x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            tv = _exact(tl.load(t_row + cols, mask=msk, other=NEG_INF))
            b = tv.to(tl.float32) * inv_temp
            m_s = tl.maximum(m_s, tl.max(x, 0))
            n_bad += nonfinite_count(x) + nonfinite_count(b)
            m_b, e, r = online_step(m_b, b)
            z_b = z_b * r + tl.sum(e, 0)
            if HAS_TAIL:
                xt = tl.where(_ranked(tv, t_thr, thr, y, cols, HAS_LABELS), NEG_INF, x)
                m_t, e, r = online_step(m_t, xt)
                z_t = z_t * r + tl.sum(e, 0)
        # NaN/+inf anywhere, or a side that is all −inf: no softmax, a NaN row (the policy)
        bad = (n_bad > 0) | (m_s == NEG_INF) | (m_b == NEG_INF)
        log_zb = tl.log(z_b)  # log w = (b − M_b) − log Z_b: no rounding of a large LSE
        carry = NEG_INF
        if HAS_TAIL:
            carry = (m_t - m_s) + tl.log(z_t)  # −inf for an empty or all −inf tail
        if bad:
            tl.store(LOSS + row, float("nan"))
            if COMPUTE_GRAD:
                for off in range(0, V, BLOCK_V):
                    cols = off + lanes
                    tl.store(g_row + cols, tl.full([BLOCK_V], float("nan"),
                                                   GRAD.dtype.element_ty), mask=cols < V)
        else:
            # ---- pass 2: suffix log-sum-exps from the last rank, the loss, scratch
            # E_k: the suffix without position k itself (an inclusive scan of the tile's
            # logits shifted by one position, plus the carry of the later tiles), so that
            # LSE_k − x_k = softplus(E_k − x_k) keeps its digits when π_k dominates.
            loss = 0.0
            n_blk = tl.cdiv(K, BLOCK_K)
            for i in range(0, n_blk):
                pos = (n_blk - 1 - i) * BLOCK_K + (BLOCK_K - 1 - klanes)  # descending
                kmsk = pos < K
                cls = tl.load(r_row + pos, mask=kmsk, other=0).to(tl.int64)
                x = tl.load(s_row + cls, mask=kmsk, other=NEG_INF).to(tl.float32) - m_s
                b = tl.load(t_row + cls, mask=kmsk, other=NEG_INF).to(tl.float32) * inv_temp
                nmsk = (klanes > 0) & (pos + 1 < K)  # lane 0's next position is in `carry`
                nxt = tl.load(r_row + pos + 1, mask=nmsk, other=0).to(tl.int64)
                x_next = tl.load(s_row + nxt, mask=nmsk, other=NEG_INF).to(tl.float32) - m_s
                e_k = _lae(tl.associative_scan(x_next, 0, _lae), carry)
                carry = _lse_tile(x, carry)
                diff = softplus(e_k - x)  # LSE_k − x_k
                logw = (b - m_b) - log_zb
                has_w = logw > NEG_INF
                w = tl.exp(logw)
                loss += tl.sum(tl.where(has_w, w * diff, 0.0), 0)
                tl.store(d_row + pos, tl.where(has_w, logw - _lae(e_k, x), NEG_INF), mask=kmsk)
                # −w_k (1 − softmax of π_k within suffix k): the gradient's −w_j, taken
                # together with its own share of exp(x_j + c_j)
                tl.store(d_row + K + pos, tl.where(has_w, w * expm1(-diff), 0.0), mask=kmsk)
            tl.store(LOSS + row, tl.maximum(loss, 0.0))
            if COMPUTE_GRAD:
                sc = tl.load(SCALE).to(tl.float32)
                # pass 3 reads scratch that other threads of this program wrote in pass 2
                tl.debug_barrier()
                # ---- pass 3: c_{j−1}, the exclusive prefix scan of d, and the ranked
                # entries g_j = exp(x_j + c_{j−1}) + w_j·expm1(−(LSE_j − x_j))
                #             = exp(x_j + c_j) − w_j without its 1 − 1
                c = NEG_INF
                for off in range(0, K, BLOCK_K):
                    pos = off + klanes
                    kmsk = pos < K
                    pmsk = (klanes > 0) & kmsk  # lane 0's previous position is in `c`
                    d = tl.load(d_row + pos, mask=kmsk, other=NEG_INF)
                    d_prev = tl.load(d_row + pos - 1, mask=pmsk, other=NEG_INF)
                    c_prev = _lae(tl.associative_scan(d_prev, 0, _lae), c)
                    c = _lse_tile(d, c)
                    cls = tl.load(r_row + pos, mask=kmsk, other=0).to(tl.int64)
                    x = tl.load(s_row + cls, mask=kmsk, other=NEG_INF).to(tl.float32) - m_s
                    pull = tl.load(d_row + K + pos, mask=kmsk, other=0.0)
                    g = (tl.exp(x + c_prev) + pull) * sc
                    tl.store(g_row + cls, g.to(GRAD.dtype.element_ty), mask=kmsk)
                # ---- pass 4: the unranked tail, exp(s_v + c_{K−1})
                if HAS_TAIL:
                    for off in range(0, V, BLOCK_V):
                        cols = off + lanes
                        msk = cols < V
                        tv = _exact(tl.load(t_row + cols, mask=msk, other=NEG_INF))
                        tail = msk & (_ranked(tv, t_thr, thr, y, cols, HAS_LABELS) == 0)
                        x = tl.load(s_row + cols, mask=tail, other=NEG_INF).to(tl.float32) - m_s
                        g = tl.exp(x + c) * sc
                        tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=tail)
    else:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, 0, V, BLOCK_V)


def _block_rows(n: int, v: int, k: int, on_cpu: bool) -> int:
    """Rows per ranking block (see GPU_BLOCK_BYTES)."""
    width = v if k > 256 else k  # large K: [rows, V] int64 sort keys (and the sort's)
    return chunk_rows(width, itemsize=24, budget=None if on_cpu else GPU_BLOCK_BYTES)


def pld_fwd_triton(s, scale, loss_out, grad_out, labels, t, inv_temp: float, top_k: int,
                   ignore_index: int, select_backend: str = "triton") -> None:
    """Same contract as pytorch.pld_fwd_torch; s/t/grad rows have unit column stride.

    select_backend: the `topk_select` backend of the ranking (where it takes the input).
    """
    n, v = s.shape
    if n == 0:
        return
    k = top_k
    on_cpu = s.device.type == "cpu"
    compute_grad = grad_out.numel() > 0
    block_v, warps = row_tile(v, on_cpu)
    block_k = max(16, min(triton.next_power_of_2(k), MAX_BLOCK_K))
    rows = _block_rows(n, v, k, on_cpu)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        y = labels[r0:r1] if labels is not None else None
        rank, thr = rank_rows(t[r0:r1], y, k, ignore_index, select_backend)
        scratch = torch.empty(r1 - r0, 2 * k, dtype=torch.float32, device=s.device)
        g = grad_out[r0:r1] if compute_grad else s
        _pld_kernel[(r1 - r0,)](
            s[r0:r1], t[r0:r1], rank, thr, y if y is not None else thr, scale, loss_out[r0:r1],
            g, scratch, s.stride(0), t.stride(0), rank.stride(0),
            grad_out.stride(0) if compute_grad else 0, scratch.stride(0), v, k, inv_temp,
            ignore_index, HAS_LABELS=y is not None, HAS_TAIL=k < v, COMPUTE_GRAD=compute_grad,
            BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps,
        )


def aot_variants():
    """Compile variants for tests/triton_aot_check.py (name, fn, signature, constexprs, warps)."""
    for dt in ("bf16", "fp32", "fp64"):
        sig = {"S": f"*{dt}", "T": f"*{dt}", "RANK": "*i64", "THR": "*i64", "LABELS": "*i64",
               "SCALE": "*fp32", "LOSS": "*fp32", "GRAD": f"*{dt}", "D": "*fp32",
               "stride_s": "i64", "stride_t": "i64", "stride_r": "i64", "stride_g": "i64",
               "stride_d": "i64", "V": "i32", "K": "i32", "inv_temp": "fp32",
               "ignore_index": "i32"}
        flags = ((True, True, True), (False, False, True), (True, False, False),
                 (False, True, False))
        for lab, tail, grad in flags if dt != "fp64" else flags[:1]:
            const = dict(HAS_LABELS=lab, HAS_TAIL=tail, COMPUTE_GRAD=grad, BLOCK_V=4096,
                         BLOCK_K=256 if tail else MAX_BLOCK_K)
            yield (f"pld {dt} labels={lab} tail={tail} grad={grad}", _pld_kernel, sig,
                   const, 8)
