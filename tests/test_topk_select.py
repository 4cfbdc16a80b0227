"""topk_select: the torch reference's tie rule (CPU) and the CUDA radix select (GPU).

Order: values descending, equal values by increasing index, NaN above every number,
-0.0 tied with +0.0. The CUDA kernel must match the reference bit for bit (values and
indices) and torch.topk on values.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import requires_gpu

from kdkernels import BackendUnavailableError
from kdkernels.select import topk_select, topk_select_ref

# ------------------------------------------------------------------ CPU: the reference


def test_reference_tie_rule():
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0, 3.0, 2.0, 2.0]])
    vals, idx = topk_select_ref(x, 5)
    assert vals.tolist() == [[3.0, 3.0, 3.0, 2.0, 2.0]]
    assert idx.tolist() == [[1, 2, 4, 5, 6]]


def test_reference_nan_and_signed_zero():
    x = torch.tensor([[0.0, -0.0, math.nan, -math.inf, 0.0, -0.0, 1.0, math.inf]])
    vals, idx = topk_select_ref(x, 8)
    assert idx.tolist() == [[2, 7, 6, 0, 1, 4, 5, 3]]
    assert math.isnan(vals[0, 0]) and vals[0, 1] == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reference_matches_topk_values_and_ties(dtype):
    x = torch.randint(-4, 5, (13, 301)).to(dtype)  # many ties
    vals, idx = topk_select_ref(x, 37)
    ref_vals, _ = torch.topk(x, 37, dim=-1)
    assert torch.equal(vals, ref_vals)
    assert torch.equal(x.gather(1, idx), vals)
    same = vals[:, 1:] == vals[:, :-1]
    assert (idx[:, 1:][same] > idx[:, :-1][same]).all()
    assert (vals[:, 1:] <= vals[:, :-1]).all()


def test_public_function_on_cpu_shapes_and_grad():
    x = torch.randn(2, 3, 50, requires_grad=True)
    vals, idx = topk_select(x, 4)
    assert vals.shape == (2, 3, 4) and idx.shape == (2, 3, 4) and idx.dtype == torch.int64
    ref_vals, ref_idx = topk_select_ref(x.detach().reshape(6, 50), 4)
    assert torch.equal(vals.detach().reshape(6, 4), ref_vals)
    assert torch.equal(idx.reshape(6, 4), ref_idx)
    vals.sum().backward()
    expect = torch.zeros(6, 50).scatter_(1, ref_idx, 1.0).reshape(2, 3, 50)
    assert torch.equal(x.grad, expect)


def test_non_contiguous_rows():
    base = torch.randn(8, 40)
    x = base[:, ::2]  # column stride 2
    vals, idx = topk_select(x, 6, backend="torch")
    ref_vals, ref_idx = topk_select_ref(x.contiguous(), 6)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)


def test_validation():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k must be an int in"):
        topk_select(x, 0)
    with pytest.raises(ValueError, match="k must be an int in"):
        topk_select(x, 11)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_select(x, 2.0)
    with pytest.raises(TypeError, match="x must be"):
        topk_select(torch.arange(10), 2)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        topk_select(x, 2, backend="cuda")


# -------------------------------------------------------------------- GPU: the kernel

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_cuda(x, k):
    vals, idx = topk_select(x, k, backend="cuda")
    ref_vals, ref_idx = topk_select_ref(x, k)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64
    assert torch.equal(idx, ref_idx)
    # bit-exact values (NaN payloads and signed zeros included)
    view = torch.int32 if x.dtype == torch.float32 else torch.int16
    assert torch.equal(vals.view(view), x.gather(1, ref_idx).view(view))
    if not torch.isnan(x).any():
        assert torch.equal(vals, torch.topk(x, k, dim=-1).values)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 7, 1271, 32000, 151936, 262144])
@pytest.mark.parametrize("k", [1, 5, 64, 256])
def test_cuda_matches_reference_and_topk(dtype, v, k):
    if k > v:
        pytest.skip("k > V")
    x = (torch.randn(33, v, device="cuda") * 4).to(dtype)
    check_cuda(x, k)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_ties_and_special_values(dtype):
    v = 5003
    x = torch.randint(-3, 4, (16, v), device="cuda").to(dtype)  # heavy ties
    x[1] = 2.0  # one value everywhere
    x[2] = -math.inf
    x[3, ::7] = math.nan
    x[4] = 0.0
    x[4, ::3] = -0.0
    x[5, 100:200] = math.inf
    for k in (1, 3, 100, 256):
        check_cuda(x, k)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_unaligned_rows(dtype):
    base = torch.randn(9, 3001, device="cuda").to(dtype)
    check_cuda(base[:, 1:], 50)  # rows start off 16-byte alignment


@requires_gpu
@pytest.mark.gpu
def test_cuda_limits_and_auto():
    x = torch.randn(4, 1000, device="cuda")
    with pytest.raises(BackendUnavailableError, match="k <= 256"):
        topk_select(x, 300, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="float64"):
        topk_select(x.double(), 3, backend="cuda")
    vals, idx = topk_select(x, 300)  # auto falls back to the reference
    ref_vals, ref_idx = topk_select_ref(x, 300)
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)


# ---------------------------------------------- interpreter: the Triton kernel (on the CPU)

INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# (positive quiet NaN with a payload, negative quiet NaN) bit patterns
NAN_BITS = {torch.float32: (0x7FC00123, -0x00400000), torch.float16: (0x7E05, -0x0200),
            torch.bfloat16: (0x7FC3, -0x0040)}


def special_rows(dtype, n_cols):
    """8 rows of heavy ties, NaNs of both signs, ±inf and ±0.0 mixes."""
    x = torch.randint(-4, 5, (8, n_cols)).to(dtype)
    pos_nan, neg_nan = (torch.tensor([b], dtype=INT_VIEW[dtype]).view(dtype)
                        for b in NAN_BITS[dtype])
    x[1] = 2.0  # one value everywhere
    x[2] = -math.inf
    x[2, 5::97] = math.inf
    x[3, ::7] = pos_nan
    x[3, 3::11] = neg_nan
    x[4] = 0.0
    x[4, ::3] = -0.0
    x[5, n_cols // 2:] = math.inf
    x[5, : n_cols // 3] = -math.inf
    x[5, n_cols - 1] = neg_nan
    x[6] = (torch.randn(n_cols) * 4).to(dtype)
    x[7] = torch.where(x[7] > 0, -0.0, x[7]).to(dtype)  # -0.0 above negative ties
    x[7, 1::4] = 0.0
    return x


def check_triton(x, k):
    vals, idx = topk_select(x, k, backend="triton")
    ref_vals, ref_idx = topk_select_ref(x, k)
    assert vals.dtype == x.dtype and idx.dtype == torch.int64
    assert vals.shape == idx.shape == (x.shape[0], k)
    assert torch.equal(idx, ref_idx)
    # bit-exact: NaN payloads and signed zeros included (gathered as integers: a CPU
    # bfloat16 gather turns every NaN into 0xFFFF)
    view = INT_VIEW[x.dtype]
    assert torch.equal(vals.view(view), x.view(view).gather(1, ref_idx))
    assert torch.equal(vals[~ref_vals.isnan()], ref_vals[~ref_vals.isnan()])


TILINGS = [
    (1000, 1, None, False),  # one tile, partly masked
    (700, 7, 256, True),  # 3 tiles of 32 x 8 keys, the last partial
    (400, 256, 256, True),  # 2 tiles of one 256-key row, the last partial
    (200, 200, None, True),  # k = V, not a power of two
]


# every tiling in float32; the 16-bit dtypes change only the loads (and the fuzzer draws
# them with every k): one multi-tile case each
@pytest.mark.interpreter
@pytest.mark.parametrize(("dtype", "n_cols", "k", "cpu_tile", "strided"),
                         [(torch.float32, *c) for c in TILINGS]
                         + [(d, *TILINGS[1]) for d in (torch.bfloat16, torch.float16)])
def test_triton_matches_reference(dtype, n_cols, k, cpu_tile, strided, monkeypatch):
    from kdkernels.select import triton as sel_triton

    if cpu_tile is not None:
        monkeypatch.setattr(sel_triton, "CPU_TILE", cpu_tile)
    if strided:  # row stride n_cols + 24, rows off alignment
        check_triton(special_rows(dtype, n_cols + 24)[:, 3 : n_cols + 3], k)
    else:
        check_triton(special_rows(dtype, n_cols), k)


@pytest.mark.interpreter
def test_triton_unsupported_inputs():
    x = torch.randn(2, 400)
    with pytest.raises(BackendUnavailableError, match="float64"):
        topk_select(x.double(), 3, backend="triton")
    with pytest.raises(BackendUnavailableError, match="k <= 256"):
        topk_select(x, 300, backend="triton")
