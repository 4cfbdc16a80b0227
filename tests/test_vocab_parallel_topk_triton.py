"""The Triton kernels of vocabulary-parallel topk_kd_loss (kdkernels/topk/parallel_triton.py)
on 2 gloo ranks with uneven shards, against the single-process torch path: the three
divergences × (logits / renormalize, logprobs / renormalize, logprobs / bucket), indices
spread over both ranks and all on one rank, padding, ignored rows, a NaN on one rank,
float64, float32 and bf16 students. One spawned job; each rank writes its measured errors to a
file that the tests then check. Without a GPU the workers run the kernels under
TRITON_INTERPRET=1 (small shapes)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from _helpers import run_ranks

import kdkernels as K

# the spawned workers import this module: Triton must see TRITON_INTERPRET before import
if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

V = 37
N = 9
KK = 6
BOUNDS = [(0, 20), (20, V)]  # uneven shards
DIVS = ["forward_kl", "reverse_kl", "jsd"]
MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
DTYPES = [(torch.float64, 4.0), (torch.float32, 3.0), (torch.bfloat16, 3.0)]


def _vp_triton(s, idx, vals, labels, vp, **kw):
    """topk_kd_loss(..., vocab_parallel=vp, backend='triton'), checking that the Triton
    launcher is what ran."""
    import kdkernels.topk.parallel_triton as pt

    launcher, ran = pt.topk_kd_fwd_vocab_parallel_triton, []

    def spy(*args, **kwargs):
        ran.append(True)
        return launcher(*args, **kwargs)

    pt.topk_kd_fwd_vocab_parallel_triton = spy
    try:
        out = K.topk_kd_loss(s, idx, vals, labels, vocab_parallel=vp, backend="triton", **kw)
    finally:
        pt.topk_kd_fwd_vocab_parallel_triton = launcher
    assert ran, "the triton vocabulary-parallel launcher did not run"
    return out


def _gather_cols(g: torch.Tensor) -> torch.Tensor:
    width = max(b - a for a, b in BOUNDS)
    pad = torch.full((g.shape[0], width), float("nan"), dtype=g.dtype)
    pad[:, : g.shape[1]] = g
    parts = [torch.empty_like(pad) for _ in BOUNDS]
    dist.all_gather(parts, pad)
    return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, BOUNDS)], 1)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| / max |ref|; NaN positions must agree."""
    if not bool((torch.isnan(x) == torch.isnan(ref)).all()):
        return math.inf
    x, ref = (torch.nan_to_num(z.detach().double(), nan=0.0) for z in (x, ref))
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _inputs(std: float, gen, values: str):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    idx = torch.stack([torch.randperm(V, generator=gen)[:KK] for _ in range(N)])
    idx[1] = torch.randperm(V - 20, generator=gen)[:KK] + 20  # all on rank 1
    idx[2] = torch.randperm(20, generator=gen)[:KK]  # all on rank 0
    idx[3, -2:] = -1  # padding
    idx[8] = torch.tensor([0, 20, 36, 19, -1, -1])  # shard edges
    vals = t.gather(1, idx.clamp_min(0))
    if values == "logprobs":
        vals = torch.log_softmax(t, 1).gather(1, idx.clamp_min(0))
    y = torch.randint(0, V, (N,), generator=gen)
    y[4] = -100  # ignored, with a NaN on rank 1
    s[4, 30] = float("nan")
    return s, idx, vals, y


def _cases(rank, out):
    a, b = BOUNDS[rank]
    vp = K.VocabParallel(a, b)
    gen = torch.Generator().manual_seed(21)
    worst: dict[str, float] = {}
    for div in DIVS:
        for values, tail in MODES:
            for dtype, std in DTYPES:
                s, idx, vals, y = _inputs(std, gen, values)
                tau = 2.0 if values == "logits" else 1.0
                kw = dict(values=values, tail=tail, divergence=div, beta=0.3,
                          temperature=tau, reduction="none")
                s = s.to(dtype)
                vals = vals.float() if dtype == torch.bfloat16 else vals.to(dtype)
                # bf16: the same values in float64 for the reference
                full = (s.double() if dtype == torch.bfloat16 else s).clone().requires_grad_()
                ref = K.topk_kd_loss(full, idx, vals, y, backend="torch", **kw)
                ref.sum().backward()
                loc = s[:, a:b].clone().requires_grad_()
                got = _vp_triton(loc, idx, vals, y, vp, **kw)
                got.sum().backward()
                assert got.dtype == torch.float32 and loc.grad.dtype == dtype
                grad = _gather_cols(loc.grad)
                tag = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
                # the gradient away from the ignored row 4 (checked to be 0 below): the
                # single-process bucket gradient lets its NaN column through there
                rows = [r for r in range(N) if r != 4]
                for key, val in ((f"{tag}_loss", _rel(got, ref)),
                                 (f"{tag}_grad", _rel(grad[rows], full.grad[rows]))):
                    worst[key] = max(worst.get(key, 0.0), val)
                worst["ignored_nonzero"] = max(worst.get("ignored_nonzero", 0.0),
                                               float(got[4].detach().abs()),
                                               float(grad[4].abs().max()))
    out["topk"] = worst


def _nonfinite_cases(rank, out):
    """A NaN on one rank makes the row NaN on every rank (a selected class for the
    renormalized tail; any class for the bucket)."""
    a, b = BOUNDS[rank]
    gen = torch.Generator().manual_seed(22)
    res = {}
    for values, tail in MODES:
        s, idx, vals, y = _inputs(3.0, gen, values)
        s[5, idx[5, 0]] = float("nan")  # a selected class
        sel6 = set(idx[6].tolist())
        col = next(c for c in range(20, V) if c not in sel6)
        s[6, col] = float("nan")  # an unselected class on rank 1
        kw = dict(values=values, tail=tail, reduction="none")
        loc = s[:, a:b].clone().requires_grad_()
        got = _vp_triton(loc, idx, vals, y, K.VocabParallel(a, b), **kw)
        got.sum().backward()
        full = s.clone().requires_grad_()
        ref = K.topk_kd_loss(full, idx, vals, y, backend="torch", **kw)
        ref.sum().backward()
        g = loc.grad
        rows = [r for r in range(N) if r != 4]  # (the ignored row: as in _cases)
        res[f"{values}/{tail}"] = dict(
            row5_nan=bool(got[5].isnan()) and bool(g[5].isnan().all()),
            row6_nan=bool(got[6].isnan()) and bool(g[6].isnan().all()),
            ignored_zero=bool(got[4] == 0) and bool((g[4] == 0).all()),
            loss_err=_rel(got, ref), grad_err=_rel(g[rows], full.grad[rows, a:b]))
    out["nonfinite"] = res


def _bytes_and_errors(rank, out):
    """The same collectives (bytes) as the torch path; 'cuda' refused on CPU tensors."""
    from kdkernels.parallel import count_bytes

    a, b = BOUNDS[rank]
    vp = K.VocabParallel(a, b)
    gen = torch.Generator().manual_seed(23)
    s, idx, vals, y = _inputs(2.0, gen, "logprobs")
    res = {}
    for tail in ("renormalize", "bucket"):
        x = s[:, a:b].clone().requires_grad_()
        with count_bytes() as tri:
            _vp_triton(x, idx, vals, y, vp, values="logprobs", tail=tail).backward()
        with count_bytes() as tor:
            K.topk_kd_loss(x, idx, vals, y, values="logprobs", tail=tail,
                           vocab_parallel=vp).backward()
        res[tail] = [sum(tri), sum(tor), len(tri), len(tor)]
    try:
        K.topk_kd_loss(s[:, a:b], idx, vals, y, values="logprobs", vocab_parallel=vp,
                       backend="cuda")
        res["cuda"] = None
    except K.BackendUnavailableError as e:
        res["cuda"] = str(e)
    out["misc"] = res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # (the workers import this module, which sets TRITON_INTERPRET before Triton loads)
    return run_ranks((_cases, _nonfinite_cases, _bytes_and_errors), len(BOUNDS),
                     tmp_path_factory.mktemp("vptk"))


def test_triton_matches_single_process_torch(results):
    for out in results:
        tk = out["topk"]
        assert tk["f64_loss"] < 1e-12 and tk["f64_grad"] < 1e-12, tk
        # float32 kernels (float64 entry math) against the float32 torch path
        assert tk["f32_loss"] < 5e-6 and tk["f32_grad"] < 5e-6, tk
        # bf16 student: float32 kernels, the gradient rounded once to bf16 (the
        # interpreter truncates where a GPU rounds to nearest)
        assert tk["bf16_loss"] < 5e-6 and tk["bf16_grad"] < 1e-2, tk
        assert tk["ignored_nonzero"] == 0.0, tk


def test_nonfinite_on_one_rank_is_nan_everywhere(results):
    for out in results:
        for mode, r in out["nonfinite"].items():
            assert r["row5_nan"] and r["ignored_zero"], (mode, r)
            # an unselected NaN counts only for the bucket (the renormalized tail never
            # reads it), as in the single-process path
            assert r["row6_nan"] == mode.endswith("bucket"), (mode, r)
            assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, (mode, r)


def test_same_collectives_as_the_torch_path(results):
    for out in results:
        m = out["misc"]
        for tail in ("renormalize", "bucket"):
            tri, tor, n_tri, n_tor = m[tail]
            assert tri == tor and n_tri == n_tor == (2 if tail == "bucket" else 1), m
        assert m["cuda"] is not None and "backend='cuda'" in m["cuda"], m
        assert "needs CUDA tensors" in m["cuda"], m


def test_aot_variants_are_listed():
    from kdkernels.topk import parallel_triton as P

    names = [v[0] for v in P.aot_variants()]
    assert len(names) == len(set(names)) and len(names) >= 6
    for _, fn, sig, const, _ in P.aot_variants():
        assert set(sig) | set(const) == set(fn.arg_names), (fn.__name__, sorted(sig))
