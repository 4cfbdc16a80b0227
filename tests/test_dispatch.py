"""Proof of dispatch: a requested backend runs, and only it; `auto` and KDKERNELS_BACKEND pick
as documented; nothing falls back silently.

Values cannot show which implementation ran (the PyTorch path is exact too), so every
implementation in every dispatch table is replaced by a spy that records its table and
backend and then computes with that table's `torch` implementation (so the losses stay
valid on a CPU). A "GPU" is faked by making the CPU count as a CUDA device on which every
backend can run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kdkernels
from kdkernels import BackendUnavailableError
from kdkernels._core import backend as B


def _kd(be):
    s = torch.randn(6, 33, requires_grad=True)
    kdkernels.kd_loss(s, torch.randn(6, 33), divergence="jsd", backend=be).backward()


def _fused(be):
    hs = torch.randn(5, 8, requires_grad=True)
    ws = torch.randn(21, 8, requires_grad=True)
    out = kdkernels.fused_linear_kd_loss(hs, ws, torch.randn(5, 6), torch.randn(21, 6),
                                         student_softcap=3.0, backend=be)
    out.backward(torch.tensor(0.5))


def _fused_topk(be):
    hs = torch.randn(5, 8, requires_grad=True)
    ws = torch.randn(21, 8, requires_grad=True)
    idx = torch.stack([torch.randperm(21)[:4] for _ in range(5)])
    out = kdkernels.fused_linear_topk_kd_loss(hs, ws, idx, torch.randn(5, 4),
                                              student_softcap=3.0, backend=be)
    out.backward(torch.tensor(0.5))


def _pld(be):
    s = torch.randn(4, 17, requires_grad=True)
    kdkernels.plackett_luce_loss(s, torch.randn(4, 17), top_k=5, backend=be).backward()


def _topk_kd(be):
    s = torch.randn(4, 30, requires_grad=True)
    idx = torch.stack([torch.randperm(30)[:6] for _ in range(4)])
    kdkernels.topk_kd_loss(s, idx, torch.randn(4, 6), backend=be).backward()


def _sinkhorn(be):
    c = torch.rand(2, 5, 4, requires_grad=True)
    f, g = kdkernels.sinkhorn(c, epsilon=0.5, n_iters=3, backend=be)
    (f.sum() + g.sum()).backward()


def _sinkhorn_loss(be):
    s = torch.randn(2, 4, 19, requires_grad=True)
    kdkernels.sinkhorn_loss(s, torch.randn(2, 4, 19), n_iters=3, backend=be).backward()


def _graph(be):
    s = torch.randn(2, 3, 23, requires_grad=True)
    kdkernels.graph_on_logits_loss(s, torch.randn(2, 3, 23), 4, backend=be).backward()


def _logit_graph(be):
    z = torch.randn(5, 23, requires_grad=True)
    kdkernels.topk_logit_graph(z, 3, backend=be)[1].sum().backward()


def _topk_select(be):
    x = torch.randn(4, 50)
    kdkernels.topk_select(x, 7, backend=be)


def _uld(be):
    s = torch.randn(4, 31, requires_grad=True)
    y = torch.tensor([3, -100, 7, 0])
    kdkernels.uld_loss(s, torch.randn(4, 23), y, top_k=9, hard_label_weight=0.5,
                       backend=be).backward()


def _samples(n, v, k):
    """A sampled record built directly (the sampler's own table must not run here)."""
    idx = torch.stack([torch.randperm(v)[:k] for _ in range(n)]).sort(-1).values
    return kdkernels.TeacherSamples(idx, torch.softmax(torch.randn(n, k), -1), v)


def _sampled_kd(be):
    s = torch.randn(4, 30, requires_grad=True)
    kdkernels.sampled_kd_loss(s, _samples(4, 30, 5), backend=be).backward()


def _fused_sampled_kd(be):
    hs = torch.randn(5, 8, requires_grad=True)
    ws = torch.randn(21, 8, requires_grad=True)
    kdkernels.fused_linear_sampled_kd_loss(hs, ws, _samples(5, 21, 4), student_softcap=3.0,
                                           backend=be).backward()


def _sample_teacher(be):
    kdkernels.sample_teacher(torch.randn(5, 40), 7, backend=be)


# public op -> (its dispatch table's op name, a call with small inputs, forward + backward)
OPS = {
    "kd_loss": ("kd_loss", _kd),
    "fused_linear_kd_loss": ("fused_linear_kd_loss", _fused),
    "fused_linear_topk_kd_loss": ("fused_linear_topk_kd_loss", _fused_topk),
    "plackett_luce_loss": ("plackett_luce_loss", _pld),
    "topk_kd_loss": ("topk_kd_loss", _topk_kd),
    "sinkhorn": ("sinkhorn", _sinkhorn),
    "sinkhorn_loss": ("sinkhorn_loss", _sinkhorn_loss),
    "graph_on_logits_loss": ("graph_on_logits_loss", _graph),
    "topk_logit_graph": ("topk_logit_graph", _logit_graph),
    "topk_select": ("topk_select", _topk_select),
    "sampled_kd_loss": ("topk_kd_loss", _sampled_kd),  # runs on top-k KD's table
    "fused_linear_sampled_kd_loss": ("fused_linear_topk_kd_loss", _fused_sampled_kd),
    "sample_teacher": ("sample_teacher", _sample_teacher),
    "uld_loss": ("uld_loss", _uld),
}


def _table(op: str) -> B.Dispatch:
    (table,) = [t for t in B.TABLES if t.op == op]
    return table


def test_every_public_op_has_a_table_and_a_call():
    public = {n for n in kdkernels.__all__ if n.islower() and callable(getattr(kdkernels, n))}
    public -= {"__version__", "global_normalizer"}  # not ops: no table, no backend
    assert public == set(OPS)
    for op, (table_op, _) in OPS.items():
        assert "torch" in _table(table_op).backends, op


@pytest.fixture
def spies(monkeypatch):
    """Replace every implementation of every table; returns the list of (op, backend) calls."""
    calls = []
    for table in B.TABLES:
        reference = table.implementation("torch")
        for be in table.backends:

            def spy(*args, _table=table, _be=be, _ref=reference, **kwargs):
                calls.append((_table.op, _be))
                return _ref(*args, **kwargs)

            monkeypatch.setitem(table._fns, be, spy)
    monkeypatch.delenv(B.ENV, raising=False)
    return calls


@pytest.fixture
def fake_gpu(monkeypatch):
    """The CPU counts as a CUDA device on which every backend can run."""
    monkeypatch.setattr(B, "on_gpu", lambda device: True)
    monkeypatch.setattr(B, "device_reason", lambda backend, device: None)


def _run(op, be, calls):
    table_op, call = OPS[op]
    with B.recording() as recorded:
        call(be)
    assert recorded == calls, "recording() must see exactly what ran"
    return table_op


def _cases():
    for op, (table_op, _) in OPS.items():
        for be in _table(table_op).backends:
            yield op, be


@pytest.mark.parametrize("op, backend", list(_cases()))
def test_explicit_backend_runs_and_only_it(op, backend, spies, fake_gpu):
    table_op = _run(op, backend, spies)
    assert (table_op, backend) in spies, f"{op}: the {backend} implementation did not run"
    assert {be for _, be in spies} == {backend}, f"{op}: other backends ran: {spies}"


@pytest.mark.parametrize("op", list(OPS))
def test_env_backend_is_an_explicit_request(op, spies, fake_gpu, monkeypatch):
    table_op = OPS[op][0]
    for backend in ("torch", "triton", "cuda"):
        spies.clear()
        monkeypatch.setenv(B.ENV, backend)
        if backend not in _table(table_op).backends:
            with pytest.raises(BackendUnavailableError, match="not implemented for this op"):
                _run(op, "auto", spies)
            assert spies == []
            continue
        _run(op, "auto", spies)
        assert {be for _, be in spies} == {backend}


@pytest.mark.parametrize("op", list(OPS))
def test_auto_on_cpu_runs_torch(op, spies):
    table_op = _run(op, "auto", spies)
    assert (table_op, "torch") in spies
    assert {be for _, be in spies} == {"torch"}


# What `auto` takes on a GPU: the first backend listed that may be chosen automatically.
AUTO_ON_GPU = {
    "kd_loss": "triton",  # cuda joins auto once a GPU benchmark shows it faster
    "fused_linear_kd_loss": "triton",
    "topk_select": "torch",  # neither the cuda nor the triton top-k is in auto yet
}


@pytest.mark.parametrize("op", list(OPS))
def test_auto_on_gpu_takes_the_first_automatic_backend(op, spies, fake_gpu):
    table_op = _run(op, "auto", spies)
    want = AUTO_ON_GPU.get(op, "torch")
    assert (table_op, want) in spies
    assert {be for _, be in spies} == {want}


@pytest.mark.parametrize("op", list(OPS))
def test_unlisted_backend_raises_and_runs_nothing(op, spies, fake_gpu):
    table_op = OPS[op][0]
    for backend in ("triton", "cuda"):
        if backend in _table(table_op).backends:
            continue
        with pytest.raises(BackendUnavailableError, match=f"{table_op}: backend='{backend}'"):
            _run(op, backend, spies)
    with pytest.raises(ValueError, match="backend must be one of"):
        _run(op, "tpu", spies)
    assert spies == []


@pytest.mark.parametrize("op", list(OPS))
def test_explicit_gpu_backend_on_a_cpu_tensor_raises(op, spies):
    table_op = OPS[op][0]
    for backend in ("triton", "cuda"):
        if backend not in _table(table_op).backends or (
            backend == "triton" and B.triton_interpreting()
        ):
            continue
        with pytest.raises(BackendUnavailableError, match="cannot run"):
            _run(op, backend, spies)
    assert spies == []


def test_verifier_refuses_explicit_and_auto_moves_on(spies, fake_gpu, monkeypatch):
    """A backend that cannot take these inputs: explicit -> the verifier's reason; auto ->
    the next backend in the table."""
    s, t = torch.randn(3, 9), torch.randn(3, 9, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="one dtype"):
        kdkernels.kd_loss(s, t, backend="cuda")
    assert spies == []
    table = _table("kd_loss")
    monkeypatch.setitem(table.impls, "cuda", dataclasses.replace(table.impls["cuda"], auto=True))
    kdkernels.kd_loss(s, t)  # cuda is refused by its verifier: auto goes on to triton
    assert {be for _, be in spies} == {"triton"}


def test_unknown_env_backend_raises(monkeypatch):
    monkeypatch.setenv(B.ENV, "tpu")
    with pytest.raises(ValueError, match="KDKERNELS_BACKEND must be one of"):
        kdkernels.kd_loss(torch.randn(2, 5), torch.randn(2, 5))


def test_a_table_needs_torch_and_known_backends():
    with pytest.raises(ValueError, match="needs 'torch'"):
        B.Dispatch("x", {"triton": B.Impl("m:f")})
    with pytest.raises(ValueError, match="needs 'torch'"):
        B.Dispatch("x", {"torch": B.Impl("m:f"), "tpu": B.Impl("m:g")})


# -------------------------------------------------- GPU: the kernels themselves launch

GPU_KERNELS = {  # (op call, backend) -> kernels that must launch (profiler names)
    ("kd", "triton"): ["_kd_fwd_kernel", "_scale_rows_kernel"],
    ("kd", "cuda"): ["kdk::kd_fwd_kernel", "kdk::scale_rows_kernel"],
    ("fused", "triton"): ["_kd_fwd_kernel", "_softcap_fwd_kernel", "_softcap_bwd_kernel"],
    ("fused", "cuda"): ["kdk::kd_fwd_kernel", "kdk::softcap_fwd_kernel",
                        "kdk::softcap_bwd_kernel"],
    ("topk", "triton"): ["_topk_select_kernel"],
    ("topk", "cuda"): ["kdk::topk_kernel"],
    ("pld", "triton"): ["_topk_select_kernel", "_pld_kernel", "_scale_rows_kernel"],
    ("pld", "cuda"): ["kdk::topk_kernel", "kdk::pld_fwd_kernel", "kdk::scale_rows_kernel"],
    ("topk_kd", "triton"): ["_topk_kd_fwd_kernel", "_scale_rows_kernel"],
    ("topk_kd", "cuda"): ["kdk::topk_kd_kernel", "kdk::scale_rows_kernel"],
    ("sinkhorn", "cuda"): ["kdk::sk_fused_fwd_kernel", "kdk::sk_fused_bwd_kernel"],
    ("graph", "cuda"): ["kdk::topk_kernel", "kdk::graph_rows_kernel", "kdk::graph_runs_kernel",
                        "kdk::graph_gw_kernel", "kdk::graph_finish_kernel",
                        "kdk::graph_rows_bwd_kernel"],
    ("sample", "triton"): ["_sample_kernel"],
    ("uld", "triton"): ["_topk_select_kernel", "_uld_kernel", "_scale_rows_kernel"],
}
OTHER = {"triton": ("kdk::",),
         "cuda": ("_kd_fwd_kernel", "_softcap", "_scale_rows", "_topk", "_pld", "_sk_")}


def _gpu_call(name, be):
    dev = torch.device("cuda")
    if name == "kd":
        s = torch.randn(8, 1000, device=dev, requires_grad=True)
        kdkernels.kd_loss(s, torch.randn(8, 1000, device=dev), backend=be).backward(
            torch.tensor(0.5, device=dev))
    elif name == "fused":
        hs = torch.randn(8, 64, device=dev, requires_grad=True)
        ws = torch.randn(1000, 64, device=dev)
        kdkernels.fused_linear_kd_loss(hs, ws, torch.randn(8, 32, device=dev),
                                       torch.randn(1000, 32, device=dev), student_softcap=5.0,
                                       backend=be).backward()
    elif name == "pld":
        s = torch.randn(8, 1000, device=dev, requires_grad=True)
        labels = torch.randint(0, 1000, (8,), device=dev)
        kdkernels.plackett_luce_loss(s, torch.randn(8, 1000, device=dev), labels, top_k=16,
                                     backend=be).backward(torch.tensor(0.5, device=dev))
    elif name == "topk_kd":
        s = torch.randn(8, 1000, device=dev, requires_grad=True)
        t = torch.randn(8, 1000, device=dev)
        vals, idx = t.log_softmax(-1).topk(16, -1)
        kdkernels.topk_kd_loss(s, idx, vals, values="logprobs", tail="bucket",
                               backend=be).backward(torch.tensor(0.5, device=dev))
    elif name == "sinkhorn":
        c = torch.rand(3, 20, 24, device=dev, requires_grad=True)
        f, g = kdkernels.sinkhorn(c, epsilon=0.1, n_iters=5, backend=be)
        (f.sum() + g.sum()).backward()
    elif name == "sample":
        kdkernels.sample_teacher(torch.randn(8, 1000, device=dev), 16, backend=be)
    elif name == "graph":
        s = torch.randn(2, 6, 500, device=dev, requires_grad=True)
        kdkernels.graph_on_logits_loss(s, torch.randn(2, 6, 400, device=dev), 8,
                                       backend=be).backward()
    elif name == "uld":
        s = torch.randn(8, 1000, device=dev, requires_grad=True)
        labels = torch.randint(0, 1000, (8,), device=dev)
        kdkernels.uld_loss(s, torch.randn(8, 1200, device=dev), labels, top_k=16,
                           hard_label_weight=0.5, backend=be).backward(
                               torch.tensor(0.5, device=dev))
    else:
        kdkernels.topk_select(torch.randn(8, 1000, device=dev), 16, backend=be)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, backend", list(GPU_KERNELS))
def test_gpu_backend_launches_its_own_kernels(name, backend):
    from _helpers import assert_launched

    assert_launched(lambda: _gpu_call(name, backend), *GPU_KERNELS[(name, backend)],
                    absent=OTHER[backend])
