"""The Triton PLD kernel (kdkernels/pld/triton.py) against the float64 oracle.

On a CPU it runs under the Triton interpreter (conftest.py), at small shapes; tiles are
shrunk so that the scans' carries and the tail's streaming cross several tiles. On a GPU
the same tests run the compiled kernel on CUDA tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import assert_lowp, grad_ulp

from kdkernels import plackett_luce_loss
from kdkernels._core.backend import recording
from kdkernels.pld import triton as pld_triton
from kdkernels.pld.ranking import rank_rows
from kdkernels.pld.reference import plackett_luce_loss_ref

pytest.importorskip("triton")
IGNORE = -100
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide rank tiles and 64-wide column tiles: several of each per row."""
    monkeypatch.setattr(pld_triton, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(pld_triton, "row_tile", lambda v, on_cpu: (64, 4))


def _inputs(n, v, *, std=30.0, labels=True, masked=0, ties=True):
    s = torch.randn(n, v, dtype=torch.float64) * std
    t = torch.randn(n, v, dtype=torch.float64) * std
    if ties:  # equal teacher logits: ties go to the lower class index
        t[:, 5:9] = t[:, 1:2]
    if masked:  # padded vocabulary: -inf on both sides
        s[:, -masked:] = -math.inf
        t[:, -masked:] = -math.inf
    y = None
    if labels:
        y = torch.randint(0, v - masked, (n,))
        y[::3] = IGNORE
    return s, t, y


def _run(s, t, y, dtype, backend, **kw):
    x = s.to(DEV, dtype).requires_grad_()
    y = y.to(DEV) if y is not None else None
    loss = plackett_luce_loss(x, t.to(DEV, dtype), y, backend=backend, reduction="none", **kw)
    w = torch.linspace(0.5, 2.0, loss.numel(), device=DEV).reshape(loss.shape)
    (loss * w).sum().backward()
    return loss.detach().cpu(), x.grad.cpu()


def _oracle(s, t, y, dtype, small: bool, **kw):
    """float64 loss and gradient of the dtype-rounded inputs (the literal oracle when small,
    else the float64 PyTorch path, itself checked against it in test_pld.py)."""
    x = s.to(dtype).double().requires_grad_()
    td = t.to(dtype).double()
    if small:
        loss = plackett_luce_loss_ref(x, td, y, reduction="none", **kw)
    else:
        loss = plackett_luce_loss(x, td, y, backend="torch", reduction="none", **kw)
    (loss * torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)).sum().backward()
    return loss.detach(), x.grad


def _check(s, t, y, dtype, small, **kw):
    with recording() as calls:
        loss, grad = _run(s, t, y, dtype, "triton", **kw)
    assert ("plackett_luce_loss", "triton") in calls
    ref_loss, ref_grad = _oracle(s, t, y, dtype, small, **kw)
    low = torch.float32 if dtype == torch.float64 else dtype  # the kernel's arithmetic
    low_loss = plackett_luce_loss_ref(s.to(dtype).to(low), t.to(dtype).to(low), y,
                                      reduction="none", compute_dtype=low,
                                      **kw) if small else None
    if low_loss is None:  # PyTorch's float32 error is at least a few ulps of the loss
        assert_lowp(loss, ref_loss, ref_loss, torch.float32,
                    slack=8 * torch.finfo(torch.float32).eps * ref_loss.abs().max().item())
    else:
        assert_lowp(loss, low_loss.detach(), ref_loss, low,
                    slack=4 * torch.finfo(low).eps * ref_loss.abs().max().item())
    slack = 4 * grad_ulp(ref_grad, dtype if dtype != torch.float64 else torch.float32)
    err = (grad.double() - ref_grad).abs().max().item()
    assert err <= slack + 1e-6, f"gradient error {err:.3g} (slack {slack:.3g})"


@pytest.mark.parametrize("v,top_k", [(40, None), (40, 1), (40, 6), (90, 33), (90, 89)])
@pytest.mark.parametrize("labels", [True, False])
def test_matches_the_oracle(v, top_k, labels, small_tiles):
    s, t, y = _inputs(5, v, labels=labels, masked=4)
    _check(s, t, y, torch.float32, True, top_k=top_k, temperature=1.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_inputs(dtype, small_tiles):
    s, t, y = _inputs(4, 70, std=8.0 if dtype == torch.float16 else 30.0)
    _check(s, t, y, dtype, True, top_k=20)


@pytest.mark.parametrize("top_k", [None, 5, 300])
def test_one_tile_per_row_and_larger_rows(top_k):
    """Default tiles (one column tile, one rank tile), ranking by the Triton top-k for
    K <= 256 and by the library sort beyond."""
    s, t, y = _inputs(3, 700)
    with recording() as calls:
        _run(s, t, y, torch.float32, "triton", top_k=top_k)
    assert (("topk_select", "triton") in calls) == (top_k is not None and top_k <= 256)
    _check(s, t, y, torch.float32, False, top_k=top_k)


def test_label_ranked_first_even_outside_the_teacher_top_k(small_tiles):
    s, t, _ = _inputs(4, 50, ties=False)
    y = t.argmin(1)  # the teacher's last class: the label must still be ranked first
    rank, thr = rank_rows(t, y, 5, IGNORE)
    assert torch.equal(rank[:, 0], y)
    assert torch.equal(thr, rank[:, -1])
    _check(s, t, y, torch.float32, True, top_k=5)
    rank1, thr1 = rank_rows(t, y, 1, IGNORE)  # K = 1: only the label, no teacher-ordered class
    assert torch.equal(rank1[:, 0], y) and bool((thr1 == -1).all())
    _check(s, t, y, torch.float32, True, top_k=1)


def test_nonfinite_rows_give_nan_and_ignored_rows_zero(small_tiles):
    s, t, _ = _inputs(6, 50, labels=False)
    y = torch.randint(0, 50, (6,))
    s[0, 7] = math.nan
    t[1, 3] = math.inf
    s[2] = -math.inf  # no student softmax
    s[3, 0] = math.nan
    y[3] = IGNORE  # ignored: nothing it holds matters
    for top_k in (None, 4):
        loss, grad = _run(s, t, y, torch.float32, "triton", top_k=top_k)
        assert bool(loss[:3].isnan().all()) and bool(grad[:3].isnan().all())
        assert loss[3] == 0 and bool((grad[3] == 0).all())
        assert bool(loss[4:].isfinite().all()) and bool(grad[4:].isfinite().all())


def test_mean_reduction_and_no_grad_path(small_tiles):
    s, t, y = _inputs(5, 60)
    out = plackett_luce_loss(s.float().to(DEV), t.float().to(DEV), y.to(DEV), top_k=9,
                             backend="triton")
    ref = plackett_luce_loss_ref(s.float().double(), t.float().double(), y, top_k=9)
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("v", [32000, 151936, 262144])
@pytest.mark.parametrize("top_k", [None, 64])
def test_gpu_vocabularies_match_the_float64_path(v, top_k):
    """At real vocabulary sizes: bf16 inputs, the kernel against the float64 PyTorch path
    on the same (rounded) inputs."""
    n = 8 if top_k is None else 32
    s = (torch.randn(n, v, device=DEV) * 4).bfloat16()
    t = (torch.randn(n, v, device=DEV) * 4).bfloat16()
    y = torch.randint(0, v, (n,), device=DEV)
    y[::4] = IGNORE
    x = s.clone().requires_grad_()
    with recording() as calls:
        loss = plackett_luce_loss(x, t, y, top_k=top_k, backend="triton", reduction="none")
        loss.sum().backward()
    assert ("plackett_luce_loss", "triton") in calls
    x64 = s.double().requires_grad_()
    ref = plackett_luce_loss(x64, t.double(), y, top_k=top_k, backend="torch", reduction="none")
    ref.sum().backward()
    assert (loss.double() - ref).abs().max().item() <= 5e-5 * (1 + ref.abs().max().item())
    err = (x.grad.double() - x64.grad).abs().max().item()
    assert err <= 4 * grad_ulp(x64.grad, torch.bfloat16) + 1e-6
