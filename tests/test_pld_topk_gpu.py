"""plackett_luce_loss and topk_kd_loss with backend="cuda" (csrc/pld.cu, csrc/topk_kd.cu).
GPU only.

Small vocabularies against the float64 oracles (reference.py); real vocabularies (32000,
151936, 262144, and 300000 for the top-k kernel's bitmap windows) against the exact torch
backend on the same GPU, which the CPU tests check against the oracles. Covered: every
divergence and tail mode, values as logits or log-probabilities, padding, top_k from 1 to V
(shared-memory and global scratch, several scan tiles), teacher ties (also ±0.0) across the
top_k cut, −inf masks, ignored rows, logits of std 30, fp32/bf16/fp16, unaligned rows,
int32 labels and indices, the gradient written over the logits, the non-finite policy,
N·V > 2³¹, and the kernels' names in the profiler. The first call builds the extension
just in time (a minute or two; docs/cuda.md).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_launched, rel_err, requires_gpu

from kdkernels import BackendUnavailableError, plackett_luce_loss, topk_kd_loss
from kdkernels.pld.reference import plackett_luce_loss_ref
from kdkernels.topk.reference import topk_kd_loss_ref

pytestmark = [requires_gpu, pytest.mark.gpu]

IGNORE = -100
MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
REAL_V = [32000, 151936, 262144]


def run(fn, s, *args, go=None, **kw):
    """(loss, gradient of Σ go·loss w.r.t. s) with s a fresh leaf."""
    x = s.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    return out.detach(), x.grad


def assert_close(x, ref, dtype, tol=1e-4):
    """float32: norm-wise relative error <= tol; fp16/bf16 (the gradient rounded once to
    dtype, on both sides): elementwise within 2 ulp of dtype plus tol of the largest."""
    assert torch.equal(torch.isnan(x), torch.isnan(ref))
    x, ref = x.double().nan_to_num(nan=0.0), ref.double().nan_to_num(nan=0.0)
    if dtype == torch.float32:
        assert rel_err(x, ref) <= tol, rel_err(x, ref)
        return
    eps = torch.finfo(dtype).eps
    bound = 2 * eps * ref.abs() + tol * ref.abs().max()
    worst = ((x - ref).abs() - bound).max().item()
    assert worst <= 0, worst


def use_plan(monkeypatch, plan):
    monkeypatch.setenv("KDKERNELS_CUDA_TOPK_KD_PLAN", plan)


# ------------------------------------------------------------------------------ PLD


def pld_case(n, v, dtype=torch.float32, std=30.0, ties=False, mask=0.05, ignore=0.3,
             labels=True, seed=0):
    """Student and teacher logits (−inf in both at masked classes), labels with ignored rows."""
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + v)
    s = torch.randn(n, v, device="cuda", generator=g) * std
    if ties:  # a few distinct values: ties everywhere, also across the top_k cut, and ±0.0
        t = torch.randint(-3, 4, (n, v), device="cuda", generator=g).float() * (std / 3)
        t = torch.where((t == 0) & (torch.rand(n, v, device="cuda", generator=g) < 0.5), -0.0, t)
    else:
        t = torch.randn(n, v, device="cuda", generator=g) * std
    m = torch.rand(n, v, device="cuda", generator=g) < mask
    m[:, 0] = False
    s[m] = float("-inf")
    t[m] = float("-inf")
    y = None
    if labels:
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        y = torch.where(m.gather(1, y[:, None])[:, 0], 0, y)
        y[torch.rand(n, device="cuda", generator=g) < ignore] = IGNORE
    return s.to(dtype), t.to(dtype), y


@pytest.mark.parametrize("v", [1, 2, 37, 130])
@pytest.mark.parametrize("top_k", [None, 1, 5, -1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("labels", [True, False])
def test_pld_matches_float64_oracle(v, top_k, ties, labels):
    k = None if top_k is None else (v - 1 if top_k == -1 else top_k)
    if k is not None and not 1 <= k <= v:
        pytest.skip("top_k out of range for this vocabulary")
    n = 8
    s, t, y = pld_case(n, v, ties=ties, labels=labels)
    go = torch.randn(n, device="cuda") * 3
    kw = dict(temperature=0.7 if ties else 1.0, top_k=k, reduction="none")
    out = []
    assert_launched(lambda: out.extend(run(plackett_luce_loss, s, t, y, go=go, backend="cuda",
                                           **kw)),
                    "kdk::pld_fwd_kernel", absent=("_pld",))
    loss, grad = out
    yc = y.cpu() if y is not None else None
    ref, ref_grad = run(plackett_luce_loss_ref, s.cpu().double(), t.cpu().double(), yc,
                        go=go.cpu().double(), **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss.cpu(), ref) <= 1e-4
    assert rel_err(grad.cpu(), ref_grad) <= 1e-4
    if y is not None:
        ign = y == IGNORE
        assert (loss[ign] == 0).all() and (grad[ign] == 0).all()


@pytest.mark.parametrize("v", REAL_V)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 64, 256, 5000, None])
def test_pld_real_vocab_matches_torch(v, dtype, top_k):
    n = 6
    s, t, y = pld_case(n, v, dtype, ties=(top_k == 64))
    go = torch.randn(n, device="cuda")
    kw = dict(temperature=1.5, top_k=top_k, reduction="none")
    loss, grad = run(plackett_luce_loss, s, t, y, go=go, backend="cuda", **kw)
    ref, ref_grad = run(plackett_luce_loss, s, t, y, go=go, backend="torch", **kw)
    assert grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= 1e-4
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("top_k", [1023, 1024, 1025, 4096, 4097, 6000])
@pytest.mark.parametrize("ties", [False, True])
def test_pld_scan_tiles_and_global_scratch(top_k, ties):
    # K around the scan tile (1024) and the shared-memory scratch limit (4096)
    n, v = 5, 6000
    s, t, y = pld_case(n, v, ties=ties, mask=0.2)
    kw = dict(top_k=top_k, reduction="sum")
    loss, grad = run(plackett_luce_loss, s, t, y, backend="cuda", **kw)
    ref, ref_grad = run(plackett_luce_loss, s, t, y, backend="torch", **kw)
    assert rel_err(loss, ref) <= 1e-4
    assert rel_err(grad, ref_grad) <= 1e-4


def test_pld_chunks_of_rows(monkeypatch):
    import kdkernels.pld.cuda as pld_cuda

    monkeypatch.setattr(pld_cuda, "_CHUNK_BYTES", 1)  # one row per launch (ranking + kernel)
    s, t, y = pld_case(7, 500)
    for top_k in (3, 300, 500):  # topk_select, the sort, K = V
        loss, grad = run(plackett_luce_loss, s, t, y, backend="cuda", top_k=top_k,
                         reduction="none")
        ref, ref_grad = run(plackett_luce_loss, s, t, y, backend="torch", top_k=top_k,
                            reduction="none")
        assert rel_err(loss, ref) <= 1e-4 and rel_err(grad, ref_grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pld_low_precision(dtype):
    s, t, y = pld_case(9, 2000, dtype, std=8.0, ties=True)
    kw = dict(top_k=40, reduction="mean")
    loss, grad = run(plackett_luce_loss, s, t, y, backend="cuda", **kw)
    ref, ref_grad = run(plackett_luce_loss, s, t, y, backend="torch", **kw)
    assert grad.dtype == dtype
    assert rel_err(loss, ref) <= 1e-4
    assert_close(grad, ref_grad, dtype)


def test_pld_unaligned_rows_int32_labels_no_grad():
    n, v = 6, 1001
    s, t, y = pld_case(n, v + 3, mask=0.0)
    s, t = s[:, 1:v + 1], t[:, 3:v + 3]  # row strides v + 3, unaligned starts
    y = y.clamp_max(v - 1).int()
    kw = dict(top_k=17, reduction="none")
    loss, grad = run(plackett_luce_loss, s, t, y, backend="cuda", **kw)
    ref, ref_grad = run(plackett_luce_loss, s, t, y.long(), backend="torch", **kw)
    assert rel_err(loss, ref) <= 1e-4 and rel_err(grad, ref_grad) <= 1e-4
    with torch.no_grad():
        nograd = plackett_luce_loss(s, t, y, backend="cuda", **kw)
    assert torch.equal(nograd, loss)


def test_pld_nonfinite_policy():
    n, v = 7, 300
    s, t, y = pld_case(n, v, ignore=0.0, mask=0.0)
    s[0, 5] = float("nan")
    t[1, 7] = float("inf")
    s[2] = float("-inf")
    t[3] = float("-inf")
    y[4] = v  # out of range: GPU labels are not range-checked, the row is NaN
    s[5, 9] = float("nan")
    y[5] = IGNORE  # ignored: whatever it holds, loss 0 and gradient 0
    loss, grad = run(plackett_luce_loss, s, t, y, backend="cuda", top_k=10, reduction="none")
    assert torch.isnan(loss[:5]).all() and torch.isnan(grad[:5]).all()
    assert loss[5] == 0 and (grad[5] == 0).all()
    ref, ref_grad = run(plackett_luce_loss, s[6:], t[6:], y[6:], backend="torch", top_k=10,
                        reduction="none")
    assert rel_err(loss[6:], ref) <= 1e-4 and rel_err(grad[6:], ref_grad) <= 1e-4


def test_pld_refuses_float64_and_mixed_dtypes():
    s, t, y = pld_case(3, 50)
    with pytest.raises((BackendUnavailableError, TypeError), match="float64"):
        plackett_luce_loss(s.double(), t.double(), y, backend="cuda")
    with pytest.raises((BackendUnavailableError, TypeError), match="one dtype"):
        plackett_luce_loss(s, t.bfloat16(), y, backend="cuda")


def test_pld_rows_past_2_pow_31_elements():
    n, v = 8200, 262144  # N·V > 2³¹: int64 offsets in every pass
    g = torch.Generator(device="cuda").manual_seed(3)
    s = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    x = s.requires_grad_(True)
    loss = plackett_luce_loss(x, t, top_k=8, reduction="none", backend="cuda")
    loss.backward(torch.ones_like(loss))
    tail = slice(n - 3, n)
    ref, ref_grad = run(plackett_luce_loss, s[tail].detach(), t[tail], top_k=8,
                        reduction="none", backend="torch")
    assert rel_err(loss[tail].detach(), ref) <= 1e-4
    assert_close(x.grad[tail], ref_grad, torch.bfloat16)


# ----------------------------------------------------------------------- top-k KD


def topk_case(n, v, k, dtype=torch.float32, values="logits", s_std=30.0, t_std=3.0,
              pad=0.2, ignore=0.3, teacher_top=True, mask=0.05, seed=0):
    """Student logits (−inf at some classes outside the teacher's entries), k unique indices
    per row (−1 = padding), the teacher's logits or log-probs there, labels to ignore rows."""
    g = torch.Generator(device="cuda").manual_seed(seed * 7919 + v * 31 + k)
    s = torch.randn(n, v, device="cuda", generator=g) * s_std
    t = torch.randn(n, v, device="cuda", generator=g) * t_std
    if teacher_top:
        idx = t.topk(k, -1).indices
    else:  # any k classes but the teacher's argmax (so the tail keeps mass), any order
        key = torch.rand(n, v, device="cuda", generator=g)
        key.scatter_(-1, t.argmax(-1, keepdim=True), 2.0)
        idx = key.argsort(-1)[:, :k]
    vals = t.gather(-1, idx) if values == "logits" else t.log_softmax(-1).gather(-1, idx)
    sel = torch.zeros(n, v, dtype=torch.bool, device="cuda").scatter_(-1, idx, True)
    m = (torch.rand(n, v, device="cuda", generator=g) < mask) & ~sel
    s[m] = float("-inf")
    padm = torch.rand(n, k, device="cuda", generator=g) < pad
    idx = idx.masked_fill(padm, -1)
    vals = vals.masked_fill(padm, 123.0)  # ignored at padding
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < ignore] = IGNORE
    return s.to(dtype), idx, vals.to(dtype), y


def topk_kw(values, tail, divergence, beta, reduction="none"):
    return dict(values=values, tail=tail, divergence=divergence, beta=beta,
                temperature=1.0 if values == "logprobs" else 1.7, reduction=reduction)


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", DIVS)
@pytest.mark.parametrize("v, k", [(1, 1), (5, 2), (37, 7), (37, 37), (300, 40)])
@pytest.mark.parametrize("plan", ["auto", "stream"])
def test_topk_kd_matches_float64_oracle(monkeypatch, values, tail, divergence, beta, v, k,
                                        plan):
    # moderate spreads: the float64 oracle (probabilities through autograd) is exact here
    use_plan(monkeypatch, plan)
    n = 8
    s, idx, vals, y = topk_case(n, v, k, values=values, s_std=3.0, t_std=2.0,
                                teacher_top=tail == "renormalize")
    go = torch.randn(n, device="cuda") * 3
    kw = topk_kw(values, tail, divergence, beta)
    out = []
    assert_launched(lambda: out.extend(run(topk_kd_loss, s, idx, vals, y, go=go, backend="cuda",
                                           **kw)),
                    "kdk::topk_kd_kernel", absent=("_topk_kd",))
    loss, grad = out
    ref, ref_grad = run(topk_kd_loss_ref, s.cpu().double(), idx.cpu(), vals.cpu().double(),
                        y.cpu(), go=go.cpu().double(), **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss.cpu(), ref) <= 2e-5
    assert rel_err(grad.cpu(), ref_grad) <= 5e-5  # float32; reverse KL's q(log q − log p − D)
    ign = y == IGNORE
    assert (loss[ign] == 0).all() and (grad[ign] == 0).all()
    if tail == "renormalize":  # only the selected classes get a gradient
        hit = torch.zeros_like(grad, dtype=torch.bool).scatter_(-1, idx.clamp_min(0), idx >= 0)
        assert (grad[~hit] == 0).all()


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", DIVS[:3])
@pytest.mark.parametrize("k", [1, 9, 1500, 3000])
@pytest.mark.parametrize("plan", ["auto", "stream", "smem"])
def test_topk_kd_std30_matches_torch(monkeypatch, values, tail, divergence, beta, k, plan):
    # std 30 on both sides; k > 1024 re-reads the entry tiles in every pass
    use_plan(monkeypatch, plan)
    n, v = 10, 3000
    s, idx, vals, y = topk_case(n, v, k, values=values, t_std=30.0, pad=0.1,
                                teacher_top=tail == "renormalize")
    go = torch.randn(n, device="cuda")
    kw = topk_kw(values, tail, divergence, beta)
    loss, grad = run(topk_kd_loss, s, idx, vals, y, go=go, backend="cuda", **kw)
    ref, ref_grad = run(topk_kd_loss, s, idx, vals, y, go=go, backend="torch", **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= 1e-4
    assert rel_err(grad, ref_grad) <= 1e-4


@pytest.mark.parametrize("v", REAL_V + [300000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", DIVS[:3])
@pytest.mark.parametrize("k", [64, 2000])
def test_topk_kd_real_vocab_matches_torch(v, dtype, values, tail, divergence, beta, k):
    n = 6
    s, idx, vals, y = topk_case(n, v, k, dtype, values=values, t_std=5.0,
                                teacher_top=tail == "renormalize")
    go = torch.randn(n, device="cuda")
    kw = topk_kw(values, tail, divergence, beta)
    loss, grad = run(topk_kd_loss, s, idx, vals, y, go=go, backend="cuda", **kw)
    ref, ref_grad = run(topk_kd_loss, s, idx, vals, y, go=go, backend="torch", **kw)
    assert grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= 1e-4
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_kd_plans(dtype):
    from kdkernels.topk.cuda import topk_kd_plan

    # a bf16 row of 32000 (62.5 KiB) fits beside a second block on sm_80 and sm_90; fp32 not
    small = topk_kd_plan(32000, 64, dtype, bucket=True)
    assert small["path"] == ("smem" if dtype == torch.bfloat16 else "stream")
    assert topk_kd_plan(32000, 64, dtype, bucket=False)["path"] == "stream"
    big = topk_kd_plan(300000, 5000, dtype, bucket=True)
    assert big["path"] == "stream" and big["bitmap_words"] == 8192 and big["entries"] == 1024


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("plan", ["stream", "smem"])
@pytest.mark.parametrize("k", [16, 1500])
def test_topk_kd_gradient_over_the_logits(monkeypatch, tail, plan, k):
    # the fused linear loss passes its logits buffer as the gradient buffer
    from kdkernels.topk.cuda import topk_kd_fwd_cuda

    use_plan(monkeypatch, plan)
    n, v = 6, 4000
    s, idx, vals, y = topk_case(n, v, k, torch.bfloat16, values="logprobs", pad=0.1)
    scale = torch.tensor(0.3, device="cuda")
    args = (y, idx, vals, 3, 0.4, 1.0, True, tail == "bucket", IGNORE)
    loss_a, loss_b = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    grad_a = torch.empty_like(s)
    topk_kd_fwd_cuda(s, scale, loss_a, grad_a, *args)
    buf = s.clone()
    topk_kd_fwd_cuda(buf, scale, loss_b, buf, *args)
    assert torch.equal(loss_a, loss_b)
    assert torch.equal(grad_a, buf)


def test_topk_kd_unaligned_rows_int32_indices_fp16_values():
    n, v, k = 6, 1003, 20
    s, idx, vals, y = topk_case(n, v + 5, k, values="logprobs")
    s = s[:, 2:v + 2]  # unaligned rows of stride v + 5
    idx = torch.where(idx >= v, -1, idx).int()
    kw = topk_kw("logprobs", "bucket", "jsd", 0.3)
    loss, grad = run(topk_kd_loss, s, idx, vals.half(), y, backend="cuda", **kw)
    ref, ref_grad = run(topk_kd_loss, s, idx.long(), vals.half(), y, backend="torch", **kw)
    assert rel_err(loss, ref) <= 1e-4 and rel_err(grad, ref_grad) <= 1e-4
    with torch.no_grad():
        nograd = topk_kd_loss(s, idx, vals.half(), y, backend="cuda", **kw)
    assert torch.equal(nograd, loss)


def test_topk_kd_nonfinite_policy():
    n, v, k = 8, 500, 6
    s, idx, vals, y = topk_case(n, v, k, values="logprobs", ignore=0.0, pad=0.0, mask=0.0)
    kw = topk_kw("logprobs", "bucket", "forward_kl", 0.5)
    bad_s = s.clone()
    unsel = int((torch.arange(v, device="cuda")[None] != idx[0][:, None]).all(0).nonzero()[0])
    bad_s[0, unsel] = float("nan")  # bucket reads the whole row: bad
    vals = vals.clone()
    vals[1, 2] = float("nan")  # a NaN teacher value: bad
    bad_s[2] = float("-inf")  # no finite student logit: bad
    idx = idx.clone()
    idx[3, 1] = idx[3, 0]  # a repeated class (checked on CPU tensors only): bad
    idx[4, 2] = v  # out of range (checked on CPU tensors only): bad
    bad_s[5, 0] = float("inf")
    y[5] = IGNORE  # ignored: loss 0, gradient 0
    loss, grad = run(topk_kd_loss, bad_s, idx, vals, y, backend="cuda", **kw)
    assert torch.isnan(loss[:5]).all() and torch.isnan(grad[:5]).all()
    assert loss[5] == 0 and (grad[5] == 0).all()
    ref, ref_grad = run(topk_kd_loss, bad_s[6:], idx[6:], vals[6:], y[6:], backend="torch", **kw)
    assert rel_err(loss[6:], ref) <= 1e-4 and rel_err(grad[6:], ref_grad) <= 1e-4
    # renormalize reads only the selected student logits: a NaN elsewhere changes nothing
    kw = topk_kw("logprobs", "renormalize", "forward_kl", 0.5)
    loss, _ = run(topk_kd_loss, bad_s[:1], idx[:1], vals[:1], y[:1], backend="cuda", **kw)
    assert torch.isfinite(loss).all()


def test_topk_kd_refuses_float64():
    s, idx, vals, y = topk_case(3, 50, 5)
    with pytest.raises(BackendUnavailableError, match="float64"):
        topk_kd_loss(s.double(), idx, vals, y, backend="cuda")


def test_topk_kd_rows_past_2_pow_31_elements():
    n, v, k = 8200, 262144, 32  # N·V > 2³¹: int64 offsets in every pass
    g = torch.Generator(device="cuda").manual_seed(5)
    s = torch.randn(n, v, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.randn(n, k, device="cuda", generator=g).log_softmax(-1) - 2.0
    idx = torch.randint(0, v, (n, k), device="cuda", generator=g)
    idx = torch.where(torch.arange(k, device="cuda") == 0, idx, -1)  # one class per row
    kw = dict(values="logprobs", tail="bucket", reduction="none")
    x = s.requires_grad_(True)
    loss = topk_kd_loss(x, idx, t, backend="cuda", **kw)
    loss.backward(torch.ones_like(loss))
    tail = slice(n - 3, n)
    ref, ref_grad = run(topk_kd_loss, s[tail].detach(), idx[tail], t[tail], backend="torch",
                        **kw)
    assert rel_err(loss[tail].detach(), ref) <= 1e-4
    assert_close(x.grad[tail], ref_grad, torch.bfloat16)
