"""The test harness of tests/test_vocab_parallel_cuda.py: a fake `kdkernels_cuda` for the
vocabulary-parallel kernels (FakeModule, fake_extension), and threads acting as the ranks
of a process group (ThreadGroup, threaded_collectives, run_threads)."""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading

import numpy as np
import torch

from kdkernels._core import backend as B

_NAN = float("nan")

# --------------------------------------------------------------- the fake extension

_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
       torch.bfloat16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
_ROW_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def at(ptr: int, shape, strides, dtype) -> torch.Tensor:
    """A writable tensor over `shape` elements at address `ptr` (strides in elements)."""
    assert ptr != 0, "null pointer"
    span = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    item = torch.empty((), dtype=dtype).element_size()
    buf = (ctypes.c_char * (span * item)).from_address(ptr)
    arr = np.frombuffer(buf, dtype=_NP[dtype], count=span)
    arr = np.lib.stride_tricks.as_strided(arr, shape, [st * item for st in strides])
    out = torch.from_numpy(arr)
    return out.view(dtype) if dtype == torch.bfloat16 else out


def _softplus(z):
    return torch.where(z > 0, z + torch.log1p(torch.exp(-z)), torch.log1p(torch.exp(z)))


def _sigmoid_minus_softplus(x):
    w = torch.sigmoid(x)
    series = torch.full_like(w, 1.0 / 14.0)
    for k in range(13, 1, -1):
        series = series * w + 1.0 / k
    return torch.where(w >= 0.25, w - _softplus(x), -series * w * w)


def _pair_terms(div, logq, logp, la_lb, dc, w, log_w, log_1mw):
    """kd_parallel.cuh's vp_pair_terms (the shifted g of kd/triton.py's _pair_terms)."""
    q, p = torch.exp(logq), torch.exp(logp)
    log_r = dc - la_lb
    zero = torch.zeros_like(q)
    if div == 2:  # reverse KL
        return torch.where(q > 0, q * (logq - logp), zero), torch.where(q > 0, la_lb, zero)
    if div == 3:  # jsd
        logm = torch.logaddexp(logp + log_w, logq + log_1mw)
        g = torch.where(q > 0, -(1 - w) * _softplus(log_w - log_1mw + log_r), zero)
        d = (torch.where(p > 0, w * p * (logp - logm), zero)
             + torch.where(q > 0, (1 - w) * q * (logq - logm), zero))
        return d, g
    if div == 4:  # skew forward
        logm = torch.logaddexp(logp + log_w, logq + log_1mw)
        g = torch.where(p > 0, -((1 - w) / w) * torch.sigmoid(log_w - log_1mw + log_r), zero)
        return torch.where(p > 0, p * (logp - logm), zero), g
    logm = torch.logaddexp(logp + log_1mw, logq + log_w)  # skew reverse
    g = torch.where(q > 0, _sigmoid_minus_softplus(log_1mw - log_w + log_r), zero)
    return torch.where(q > 0, q * (logq - logm), zero), g


def _tvd_g(diff):
    return torch.where(diff > 0, -1.0, torch.where(diff < 0, 0.0, -0.5)).to(diff.dtype)


def _excl_sum(d):
    """(max, Σ e^{d − max} without the first argmax, the first argmax) per row."""
    m = d.amax(1)
    j = d.argmax(1, keepdim=True)
    e = torch.exp(d - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(1))
    return m, e.scatter(1, j, 0.0).sum(1), j[:, 0]


class FakeModule:
    """The extension's vocabulary-parallel entry points (and scale_rows, and the fused
    losses' softcap_fwd / softcap_bwd), emulated on CPU
    tensors: each reads its inputs and writes its outputs through the pointers, sizes
    and strides it is given, computing what the kernel computes per row, in the kernel's
    compute dtype. `launches` lists the calls."""

    def __init__(self):
        self.launches: list[str] = []

    # ------------------------------------------------------------- kd_loss
    def _kd_rows(self, kw):
        n, w = kw["n_rows"], kw["width"]
        assert n > 0 and 1 <= w and kw["stride_s"] >= w
        cdt = torch.float64 if kw["is_double"] else torch.float32
        rdt = torch.float64 if kw["is_double"] else _ROW_DTYPES[kw["dtype"]]
        s = at(kw["s"], (n, w), (kw["stride_s"], 1), rdt)
        t = at(kw["t"], (n, w), (kw["stride_t"], 1), rdt) if kw["div"] != 0 else None
        valid = torch.ones(n, dtype=torch.bool)
        y = torch.zeros(n, dtype=torch.int64)
        if kw["labels"]:
            ldt = torch.int64 if kw["labels_i64"] else torch.int32
            y = at(kw["labels"], (n,), (kw["stride_l"],), ldt).long()
            valid = y != kw["ignore_index"]
        assert not kw["use_x"] or kw["hard_w"] != 0.0
        c = lambda v: torch.tensor(v, dtype=cdt)  # noqa: E731  (a scalar in the compute dtype)
        prm = dict(it=c(kw["inv_temp"]), w=c(kw["w"]), log_w=c(kw["log_w"]),
                   log_1mw=c(kw["log_1mw"]), soft_w=c(kw["soft_w"]), hard_w=c(kw["hard_w"]),
                   it_t=c(kw.get("inv_temp_t", kw["inv_temp"])))
        x = s.to(cdt)
        b = None
        if t is not None:
            b = t.to(cdt) * prm["it_t"]
            if kw["div"] == 7:
                b = (1 - prm["w"]) * (x * prm["it"]) + prm["w"] * b
        return n, w, cdt, rdt, x, b, valid, y, prm

    def kd_vp_stats(self, **kw):
        self.launches.append("kd_vp_stats")
        n, w, cdt, _, x, b, valid, _, prm = self._kd_rows(kw)
        inf = math.inf
        bx = torch.isnan(x) | (x == inf)
        a = torch.where(bx, -inf, x * prm["it"])
        flag = bx.any(1)
        m_a, z_a, j_a = _excl_sum(a)
        st = torch.zeros(n, 8, dtype=cdt)
        st[:, 0], st[:, 4] = m_a, z_a
        st[:, 1:3] = -inf
        if b is not None:
            bb = torch.isnan(b) | (b == inf)
            flag |= bb.any(1)
            b = torch.where(bb, -inf, b)
            st[:, 1], st[:, 5], _ = _excl_sum(b)
            if kw["div"] == 2:  # b at a's pivot
                st[:, 7] = torch.where(m_a > -inf, b.gather(1, j_a.unsqueeze(1))[:, 0], 0.0)
        if kw["use_x"]:
            st[:, 2], st[:, 6], _ = _excl_sum(torch.where(bx, -inf, x))
        st[:, 3] = flag.to(cdt)
        piv = torch.where(m_a > -inf, j_a, 0)
        ignored = ~valid  # nothing read: M = −inf, Z' = 0, no flag
        st[ignored] = torch.tensor([-inf, -inf, -inf, 0, 0, 0, 0, 0], dtype=cdt)
        piv[ignored] = 0
        at(kw["stats"], (n, 8), (8, 1), cdt).copy_(st)
        at(kw["piv"], (n,), (1,), torch.int32).copy_(piv)

    def _kd_norm(self, kw, n, cdt, valid):
        flags = at(kw["flags"], (n,), (1,), torch.int32).long()
        own = (flags & 2) != 0
        ok = ((flags & 1) == 0) & valid
        norm = at(kw["norm"], (n, 9), (9, 1), cdt).clone()
        piv = at(kw["piv"], (n,), (1,), torch.int32).long().unsqueeze(1)
        return own, ok, norm, piv

    def _kd_logs(self, kw, x, b, norm, prm):
        a = x * prm["it"]
        la = a - norm[:, 0:1]
        logq = la - norm[:, 1:2]
        logp = (b - norm[:, 2:3]) - norm[:, 3:4] if b is not None else None
        return a, la, logq, logp

    def kd_vp_partials(self, **kw):
        self.launches.append("kd_vp_partials")
        n, w, cdt, _, x, b, valid, y, prm = self._kd_rows(kw)
        own, ok, norm, piv = self._kd_norm(kw, n, cdt, valid)
        div = kw["div"]
        part = torch.zeros(n, 4, dtype=cdt)
        if div != 0:
            a, la, logq, logp = self._kd_logs(kw, x, b, norm, prm)
            if div in (1, 7):
                p = torch.exp(logp)
                part[:, 0] = torch.where(p > 0, p * (logp - logq), 0.0).sum(1)
            else:
                is_p = own.unsqueeze(1) & (torch.arange(w) == piv)
                if div == 6:
                    dpiv = (torch.expm1(logp.gather(1, piv)) - torch.expm1(logq.gather(1, piv)))
                    diff = torch.where(is_p, dpiv, torch.exp(logp) - torch.exp(logq))
                    d, g = 0.5 * diff.abs(), _tvd_g(diff)
                else:
                    d, g = _pair_terms(div, logq, logp, la - (b - norm[:, 6:7]),
                                       norm[:, 1:2] - norm[:, 3:4], prm["w"], prm["log_w"],
                                       prm["log_1mw"])
                qg = torch.exp(logq) * g
                part[:, 0] = d.sum(1)
                part[:, 1] = torch.where(is_p, 0.0, qg).sum(1)
                part[:, 2] = torch.where(is_p, qg, 0.0).sum(1)
        if kw["hard_w"] != 0.0:
            y_loc = y - kw["start"]
            mine = (y_loc >= 0) & (y_loc < w)
            part[:, 3] = torch.where(mine, x.gather(1, y_loc.clamp(0, w - 1).unsqueeze(1))[:, 0],
                                     0.0)
        part = torch.where(ok.unsqueeze(1), part, 0.0)
        at(kw["part"], (n, 4), (4, 1), cdt).copy_(part)

    def kd_vp_grad(self, **kw):
        self.launches.append("kd_vp_grad")
        n, w, cdt, rdt, x, b, valid, y, prm = self._kd_rows(kw)
        own, ok, norm, piv = self._kd_norm(kw, n, cdt, valid)
        assert kw["stride_g"] >= w
        div = kw["div"]
        sc = at(kw["scale"], (1,), (1,), cdt)[0]
        c_soft, c_hard = prm["soft_w"] * prm["it"] * sc, prm["hard_w"] * sc
        g_bar = norm[:, 7:8] + norm[:, 8:9]
        a, la, logq, logp = self._kd_logs(kw, x, b if b is not None else x, norm, prm)
        q = torch.exp(logq)
        gather = lambda v: v.gather(1, piv)  # noqa: E731
        lq_j, lp_j = gather(logq), gather(logp)
        diff_piv = torch.expm1(lp_j) - torch.expm1(lq_j)
        is_p = own.unsqueeze(1) & (torch.arange(w) == piv)
        if div == 0:
            out, pv = torch.zeros_like(q), torch.zeros_like(lq_j)
        elif div in (1, 7):
            out, pv = q - torch.exp(logp), torch.expm1(lq_j) - torch.expm1(lp_j)
        else:
            if div == 6:
                g = _tvd_g(torch.where(is_p, diff_piv, torch.exp(logp) - q))
            else:
                _, g = _pair_terms(div, logq, logp, la - (b - norm[:, 6:7]),
                                   norm[:, 1:2] - norm[:, 3:4], prm["w"], prm["log_w"],
                                   prm["log_1mw"])
            out = q * (g - g_bar)
            pv = (-torch.expm1(lq_j) * gather(g) - norm[:, 7:8]) * torch.exp(lq_j)
        out, pv = out * c_soft, pv * c_soft
        if kw["hard_w"] != 0.0:
            ls = (x - norm[:, 4:5]) - norm[:, 5:6] if kw["use_x"] else logq
            y_loc = (y - kw["start"]).unsqueeze(1)
            out = out + c_hard * (torch.exp(ls) - (torch.arange(w) == y_loc).to(cdt))
            ls_j = gather(ls)
            pv = pv + c_hard * torch.where(piv == y_loc, torch.expm1(ls_j), torch.exp(ls_j))
        out = torch.where(is_p, pv, out)
        fill = torch.where(valid, _NAN, 0.0).to(cdt).unsqueeze(1)
        out = torch.where(ok.unsqueeze(1), out, fill)
        at(kw["grad"], (n, w), (kw["stride_g"], 1), rdt).copy_(out.to(rdt))

    # ------------------------------------------------------------- topk_kd_loss
    def _topk_rows(self, kw):
        n, w, k = kw["n_rows"], kw["width"], kw["k"]
        assert n > 0 and w >= 1 and k >= 1
        cdt = torch.float64 if kw["is_double"] else torch.float32
        rdt = torch.float64 if kw["is_double"] else _ROW_DTYPES[kw["dtype"]]
        s = at(kw["s"], (n, w), (kw["stride_s"], 1), rdt)
        idx = at(kw["idx"], (n, k), (kw["stride_i"], 1), torch.int64)
        valid = torch.ones(n, dtype=torch.bool)
        if kw["labels"]:
            ldt = torch.int64 if kw["labels_i64"] else torch.int32
            valid = at(kw["labels"], (n,), (kw["stride_l"],), ldt).long() != kw["ignore_index"]
        loc = idx - kw["start"]
        own = (loc >= 0) & (loc < w)
        return n, w, k, cdt, rdt, s, loc, own, valid

    def topk_vp_gather(self, **kw):
        self.launches.append("topk_vp_gather")
        n, w, k, cdt, _, s, loc, own, valid = self._topk_rows(kw)
        own = own & valid.unsqueeze(1)
        sel = at(kw["sel"], (n, k + int(kw["bucket"])), (kw["stride_o"], 1), torch.float64)
        sel[:, :k] = torch.where(own, s.gather(1, loc.clamp(0, w - 1)).double(), 0.0)
        if kw["bucket"]:
            a = s.to(cdt) * torch.tensor(kw["inv_temp"], dtype=cdt)
            bad = torch.isnan(a) | (a == math.inf)
            chosen = torch.zeros(n, w, dtype=torch.bool)
            rows = torch.arange(n).unsqueeze(1).expand(n, k)
            chosen[rows[own], loc[own]] = True
            tail = torch.where(bad | chosen, -math.inf, a)
            m = tail.amax(1)
            z = torch.exp(tail - torch.where(m > -math.inf, m, 0.0).unsqueeze(1)).sum(1)
            st = torch.stack([m, bad.any(1).to(cdt), z], 1)
            st[~valid] = torch.tensor([-math.inf, 0.0, 0.0], dtype=cdt)
            at(kw["tstat"], (n, 3), (3, 1), cdt).copy_(st)

    def topk_vp_grad(self, **kw):
        self.launches.append("topk_vp_grad")
        n, w, k, cdt, rdt, s, loc, own, _ = self._topk_rows(kw)
        mode = at(kw["mode"], (n,), (1,), torch.int32)
        r = at(kw["r"], (n, k + int(kw["bucket"])), (kw["stride_r"], 1), cdt)
        if kw["bucket"]:
            tail = at(kw["tail"], (n, 2), (2, 1), cdt)
            a = s.to(cdt) * torch.tensor(kw["inv_temp"], dtype=cdt)
            g = r[:, k:] * torch.exp((a - tail[:, 0:1]) - tail[:, 1:2])
        else:
            g = torch.zeros(n, w, dtype=cdt)
        rows = torch.arange(n).unsqueeze(1).expand(n, k)
        g[rows[own], loc[own]] = r[:, :k][own]
        g[mode == 1] = _NAN
        g[mode == 2] = 0.0
        at(kw["grad"], (n, w), (kw["stride_g"], 1), rdt).copy_(g.to(rdt))

    # ------------------------------------------------------------- the fused losses
    # (csrc/include/kdkernels/softcap.cuh: float32 arithmetic, one rounding into the rows'
    # dtype; cap and k are float32 there)
    def softcap_fwd(self, u, out, n_rows, v, stride_u, stride_o, cap, dtype, device, stream):
        self.launches.append("softcap_fwd")
        rdt = _ROW_DTYPES[dtype]
        x = at(u, (n_rows, v), (stride_u, 1), rdt).float()
        res = torch.tensor(cap, dtype=torch.float32) * torch.tanh(x)
        at(out, (n_rows, v), (stride_o, 1), rdt).copy_(res.to(rdt))

    def softcap_bwd(self, g, u, row_scale, n_rows, v, stride_g, stride_u, k, dtype, device,
                    stream):
        self.launches.append("softcap_bwd")
        rdt = _ROW_DTYPES[dtype]
        gr = at(g, (n_rows, v), (stride_g, 1), rdt)
        x = gr.float()
        if row_scale:
            x = x * at(row_scale, (n_rows,), (1,), torch.float32).unsqueeze(1)
        if u:
            uu = at(u, (n_rows, v), (stride_u, 1), rdt).float()
            e = torch.exp(-2.0 * uu.abs())
            x = x * (torch.tensor(k, dtype=torch.float32) * (4.0 * e / (1.0 + e).square()))
        gr.copy_(x.to(rdt))

    # ------------------------------------------------------------- backward
    def scale_rows(self, grad, scale, per_row, n_rows, v, stride_g, dtype, device, stream):
        self.launches.append("scale_rows")
        g = at(grad, (n_rows, v), (stride_g, 1), _ROW_DTYPES[dtype])
        sc = at(scale, (n_rows if per_row else 1,), (1,), torch.float32)
        g.copy_((g.float() * sc.unsqueeze(1)).to(g.dtype))


@contextlib.contextmanager
def fake_extension():
    """Route the cuda backend of the vocabulary-parallel losses (and scale_rows, and the
    fused losses' softcap kernels) to a FakeModule on CPU tensors: the CPU counts as a
    GPU, the extension as available."""
    from kdkernels import _ext
    from kdkernels._core import cuda as core_cuda
    from kdkernels.fused_linear import cuda as fl_cuda
    from kdkernels.kd import parallel_cuda as kd_pc
    from kdkernels.topk import parallel_cuda as tk_pc

    fake = FakeModule()
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    for m in (core_cuda, fl_cuda, kd_pc, tk_pc):
        patch(m, "module", lambda: fake)
        patch(m, "device_index", lambda dev: 0)
        patch(m, "stream", lambda dev: 0)
    patch(B, "on_gpu", lambda device: True)
    patch(_ext, "unavailable_reason", lambda: None)
    try:
        yield fake
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


# --------------------------------------------------------------- threads as ranks


class ThreadGroup:
    """A process group of `world` threads of this process: all_reduce (MAX / SUM of every
    rank's tensor, in place) and all-gather meet in a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=600)
        self.slots: list = [None] * world
        self.result = None

    def _exchange(self, rank: int, x, combine):
        self.slots[rank] = x
        self.barrier.wait()
        if rank == 0:
            self.result = combine(list(self.slots))
        self.barrier.wait()
        res = self.result
        self.barrier.wait()  # every rank has read it
        return res

    def all_reduce(self, rank: int, x, op: str):
        def combine(xs):
            acc = xs[0].clone()
            for y in xs[1:]:
                acc = torch.maximum(acc, y) if op == "max" else acc + y
            return acc

        x.copy_(self._exchange(rank, x, combine))
        return x

    def gather(self, rank: int, x):
        return [y.clone() for y in self._exchange(rank, x, lambda xs: xs)]


class _Handle:
    """One rank's view of a ThreadGroup (what VocabParallel.group holds)."""

    def __init__(self, grp: ThreadGroup, rank: int):
        self.grp, self.rank = grp, rank


@contextlib.contextmanager
def threaded_collectives(bounds):
    """Every vocabulary-parallel launcher's all_reduce (and the fused losses' hidden-
    gradient one), and the group check, on _Handle groups; the rest (launchers, kernels,
    autograd, public functions) untouched. The
    byte counter counts per thread; `recording()` lists are shared by the threads (both
    ranks run the same backend)."""
    from kdkernels import parallel as P
    from kdkernels.fused_linear import function as fl_fn
    from kdkernels.fused_linear import parallel as fl_p
    from kdkernels.kd import function as kd_fn
    from kdkernels.kd import parallel as kd_p
    from kdkernels.kd import parallel_glue as kd_g
    from kdkernels.topk import function as tk_fn
    from kdkernels.topk import parallel as tk_p
    from kdkernels.topk import parallel_glue as tk_g

    local = threading.local()  # count_bytes per thread: each rank counts its own calls

    @contextlib.contextmanager
    def count_bytes():
        calls: list[int] = []
        local.counters = getattr(local, "counters", []) + [calls]
        try:
            yield calls
        finally:
            local.counters = [c for c in local.counters if c is not calls]

    def all_reduce(x, op, group):
        for calls in getattr(local, "counters", []):
            calls.append(x.numel() * x.element_size())
        return group.grp.all_reduce(group.rank, x, op)

    @contextlib.contextmanager
    def recording():  # B.recording, removing its list by identity (two threads record)
        calls: list = []
        B._recorders.append(calls)
        try:
            yield calls
        finally:
            B._recorders[:] = [c for c in B._recorders if c is not calls]

    def check(vp, op, backend, widths, rows, device, agree=None):
        assert all(w == vp.width for w in widths)
        return P.Shards(vp.start, vp.stop, bounds[-1][1], max(b - a for a, b in bounds),
                        vp.group)

    saved = []
    for m, name, value in ((kd_p, "all_reduce", all_reduce), (kd_g, "all_reduce", all_reduce),
                           (tk_p, "all_reduce", all_reduce), (tk_g, "all_reduce", all_reduce),
                           (fl_p, "all_reduce", all_reduce),
                           (kd_fn, "check_vocab_parallel", check),
                           (tk_fn, "check_vocab_parallel", check),
                           (fl_fn, "check_vocab_parallel", check),
                           (P, "count_bytes", count_bytes), (B, "recording", recording)):
        saved.append((m, name, getattr(m, name)))
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def run_threads(cases, bounds, device: str) -> list[dict]:
    """Every case on len(bounds) threads acting as ranks; each rank's `out`."""
    grp = ThreadGroup(len(bounds))
    outs: list[dict] = [{} for _ in bounds]
    errors: list[BaseException] = []

    def worker(rank):
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        h = _Handle(grp, rank)
        ctx = dict(rank=rank, bounds=bounds, device=device, group=h,
                   gather=lambda x: grp.gather(rank, x))
        try:
            for case in cases:
                case(ctx, outs[rank])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            grp.barrier.abort()

    with threaded_collectives(bounds):
        threads = [threading.Thread(target=worker, args=(r,)) for r in range(len(bounds))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    return outs


