"""The Triton backend of topk_kd_loss (kdkernels/topk/triton.py) against the float64 oracle.

On a CPU it runs under the Triton interpreter (conftest.py), at small shapes, with tiles
shrunk so that both the entry loop and the column loop cross several tiles. On a GPU the
same tests run the compiled kernel on CUDA tensors.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import torch
from _helpers import assert_lowp, grad_ulp, rel_err

from kdkernels import topk_kd_loss
from kdkernels._core.backend import recording
from kdkernels._core.codes import Div
from kdkernels.topk import triton as topk_triton
from kdkernels.topk.pytorch import topk_kd_fwd_torch
from kdkernels.topk.reference import topk_kd_loss_ref

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

IGNORE = -100
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]
CODES = {"forward_kl": int(Div.FWD_KL), "reverse_kl": int(Div.REV_KL), "jsd": int(Div.JSD),
         "taid": int(Div.TAID), "none": int(Div.ZERO)}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """4 entries and 16 columns per tile: every loop of the kernel crosses tiles."""
    monkeypatch.setattr(topk_triton, "launch_config", lambda v, k, on_cpu: (4, 16, 4))


def _inputs(n, v, k, *, values="logits", std=30.0, pad_frac=0.2, ignore_frac=0.3,
            teacher_top=True, masked=0.0):
    """float64 student logits with row spreads std, std/3, std/10, std/30 (the widest
    saturate, the others keep gradients the oracle resolves), k unique teacher classes per
    row (the teacher's top-k, or any k but its argmax), padding (-1, values 123: ignored),
    ~30% ignored rows, and a fraction `masked` of -inf student logits (a masked vocabulary,
    outside the selection)."""
    spread = std / torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=torch.float64).repeat(n)[:n, None]
    s = torch.randn(n, v, dtype=torch.float64) * spread
    t = torch.randn(n, v, dtype=torch.float64) * spread
    if teacher_top:
        idx = t.topk(k, -1).indices
    else:
        key = torch.rand(n, v).scatter_(-1, t.argmax(-1, keepdim=True), 2.0)
        idx = key.argsort(-1)[:, :k]
    src = torch.log_softmax(t, -1) if values == "logprobs" else t
    vals = src.gather(-1, idx)
    pad = torch.rand(n, k) < pad_frac
    idx = idx.masked_fill(pad, -1)
    vals = vals.masked_fill(pad, 123.0)
    if masked:
        s = s.masked_fill((torch.rand(n, v) < masked) & ~_hits(idx, v), -math.inf)
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < ignore_frac] = IGNORE
    return s, idx, vals, y


def _hits(idx, v):
    """[N, V] bool: the selected classes (padding selects nothing)."""
    hits = torch.zeros(idx.shape[0], v, dtype=torch.long)
    return hits.scatter_add_(-1, idx.clamp_min(0), (idx >= 0).long()) > 0


def _run(fn, s, idx, vals, y, upstream=None, dtype=None, dev=None, **kw):
    """(loss, gradient of Σ upstream·loss w.r.t. s) with s a fresh leaf, in `dtype` on `dev`."""
    dev = dev or s.device
    x = s.to(dev, dtype or s.dtype).detach().requires_grad_()
    v = vals.to(dev, dtype or vals.dtype)
    out = fn(x, idx.to(dev), v, y.to(dev) if y is not None else None, **kw)
    gout = torch.ones_like(out) if upstream is None else upstream.to(out)
    (g,) = torch.autograd.grad(out, x, gout)
    return out.detach().cpu(), g.cpu()


def _triton(s, idx, vals, y, upstream=None, dtype=None, **kw):
    return _run(topk_kd_loss, s, idx, vals, y, upstream, dtype, DEV, backend="triton", **kw)


def _launch(fn, s, idx, vals, y, divergence="jsd", beta=0.3, inv_temp=1.0, values="logprobs",
            tail="bucket", grad=True, alias=False, scale=0.5, soft_w=1.0, hard_w=0.0):
    """Call a launcher directly: (loss [N], gradient [N, V]); alias: grad_out is s itself.
    beta: the mixture weight (λ for taid); divergence 'none': no divergence term."""
    s = s.to(DEV).clone()
    loss = torch.empty(s.shape[0], device=DEV)
    g = s if alias else (torch.empty_like(s) if grad else s.new_empty(0))
    sc = torch.tensor(scale, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32,
                      device=DEV)
    fn(s, sc, loss, g, y.to(DEV) if y is not None else None, idx.to(DEV), vals.to(DEV),
       CODES[divergence], beta, inv_temp, values == "logprobs", tail == "bucket", IGNORE,
       soft_w, hard_w)
    return loss.cpu(), g.cpu()


def _same(a, b):
    """Equal, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


# ------------------------------------------------------------------ against the oracle


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", DIVS)
def test_matches_oracle_float32(values, tail, divergence, beta):
    """std-30 spreads, τ = 1.7 on logits, padding, ignored rows, a masked vocabulary,
    arbitrary teacher classes (so that the tail keeps mass), a random upstream gradient."""
    s, idx, vals, y = _inputs(12, 37, 7, values=values, teacher_top=False, masked=0.15)
    tau = 1.0 if values == "logprobs" else 1.7
    kw = dict(values=values, tail=tail, divergence=divergence, beta=beta, temperature=tau,
              reduction="none")
    up = torch.randn(12, dtype=torch.float64) * 3
    loss, g = _triton(s, idx, vals, y, up, torch.float32, **kw)
    s32, v32 = s.float().double(), vals.float().double()  # the oracle on the same inputs
    ref, g_ref = _run(topk_kd_loss_ref, s32, idx, v32, y, up, **kw)
    assert loss.dtype == torch.float32 and g.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(g, g_ref) <= 1e-5
    ign = y == IGNORE
    assert torch.all(loss[ign] == 0) and torch.all(g[ign] == 0)
    assert torch.all(loss[~ign] > 0)
    hits = _hits(idx, 37)
    if tail == "renormalize":  # only the selected classes get a gradient
        assert torch.all(g[~hits] == 0)
    else:  # the tail's classes get r_tail · softmax within the tail; masked ones 0
        assert torch.all(g[torch.isinf(s)] == 0)
        narrow = (torch.arange(12) % 4 == 3) & ~ign  # std 1: no tail softmax underflows
        assert torch.all(g[narrow][~hits[narrow] & torch.isfinite(s[narrow])] != 0)


@pytest.mark.parametrize("values, tail", MODES)
def test_matches_oracle_float64_and_torch(values, tail):
    """float64 students run in float64: the oracle's digits at a moderate spread, and the
    torch path's (the same formulas) at any."""
    s, idx, vals, y = _inputs(8, 29, 6, values=values, std=4.0, teacher_top=False)
    tau = 1.0 if values == "logprobs" else 0.6
    for divergence, beta in DIVS:
        kw = dict(values=values, tail=tail, divergence=divergence, beta=beta, temperature=tau,
                  reduction="sum")
        loss, g = _triton(s, idx, vals, y, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **kw)
        low, g_low = _run(topk_kd_loss, s, idx, vals, y, backend="torch", **kw)
        assert g.dtype == torch.float64
        assert rel_err(loss, ref) <= 1e-7  # (the loss is float32)
        assert rel_err(g, g_ref) <= 1e-12 and rel_err(g, g_low) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """16-bit students and teacher values: within twice PyTorch's own 16-bit error."""
    for values, tail in MODES[1:]:
        s, idx, vals, y = _inputs(10, 33, 5, values=values, std=8.0, teacher_top=False)
        s, vals = s.to(dtype), vals.to(dtype)
        kw = dict(values=values, tail=tail, divergence="jsd", beta=0.3, reduction="mean")
        loss, g = _triton(s, idx, vals, y, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s.double(), idx, vals.double(), y, **kw)
        low, g_low = _run(topk_kd_loss_ref, s, idx, vals, y, compute_dtype=dtype, **kw)
        assert g.dtype == dtype
        assert_lowp(loss, low, ref, dtype)
        assert_lowp(g, g_low, g_ref, dtype, slack=grad_ulp(g_ref, dtype))


# --------------------------------------------- precision at std 30 (the pivot entry)


def _mp_grad(a_row, idx_row, u_row, divergence, beta, bucket):
    """∂D/∂a of one row (τ = 1, log-prob values) from pytorch.py's entry form at 50
    digits: q, p, h = q ∂D/∂q, r_e = h_e − q_e Σh, spread over the tail by its softmax."""
    with mp.workdps(50):
        a = [mp.mpf(float(x)) for x in a_row]
        sel = [int(c) for c in idx_row if c >= 0]
        u = [mp.mpf(float(x)) for c, x in zip(idx_row, u_row) if c >= 0]
        lse = lambda xs: mp.log(sum(mp.e ** x for x in xs))
        rest = [c for c in range(len(a)) if c not in sel]
        if bucket:
            la = lse(a)
            q = [mp.e ** (a[c] - la) for c in sel] + [mp.e ** (lse([a[c] for c in rest]) - la)]
            p = [mp.e ** x for x in u] + [max(0, 1 - sum(mp.e ** x for x in u))]
        else:
            la, lu = lse([a[c] for c in sel]), lse(u)
            q = [mp.e ** (a[c] - la) for c in sel]
            p = [mp.e ** (x - lu) for x in u]
        b = mp.mpf(beta)
        if divergence == "forward_kl":
            h = [-pi for pi in p]
        elif divergence == "reverse_kl":
            h = [qi * mp.log(qi / pi) for pi, qi in zip(p, q)]
        else:
            h = [(1 - b) * qi * mp.log(qi / (b * pi + (1 - b) * qi)) for pi, qi in zip(p, q)]
        sh = sum(h)
        r = [hi - qi * sh for hi, qi in zip(h, q)]
        g = [mp.mpf(0)] * len(a)
        for c, rc in zip(sel, r):
            g[c] = rc
        if bucket:
            lt = lse([a[c] for c in rest])
            for c in rest:
                g[c] = r[-1] * mp.e ** (a[c] - lt)
        return [float(x) for x in g]


@pytest.mark.parametrize("launcher", ["triton", "torch"])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence, beta", DIVS)
def test_std30_rows_keep_their_gradient(tail, divergence, beta, launcher):
    """Rows where one entry's q rounds to 1 (std 30), float32 and float64: every row's
    gradient to 1e-5 (float32) / 1e-11 (float64) of its own norm against a 50-digit
    evaluation, where r = h − q Σh taken directly loses it entirely (both the kernel and
    the float64 PyTorch path). The teacher's top-k
    leaves a tail of ~1e-6 (1 − Σ p cancels: the kernel sums the teacher in float64)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-11)):
        s, idx, vals, _ = _inputs(6, 23, 5, values="logprobs", pad_frac=0.1)
        s, vals = s.to(dtype), (vals - 1e-6).to(dtype)
        fn = topk_triton.topk_kd_fwd_triton if launcher == "triton" else topk_kd_fwd_torch
        _, g = _launch(fn, s, idx, vals, None, divergence, beta, tail=tail, scale=1.0)
        for i in range(6):
            ref = torch.tensor(_mp_grad(s[i].tolist(), idx[i].tolist(), vals[i].tolist(),
                                        divergence, beta, tail == "bucket"), dtype=torch.float64)
            assert rel_err(g[i], ref) <= tol, (dtype, i)


# ------------------------------------------------------------------ shapes and modes


def test_k_one_and_k_full():
    """k = 1 (renormalize: loss 0, gradient 0; bucket: one entry and the tail), and k = V
    with every class selected (bucket: an empty tail, Σ p = 1 − 1e-9 gives it nothing)."""
    s, idx, vals, y = _inputs(6, 21, 1, values="logprobs", pad_frac=0.0, teacher_top=False)
    for tail in ("renormalize", "bucket"):
        kw = dict(values="logprobs", tail=tail, divergence="reverse_kl", reduction="none")
        loss, g = _triton(s, idx, vals, y, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **kw)
        assert rel_err(loss, ref) <= 1e-7 and rel_err(g, g_ref) <= 1e-12
        if tail == "renormalize":
            assert torch.all(loss == 0) and torch.all(g == 0)
        else:
            assert torch.all(loss[y != IGNORE] > 0)
    v = 19
    s = torch.randn(6, v, dtype=torch.float64) * 30
    t = torch.randn(6, v, dtype=torch.float64) * 30
    idx = torch.rand(6, v).argsort(-1)
    vals = torch.log_softmax(t, -1).gather(-1, idx) - 1e-9
    for divergence, beta in DIVS:
        kw = dict(values="logprobs", divergence=divergence, beta=beta, reduction="none")
        a, ga = _triton(s, idx, vals, None, dtype=torch.float32, tail="bucket", **kw)
        b, gb = _triton(s, idx, vals, None, dtype=torch.float32, tail="renormalize", **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s.float().double(), idx, vals.float().double(),
                          None, tail="renormalize", **kw)
        assert torch.isfinite(a).all() and torch.isfinite(ga).all()
        assert rel_err(a, ref) <= 1e-5 and rel_err(ga, g_ref) <= 1e-5
        assert rel_err(a, b) <= 1e-5 and rel_err(ga, gb) <= 1e-5


def test_padding_all_padded_rows_int32_and_strided_inputs():
    """Extra -1 slots anywhere change nothing; an all-padding row has loss 0 (renormalize)
    or only its tail (bucket); int32 indices and strided index/value tensors."""
    s, idx, vals, y = _inputs(8, 23, 5, values="logprobs", pad_frac=0.0, teacher_top=False)
    perm = torch.randperm(9)
    idx_p = torch.cat([idx, torch.full((8, 4), -1)], -1)[:, perm]
    vals_p = torch.cat([vals, torch.randn(8, 4) * 1e3], -1)[:, perm]
    idx_p[1] = -1
    y[1] = 0
    big_i = torch.stack([idx_p, idx_p], -1).int()  # column stride 2, int32
    big_v = torch.stack([vals_p, vals_p], -1)
    for tail in ("renormalize", "bucket"):
        kw = dict(values="logprobs", tail=tail, divergence="jsd", reduction="none")
        a, ga = _triton(s, idx, vals, y, **kw)
        b, gb = _triton(s, big_i[..., 0], big_v[..., 0], y, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s, idx_p, vals_p, y, **kw)
        assert rel_err(b, ref) <= 1e-7 and rel_err(gb, g_ref) <= 1e-12
        keep = torch.arange(8) != 1
        assert rel_err(a[keep], b[keep]) <= 1e-7 and rel_err(ga[keep], gb[keep]) <= 1e-14
        # renormalize: no entries; bucket: only the tail, p_tail = 1 = q_tail
        assert b[1] == 0 and torch.all(gb[1] == 0)
        assert a[1] > 0 and ga[1].abs().max() > 0


def test_bucket_tail_only_row_against_oracle():
    """All-padding rows in bucket mode against a teacher that left mass elsewhere: the
    tail is the only entry, D = 0; with one entry beside it, the oracle's value."""
    s, idx, vals, y = _inputs(4, 17, 3, values="logprobs", pad_frac=0.0, ignore_frac=0.0,
                              teacher_top=False)
    idx[0] = -1
    idx[1, 1:] = -1
    kw = dict(values="logprobs", tail="bucket", divergence="forward_kl", reduction="none")
    loss, g = _triton(s, idx, vals, y, **kw)
    ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **kw)
    assert loss[0] == 0 and torch.all(g[0] == 0)
    assert loss[1] > 0 and rel_err(loss, ref) <= 1e-7 and rel_err(g, g_ref) <= 1e-12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_and_that_triton_ran(reduction):
    s, idx, vals, y = _inputs(9, 31, 4, values="logprobs", teacher_top=False)
    kw = dict(values="logprobs", tail="bucket", divergence="reverse_kl", reduction=reduction)
    with recording() as calls:
        loss, g = _triton(s, idx, vals, y, dtype=torch.float32, **kw)
    assert calls == [("topk_kd_loss", "triton"), ("scale_rows", "triton")]  # (backward)
    with recording() as calls:
        ref, g_ref = _run(topk_kd_loss, s.float(), idx, vals.float(), y, backend="torch", **kw)
    assert calls == [("topk_kd_loss", "torch"), ("scale_rows", "torch")]
    assert loss.dim() == 0 and rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-5
    x = s.float().to(DEV).requires_grad_()
    with torch.no_grad(), recording() as calls:  # no gradient: the launcher alone
        out = topk_kd_loss(x, idx.to(DEV), vals.float().to(DEV), y.to(DEV), backend="triton",
                           **kw)
    assert calls == [("topk_kd_loss", "triton")] and not out.requires_grad
    assert rel_err(out.cpu(), loss) <= 1e-6


# ------------------------------------------- the launcher: aliasing, no gradient, policy


@pytest.mark.parametrize("values, tail, dtype", [
    ("logits", "renormalize", torch.bfloat16), ("logprobs", "renormalize", torch.float32),
    ("logprobs", "bucket", torch.float32), ("logprobs", "bucket", torch.bfloat16)])
def test_gradient_may_alias_the_logits(values, tail, dtype):
    """grad_out = s (the fused-linear buffer reuse) gives the same bits as a separate
    buffer, with ignored, NaN, all-padding and masked rows among them; no gradient: the
    same losses."""
    s, idx, vals, y = _inputs(10, 45, 6, values=values, teacher_top=False, masked=0.1)
    s[2, 7] = math.nan
    idx[3] = -1
    s, vals = s.to(dtype), vals.to(dtype)
    kw = dict(values=values, tail=tail, divergence="jsd", beta=0.3,
              inv_temp=1.0 if values == "logprobs" else 0.5)
    fn = topk_triton.topk_kd_fwd_triton
    loss, g = _launch(fn, s, idx, vals, y, **kw)
    loss_a, g_a = _launch(fn, s, idx, vals, y, alias=True, **kw)
    loss_n, g_n = _launch(fn, s, idx, vals, y, grad=False, **kw)
    assert g_n.numel() == 0
    assert _same(loss, loss_a) and _same(loss, loss_n) and _same(g, g_a)
    assert g.dtype == dtype and g.abs().nan_to_num().max() > 0
    loss_t, g_t = _launch(topk_kd_fwd_torch, s, idx, vals, y, **kw)
    assert torch.equal(loss.isnan(), loss_t.isnan()) and torch.equal(g.isnan(), g_t.isnan())
    ok = ~loss.isnan()
    # (losses to ~1 ulp of the row's largest per-entry term: float32 sums of signed terms)
    assert torch.allclose(loss[ok], loss_t[ok], rtol=1e-5, atol=1e-6)
    assert rel_err(g[ok], g_t[ok]) <= (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_non_finite_policy(tail):
    """NaN/+inf the loss reads: NaN loss and a NaN gradient row; an all -inf student: the
    same; ignored rows: 0 whatever they hold; the other rows unchanged. As the torch path."""
    s, idx, vals, y = _inputs(10, 29, 5, values="logprobs", pad_frac=0.0, ignore_frac=0.0,
                              teacher_top=False)
    s, vals = s.float(), vals.float()
    s[0, idx[0, 1]] = math.nan  # a selected logit
    s[1, idx[1, 0]] = math.inf
    vals[2, 3] = math.nan  # a teacher value
    vals[3, 0] = math.inf
    unsel = [c for c in range(29) if c not in idx[4].tolist()][0]
    s[4, unsel] = math.nan  # outside the selection: only the bucket reads it
    s[5] = -math.inf  # no softmax at all
    s[6, idx[6, 0]] = math.nan  # ignored rows: nothing matters
    vals[7, 1] = math.inf
    y[6] = y[7] = IGNORE
    idx[8, 2] = -1
    vals[8, 2] = math.nan  # padding: never read
    kw = dict(divergence="reverse_kl", tail=tail)
    loss, g = _launch(topk_triton.topk_kd_fwd_triton, s, idx, vals, y, **kw)
    loss_t, g_t = _launch(topk_kd_fwd_torch, s, idx, vals, y, **kw)
    bad = [0, 1, 2, 3, 5] + ([4] if tail == "bucket" else [])
    for r in range(10):
        assert loss[r].isnan() == (r in bad), r
        assert (torch.all(g[r].isnan()) if r in bad else torch.all(g[r].isfinite())), r
    assert torch.all(loss[6:8] == 0) and torch.all(g[6:8] == 0)
    assert _same(loss, loss_t) or rel_err(loss.nan_to_num(), loss_t.nan_to_num()) <= 1e-5
    assert rel_err(g.nan_to_num(), g_t.nan_to_num()) <= 1e-5


def test_masked_teacher_entry_and_student_entry():
    """-inf is a mask: a selected class the student masks while the teacher keeps mass
    gives forward KL = +inf (the exact value) and a finite gradient; reverse KL and jsd
    stay finite, with the oracle's loss (whose autograd gradient is NaN there: 0·log 0)
    and the torch path's gradient."""
    s, idx, vals, y = _inputs(6, 19, 4, values="logprobs", pad_frac=0.0, ignore_frac=0.0,
                              std=5.0, teacher_top=False)
    s[1, idx[1, 2]] = -math.inf
    for tail in ("renormalize", "bucket"):
        for divergence, beta in DIVS:
            kw = dict(values="logprobs", tail=tail, divergence=divergence, beta=beta,
                      reduction="none")
            loss, g = _triton(s, idx, vals, y, **kw)
            _, g_t = _run(topk_kd_loss, s, idx, vals, y, backend="torch", **kw)
            assert torch.isfinite(g).all() and rel_err(g, g_t) <= 1e-12
            assert g[1].abs().max() > 0
            if divergence == "forward_kl":
                assert loss[1] == math.inf and torch.isfinite(loss[[0, 2, 3, 4, 5]]).all()
                continue
            ref = topk_kd_loss_ref(s, idx, vals, y, **kw)
            assert torch.isfinite(loss).all() and g[1, idx[1, 2]] == 0
            assert rel_err(loss, ref) <= 1e-7


def test_out_of_range_index_makes_the_row_nan():
    """Indices are range-checked on CPU tensors only: on a GPU an index >= V or < -1 reads
    nothing, and its row's loss and gradient are NaN (the other rows unchanged)."""
    s, idx, vals, y = _inputs(4, 13, 3, values="logprobs", pad_frac=0.0, ignore_frac=0.0,
                              teacher_top=False)
    bad_idx = idx.clone()
    bad_idx[1, 0] = 13
    bad_idx[2, 2] = -7
    for tail in ("renormalize", "bucket"):
        loss, g = _launch(topk_triton.topk_kd_fwd_triton, s, bad_idx, vals, y, tail=tail)
        ref, g_ref = _launch(topk_triton.topk_kd_fwd_triton, s, idx, vals, y, tail=tail)
        assert loss[1:3].isnan().all() and g[1:3].isnan().all()
        keep = [0, 3]
        assert torch.equal(loss[keep], ref[keep]) and torch.equal(g[keep], g_ref[keep])


def test_class_bitmap():
    idx = torch.tensor([[31, 0, -1, 63, 32], [-1, -1, -1, -1, -1], [5, 40, 31, 30, 64]])
    bits = topk_triton.class_bitmap(idx, 70)
    assert bits.dtype == torch.int32 and bits.shape == (3, 3)
    words = bits.view(torch.uint8).reshape(3, 3, 4)
    got = [[c for c in range(70) if (words[r, c // 32, (c % 32) // 8] >> (c % 8)) & 1]
           for r in range(3)]
    assert got == [[0, 31, 32, 63], [], [5, 30, 31, 40, 64]]


# ------------------------------------------- hard label, soft weight and TAID (§5)

MIXES = [
    ("taid", dict(taid_t=0.3)),
    ("taid", dict(taid_t=0.7, hard_label_weight=1.3)),
    ("forward_kl", dict(hard_label_weight=0.7, soft_label_weight=0.4)),
    ("jsd", dict(beta=0.3, hard_label_weight=0.5, soft_label_weight=0.0)),
]


def _finite_labels(s, y):
    """Labels moved off classes the student masks (their cross-entropy is +inf)."""
    off = (y != IGNORE) & torch.isinf(s.gather(1, y.clamp_min(0)[:, None])[:, 0])
    return torch.where(off, s.argmax(1), y)


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, kw_mix", MIXES)
def test_hard_label_and_taid_match_oracle_and_torch(values, tail, divergence, kw_mix):
    """float32 at std 30 (with a masked vocabulary) against the oracle on the same inputs;
    float64 at std 4 against the oracle's digits and the torch path's; the kernel ran."""
    tau = 1.0 if values == "logprobs" else 1.7
    kw = dict(values=values, tail=tail, divergence=divergence, temperature=tau,
              reduction="none", **kw_mix)
    s, idx, vals, y = _inputs(8, 37, 7, values=values, teacher_top=False, masked=0.1)
    y = _finite_labels(s, y)
    up = torch.randn(8, dtype=torch.float64) * 3
    with recording() as ran:
        loss, g = _triton(s, idx, vals, y, up, torch.float32, **kw)
    assert ("topk_kd_loss", "triton") in ran
    ref, g_ref = _run(topk_kd_loss_ref, s.float().double(), idx, vals.float().double(), y, up,
                      **kw)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-5
    ign = y == IGNORE
    assert torch.all(loss[ign] == 0) and torch.all(g[ign] == 0)
    s, idx, vals, y = _inputs(8, 29, 6, values=values, std=4.0, teacher_top=False)
    kw["reduction"] = "sum"  # (an upstream gradient would be rounded to the float32 loss's)
    loss, g = _triton(s, idx, vals, y, **kw)
    ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **kw)
    _, g_t = _run(topk_kd_loss, s, idx, vals, y, backend="torch", **kw)
    assert rel_err(loss, ref) <= 1e-7
    assert rel_err(g, g_ref) <= 1e-12 and rel_err(g, g_t) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_label_keeps_its_gradient_at_std30(dtype):
    """The label is the row's argmax and softmax(s)_y rounds to 1: its entry is
    softmax_y − 1 = −Σ_{v≠y} softmax_v, to 1e-5 (float32) of that tiny value, not 1 − 1."""
    s, idx, vals, _ = _inputs(8, 23, 4, values="logprobs", teacher_top=False)
    y = s.argmax(1)
    kw = dict(divergence="none", tail="renormalize", soft_w=0.0, hard_w=1.0, scale=1.0)
    _, g = _launch(topk_triton.topk_kd_fwd_triton, s.to(dtype), idx, vals.to(dtype), y, **kw)
    p = torch.softmax(s.to(dtype).double(), 1)
    want = -p.scatter(1, y[:, None], 0.0).sum(1)  # −Σ_{v≠y} p_v, summed directly
    got = g.gather(1, y[:, None])[:, 0].double()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.all((got - want).abs() <= tol * want.abs()), (got, want)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_hard_label_nonfinite_alias_and_out_of_range_label(tail):
    """With the hard label the whole row is read: a NaN outside the entries makes the row
    NaN; a label on a masked class gives +inf and a finite gradient; a label out of
    [0, V) (unchecked on a GPU) a NaN row; the gradient over the logits (the fused loss's
    buffer) gives the same bits; as the torch path."""
    s, idx, vals, y = _inputs(8, 29, 5, values="logprobs", pad_frac=0.0, ignore_frac=0.0,
                              teacher_top=False)
    s, vals = s.float(), vals.float()
    unsel = [c for c in range(29) if c not in idx[0].tolist()][0]
    s[0, unsel] = math.nan
    s[1, y[1]] = -math.inf
    idx[1] = torch.where(idx[1] == y[1], -1, idx[1])
    y[2] = 29
    s[3] = math.nan
    y[3] = IGNORE
    kw = dict(divergence="taid", beta=0.4, tail=tail, soft_w=0.8, hard_w=1.5)
    fn = topk_triton.topk_kd_fwd_triton
    loss, g = _launch(fn, s, idx, vals, y, **kw)
    loss_a, g_a = _launch(fn, s, idx, vals, y, alias=True, **kw)
    loss_t, g_t = _launch(topk_kd_fwd_torch, s, idx, vals, y, **kw)
    assert _same(loss, loss_a) and _same(g, g_a)
    assert loss[0].isnan() and g[0].isnan().all() and loss[2].isnan() and g[2].isnan().all()
    assert loss[1] == math.inf and g[1].isfinite().all() and g[1].abs().max() > 0
    assert loss[3] == 0 and torch.all(g[3] == 0)
    assert _same(loss.isnan(), loss_t.isnan()) and torch.equal(g.isnan(), g_t.isnan())
    ok = [4, 5, 6, 7]
    assert rel_err(loss[ok], loss_t[ok]) <= 1e-5 and rel_err(g[ok], g_t[ok]) <= 1e-5
