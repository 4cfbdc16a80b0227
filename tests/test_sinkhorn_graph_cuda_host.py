"""The host side of the CUDA Sinkhorn and graph backends, on the CPU, without a GPU.

A fake `kdkernels_cuda` module stands in for the extension: it reads and writes the
tensors through the raw pointers the wrappers pass (ctypes views of CPU memory) and
emulates each kernel launch as csrc/sinkhorn.cu and csrc/graph.cu sequence them (the
per-launch arithmetic vectorised over threads, in the kernels' dtype; the slot,
segment, check and write-once logic as written). That checks the argument plumbing
(pointer order, sizes, history slots, the tol buffers) and the launch design against
the float64 torch paths: values, gradients, the tol early exit, masked groups, ties.
The kernels' own arithmetic runs only on a GPU (tests/test_sinkhorn_graph_gpu.py).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import kdkernels
from kdkernels.graph import cuda as graph_cuda
from kdkernels.graph import ops as graph_ops
from kdkernels.select import cuda as select_cuda
from kdkernels.sinkhorn import cuda as sk_cuda
from kdkernels.sinkhorn import solver_op

_CT = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32,
       np.int64: ctypes.c_int64, np.bool_: ctypes.c_bool}
SEG = 16
WARPS = 8


def view(ptr: int, shape, dtype):
    """A writable NumPy view of `shape` elements at address `ptr`."""
    n = int(np.prod(shape))
    buf = (_CT[dtype] * max(n, 1)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=n).reshape(shape)


def _lse_pair(x, axis):
    """(shift, log-sum) of a log-sum-exp along `axis` (torch.logsumexp's ±inf rule)."""
    mx = np.max(x, axis=axis, keepdims=True)
    sh = np.where(np.isinf(mx), 0.0, mx)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ls = np.log(np.sum(np.exp(x - sh), axis=axis, keepdims=True))
    return sh.squeeze(axis), ls.squeeze(axis)


class FakeModule:
    """Emulates the extension's entry points used by sinkhorn/cuda.py and graph/cuda.py."""

    def __init__(self, fused: bool):
        self.fused = fused
        self.launches: list[str] = []

    def build_info(self):
        return {"sinkhorn_segment": SEG}

    # ---------------------------------------------------------------- sinkhorn
    def sinkhorn_plan(self, b1, b2, is_double, device):
        return {"fused": self.fused, "smem_bytes": 0}

    @staticmethod
    def sinkhorn_slots(n_iters, use_tol, history, fused):
        if history:
            return n_iters
        if use_tol:
            return min(n_iters, SEG) if fused else 2
        return 0 if fused else 2

    def sinkhorn_fwd(self, cost, log_a, log_b, rh, lh, f, g, part, iters, m, b1, b2, n_iters,
                     n_slots, epsilon, use_tol, tol, history, is_double, fused, device, stream):
        dt = np.float64 if is_double else np.float32
        assert n_slots >= max(self.sinkhorn_slots(n_iters, use_tol, history, fused), 1)
        C = view(cost, (m, b1, b2), dt)
        la, lb = view(log_a, (m, b1), dt), view(log_b, (m, b2), dt)
        RH, LH = view(rh, (n_slots, 2, m, b1), dt), view(lh, (n_slots, 2, m, b2), dt)
        F, G = view(f, (m, b1), dt), view(g, (m, b2), dt)
        it = view(iters, (1,), np.int32)
        eps, tl = dt(epsilon), dt(tol)
        ce = (C / eps).astype(dt)
        t1 = -(-b1 // WARPS)

        def check(pt, t, k_first, count):
            cur = int(it[0])
            for s in range(count):
                e = pt.reshape(-1)[: count * m * t].reshape(count, m, t)[s].sum(-1)
                e = np.where(np.isnan(e), np.inf, e)
                if e.max() < tl and k_first + s < cur:
                    cur = k_first + s
            it[0] = cur

        if fused:
            seg = min(n_iters, SEG) if use_tol else n_iters
            hist = self.sinkhorn_slots(n_iters, use_tol, history, True) > 0
            pt = view(part, (seg, m), dt) if use_tol else None
            for k0 in range(1, n_iters + 1, seg):
                k1 = min(n_iters + 1, k0 + seg)
                self.launches.append("fused_fwd")
                if not (use_tol and it[0] < k0):
                    ps = (k0 - 2 if k0 > 1 else 0) % n_slots
                    psi = lb - (LH[ps, 0] + LH[ps, 1]) if k0 > 1 else np.zeros_like(lb)
                    phi = np.zeros_like(la)
                    rs, rl = _lse_pair(psi[:, None, :] - ce, 2)
                    for k in range(k0, k1):
                        slot = (k - 1) % n_slots
                        phi = la - (rs + rl)
                        if hist:
                            RH[slot, 0], RH[slot, 1] = rs, rl
                        ls, ll = _lse_pair(phi[:, :, None] - ce, 1)
                        psi = lb - (ls + ll)
                        if hist:
                            LH[slot, 0], LH[slot, 1] = ls, ll
                        if use_tol or k + 1 < k1:
                            rs, rl = _lse_pair(psi[:, None, :] - ce, 2)
                            if use_tol:
                                with np.errstate(over="ignore", invalid="ignore"):
                                    d = np.abs(np.exp(phi + (rs + rl)) - np.exp(la))
                                pt[k - k0] = d.sum(-1)
                    if not use_tol:
                        F[:], G[:] = phi * eps, psi * eps
                if use_tol:
                    self.launches.append("check")
                    check(pt, 1, k0, k1 - k0)
        else:
            pt = view(part, (m, t1), dt) if use_tol else None
            for k in range(1, n_iters + 1):
                last = k == n_iters and not use_tol
                slot, ps = (k - 1) % n_slots, (k - 2 if k > 1 else 0) % n_slots
                self.launches.append("row")
                if not (use_tol and it[0] < k):
                    psi = lb - (LH[ps, 0] + LH[ps, 1]) if k > 1 else np.zeros_like(lb)
                    rs, rl = _lse_pair(psi[:, None, :] - ce, 2)
                    if use_tol and k > 1:
                        with np.errstate(over="ignore", invalid="ignore"):
                            d = np.abs(np.exp((la - (RH[ps, 0] + RH[ps, 1])) + (rs + rl))
                                       - np.exp(la))
                        d = np.pad(d, ((0, 0), (0, t1 * WARPS - b1)))
                        pt[:] = d.reshape(m, t1, WARPS).sum(-1)
                    RH[slot, 0], RH[slot, 1] = rs, rl
                    if last:
                        F[:] = (la - (rs + rl)) * eps
                if use_tol and k > 1:
                    self.launches.append("check")
                    check(pt, t1, k - 1, 1)
                self.launches.append("col")
                if not (use_tol and it[0] < k):
                    phi = la - (RH[slot, 0] + RH[slot, 1])
                    ls, ll = _lse_pair(phi[:, :, None] - ce, 1)
                    LH[slot, 0], LH[slot, 1] = ls, ll
                    if last:
                        G[:] = (lb - (ls + ll)) * eps
        if use_tol:
            self.launches.append("final")
            slot = (int(it[0]) - 1) % n_slots
            F[:] = (la - (RH[slot, 0] + RH[slot, 1])) * eps
            G[:] = (lb - (LH[slot, 0] + LH[slot, 1])) * eps

    def sinkhorn_bwd(self, cost, log_a, log_b, rh, lh, iters, grad_f, grad_g, fb, gb, cbar,
                     labar, lbbar, m, b1, b2, n_iters, epsilon, is_double, fused, device,
                     stream):
        dt = np.float64 if is_double else np.float32
        C = view(cost, (m, b1, b2), dt)
        la, lb = view(log_a, (m, b1), dt), view(log_b, (m, b2), dt)
        RH, LH = view(rh, (n_iters, 2, m, b1), dt), view(lh, (n_iters, 2, m, b2), dt)
        CB = view(cbar, (m, b1, b2), dt)
        LAB, LBB = view(labar, (m, b1), dt), view(lbbar, (m, b2), dt)
        it = int(view(iters, (1,), np.int32)[0])
        eps = dt(epsilon)
        ce = (C / eps).astype(dt)
        if fused:
            self.launches.append("fused_bwd")
            f_b = view(grad_f, (m, b1), dt).copy() if grad_f else np.zeros((m, b1), dt)
            g_b = view(grad_g, (m, b2), dt).copy() if grad_g else np.zeros((m, b2), dt)
            lab, lbb = np.zeros((m, b1), dt), np.zeros((m, b2), dt)
        else:
            assert fb and gb
            f_b, g_b = view(fb, (m, b1), dt), view(gb, (m, b2), dt)
            lab, lbb = LAB, LBB
        for k in range(n_iters if not fused else it, 0, -1):
            if not fused:
                self.launches += ["bwd_col", "bwd_row"]
                if k > it:
                    continue
            phi = la - (RH[k - 1, 0] + RH[k - 1, 1])
            beta = np.exp(((phi[:, :, None] - ce) - LH[k - 1, 0][:, None, :])
                          - LH[k - 1, 1][:, None, :])
            w = beta * g_b[:, None, :]
            CB += w
            f_in = f_b if (fused or k == it) else np.zeros_like(f_b)
            f_new = f_in - w.sum(-1)
            lbb += eps * g_b
            psp = lb - (LH[k - 2, 0] + LH[k - 2, 1]) if k > 1 else np.zeros_like(lb)
            alpha = np.exp(((psp[:, None, :] - ce) - RH[k - 1, 0][:, :, None])
                           - RH[k - 1, 1][:, :, None])
            w = alpha * f_new[:, :, None]
            CB += w
            lab += eps * f_new
            g_b[:] = -w.sum(-2)
            f_b[:] = 0 if fused else f_new
        if fused:
            LAB[:], LBB[:] = lab, lbb

    # ------------------------------------------------------------------- graph
    def topk(self, x, stride_x, n_rows, v, k, dtype, values, indices, device, stream):
        assert dtype == 0
        X = np.lib.stride_tricks.as_strided(view(x, ((n_rows - 1) * stride_x + v,), np.float32),
                                            (n_rows, v), (4 * stride_x, 4))
        order = np.argsort(-X, axis=1, kind="stable")[:, :k]  # ties by lower index
        view(indices, (n_rows, k), np.int64)[:] = order
        view(values, (n_rows, k), np.float32)[:] = np.take_along_axis(X, order, 1)
        self.launches.append("topk")

    def graph_rows(self, z, stride_z, valid, top_idx, n_rows, v, k, inv_temp, dtype, a, idx,
                   m, lse, device, stream):
        Z = np.lib.stride_tricks.as_strided(view(z, ((n_rows - 1) * stride_z + v,), np.float32),
                                            (n_rows, v), (4 * stride_z, 4))
        ok = view(valid, (n_rows,), np.bool_) if valid else np.ones(n_rows, bool)
        top = view(top_idx, (n_rows, k), np.int64)
        A, I = view(a, (n_rows, k), np.float32), view(idx, (n_rows, k), np.int32)
        M, L = view(m, (n_rows,), np.float32), view(lse, (n_rows,), np.float32)
        x = Z.astype(np.float32) * np.float32(inv_temp)
        with np.errstate(over="ignore", invalid="ignore"):
            lrow = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
        lrow = np.where(np.isfinite(x).all(1), lrow, np.nan).astype(np.float32)
        ent = np.exp(np.take_along_axis(x, top, 1) - lrow[:, None]).astype(np.float32)
        A[:] = np.where(ok[:, None], ent, 0.0)
        I[:] = np.where(ok[:, None], top, 2**31 - 1)
        M[:] = np.where(ok, A.sum(1), 0.0)
        L[:] = np.where(ok, lrow, 0.0)
        self.launches.append("graph_rows")

    def graph_runs(self, key, perm, a, m, du, nu, bad, uent, groups, t_len, k, fix_scale,
                   device, stream):
        p = t_len * k
        K, P = view(key, (2 * groups, p), np.int32), view(perm, (2 * groups, p), np.int64)
        A, M = view(a, (2 * groups * p,), np.float32), view(m, (2 * groups * t_len,), np.float32)
        DU = view(du, (2 * groups, p), np.int64)
        NU, BAD = view(nu, (2 * groups,), np.int32), view(bad, (2 * groups,), np.int32)
        UE = view(uent, (groups * p,), np.int32) if uent else None
        for g2 in range(2 * groups):
            for q in range(p):
                c = K[g2, q]
                if c == 2**31 - 1 or (q > 0 and K[g2, q - 1] == c):
                    continue
                total, nan, r = 1, False, q
                while r < p and K[g2, r] == c:
                    e = int(P[g2, r])
                    w = np.float32(A[g2 * p + e] * M[g2 * t_len + e // k])
                    if np.isnan(w):
                        nan = True
                    else:
                        total += int(float(w) * fix_scale + 0.5)
                    if UE is not None and g2 < groups:
                        UE[g2 * p + e] = q
                    r += 1
                DU[g2, q] = total
                NU[g2] += 1
                if nan:
                    BAD[g2] = 1
        self.launches.append("graph_runs")

    def graph_gw(self, sorted, order, nu, bad, cost, gu, groups, p, unfix, device, stream):
        S, O = view(sorted, (2 * groups, p), np.int64), view(order, (2 * groups, p), np.int64)
        NU, BAD = view(nu, (2 * groups,), np.int32), view(bad, (2 * groups,), np.int32)
        COST = view(cost, (groups,), np.float64)
        GU = view(gu, (groups * p,), np.float32) if gu else None
        for g in range(groups):
            ns, nt = int(NU[g]), int(NU[groups + g])
            n = max(ns, nt)
            if ns == 0:
                COST[g] = 0.0
                continue
            x = np.zeros(n)
            y = np.zeros(n)
            x[:ns] = S[g, :ns] * unfix
            y[:nt] = S[groups + g, :nt] * unfix
            me, ms = (x.sum() - y.sum()) / n, (x.sum() + y.sum()) / n
            res = []
            for yy in (y, y[::-1]):
                e, s = x - yy - me, x + yy - ms
                c2 = (2 * n * (e * e * s * s).sum() + 2 * (e * e).sum() * (s * s).sum()
                      + 4 * (e * s).sum() ** 2 - 4 * (e * e * s).sum() * s.sum()
                      - 4 * (e * s * s).sum() * e.sum())
                res.append((c2, e, s))
            rev = res[1][0] < res[0][0]
            c2, e, s = res[1] if rev else res[0]
            isbad = BAD[g] + BAD[groups + g] > 0
            COST[g] = np.nan if isbad else c2 / n**2
            if GU is not None:
                de = (n * e * s * s - 2 * e * s * s.sum() + e * (s * s).sum() - s * s * e.sum()
                      + 2 * s * (e * s).sum() - (e * s * s).sum())
                ds = (n * s * e * e - 2 * s * e * e.sum() + s * (e * e).sum() - e * e * s.sum()
                      + 2 * e * (e * s).sum() - (e * e * s).sum())
                sc = np.nan if isbad else 4.0 / n**2
                GU[g * p + O[g, :ns]] = ((de + ds) * sc)[:ns]
        self.launches.append("graph_gw")

    def graph_finish(self, cost, nu, loss, inv, groups, device, stream):
        COST, NU = view(cost, (groups,), np.float64), view(nu, (2 * groups,), np.int32)
        cnt = max(int((NU[:groups] > 0).sum()), 1)
        view(loss, (1,), np.float32)[0] = COST[NU[:groups] > 0].sum() / cnt
        view(inv, (1,), np.float32)[0] = 1.0 / cnt
        self.launches.append("graph_finish")

    def graph_rows_bwd(self, z, stride_z, valid, a, idx, m, lse, abar, uent, gu, scale, inv,
                       grad, stride_g, n_rows, v, k, t_len, inv_temp, dtype, device, stream):
        Z = np.lib.stride_tricks.as_strided(view(z, ((n_rows - 1) * stride_z + v,), np.float32),
                                            (n_rows, v), (4 * stride_z, 4))
        GR = np.lib.stride_tricks.as_strided(view(grad, ((n_rows - 1) * stride_g + v,), np.float32),
                                             (n_rows, v), (4 * stride_g, 4))
        ok = view(valid, (n_rows,), np.bool_) if valid else np.ones(n_rows, bool)
        A, I = view(a, (n_rows, k), np.float32), view(idx, (n_rows, k), np.int32)
        M, L = view(m, (n_rows,), np.float32), view(lse, (n_rows,), np.float32)
        p = t_len * k
        if abar:
            AB = view(abar, (n_rows, k), np.float32)
        else:
            UE = view(uent, (n_rows * k,), np.int32).reshape(n_rows, k)
            GUv = view(gu, (n_rows // t_len * p,), np.float32)
            slots = np.where(ok[:, None], UE, 0)  # masked rows read nothing
            gd = GUv[(np.arange(n_rows) // t_len * p)[:, None] + slots]
            AB = gd * M[:, None] + (gd * A).sum(1, keepdims=True)
        sc = np.float32(inv_temp)
        if scale:
            sc = sc * view(scale, (1,), np.float32)[0] * view(inv, (1,), np.float32)[0]
        written = np.zeros((n_rows, v), np.int32)
        for r in range(n_rows):
            if not ok[r]:
                GR[r] = 0
                continue
            a_r = AB[r, 0]
            rel = AB[r] - a_r
            c = (A[r] * AB[r]).sum()
            p_rel = (A[r] * rel).sum()
            kk = I[r, k - 1]
            zk = Z[r, kk]
            inside = (Z[r] > zk) | ((Z[r] == zk) & (np.arange(v) <= kk))
            pc = np.exp(Z[r] * inv_temp - L[r])
            tail = pc[~inside].sum()
            GR[r, ~inside] = -(pc[~inside] * c) * sc
            written[r, ~inside] += 1
            GR[r, I[r]] = A[r] * (rel + a_r * tail - p_rel) * sc
            written[r, I[r]] += 1
        assert (written[ok] == 1).all(), "every gradient address is written once"
        self.launches.append("graph_rows_bwd")


@pytest.fixture
def fake(monkeypatch):
    def install(fused=True):
        mod = FakeModule(fused)
        for m in (sk_cuda, graph_cuda, select_cuda):
            monkeypatch.setattr(m, "module", lambda mod=mod: mod)
            monkeypatch.setattr(m, "device_index", lambda dev: 0)
            monkeypatch.setattr(m, "stream", lambda dev: 0)
        sk_cuda._plan.cache_clear()
        sk_cuda._segment.cache_clear()
        return mod

    yield install
    sk_cuda._plan.cache_clear()
    sk_cuda._segment.cache_clear()


def _solve(cost, la, lb, eps, n_iters, tol, fn):
    c = cost.clone().requires_grad_(True)
    a = la.clone().requires_grad_(True)
    b = lb.clone().requires_grad_(True)
    f, g = fn(c, a, b, eps, n_iters, tol)
    gen = torch.Generator().manual_seed(1)
    wf = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(f.dtype)
    wg = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(g.dtype)
    ((f * wf).sum() + (g * wg).sum()).backward()
    return f.detach(), g.detach(), c.grad, a.grad, b.grad


def _problem(m, b1, b2, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(m, b1, b2, generator=gen, dtype=torch.float64).to(dtype)
    wa = torch.rand(m, b1, generator=gen, dtype=torch.float64) + 0.1
    wb = torch.rand(m, b2, generator=gen, dtype=torch.float64) + 0.1
    la = (wa / wa.sum(-1, keepdim=True)).log().to(dtype)
    lb = (wb / wb.sum(-1, keepdim=True)).log().to(dtype)
    return cost, la, lb


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [None, 1e-3])
def test_sinkhorn_cuda_host_matches_torch(fake, fused, dtype, tol):
    mod = fake(fused)
    cost, la, lb = _problem(3, 13, 21, dtype)
    from kdkernels.sinkhorn.pytorch import sinkhorn_torch

    n_iters = 37  # > one tol segment
    want = _solve(cost.double(), la.double(), lb.double(), 0.05, n_iters, tol, sinkhorn_torch)
    got = _solve(cost, la, lb, 0.05, n_iters, tol, solver_op.sinkhorn_cuda)
    rtol = 1e-9 if dtype == torch.float64 else 2e-3
    for w, g_ in zip(want, got):
        assert g_.dtype == dtype
        torch.testing.assert_close(g_.double(), w, rtol=rtol, atol=rtol)
    assert ("fused_fwd" in mod.launches) == fused and ("row" in mod.launches) != fused
    assert ("check" in mod.launches) == (tol is not None)


@pytest.mark.parametrize("fused", [True, False])
def test_sinkhorn_cuda_host_tol_stops_at_torch_iteration(fake, fused):
    fake(fused)
    from kdkernels.sinkhorn.pytorch import sinkhorn_iterate

    cost, la, lb = _problem(4, 9, 11, torch.float64, seed=3)
    ce = cost / 0.1
    for n_iters, tol in ((100, 1e-6), (40, 1e-4), (3, 1e-12)):
        _, _, phis, _ = sinkhorn_iterate(ce, la, lb, n_iters, tol, history=True)
        f, g, rh, lh, iters = sk_cuda.sinkhorn_fwd_cuda(cost, la, lb, 0.1, n_iters, tol, True)
        assert int(iters) == phis.shape[0]
        torch.testing.assert_close(f / 0.1, phis[-1])


def test_sinkhorn_cuda_host_no_gradient_and_empty(fake):
    fake(True)
    cost, la, lb = _problem(2, 5, 6, torch.float32)
    f, g, rh, lh, iters = sk_cuda.sinkhorn_fwd_cuda(cost, la, lb, 0.2, 7, None, False)
    assert rh.shape[0] == 0 and lh.shape[0] == 0 and int(iters) == 7
    e = torch.empty(0, 5, 6)
    f, g, *_ = sk_cuda.sinkhorn_fwd_cuda(e, la[:0], lb[:0], 0.2, 3, None, True)
    assert f.shape == (0, 5) and g.shape == (0, 6)
    with pytest.raises(TypeError, match="float32 or float64"):
        sk_cuda.sinkhorn_fwd_cuda(cost.half(), la.half(), lb.half(), 0.2, 3, None, False)


def test_sinkhorn_table_has_cuda_explicit_only():
    from kdkernels.sinkhorn.ops import SINKHORN

    assert SINKHORN.backends[0] == "cuda" and not SINKHORN.impls["cuda"].auto


# ---------------------------------------------------------------------------- graph


def _graph_inputs(g, t_len, v_s, v_t, seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(g, t_len, v_s, generator=gen) * 3
    t = torch.randn(g, t_len, v_t, generator=gen) * 3
    if ties:
        s = s.round()
        t = t.round()
    return s, t


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_graph_loss_cuda_host_matches_torch(fake, masked, ties):
    mod = fake()
    s, t = _graph_inputs(3, 5, 40, 33, ties=ties)
    valid = None
    if masked:
        valid = torch.ones(3, 5, dtype=torch.bool)
        valid[1] = False  # a group without a valid position
        valid[2, 1:3] = False
        s[2, 1] = float("nan")  # never read through a masked position's values
    from kdkernels.graph.pytorch import graph_on_logits_loss_torch

    sw = s.clone().requires_grad_(True)
    want = graph_on_logits_loss_torch(sw, t, 4, 0.5, valid)
    want.backward()
    sg = s.clone().requires_grad_(True)
    got = graph_ops.graph_on_logits_loss_cuda(sg, t, 4, 0.5, valid)
    got.backward(torch.tensor(1.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    gw = torch.nan_to_num(sw.grad)
    torch.testing.assert_close(sg.grad, gw, rtol=1e-4, atol=1e-7)
    assert {"topk", "graph_rows", "graph_runs", "graph_gw", "graph_finish",
            "graph_rows_bwd"} <= set(mod.launches)


def test_topk_logit_graph_cuda_host_matches_torch(fake):
    fake()
    z, _ = _graph_inputs(1, 6, 30, 30, seed=4)
    z = z[0]
    valid = torch.tensor([True, True, False, True, True, True])
    from kdkernels.graph.pytorch import topk_logit_graph_torch

    zw = z.clone().requires_grad_(True)
    nodes_w, adj_w = topk_logit_graph_torch(zw, 5, 1.0, valid)
    (adj_w * torch.arange(adj_w.numel()).view_as(adj_w)).sum().backward()
    zg = z.clone().requires_grad_(True)
    nodes, adj = graph_ops.topk_logit_graph_cuda(zg, 5, 1.0, valid)
    (adj * torch.arange(adj.numel()).view_as(adj)).sum().backward()
    assert torch.equal(nodes, nodes_w)
    torch.testing.assert_close(adj, adj_w)
    torch.testing.assert_close(zg.grad, zw.grad, rtol=1e-4, atol=1e-6)


def test_graph_cuda_refuses_float64_and_large_k():
    s = torch.randn(1, 2, 300, dtype=torch.float64)
    with pytest.raises(kdkernels.BackendUnavailableError, match="float64"):
        graph_ops.graph_on_logits_loss_cuda(s, s, 4, 1.0, None)
    with pytest.raises(kdkernels.BackendUnavailableError, match="k <= 256"):
        graph_ops.topk_logit_graph_cuda(s[0].float(), 257, 1.0, None)
