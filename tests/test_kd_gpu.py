"""kd_loss on CUDA (Triton backend) against the float64 oracle at real vocabulary sizes.

Skipped without a GPU. Run on a GPU machine with `pytest tests/test_kd_gpu.py`.
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

from kdkernels import DIVERGENCES, kd_loss
from kdkernels.kd.reference import kd_loss_ref

pytestmark = [requires_gpu, pytest.mark.gpu]


def make_case(n, v, dtype, std=10.0):
    g = torch.Generator(device="cuda").manual_seed(n * 7 + v)
    spread = std / torch.tensor([1.0, 3.0, 10.0, 30.0], device="cuda").repeat(n)[:n, None]
    s = (torch.randn(n, v, device="cuda", generator=g) * spread).to(dtype)
    t = (torch.randn(n, v, device="cuda", generator=g) * spread).to(dtype)
    mask = torch.rand(n, v, device="cuda", generator=g) < 0.05
    mask[:, 0] = False
    s[mask] = float("-inf")
    t[mask] = float("-inf")
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels = torch.where(mask.gather(1, labels[:, None])[:, 0], 0, labels)
    labels[torch.rand(n, device="cuda", generator=g) < 0.3] = -100
    return s, t, labels


def run(fn, s, t, labels, go, **kw):
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, t, labels, **kw)
    out.backward(go)
    return out.detach(), s.grad


@pytest.mark.parametrize("v", [32000, 128256, 151936, 262144])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_cuda_matches_oracle(v, dtype, divergence):
    n = 24
    s, t, labels = make_case(n, v, dtype)
    go = torch.randn(n, device="cuda")
    kw = dict(divergence=divergence, temperature=1.5, reduction="none",
              hard_label_weight=0.2, **kd_params(divergence))
    out = []
    assert_launched(lambda: out.extend(run(kd_loss, s, t, labels, go, backend="triton", **kw)),
                    "_kd_fwd_kernel", "_scale_rows_kernel", absent=("kdk::",))
    loss, grad = out
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    if dtype == torch.float32:
        assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    else:
        low, low_grad = run(kd_loss_ref, s, t, labels, go.to(dtype), compute_dtype=dtype, **kw)
        assert_lowp(loss, low, ref, dtype)
        assert_lowp(grad, low_grad, ref_grad, dtype, slack=grad_ulp(ref_grad, dtype))


@pytest.mark.parametrize("backend", ["triton"])
def test_rows_past_2_pow_31_elements(backend):
    """N·V > 2^31: the last rows' offsets overflow int32; check them against the oracle."""
    v = 128256
    n = (1 << 31) // v + 64
    assert n * v > 2**31
    s, t, labels = make_case(n, v, torch.bfloat16)
    go = torch.randn(n, device="cuda")
    kw = dict(divergence="forward_kl", temperature=1.0, reduction="none")
    loss, grad = run(kd_loss, s, t, labels, go, backend=backend, **kw)
    for rows in (slice(0, 16), slice(n - 16, n)):
        ref, ref_grad = run(kd_loss_ref, s[rows].double(), t[rows].double(), labels[rows],
                            go[rows].double(), **kw)
        assert rel_err(loss[rows], ref) <= 1e-4
        assert (grad[rows].double() - ref_grad).abs().max() <= 2e-2 * ref_grad.abs().max()


def test_triton_cuda_compiles_with_inductor():
    s, t, labels = make_case(64, 32000, torch.bfloat16)

    def f(s, t, labels):
        return kd_loss(s, t, labels, divergence="jsd", backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    go = torch.tensor(1.0, device="cuda")
    loss, grad = run(compiled, s, t, labels, go)
    ref, ref_grad = run(f, s, t, labels, go)
    assert rel_err(loss, ref) <= 1e-6 and rel_err(grad, ref_grad) <= 1e-6


def test_auto_picks_triton_on_cuda():
    from kdkernels.kd.ops import KD_FWD

    dev = torch.device("cuda")
    assert KD_FWD.resolve("auto", dev, s_dtype=torch.bfloat16, t_dtype=torch.bfloat16) == "triton"
