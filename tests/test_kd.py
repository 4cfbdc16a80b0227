"""kd_loss (docs/spec.md §1) against the float64 autograd oracle, on both CPU-runnable backends.

The `triton` backend runs here under TRITON_INTERPRET=1 (set by conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_lowp, grad_ulp, kd_params, rel_err

import kdkernels
from kdkernels import DIVERGENCES, KDLoss, kd_loss
from kdkernels.kd.reference import kd_loss_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
TEMPS = (0.5, 1.0, 2.0)


def make_case(n, v, *, std=30.0, masked=0.1, ignored=0.3, dtype=torch.float32,
              lead=None):
    """Random logits, -inf entries shared by both models, ~30% ignored labels.

    Row spreads cycle through std, std/3, std/10, std/30: the widest rows saturate the
    divergences (their gradients sink below the float64 oracle's own rounding), the
    narrower ones carry gradients the oracle resolves, so relative errors stay meaningful.
    """
    spread = std / torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=torch.float64).repeat(n)[:n, None]
    s = torch.randn(n, v, dtype=torch.float64) * spread
    t = torch.randn(n, v, dtype=torch.float64) * spread + torch.randn(n, 1, dtype=torch.float64)
    if masked and v >= 4:
        mask = torch.rand(n, v) < masked
        mask[:, 0] = False  # every row keeps a finite entry
        s[mask] = -math.inf
        t[mask] = -math.inf
    labels = torch.randint(0, v, (n,))
    if v >= 4 and masked:
        labels = torch.where(torch.isinf(s.gather(1, labels[:, None]))[:, 0], 0, labels)
    labels[torch.rand(n) < ignored] = -100
    if lead is not None:
        s, t, labels = s.reshape(*lead, v), t.reshape(*lead, v), labels.reshape(lead)
    return s.to(dtype), t.to(dtype), labels


def run(fn, s, t, labels, go=None, **kw):
    """Loss and gradient w.r.t. student logits, with upstream gradient `go` (default 1)."""
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, t, labels, **kw)
    out.backward(torch.ones_like(out) if go is None else go)
    return out.detach(), s.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("v", [1, 2, 1271, 4099])
def test_matches_float64_oracle(backend, divergence, v):
    """fp32, std 30, -inf masks, 30% ignored rows, hard-label mixing, random upstream grad."""
    n = 12
    temperature = TEMPS[(v + len(divergence)) % 3]
    s, t, labels = make_case(n, v)
    go = torch.randn(n, dtype=torch.float32) * 3
    kw = dict(divergence=divergence, temperature=temperature, reduction="none",
              hard_label_weight=0.25, soft_label_weight=0.8, **kd_params(divergence))
    loss, grad = run(kd_loss, s, t, labels, go, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize(
    "divergence,extra",
    [("jsd", dict(beta=0.0)), ("jsd", dict(beta=1.0)), ("skew_forward_kl", dict(alpha=0.0)),
     ("skew_reverse_kl", dict(alpha=1.0)), ("taid", dict(taid_t=0.0)),
     ("taid", dict(taid_t=1.0)), ("forward_kl", dict(soft_label_weight=0.0))],
)
def test_endpoints(backend, temperature, divergence, extra):
    """Mixture weights at 0/1 (TRL's jsd endpoints; degenerate skew/TAID) and hard-only loss."""
    s, t, labels = make_case(9, 333, std=5.0)
    kw = dict(divergence=divergence, temperature=temperature, hard_label_weight=0.5, **extra)
    loss, grad = run(kd_loss, s, t, labels, torch.tensor(1.7), backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, torch.tensor(1.7), **kw)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("normalizer", [None, 37, "tensor"])
def test_reductions_and_normalizer(backend, reduction, normalizer):
    s, t, labels = make_case(2 * 3 * 5, 257, lead=(2, 3, 5))
    if normalizer == "tensor":
        normalizer = torch.tensor(11.0)
    go = torch.randn(2, 3, 5) if reduction == "none" else torch.tensor(-0.7)
    kw = dict(divergence="jsd", beta=0.4, temperature=2.0, reduction=reduction,
              normalizer=normalizer)
    if normalizer is not None and reduction != "mean":  # it would be ignored: refused
        with pytest.raises(ValueError, match="normalizer is the denominator"):
            run(kd_loss, s, t, labels, go, backend=backend, **kw)
        return
    loss, grad = run(kd_loss, s, t, labels, go, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert loss.shape == ref.shape
    assert grad.shape == s.shape
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_rows_ignored(backend, divergence):
    s, t, labels = make_case(7, 129)
    labels[:] = -100
    for reduction in ("mean", "sum", "none"):
        loss, grad = run(kd_loss, s, t, labels, backend=backend, divergence=divergence,
                         reduction=reduction, hard_label_weight=0.3,
                         **kd_params(divergence))
        assert torch.isfinite(loss).all() and (loss == 0).all()
        assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_labels_mean_over_rows(backend):
    s, t, _ = make_case(10, 500, masked=0.0)
    loss, grad = run(kd_loss, s, t, None, backend=backend, divergence="reverse_kl")
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), None, divergence="reverse_kl")
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_truncate(backend):
    s, t, labels = make_case(6, 300)
    t_big = torch.cat([t, torch.randn(6, 45) * 30], dim=1)
    kw = dict(divergence="tvd", vocab_mismatch="truncate", hard_label_weight=0.2)
    loss, grad = run(kd_loss, s, t_big, labels, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t_big.double(), labels, **kw)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    s_big = torch.cat([s, torch.randn(6, 45) * 30], dim=1)
    loss, grad = run(kd_loss, s_big, t, labels, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s_big.double(), t.double(), labels, **kw)
    assert grad.shape == s_big.shape and (grad[:, 300:] == 0).all()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_low_precision_within_twice_torch_error(backend, dtype, divergence):
    """|ours − ref64| ≤ 2·|torch at dtype − ref64| + atol (max-abs, loss and gradient)."""
    std = 8.0 if dtype == torch.float16 else 30.0  # fp16 overflows exp-free logits past ~6e4
    s, t, labels = make_case(16, 1031, std=std, dtype=dtype)
    go = torch.randn(16)
    kw = dict(divergence=divergence, temperature=1.5, reduction="none",
              hard_label_weight=0.1, **kd_params(divergence))
    loss, grad = run(kd_loss, s, t, labels, go, backend=backend, **kw)
    assert grad.dtype == dtype and loss.dtype == torch.float32
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    low, low_grad = run(kd_loss_ref, s, t, labels, go.to(dtype), compute_dtype=dtype, **kw)

    assert_lowp(loss, low, ref, dtype)
    assert_lowp(grad, low_grad, ref_grad, dtype, slack=grad_ulp(ref_grad, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs(backend):
    s, t, labels = make_case(5, 777, dtype=torch.float64)
    kw = dict(divergence="skew_reverse_kl", alpha=0.35, temperature=0.5)
    loss, grad = run(kd_loss, s, t, labels, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s, t, labels, **kw)
    assert grad.dtype == torch.float64 and loss.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-6 and rel_err(grad, ref_grad) <= 1e-5


def test_backends_agree_and_teacher_gets_no_gradient():
    s, t, labels = make_case(8, 600)
    t = t.clone().requires_grad_(True)
    s1 = s.clone().requires_grad_(True)
    kd_loss(s1, t, labels, divergence="jsd", backend="torch").backward()
    assert t.grad is None and s1.grad is not None


def test_no_grad_path_skips_gradient():
    s, t, labels = make_case(8, 600)
    with torch.no_grad():
        loss = kd_loss(s, t, labels, divergence="tvd")
    ref = kd_loss_ref(s.double(), t.double(), labels, divergence="tvd")
    assert rel_err(loss, ref) <= 1e-5


def test_backward_twice_raises():
    s, t, labels = make_case(4, 50)
    s.requires_grad_(True)
    loss = kd_loss(s, t, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_kdloss_module_and_env_backend(monkeypatch):
    s, t, labels = make_case(6, 100)
    module = KDLoss(divergence="reverse_kl", temperature=2.0)
    assert "reverse_kl" in repr(module)
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    loss, grad = run(module, s, t, labels)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, divergence="reverse_kl",
                        temperature=2.0)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    s, t, labels = make_case(6, 300)

    def f(s, t, labels):
        return kd_loss(s, t, labels, divergence="jsd", temperature=2.0, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss, grad = run(compiled, s, t, labels)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, divergence="jsd",
                        temperature=2.0)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_public_api():
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                "skew_reverse_kl", "tvd", "taid", "dkd", "nkd", "cosine"}
    assert kdkernels.__version__
