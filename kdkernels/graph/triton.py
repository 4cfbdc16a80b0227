"""The `triton` backend of `topk_logit_graph` and `graph_on_logits_loss` (docs/spec.md §5;
the math: pytorch.py).

Row stage, one program per position (row) of each model, `_rows_fwd_kernel`: one pass
over the row's V logits that is both `topk_select`'s streamed bitonic top-k (its key
helpers and sorting network, so the order is the package's one top-k order: values
descending, ties by lower index, NaN first) and the online log-sum-exp of z/τ; it writes
the k entries a_k = exp(z_k/τ − LSE), their classes, the row's top-k mass m = Σ a_k, the
LSE and the k-th order key. A masked position is never read (its classes are a sentinel
that sorts last). A row with a NaN or +inf, or without a finite logit, gets LSE = NaN.

Group stage, on the G·T·k entries only (never on V): the entries of each group (T·k of
them, both models stacked) are sorted by class (a library sort of int32 keys), then
`_runs_kernel`, one program per tile of a group's sorted entries, finds the run of each
class (a class's first entry: a max-scan of run starts in the tile, a binary search for
the one run that began in an earlier tile) and adds w = a·m in fixed point (int64,
2^F per unit, F from T so that no sum overflows) into the run's slot with integer
atomics: exact and order-free, so strengths that are equal term by term tie exactly,
and the result is deterministic. A second library sort (int64, descending, stable)
orders the strengths; equal sums keep the class order of the first sort, so ties go to
the lower class index. `_gw_kernel`, one program per group: the sums of x and y, then
for both pairings (identity, reversal) the centred moments of the closed form
(pytorch.py) in one pass, the choice (identity on ties), the group's cost and, when a
gradient is wanted, ∂cost/∂x_i in closed form, written to the strength's slot.
`_finish_kernel`: the mean over groups with a valid position (one program, fixed order).

Backward, one program per student row, `_rows_bwd_kernel`: ā_j = g_{u_j}·m + Σ_j' g_{u_j'}
a_j' from the slots (the scatter back through the sort and the strength sums), then the
top-k softmax backward in the mode-relative form, streaming the row once: −p_w c/τ for
the classes outside the top-k (a comparison with the k-th order key, no list) and their
mass summed directly, then the k in-top-k entries; the upstream gradient and 1/#groups
are read on the device.

Global traffic: forward, one read of each logit tensor (the row stage) plus about 75
bytes per top-k entry and model (G·T·k entries: the two sorts, the slots, the scans);
backward, one read of the student logits and one write of the gradient: 2× one read of
both logit tensors in all (V_s = V_t). Float32 arithmetic; float16/bfloat16/float32
inputs, k <= 256 (ops.py refuses the others). Launches: 2 row kernels, 2 library sorts,
3 group kernels (forward); 1 row kernel (backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.rowgrad import as_rows
from .._triton.math import nonfinite_count, online_step
from .._triton.tiles import row_tile
from ..select.triton import _NO_KEY, _bitonic_merge, _bitonic_sort, _order_keys

# Columns per tile of the row kernels (at least K_PAD), on a GPU and under the interpreter.
GPU_TILE = 2048
CPU_TILE = 2048
# Entries per program of the group stage.
GROUP_BLOCK = 1024

_NO_CLASS = tl.constexpr(2**31 - 1)  # the class of a masked position's entries: sorts last


@triton.jit
def _imax(a, b):
    return tl.maximum(a, b)


@triton.jit
def _rows_fwd_kernel(Z, VALID, A, IDX, M, LSE, KTH, stride_z, V, k, inv_temp,
                     HAS_VALID: tl.constexpr, K_PAD: tl.constexpr, LOG_K: tl.constexpr,
                     ROWS: tl.constexpr, LOG_ROWS: tl.constexpr):
    """Row `row` of Z [N, V]: A/IDX [N, k] the top-k softmax entries and their classes,
    M the top-k mass, LSE, KTH the k-th order key (select/triton.py's keys)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    slot = tl.arange(0, K_PAD)[None, :]
    keep = slot < k
    out = row * k + slot
    NEG_INF: tl.constexpr = float("-inf")
    ok = True
    if HAS_VALID:
        ok = tl.load(VALID + row) != 0
    if ok:
        lane = tl.arange(0, ROWS)[:, None] * K_PAD + slot
        flat = tl.arange(0, ROWS * K_PAD)
        odd = (tl.arange(0, ROWS) % 2 == 1)[:, None]
        best = tl.full((1, K_PAD), _NO_KEY, tl.int64)
        m_run = NEG_INF
        z_sum = 0.0
        n_bad = 0
        for start in range(0, V, ROWS * K_PAD):
            # the online log-sum-exp of z/τ (the same columns as the keys below)
            cols = start + flat
            x = tl.load(z_row + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * inv_temp
            n_bad += nonfinite_count(x)
            m_run, e, r = online_step(m_run, x)
            z_sum = z_sum * r + tl.sum(e, 0)
            # topk_select's tile step (select/triton.py)
            thr = tl.max(tl.max(tl.where(slot == k - 1, best, _NO_KEY), axis=1), axis=0)
            key = _order_keys(z_row, start + lane, V)
            key = tl.where(key > thr, key, _NO_KEY)
            if tl.max(tl.max(key, axis=1), axis=0) > thr:
                t = _bitonic_sort(key, odd, LOG_K)
                for lvl in tl.static_range(LOG_ROWS):
                    t = tl.max(tl.reshape(t, (ROWS >> (lvl + 1), 2, K_PAD)), axis=1)
                    t = _bitonic_merge(t, (tl.arange(0, ROWS >> (lvl + 1)) % 2 == 1)[:, None],
                                       LOG_K)
                best = _bitonic_merge(tl.maximum(best, t), tl.full((1, 1), 1, tl.int1), LOG_K)
        bad = (n_bad > 0) | (m_run == NEG_INF)
        lse = tl.where(bad, float("nan"), m_run + tl.log(z_sum))
        idx = tl.where(keep, 0xFFFFFFFF - (best & 0xFFFFFFFF), 0)
        zk = tl.load(z_row + idx, mask=keep, other=0.0).to(tl.float32) * inv_temp
        a = tl.where(keep, tl.exp(zk - lse), 0.0)
        tl.store(A + out, a, mask=keep)
        tl.store(IDX + out, idx.to(tl.int32), mask=keep)
        tl.store(M + row, tl.sum(tl.sum(a, axis=1), axis=0))
        tl.store(LSE + row, lse)
        tl.store(KTH + row, tl.max(tl.max(tl.where(slot == k - 1, best, _NO_KEY), axis=1),
                                   axis=0))
    else:
        tl.store(A + out, tl.zeros((1, K_PAD), tl.float32), mask=keep)
        tl.store(IDX + out, tl.full((1, K_PAD), _NO_CLASS, tl.int32), mask=keep)
        tl.store(M + row, 0.0)
        tl.store(LSE + row, 0.0)
        tl.store(KTH + row, _NO_KEY)


@triton.jit
def _runs_kernel(KEY, PERM, A, M, DU, NU, BAD, UENT, P, T, k, G, n_steps, fix_scale,
                 STORE_UENT: tl.constexpr, BLOCK: tl.constexpr):
    """Tile `blk` of group-side g2's entries sorted by class (KEY [2G, P], PERM their entry
    numbers t·k + j): DU[g2, first entry of the run] += w = a·m in fixed point (+1 at the
    run's first entry, so that a touched slot is >= 0 and an untouched one stays -1),
    NU[g2] += the runs that start here, BAD[g2] = a NaN weight; UENT[entry] = its slot."""
    g2 = tl.program_id(0)
    blk = tl.program_id(1)
    base = g2.to(tl.int64) * P
    off = blk * BLOCK
    p = off + tl.arange(0, BLOCK)
    c = tl.load(KEY + base + p, mask=p < P, other=_NO_CLASS)
    prev = tl.load(KEY + base + p - 1, mask=(p < P) & (p > 0), other=-1)
    live = c != _NO_CLASS
    start = live & (c != prev)
    run = tl.associative_scan(tl.where(start, p, -1), 0, _imax)
    # the run that began before this tile: the first entry of the tile's first class
    c0 = tl.load(KEY + base + off)
    lo = off * 0
    hi = off
    for _ in range(n_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(KEY + base + mid, mask=active, other=c0)
        right = active & (v < c0)
        left = active & (v >= c0)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(left, mid, hi)
    run = tl.where(run < 0, lo, run)
    e = tl.load(PERM + base + p, mask=live, other=0)
    a = tl.load(A + base + e, mask=live, other=0.0)
    m = tl.load(M + g2.to(tl.int64) * T + e // k, mask=live, other=0.0)
    w = a * m
    nan = live & (w != w)
    q = tl.where(live & (w == w), (w * fix_scale + 0.5).to(tl.int64), 0) + start.to(tl.int64)
    tl.atomic_add(DU + base + run, q, mask=live, sem="relaxed")
    tl.atomic_add(NU + g2, tl.sum(start.to(tl.int32), 0), sem="relaxed")
    tl.atomic_max(BAD + g2, tl.max(nan.to(tl.int32), 0), sem="relaxed")
    if STORE_UENT:
        if g2 < G:  # the student's entries
            tl.store(UENT + base + e, run, mask=live)


@triton.jit
def _gw_kernel(SORTED, ORDER, NU, BAD, COST, GU, P, G, unfix, COMPUTE_GRAD: tl.constexpr,
               BLOCK: tl.constexpr):
    """Group g: x = the student's strengths sorted descending (SORTED[g], fixed point),
    y = the teacher's (SORTED[G + g]), zero beyond their counts NU; COST[g] = the better of
    the identity and reversal 1-D GW costs (0 for a group without a valid position, NaN
    for a group with a NaN weight); GU[g, ORDER[g, i]] = ∂COST[g]/∂x_i."""
    g = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    ns = tl.load(NU + g)
    nt = tl.load(NU + G + g)
    n = tl.maximum(ns, nt)
    bad = (tl.load(BAD + g) + tl.load(BAD + G + g)) > 0
    x_ptr = SORTED + g * P
    y_ptr = SORTED + (G + g) * P
    if ns == 0:
        tl.store(COST + g, 0.0)
    else:
        nf = n.to(tl.float32)
        zero = tl.zeros((BLOCK,), tl.float32)  # per-lane partial sums, reduced after the loops
        sx = zero
        sy = zero
        for off in range(0, n, BLOCK):
            i = off + lanes
            sx += tl.load(x_ptr + i, mask=i < ns, other=0).to(tl.float32)
            sy += tl.load(y_ptr + i, mask=i < nt, other=0).to(tl.float32)
        sx_all = tl.sum(sx, 0)
        sy_all = tl.sum(sy, 0)
        mean_e = (sx_all - sy_all) * unfix / nf  # the means of e = x − y and s = x + y,
        mean_s = (sx_all + sy_all) * unfix / nf  # the same for both pairings
        # centred moments: e, s, e², s², es, e²s, es², e²s² (identity, then reversal)
        e1 = zero
        s1 = zero
        ee = zero
        ss = zero
        es = zero
        ees = zero
        ess = zero
        eess = zero
        e1r = zero
        s1r = zero
        eer = zero
        ssr = zero
        esr = zero
        eesr = zero
        essr = zero
        eessr = zero
        for off in range(0, n, BLOCK):
            i = off + lanes
            inside = i < n
            j = n - 1 - i
            x = tl.load(x_ptr + i, mask=i < ns, other=0).to(tl.float32) * unfix
            y = tl.load(y_ptr + i, mask=i < nt, other=0).to(tl.float32) * unfix
            yr = tl.load(y_ptr + j, mask=inside & (j < nt), other=0).to(tl.float32) * unfix
            e = tl.where(inside, x - y - mean_e, 0.0)
            s = tl.where(inside, x + y - mean_s, 0.0)
            er = tl.where(inside, x - yr - mean_e, 0.0)
            sr = tl.where(inside, x + yr - mean_s, 0.0)
            e1 += e
            s1 += s
            ee += e * e
            ss += s * s
            es += e * s
            ees += e * e * s
            ess += e * s * s
            eess += e * e * s * s
            e1r += er
            s1r += sr
            eer += er * er
            ssr += sr * sr
            esr += er * sr
            eesr += er * er * sr
            essr += er * sr * sr
            eessr += er * er * sr * sr
        e1 = tl.sum(e1, 0)
        s1 = tl.sum(s1, 0)
        ee = tl.sum(ee, 0)
        ss = tl.sum(ss, 0)
        es = tl.sum(es, 0)
        ees = tl.sum(ees, 0)
        ess = tl.sum(ess, 0)
        eess = tl.sum(eess, 0)
        e1r = tl.sum(e1r, 0)
        s1r = tl.sum(s1r, 0)
        eer = tl.sum(eer, 0)
        ssr = tl.sum(ssr, 0)
        esr = tl.sum(esr, 0)
        eesr = tl.sum(eesr, 0)
        essr = tl.sum(essr, 0)
        eessr = tl.sum(eessr, 0)
        # Σ_{i,j} (e_i − e_j)²(s_i − s_j)², expanded (pytorch.py)
        c_id = 2.0 * nf * eess + 2.0 * ee * ss + 4.0 * es * es - 4.0 * ees * s1 - 4.0 * ess * e1
        c_rev = (2.0 * nf * eessr + 2.0 * eer * ssr + 4.0 * esr * esr - 4.0 * eesr * s1r
                 - 4.0 * essr * e1r)
        rev = c_rev < c_id
        inv_n2 = 1.0 / (nf * nf)
        cost = tl.where(rev, c_rev, c_id) * inv_n2
        tl.store(COST + g, tl.where(bad, float("nan"), cost))
        if COMPUTE_GRAD:
            e1 = tl.where(rev, e1r, e1)
            s1 = tl.where(rev, s1r, s1)
            ee = tl.where(rev, eer, ee)
            ss = tl.where(rev, ssr, ss)
            es = tl.where(rev, esr, es)
            ees = tl.where(rev, eesr, ees)
            ess = tl.where(rev, essr, ess)
            scale = tl.where(bad, float("nan"), 4.0 * inv_n2)
            for off in range(0, ns, BLOCK):
                i = off + lanes
                live = i < ns
                j = tl.where(rev, n - 1 - i, i)
                x = tl.load(x_ptr + i, mask=live, other=0).to(tl.float32) * unfix
                y = tl.load(y_ptr + j, mask=live & (j < nt), other=0).to(tl.float32) * unfix
                e = x - y - mean_e
                s = x + y - mean_s
                # ∂/∂e_i and ∂/∂s_i of the pair sum, over 4: Σ_j (e_i − e_j)(s_i − s_j)² and
                # Σ_j (s_i − s_j)(e_i − e_j)², expanded in the moments
                de = nf * e * s * s - 2.0 * e * s * s1 + e * ss - s * s * e1 + 2.0 * s * es - ess
                ds = nf * s * e * e - 2.0 * s * e * e1 + s * ee - e * e * s1 + 2.0 * e * es - ees
                u = tl.load(ORDER + g * P + i, mask=live, other=0)
                tl.store(GU + g * P + u, (de + ds) * scale, mask=live)


@triton.jit
def _finish_kernel(COST, NU, LOSS, INV, G, BLOCK: tl.constexpr):
    """LOSS = the mean of COST over the groups with a valid position (NU > 0), INV = 1 over
    their number (at least 1)."""
    lanes = tl.arange(0, BLOCK)
    total = 0.0
    count = 0
    for off in range(0, G, BLOCK):
        gi = off + lanes
        counted = (tl.load(NU + gi, mask=gi < G, other=0) > 0) & (gi < G)
        total += tl.sum(tl.where(counted, tl.load(COST + gi, mask=counted, other=0.0), 0.0), 0)
        count += tl.sum(counted.to(tl.int32), 0)
    inv = 1.0 / tl.maximum(count, 1).to(tl.float32)
    tl.store(LOSS, total * inv)
    tl.store(INV, inv)


@triton.jit
def _rows_bwd_kernel(Z, VALID, A, IDX, M, LSE, KTH, ABAR, UENT, GU, SCALE, INV, GRAD,
                     stride_z, stride_g, V, k, T, P, inv_temp,
                     HAS_VALID: tl.constexpr, FROM_GRAPH: tl.constexpr, HAS_SCALE: tl.constexpr,
                     K_PAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """GRAD[row, :V] = ∂/∂z of Σ_j ā_j a_j for row `row` of Z (the top-k softmax backward).

    ā: ABAR [N, k], or (FROM_GRAPH) from the strength gradient GU of the row's group at
    the entries' slots UENT: ā_j = g_j m + Σ_j' g_j' a_j'. HAS_SCALE: times SCALE·INV."""
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    g_row = GRAD + row * stride_g
    lanes = tl.arange(0, BLOCK_V)
    ok = True
    if HAS_VALID:
        ok = tl.load(VALID + row) != 0
    if ok:
        slot = tl.arange(0, K_PAD)
        keep = slot < k
        a = tl.load(A + row * k + slot, mask=keep, other=0.0)
        if FROM_GRAPH:
            u = tl.load(UENT + row * k + slot, mask=keep, other=0)
            gd = tl.load(GU + (row // T) * P + u, mask=keep, other=0.0)
            abar = gd * tl.load(M + row) + tl.sum(gd * a, 0)
        else:
            abar = tl.load(ABAR + row * k + slot, mask=keep, other=0.0).to(tl.float32)
        sc = inv_temp
        if HAS_SCALE:
            sc = sc * tl.load(SCALE).to(tl.float32) * tl.load(INV)
        lse = tl.load(LSE + row)
        kth = tl.load(KTH + row)
        # c = Σ_K p ā and ā_w − c relative to the mode r (the first entry): pytorch.py
        a_r = tl.sum(tl.where(slot == 0, abar, 0.0), 0)
        rel = tl.where(keep, abar - a_r, 0.0)
        c = tl.sum(a * abar, 0)
        p_rel = tl.sum(a * rel, 0)
        tail = tl.zeros((BLOCK_V,), tl.float32)  # per lane, reduced after the loop
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            msk = cols < V
            x = tl.load(z_row + cols, mask=msk, other=float("-inf")).to(tl.float32) * inv_temp
            outside = msk & (_order_keys(z_row, cols, V) < kth)
            p = tl.exp(x - lse)
            tail += tl.where(outside, p, 0.0)
            tl.store(g_row + cols, (-(p * c) * sc).to(GRAD.dtype.element_ty), mask=outside)
        in_k = rel + a_r * tl.sum(tail, 0) - p_rel
        idx = tl.load(IDX + row * k + slot, mask=keep, other=0)
        tl.store(g_row + idx, (a * in_k * sc).to(GRAD.dtype.element_ty), mask=keep)
    else:
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            tl.store(g_row + cols, tl.zeros((BLOCK_V,), GRAD.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------- launchers


def _row_config(v: int, k: int, on_cpu: bool) -> dict:
    """The constexprs and num_warps of the row kernels on rows of v columns."""
    k_pad = max(2, triton.next_power_of_2(k))
    block, warps = row_tile(v, on_cpu, gpu_cap=GPU_TILE, cpu_cap=CPU_TILE)
    rows = max(block, k_pad) // k_pad
    return dict(K_PAD=k_pad, LOG_K=k_pad.bit_length() - 1, ROWS=rows,
                LOG_ROWS=rows.bit_length() - 1, num_warps=warps)


def topk_rows(z: torch.Tensor, valid: torch.Tensor | None, k: int, inv_temp: float,
              a, idx, m, lse, kth) -> None:
    """Row stage on z [N, V] (unit column stride) into a/idx [N, k], m/lse/kth [N]."""
    n, v = z.shape
    if n == 0:
        return
    cfg = _row_config(v, k, z.device.type == "cpu")
    _rows_fwd_kernel[(n,)](z, valid if valid is not None else m, a, idx, m, lse, kth,
                           z.stride(0), v, k, inv_temp, HAS_VALID=valid is not None, **cfg)


def rows_backward(z, valid, a, idx, m, lse, kth, inv_temp: float, *, abar=None, uent=None,
                  gu=None, t_len: int = 1, scale=None, inv=None) -> torch.Tensor:
    """∂/∂z [N, V] (z's dtype) of Σ ā·a: ā = abar [N, k], or from (uent, gu) of groups of
    t_len rows; times scale·inv (0-dim float32 tensors) when given."""
    n, v = z.shape
    k = a.shape[1]
    grad = torch.empty(n, v, dtype=z.dtype, device=z.device)
    if n == 0:
        return grad
    block, warps = row_tile(v, z.device.type == "cpu", gpu_cap=GPU_TILE, cpu_cap=CPU_TILE)
    graph = abar is None
    dummy = m
    _rows_bwd_kernel[(n,)](
        z, valid if valid is not None else dummy, a, idx, m, lse, kth,
        dummy if graph else abar, uent if graph else dummy, gu if graph else dummy,
        scale if scale is not None else dummy, inv if inv is not None else dummy, grad,
        z.stride(0), grad.stride(0), v, k, t_len, t_len * k, inv_temp,
        HAS_VALID=valid is not None, FROM_GRAPH=graph, HAS_SCALE=scale is not None,
        K_PAD=max(2, triton.next_power_of_2(k)), BLOCK_V=block, num_warps=warps)
    return grad


def fixed_point_bits(t_len: int) -> int:
    """F: a strength sums at most t_len weights <= 1 (plus rounding), so t_len·2^F + 1
    stays below 2^63."""
    return 62 - t_len.bit_length()


def graph_loss_forward(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None, k: int,
                       inv_temp: float, need_grad: bool):
    """The loss of s [G, T, V_s] against t [G, T, V_t] (G, T >= 1), and what the backward
    needs: (loss, a, idx, m, lse, kth, uent, gu, inv); uent, gu empty without need_grad."""
    g, t_len, _ = s.shape
    n, p = g * t_len, t_len * k
    dev = s.device
    on_cpu = dev.type == "cpu"
    vrow = valid.reshape(n) if valid is not None else None
    a = torch.empty(2, n, k, dtype=torch.float32, device=dev)
    idx = torch.empty(2, n, k, dtype=torch.int32, device=dev)
    m = torch.empty(2, n, dtype=torch.float32, device=dev)
    lse = torch.empty(2, n, dtype=torch.float32, device=dev)
    kth = torch.empty(2, n, dtype=torch.int64, device=dev)
    for side, z in enumerate((s, t)):
        topk_rows(as_rows(z), vrow, k, inv_temp, a[side], idx[side], m[side], lse[side],
                  kth[side])
    # strengths: entries sorted by class, the runs' fixed-point sums, sorted descending
    key, perm = torch.sort(idx.view(2 * g, p), dim=1)
    du = torch.full((2 * g, p), -1, dtype=torch.int64, device=dev)
    nu = torch.zeros(2 * g, dtype=torch.int32, device=dev)
    bad = torch.zeros(2 * g, dtype=torch.int32, device=dev)
    uent = torch.empty(n * k if need_grad else 0, dtype=torch.int32, device=dev)
    bits = fixed_point_bits(t_len)
    block = GROUP_BLOCK
    _runs_kernel[(2 * g, triton.cdiv(p, block))](
        key, perm, a, m, du, nu, bad, uent if need_grad else nu, p, t_len, k, g,
        max(1, p.bit_length()), float(2.0**bits), STORE_UENT=need_grad, BLOCK=block,
        num_warps=4)
    sorted_du, order = torch.sort(du, dim=1, descending=True, stable=True)
    cost = torch.empty(g, dtype=torch.float32, device=dev)
    gu = torch.empty(n * k if need_grad else 0, dtype=torch.float32, device=dev)
    _gw_kernel[(g,)](sorted_du, order, nu, bad, cost, gu if need_grad else cost, p, g,
                     float(2.0**-bits), COMPUTE_GRAD=need_grad, BLOCK=block, num_warps=8)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    inv = torch.empty((), dtype=torch.float32, device=dev)
    _finish_kernel[(1,)](cost, nu, loss, inv, g, BLOCK=256 if on_cpu else 1024, num_warps=4)
    return loss, a[0], idx[0], m[0], lse[0], kth[0], uent, gu, inv


def graph_loss_backward(s, valid, a, idx, m, lse, kth, uent, gu, scale, inv,
                        inv_temp: float) -> torch.Tensor:
    """∂loss/∂s [G, T, V_s] times the upstream gradient `scale` (0-dim float32)."""
    g, t_len, v = s.shape
    grad = rows_backward(as_rows(s), valid.reshape(-1) if valid is not None else None, a, idx,
                         m, lse, kth, inv_temp, uent=uent, gu=gu, t_len=t_len,
                         scale=scale, inv=inv)
    return grad.view(g, t_len, v)


def aot_variants():
    """Compile variants for tests/triton_aot_check.py (name, fn, signature, constexprs, warps)."""
    # the row stage: its largest network (K_PAD = 256, the select kernel's limit), once
    # (every variant costs seconds to compile); the backward in both modes and dtypes
    cfg = _row_config(151936, 256, on_cpu=False)
    warps = cfg.pop("num_warps")
    sig = {"Z": "*bf16", "VALID": "*i1", "A": "*fp32", "IDX": "*i32", "M": "*fp32",
           "LSE": "*fp32", "KTH": "*i64", "stride_z": "i64", "V": "i32", "k": "i32",
           "inv_temp": "fp32"}
    yield (f"graph rows_fwd bf16 K_PAD={cfg['K_PAD']}", _rows_fwd_kernel, sig,
           dict(HAS_VALID=True, **cfg), warps)
    block, warps = row_tile(151936, False, gpu_cap=GPU_TILE, cpu_cap=CPU_TILE)
    for dt, graph in (("bf16", True), ("fp32", False)):
        sig = {"Z": f"*{dt}", "VALID": "*i1", "A": "*fp32", "IDX": "*i32", "M": "*fp32",
               "LSE": "*fp32", "KTH": "*i64", "ABAR": "*fp32", "UENT": "*i32", "GU": "*fp32",
               "SCALE": "*fp32", "INV": "*fp32", "GRAD": f"*{dt}", "stride_z": "i64",
               "stride_g": "i64", "V": "i32", "k": "i32", "T": "i32", "P": "i32",
               "inv_temp": "fp32"}
        yield (f"graph rows_bwd {dt} graph={graph}", _rows_bwd_kernel, sig,
               dict(HAS_VALID=graph, FROM_GRAPH=graph, HAS_SCALE=graph, K_PAD=16,
                    BLOCK_V=block), warps)
    sig = {"KEY": "*i32", "PERM": "*i64", "A": "*fp32", "M": "*fp32", "DU": "*i64",
           "NU": "*i32", "BAD": "*i32", "UENT": "*i32", "P": "i32", "T": "i32", "k": "i32",
           "G": "i32", "n_steps": "i32", "fix_scale": "fp32"}
    for grad in (True, False):
        yield (f"graph runs uent={grad}", _runs_kernel, sig,
               dict(STORE_UENT=grad, BLOCK=GROUP_BLOCK), 4)
    sig = {"SORTED": "*i64", "ORDER": "*i64", "NU": "*i32", "BAD": "*i32", "COST": "*fp32",
           "GU": "*fp32", "P": "i32", "G": "i32", "unfix": "fp32"}
    for grad in (True, False):
        yield (f"graph gw grad={grad}", _gw_kernel, sig,
               dict(COMPUTE_GRAD=grad, BLOCK=GROUP_BLOCK), 8)
    sig = {"COST": "*fp32", "NU": "*i32", "LOSS": "*fp32", "INV": "*fp32", "G": "i32"}
    yield "graph finish", _finish_kernel, sig, dict(BLOCK=1024), 4
