"""Coming from Liger-Kernel: kdkernels with the mapped keywords gives Liger's numbers.

Liger's losses are GPU (Triton) kernels, so each is transcribed here as plain PyTorch from
its definition in liger-kernel 0.8.5 (the chunked loss's per-chunk computation, the
Triton kernels' per-element formulas and reductions) and evaluated in float64: the oracle.
kdkernels runs in float32 on the same values.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_err

from kdkernels import fused_linear_kd_loss, kd_loss
from kdkernels._core.backend import recording
from kdkernels.integrations.liger import LigerFusedLinearJSD, LigerFusedLinearJSDLoss
from kdkernels.kd.reference import kd_loss_ref

# --- Liger's losses, transcribed ----------------------------------------------------------


def liger_jsd_terms(log_q, log_p, beta):
    """Per-element generalized JSD in Liger's convention: m = βp + (1−β)q (p teacher,
    q student), β·p·(log p − log m) + (1−β)·q·(log q − log m); β = 0: p(log p − log q),
    β = 1: q(log q − log p)."""
    if beta == 0:
        return log_p.exp() * (log_p - log_q)
    if beta == 1:
        return log_q.exp() * (log_q - log_p)
    log_m = torch.logsumexp(torch.stack([log_q + math.log(1 - beta),
                                         log_p + math.log(beta)]), 0)
    return beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)


def liger_chunked_jsd(x_s, w_s, x_t, w_t, target, b_s=None, b_t=None, weight_hard_loss=0.5,
                      weight_soft_loss=0.5, beta=0.5, ignore_index=-100, temperature=1.0,
                      chunk_size=1024):
    """chunked_loss.LigerFusedLinearJSDLoss: torch.chunk into max(1, N // chunk_size)
    chunks; per chunk the hard loss Σ CE(untempered S) and the soft loss Σ_valid rows of
    Σ_v JSD terms of S/τ, T/τ, each divided by the valid count of the whole batch
    (clamped to 1); student logits zero-padded up to the teacher's vocabulary.
    Returns (loss, soft, hard)."""
    n_chunks = max(1, x_s.shape[0] // chunk_size)
    n_valid = (target != ignore_index).sum().clamp_min(1)
    loss = soft_acc = hard_acc = 0.0
    for xs, xt, y in zip(x_s.chunk(n_chunks), x_t.chunk(n_chunks), target.chunk(n_chunks)):
        s = xs @ w_s.t() + (0 if b_s is None else b_s)
        with torch.no_grad():
            t = xt @ w_t.t() + (0 if b_t is None else b_t)
        hard = F.nll_loss(F.log_softmax(s, -1), y, reduction="sum",
                          ignore_index=ignore_index) / n_valid
        s, t = s / temperature, t / temperature
        if t.shape[-1] > s.shape[-1]:
            s = torch.cat([s, s.new_zeros(s.shape[0], t.shape[-1] - s.shape[-1])], -1)
        rows = liger_jsd_terms(F.log_softmax(s, -1), F.log_softmax(t, -1), beta).sum(-1)
        soft = rows.masked_fill(y == ignore_index, 0.0).sum() / n_valid
        loss = loss + weight_hard_loss * hard + weight_soft_loss * soft
        soft_acc, hard_acc = soft_acc + soft, hard_acc + hard
    return loss, soft_acc, hard_acc


def liger_fused_linear_jsd(x_s, w_s, x_t, w_t, shift_labels=None, jsd_beta=0.5,
                           ignore_index=-100, temperature=1.0):
    """transformers.LigerFusedLinearJSD: JSD terms of (x W)/τ summed, ignored rows 0,
    divided by the number of non-ignored rows (all rows without labels)."""
    s, t = (x_s @ w_s.t()) / temperature, ((x_t @ w_t.t()) / temperature).detach()
    terms = liger_jsd_terms(F.log_softmax(s, -1), F.log_softmax(t, -1), jsd_beta)
    if shift_labels is None:
        return terms.sum() / s.shape[0]
    keep = shift_labels != ignore_index
    return terms[keep].sum() / keep.sum()


def liger_kldiv(y_pred, y_true, reduction="batchmean", log_target=False, eps=1e-10):
    """LigerKLDIVLoss on [BT, V]: y_true·(log max(y_true, eps) − y_pred), or
    exp(y_true)·(y_true − y_pred) with log_target; batchmean /BT, mean /(BT·V)."""
    if log_target:
        terms = y_true.exp() * (y_true - y_pred)
    else:
        terms = y_true * (torch.log(torch.clamp_min(y_true, eps)) - y_pred)
    bt, v = y_pred.shape
    return {"none": terms, "sum": terms.sum(), "batchmean": terms.sum() / bt,
            "mean": terms.sum() / (bt * v)}[reduction]


def liger_tvd(p, q, shift_labels=None, reduction="batchmean", ignore_index=-100):
    """LigerTVDLoss on [BT, V]: ½|p − q| (gradient to p only), ignored rows 0; batchmean /
    non-ignored rows, mean / (non-ignored rows · V)."""
    terms = 0.5 * (p - q.detach()).abs()
    n = p.shape[0]
    if shift_labels is not None:
        keep = shift_labels != ignore_index
        terms = terms * keep[:, None]
        n = keep.sum()
    return {"none": terms, "sum": terms.sum(), "batchmean": terms.sum() / n,
            "mean": terms.sum() / (n * p.shape[1])}[reduction]


# --- inputs -------------------------------------------------------------------------------


def _heads(n=13, hs=8, ht=12, vs=37, vt=None, bias=True):
    vt = vs if vt is None else vt
    g = torch.Generator().manual_seed(11)
    r = lambda *shape, std=1.0: torch.randn(*shape, generator=g) * std
    student = [r(n, hs, std=4.0), r(vs, hs), r(vs, std=3.0) if bias else None]
    teacher = [r(n, ht, std=4.0), r(vt, ht), r(vt, std=3.0) if bias else None]
    labels = torch.randint(0, vs, (n,), generator=g)
    labels[::4] = -100
    return student, teacher, labels


def _run(fn, student, dtype):
    """fn(*student) on fresh leaves of `dtype`; (outputs, grads of the student tensors)."""
    leaves = [None if x is None else x.to(dtype).requires_grad_(True) for x in student]
    out = fn(*leaves)
    first = out[0] if isinstance(out, tuple) else out
    first.sum().backward()
    return out, [None if x is None else x.grad for x in leaves]


def _close(ours, ref, what=""):
    ours, ref = ours.double(), ref.double()
    tol = 1e-6 + 2e-6 * ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= tol, f"{what}: {ours} vs {ref}"


def _grads_close(ours, ref):
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == torch.float32
            assert rel_err(a, b) < 1e-5


# --- the fused linear JSD modules ---------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("temperature, w_hard, w_soft", [
    (1.0, 0.5, 0.5), (2.0, 0.0, 1.0), (0.5, 1.0, 0.0), (3.0, 0.1, 0.9)])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_jsd_module_matches_liger(beta, temperature, w_hard, w_soft, bias):
    (x_s, w_s, b_s), (x_t, w_t, b_t), y = _heads(bias=bias)
    cfg = dict(weight_hard_loss=w_hard, weight_soft_loss=w_soft, beta=beta,
               temperature=temperature, chunk_size=4)
    ref, ref_g = _run(lambda a, b, c: liger_chunked_jsd(
        a, b, x_t.double(), w_t.double(), y, c, None if b_t is None else b_t.double(),
        **cfg)[0], (x_s, w_s, b_s), torch.float64)
    mod = LigerFusedLinearJSDLoss(**cfg)
    with recording() as ran:
        ours, ours_g = _run(lambda a, b, c: mod(a, b, x_t, w_t, y, c, b_t),
                            (x_s, w_s, b_s), torch.float32)
    assert ("fused_linear_kd_loss", "torch") in ran
    _close(ours, ref)
    _grads_close(ours_g, ref_g)


def test_chunked_jsd_module_other_ignore_index_and_soft_hard_tuple():
    (x_s, w_s, b_s), (x_t, w_t, b_t), y = _heads()
    y[y == -100] = 42 % w_s.shape[0]
    cfg = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.4, ignore_index=5,
               temperature=2.0)
    y[1] = 5
    ref, ref_g = _run(lambda a, b, c: liger_chunked_jsd(
        a, b, x_t.double(), w_t.double(), y, c, b_t.double(), **cfg),
        (x_s, w_s, b_s), torch.float64)
    mod = LigerFusedLinearJSDLoss(**cfg, return_soft_hard_loss=True)
    ours, ours_g = _run(lambda a, b, c: mod(a, b, x_t, w_t, y, c, b_t),
                        (x_s, w_s, b_s), torch.float32)
    assert isinstance(ours, tuple) and len(ours) == 3
    for a, b, what in zip(ours, ref, ("loss", "soft", "hard")):
        _close(a, b, what)
    _grads_close(ours_g, ref_g)


def test_chunked_jsd_module_all_ignored():
    (x_s, w_s, b_s), (x_t, w_t, b_t), y = _heads()
    y.fill_(-100)
    ref, _ = _run(lambda a, b, c: liger_chunked_jsd(a, b, x_t.double(), w_t.double(), y, c,
                                                    b_t.double()), (x_s, w_s, b_s),
                  torch.float64)
    ours, g = _run(lambda a, b, c: LigerFusedLinearJSDLoss()(a, b, x_t, w_t, y, c, b_t),
                   (x_s, w_s, b_s), torch.float32)
    assert ours.item() == 0.0 == ref[0].item()
    assert all(torch.count_nonzero(x) == 0 for x in g)


@pytest.mark.filterwarnings("ignore:vocab_mismatch='truncate'")  # 8 of 45 columns: a toy
def test_padded_teacher_vocabulary_uses_the_shared_columns():
    """A teacher head with extra (padding) rows: kdkernels drops them (the shared
    vocabulary), where Liger appends constant-0 student logits; checked against the
    float64 kd oracle on the first V_s columns."""
    (x_s, w_s, b_s), (x_t, w_t, b_t), y = _heads(vs=37, vt=45)
    cfg = dict(weight_hard_loss=0.2, weight_soft_loss=0.8, beta=0.3, temperature=1.5)

    def oracle(a, b, c):
        s = a @ b.t() + c
        t = x_t.double() @ w_t.double().t() + b_t.double()
        return kd_loss_ref(s, t[:, :37], y, divergence="jsd", beta=0.3, temperature=1.5,
                           hard_label_weight=0.2, soft_label_weight=0.8)

    ref, ref_g = _run(oracle, (x_s, w_s, b_s), torch.float64)
    ours, ours_g = _run(lambda a, b, c: LigerFusedLinearJSDLoss(**cfg)(a, b, x_t, w_t, y, c,
                                                                       b_t),
                        (x_s, w_s, b_s), torch.float32)
    _close(ours, ref)
    _grads_close(ours_g, ref_g)
    with pytest.raises(ValueError, match="vocabulary"):  # a larger student: as Liger, refused
        LigerFusedLinearJSDLoss()(x_t, w_t, x_s, w_s, y)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("accum_dtype", [None, torch.float32])
def test_fused_linear_jsd_module_matches_liger(beta, with_labels, accum_dtype):
    (x_s, w_s, _), (x_t, w_t, _), y = _heads(bias=False)
    y = y if with_labels else None
    ref, ref_g = _run(lambda a, b: liger_fused_linear_jsd(
        a, b, x_t.double(), w_t.double(), y, jsd_beta=beta, temperature=1.7),
        (x_s, w_s), torch.float64)
    mod = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.7, accum_dtype=accum_dtype)
    ours, ours_g = _run(lambda a, b: mod(a, b, x_t, w_t, y), (x_s, w_s), torch.float32)
    _close(ours, ref)
    _grads_close(ours_g, ref_g)
    with pytest.raises(ValueError, match="accum_dtype"):
        LigerFusedLinearJSD(accum_dtype=torch.float16)


# --- LigerKLDIVLoss and LigerTVDLoss: kd_loss on the logits -------------------------------


def _logits(n=11, v=53):
    s = torch.randn(n, v) * 10
    t = torch.randn(n, v) * 15
    return s, t


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kldiv_maps_to_forward_kl(reduction, log_target, temperature):
    """LigerKLDIVLoss(reduction, log_target)(log_softmax(s/τ), softmax(t/τ) or its log)
    is kd_loss(s, t, temperature=τ) with batchmean → "mean", mean → normalizer N·V,
    none → its row sums are kd_loss's "none"."""
    s, t = _logits()
    n, v = s.shape
    lt = lambda x: F.log_softmax(x.double() / temperature, -1)
    target = lt(t) if log_target else lt(t).exp()
    rows = (lambda x: x.sum(-1)) if reduction == "none" else (lambda x: x)
    ref, (ref_g,) = _run(lambda a: rows(liger_kldiv(F.log_softmax(a / temperature, -1),
                                                    target, reduction, log_target)),
                         (s,), torch.float64)
    mapped = {"batchmean": dict(reduction="mean"), "sum": dict(reduction="sum"),
              "mean": dict(reduction="mean", normalizer=n * v),
              "none": dict(reduction="none")}[reduction]
    ours, (ours_g,) = _run(lambda a: kd_loss(a, t, temperature=temperature, **mapped),
                           (s,), torch.float32)
    _close(ours, ref)
    assert rel_err(ours_g, ref_g) < 1e-5


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_tvd_maps_to_divergence_tvd(reduction, with_labels):
    """LigerTVDLoss(reduction)(softmax(s/τ), softmax(t/τ), labels) — the student first,
    the argument that gets the gradient — is kd_loss(s, t, labels, divergence="tvd",
    temperature=τ), batchmean → "mean", mean → normalizer (valid rows)·V."""
    s, t = _logits()
    n, v = s.shape
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100
    labels = labels if with_labels else None
    tau = 1.5
    q_t = F.softmax(t.double() / tau, -1)
    per_row = (lambda x: x.sum(-1)) if reduction == "none" else (lambda x: x)
    ref, (ref_g,) = _run(lambda a: per_row(liger_tvd(F.softmax(a / tau, -1), q_t, labels,
                                                     reduction)), (s,), torch.float64)
    rows = n if labels is None else int((labels != -100).sum())
    mapped = {"batchmean": dict(reduction="mean"), "sum": dict(reduction="sum"),
              "mean": dict(reduction="mean", normalizer=rows * v),
              "none": dict(reduction="none")}[reduction]
    ours, (ours_g,) = _run(lambda a: kd_loss(a, t, labels, divergence="tvd", temperature=tau,
                                             **mapped), (s,), torch.float32)
    _close(ours, ref)
    assert rel_err(ours_g, ref_g) < 1e-5


def test_fused_modules_are_fused_linear_kd_loss():
    """The modules add nothing but the keyword mapping."""
    (x_s, w_s, b_s), (x_t, w_t, b_t), y = _heads()
    a = LigerFusedLinearJSDLoss(weight_hard_loss=0.25, weight_soft_loss=0.75, beta=0.6,
                                temperature=2.0)(x_s, w_s, x_t, w_t, y, b_s, b_t)
    b = fused_linear_kd_loss(x_s, w_s, x_t, w_t, y, student_bias=b_s, teacher_bias=b_t,
                             divergence="jsd", beta=0.6, temperature=2.0,
                             hard_label_weight=0.25, soft_label_weight=0.75)
    assert torch.equal(a, b)
