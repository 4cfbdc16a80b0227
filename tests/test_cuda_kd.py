"""kd_loss with backend="cuda" (csrc/kd.cu) against the float64 oracle. GPU only.

The cases of the foundation tests (test_kd.py: small odd vocabularies, endpoints,
reductions, all rows ignored; test_kd_gpu.py: real vocabularies, N·V > 2^31), run on
every kernel path: `stream` (one block streams the row), `smem:1` (the row in one block's
shared memory) and, on sm_90, `smem:2`/`smem:8` (a thread-block cluster holding the row
in distributed shared memory), chosen with KDKERNELS_CUDA_KD_PLAN. At real vocabularies
the CUDA error must be as small as the Triton backend's. Skipped without a GPU; the first
call builds the extension just in time (a minute or two; see docs/cuda.md).
"""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    assert_launched,
    assert_lowp,
    grad_ulp,
    kd_params,
    rel_err,
    requires_gpu,
)
from test_kd import TEMPS, run
from test_kd import make_case as make_cpu_case
from test_kd_gpu import make_case as make_gpu_case

from kdkernels import DIVERGENCES, BackendUnavailableError, kd_loss
from kdkernels.kd.reference import kd_loss_ref

pytestmark = [requires_gpu, pytest.mark.gpu]

PLANS = ["auto", "stream", "smem:1", "smem:2", "smem:8"]


def use_plan(monkeypatch, plan, v, dtype, divergence="forward_kl"):
    """Select the kernel path; skip when it cannot hold rows of v columns on this GPU."""
    from kdkernels.kd import cuda as kd_cuda
    from kdkernels.kd.params import _CODES

    monkeypatch.setenv("KDKERNELS_CUDA_KD_PLAN", plan)
    try:
        return kd_cuda.kd_plan(v, dtype, _CODES[divergence])
    except ValueError as exc:  # the forced plan does not fit this GPU / these rows
        pytest.skip(str(exc))


def to_cuda(*xs):
    return [x.cuda() if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("v", [1, 2, 1271, 4099])
def test_matches_float64_oracle(monkeypatch, plan, divergence, v):
    """fp32, std 30, -inf masks, 30% ignored rows, hard-label mixing, random upstream grad."""
    use_plan(monkeypatch, plan, v, torch.float32, divergence)
    n = 12
    temperature = TEMPS[(v + len(divergence)) % 3]
    s, t, labels = to_cuda(*make_cpu_case(n, v))
    go = torch.randn(n, device="cuda") * 3
    kw = dict(divergence=divergence, temperature=temperature, reduction="none",
              hard_label_weight=0.25, soft_label_weight=0.8, **kd_params(divergence))
    out = []
    assert_launched(lambda: out.extend(run(kd_loss, s, t, labels, go, backend="cuda", **kw)),
                    "kdk::kd_fwd_kernel", "kdk::scale_rows_kernel", absent=("_kd_fwd_kernel",))
    loss, grad = out
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()


@pytest.mark.parametrize("temperature", TEMPS)
@pytest.mark.parametrize(
    "divergence,extra",
    [("jsd", dict(beta=0.0)), ("jsd", dict(beta=1.0)), ("skew_forward_kl", dict(alpha=0.0)),
     ("skew_reverse_kl", dict(alpha=1.0)), ("taid", dict(taid_t=0.0)),
     ("taid", dict(taid_t=1.0)), ("forward_kl", dict(soft_label_weight=0.0))],
)
def test_endpoints(temperature, divergence, extra):
    s, t, labels = to_cuda(*make_cpu_case(9, 333, std=5.0))
    go = torch.tensor(1.7, device="cuda")
    kw = dict(divergence=divergence, temperature=temperature, hard_label_weight=0.5, **extra)
    loss, grad = run(kd_loss, s, t, labels, go, backend="cuda", **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("normalizer", [None, 37, "tensor"])
def test_reductions_and_normalizer(reduction, normalizer):
    s, t, labels = to_cuda(*make_cpu_case(2 * 3 * 5, 257, lead=(2, 3, 5)))
    if normalizer == "tensor":
        normalizer = torch.tensor(11.0, device="cuda")
    go = torch.randn(2, 3, 5) if reduction == "none" else torch.tensor(-0.7)
    go = go.cuda()
    kw = dict(divergence="jsd", beta=0.4, temperature=2.0, reduction=reduction,
              normalizer=normalizer)
    loss, grad = run(kd_loss, s, t, labels, go, backend="cuda", **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert loss.shape == ref.shape and grad.shape == s.shape
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("plan", ["stream", "smem:1", "smem:8"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_all_rows_ignored(monkeypatch, plan, divergence):
    use_plan(monkeypatch, plan, 129, torch.float32, divergence)
    s, t, labels = to_cuda(*make_cpu_case(7, 129))
    labels[:] = -100
    for reduction in ("mean", "sum", "none"):
        loss, grad = run(kd_loss, s, t, labels, backend="cuda", divergence=divergence,
                         reduction=reduction, hard_label_weight=0.3,
                         **kd_params(divergence))
        assert torch.isfinite(loss).all() and (loss == 0).all()
        assert torch.isfinite(grad).all() and (grad == 0).all()


@pytest.mark.parametrize("plan", ["auto", "stream"])
@pytest.mark.parametrize("v", [32000, 128256, 151936, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_real_vocab_as_tight_as_triton(monkeypatch, plan, v, dtype, divergence):
    """The foundation GPU case: the low-precision rule, and no looser than Triton."""
    use_plan(monkeypatch, plan, v, dtype, divergence)
    n = 24
    s, t, labels = make_gpu_case(n, v, dtype)
    go = torch.randn(n, device="cuda")
    kw = dict(divergence=divergence, temperature=1.5, reduction="none",
              hard_label_weight=0.2, **kd_params(divergence))
    loss, grad = run(kd_loss, s, t, labels, go, backend="cuda", **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    ulp = grad_ulp(ref_grad, dtype)
    if dtype == torch.float32:
        assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    else:
        low, low_grad = run(kd_loss_ref, s, t, labels, go.to(dtype), compute_dtype=dtype, **kw)
        assert_lowp(loss, low, ref, dtype)
        assert_lowp(grad, low_grad, ref_grad, dtype, slack=ulp)
    tri, tri_grad = run(kd_loss, s, t, labels, go, backend="triton", **kw)
    assert_lowp(loss, tri, ref, dtype)  # no looser than Triton either
    assert_lowp(grad, tri_grad, ref_grad, dtype, slack=ulp)


@pytest.mark.parametrize("plan", ["auto", "stream"])
@pytest.mark.parametrize("v", [151936, 262144])
def test_rows_past_2_pow_31_elements(monkeypatch, plan, v):
    """N·V > 2^31 (bf16, ~13 GB): rows whose offsets overflow int32, against the oracle."""
    use_plan(monkeypatch, plan, v, torch.bfloat16)
    n = (1 << 31) // v + 64
    assert n * v > 2**31
    s, t, labels = make_gpu_case(n, v, torch.bfloat16)
    go = torch.randn(n, device="cuda")
    kw = dict(divergence="forward_kl", temperature=1.0, reduction="none",
              hard_label_weight=0.1)
    loss, grad = run(kd_loss, s, t, labels, go, backend="cuda", **kw)
    for rows in (slice(0, 16), slice(n - 16, n)):
        ref, ref_grad = run(kd_loss_ref, s[rows].double(), t[rows].double(), labels[rows],
                            go[rows].double(), **kw)
        assert rel_err(loss[rows], ref) <= 1e-4
        assert (grad[rows].double() - ref_grad).abs().max() <= 2e-2 * ref_grad.abs().max()


@pytest.mark.parametrize("plan", ["stream", "smem:1", "smem:2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unaligned_rows_and_int32_labels(monkeypatch, plan, dtype):
    """Rows that start off 16-byte alignment take the element-wise path; int32 labels."""
    v = 4099
    use_plan(monkeypatch, plan, v, dtype, "jsd")
    s0, t0, labels = to_cuda(*make_cpu_case(10, v + 1, std=5.0, masked=0))
    s, t = s0.to(dtype)[:, 1:], t0.to(dtype)[:, 1:]  # row starts 1 element in
    labels = torch.where(labels > 0, labels - 1, labels).to(torch.int32)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.3, hard_label_weight=0.4,
              reduction="sum")
    loss, grad = run(kd_loss, s, t, labels, torch.tensor(0.9, device="cuda"), backend="cuda",
                     **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels.long(),
                        torch.tensor(0.9, device="cuda", dtype=torch.float64), **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(loss, ref) <= tol and rel_err(grad, ref_grad) <= tol


def test_plan_choice():
    """Rows that fit on chip use shared memory; on sm_90 long rows use a cluster."""
    from kdkernels.kd import cuda as kd_cuda

    major = torch.cuda.get_device_capability()[0]
    p = kd_cuda.kd_plan(32000, torch.bfloat16)
    assert p["path"] == "smem"
    if major >= 9:
        assert p["cluster"] == 2 and p["smem_bytes"] <= 64 * 1024
        p = kd_cuda.kd_plan(262144, torch.bfloat16)
        assert p["path"] == "smem" and p["cluster"] == 8
        assert p["cols_per_cta"] * 8 >= 262144
    p = kd_cuda.kd_plan(262144, torch.float32)
    assert p["path"] == "stream"


def test_mixed_dtypes_rejected():
    s = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    t = torch.randn(4, 100, device="cuda", dtype=torch.float32)
    with pytest.raises((TypeError, BackendUnavailableError), match="one dtype"):
        kd_loss(s.requires_grad_(), t, backend="cuda")


def test_compiles_with_inductor():
    s, t, labels = make_gpu_case(64, 32000, torch.bfloat16)

    def f(s, t, labels):
        return kd_loss(s, t, labels, divergence="jsd", backend="cuda")

    compiled = torch.compile(f, fullgraph=True)
    go = torch.tensor(1.0, device="cuda")
    loss, grad = run(compiled, s, t, labels, go)
    ref, ref_grad = run(f, s, t, labels, go)
    assert rel_err(loss, ref) <= 1e-6 and rel_err(grad, ref_grad) <= 1e-6
