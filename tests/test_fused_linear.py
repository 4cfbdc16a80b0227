"""fused_linear_kd_loss (docs/spec.md §2) against the materialised float64 oracle.

CPU: the `torch` backend and the chunked path with the Triton divergence and softcap
kernels (under TRITON_INTERPRET=1, set by conftest.py), tiny shapes. GPU tests (skipped
without one) run the target bf16 shape N=8192, H=4096, V=128256 against a float64
reference computed chunk by chunk.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_lowp, kd_params, rel_err, requires_gpu

from kdkernels import FusedLinearKDLoss, fused_linear_kd_loss
from kdkernels.fused_linear import choose_chunk_size
from kdkernels.fused_linear import ops as fl_ops
from kdkernels.fused_linear.chunking import BUDGET_ENV, MAX_ROWS, MIN_ROWS, chunk_bytes_per_row
from kdkernels.fused_linear.reference import fused_linear_kd_loss_ref
from kdkernels.kd import DIVERGENCES

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def make_case(lead, h_s, h_t, v_s, v_t=None, *, std=30.0, ignored=0.3, dtype=torch.float32,
              bias=True, device="cpu"):
    """Hidden states and heads whose logits have standard deviation about `std`."""
    v_t = v_s if v_t is None else v_t
    g = dict(dtype=torch.float64, device=device)
    c = dict(
        hs=torch.randn(*lead, h_s, **g),
        ws=torch.randn(v_s, h_s, **g) * (std / h_s**0.5),
        ht=torch.randn(*lead, h_t, **g),
        wt=torch.randn(v_t, h_t, **g) * (std / h_t**0.5),
        bs=torch.randn(v_s, **g) * 2 if bias else None,
        bt=torch.randn(v_t, **g) * 2 if bias else None,
    )
    c = {k: (x.to(dtype) if x is not None else None) for k, x in c.items()}
    labels = torch.randint(0, min(v_s, v_t), lead, device=device)
    labels[torch.rand(lead, device=device) < ignored] = -100
    c["labels"] = labels
    return c


def run(fn, c, go=None, *, frozen=(), **kw):
    """Loss and the student gradients (None where frozen) with upstream gradient `go`."""
    leaves = {}
    for k in ("hs", "ws", "bs"):
        x = c[k]
        if x is not None:
            x = x.detach().clone().requires_grad_(k not in frozen)
        leaves[k] = x
    out = fn(leaves["hs"], leaves["ws"], c["ht"], c["wt"], c["labels"],
             student_bias=leaves["bs"], teacher_bias=c["bt"], **kw)
    if out.requires_grad:
        out.backward(torch.ones_like(out) if go is None else go)
    grads = {k: (x.grad if x is not None else None) for k, x in leaves.items()}
    return out.detach(), grads


def as64(c):
    return {k: (x.double() if x is not None and x.is_floating_point() else x)
            for k, x in c.items()}


def check_against_ref(c, go=None, *, frozen=(), tol=1e-5, **kw):
    """Run the fused loss and the float64 oracle on the same inputs; compare everything
    (with the divergence's own mixture keyword, kd_params, unless given)."""
    kw = {**kd_params(kw.get("divergence", "forward_kl")), **kw}
    ref_kw = {k: v for k, v in kw.items() if k not in ("chunk_size", "backend")}
    loss, grads = run(fused_linear_kd_loss, c, go, frozen=frozen, **kw)
    go64 = go.double() if go is not None else None
    ref, ref_grads = run(fused_linear_kd_loss_ref, as64(c), go64, frozen=frozen, **ref_kw)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    # the loss is float32 whatever the inputs (docs/spec.md), so float32 rounding bounds it
    assert rel_err(loss, ref) <= max(tol, 1e-6), (rel_err(loss, ref), kw)
    for k in ("hs", "ws", "bs"):
        if c[k] is None or k in frozen:
            assert grads[k] is None
            continue
        assert grads[k].dtype == c[k].dtype and grads[k].shape == c[k].shape
        assert torch.isfinite(grads[k]).all()
        assert rel_err(grads[k], ref_grads[k]) <= tol, (k, rel_err(grads[k], ref_grads[k]), kw)
    return loss, grads


FULL = dict(student_softcap=30.0, teacher_softcap=50.0, student_logit_scale=0.7,
            teacher_logit_scale=1.3, hard_label_weight=0.3, soft_label_weight=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence_matches_float64(backend, divergence):
    """3-D inputs, H_s != H_t, biases, softcaps, logit scales, 30% ignored rows, hard-label
    mixing, odd vocab, std-30 logits, a chunk size that does not divide N, upstream 0.7."""
    c = make_case((3, 5), 24, 17, 259)
    temperature = (0.5, 1.0, 2.0)[len(divergence) % 3]
    check_against_ref(c, torch.tensor(0.7), divergence=divergence, temperature=temperature,
                      chunk_size=4, backend=backend, **FULL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reductions(backend, reduction):
    """'none' recomputes in backward with a per-row (signed) upstream gradient."""
    c = make_case((2, 7), 16, 20, 131)
    go = torch.randn(2, 7) * 3 if reduction == "none" else torch.tensor(-1.7)
    loss, _ = check_against_ref(c, go, divergence="jsd", reduction=reduction, chunk_size=3,
                                backend=backend, **{**FULL, "beta": 0.4})
    if reduction == "none":
        assert loss.shape == (2, 7)
        assert (loss[c["labels"] == -100] == 0).all()


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # plain linear heads
        dict(student_softcap=20.0),
        dict(teacher_softcap=10.0, teacher_logit_scale=0.5),
        dict(student_logit_scale=-0.6),
        dict(temperature=3.0, normalizer=40.0),
        dict(normalizer=torch.tensor(25)),
        dict(soft_label_weight=0.0, hard_label_weight=1.0),  # pure CE: teacher not computed
        dict(divergence="tvd", hard_label_weight=2.0),
        dict(no_bias=True, no_labels=True),
        dict(no_bias=True, student_logit_scale=0.5, teacher_logit_scale=2.0,
             teacher_softcap=40.0),  # scale in the GEMM epilogue without a bias
    ],
)
def test_variants_torch(variant):
    variant = dict(variant)
    c = make_case((11,), 9, 14, 97, bias=not variant.pop("no_bias", False))
    if variant.pop("no_labels", False):
        c["labels"] = None
    check_against_ref(c, torch.tensor(1.3), chunk_size=5, backend="torch", **variant)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_truncate(backend):
    """V_s != V_t with vocab_mismatch='truncate': columns past min(V_s, V_t) get zero grad."""
    c = make_case((10,), 12, 8, 77, 64)
    _, grads = check_against_ref(c, divergence="reverse_kl", vocab_mismatch="truncate",
                                 chunk_size=6, backend=backend, student_softcap=25.0,
                                 hard_label_weight=0.5)
    assert (grads["ws"][64:] == 0).all() and (grads["bs"][64:] == 0).all()
    with pytest.raises(ValueError, match="vocab_mismatch='truncate'"):
        fused_linear_kd_loss(c["hs"], c["ws"], c["ht"], c["wt"], c["labels"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_does_no_weight_work(backend, monkeypatch):
    c = make_case((9,), 10, 6, 83)

    def boom(*a, **k):
        raise AssertionError("weight-gradient GEMM ran for a frozen head")

    monkeypatch.setattr(fl_ops, "_accumulate_f32", boom)
    check_against_ref(c, frozen=("ws", "bs"), divergence="skew_forward_kl", chunk_size=4,
                      backend=backend, **FULL)


def test_frozen_hidden_and_bias_only():
    """Gradients only for what requires them: weight alone, or bias alone."""
    c = make_case((8,), 10, 6, 45)
    check_against_ref(c, frozen=("hs",), chunk_size=3, backend="torch", **FULL)
    check_against_ref(c, frozen=("hs", "ws"), chunk_size=3, backend="torch", **FULL)


@pytest.mark.parametrize("chunk_size", [1, 7, 13, 64, None])
def test_chunk_sizes(chunk_size):
    c = make_case((13,), 8, 8, 50)
    check_against_ref(c, divergence="taid", chunk_size=chunk_size, backend="torch", **FULL)


def test_float64_inputs_are_exact():
    c = make_case((6,), 7, 5, 41, dtype=torch.float64)
    check_against_ref(c, divergence="skew_reverse_kl", chunk_size=4, backend="torch",
                      tol=1e-11, **FULL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_within_twice_torch_error(backend):
    """|fast - ref64| <= 2 |torch_bf16 - ref64| + atol, gradients back in bf16."""
    c = make_case((12,), 32, 24, 113, std=8.0, dtype=torch.bfloat16)
    kw = dict(divergence="forward_kl", student_softcap=20.0, hard_label_weight=0.2)
    loss, grads = run(fused_linear_kd_loss, c, chunk_size=5, backend=backend, **kw)
    ref, ref_grads = run(fused_linear_kd_loss_ref, as64(c), **kw)
    low, low_grads = run(fused_linear_kd_loss_ref, c, compute_dtype=torch.bfloat16, **kw)
    bf16 = torch.bfloat16
    assert_lowp(loss, low, ref, bf16)
    for k in ("hs", "ws", "bs"):
        assert grads[k].dtype == bf16
        assert_lowp(grads[k], low_grads[k], ref_grads[k], bf16, measure=rel_err)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_dtype_accumulation(backend):
    """weight_grad_accumulation='weight': no float32 buffer, bf16 weight/bias gradients within
    a few bf16 roundings (one per chunk) of the float64 reference; the loss and the hidden
    gradient are unchanged; identical to 'float32' for float32 weights."""
    c = make_case((12,), 32, 24, 113, std=8.0, dtype=torch.bfloat16)
    kw = dict(divergence="forward_kl", chunk_size=3, backend=backend)
    loss_w, g_w = run(fused_linear_kd_loss, c, weight_grad_accumulation="weight", **kw)
    loss_f, g_f = run(fused_linear_kd_loss, c, **kw)
    _, ref_g = run(fused_linear_kd_loss_ref, as64(c), divergence="forward_kl")
    _, low_g = run(fused_linear_kd_loss_ref, c, divergence="forward_kl",
                   compute_dtype=torch.bfloat16)
    assert torch.equal(loss_w, loss_f) and torch.equal(g_w["hs"], g_f["hs"])
    for k in ("ws", "bs"):
        assert g_w[k].dtype == torch.bfloat16
        assert_lowp(g_w[k], low_g[k], ref_g[k], torch.bfloat16, measure=rel_err)
        # the bf16 logit gradient dominates; one rounding per chunk adds little to it
        err = rel_err(g_w[k], ref_g[k])
        assert err <= rel_err(g_f[k], ref_g[k]) + 4 * torch.finfo(torch.bfloat16).eps
    c32 = make_case((7,), 9, 5, 41)
    kw32 = dict(divergence="tvd", chunk_size=2, backend=backend)
    _, a = run(fused_linear_kd_loss, c32, weight_grad_accumulation="weight", **kw32)
    _, b = run(fused_linear_kd_loss, c32, **kw32)
    assert all(torch.equal(a[k], b[k]) for k in ("hs", "ws", "bs"))
    with pytest.raises(ValueError, match="weight_grad_accumulation"):
        run(fused_linear_kd_loss, c32, weight_grad_accumulation="bf16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_and_empty(backend):
    c = make_case((5,), 6, 6, 33)
    c["labels"][:] = -100
    loss, grads = run(fused_linear_kd_loss, c, backend=backend, hard_label_weight=1.0,
                      chunk_size=2)
    assert float(loss) == 0.0
    for k in ("hs", "ws", "bs"):
        assert torch.isfinite(grads[k]).all() and (grads[k] == 0).all()
    e = make_case((0, 3), 6, 6, 33)
    loss, grads = run(fused_linear_kd_loss, e, backend=backend)
    assert float(loss) == 0.0 and grads["hs"].shape == (0, 3, 6) and (grads["ws"] == 0).all()


def test_no_grad_mode_and_teacher_constant():
    c = make_case((7,), 8, 8, 40)
    d = as64(c)
    ref = fused_linear_kd_loss_ref(d["hs"], d["ws"], d["ht"], d["wt"], c["labels"],
                                   student_bias=d["bs"], teacher_bias=d["bt"])
    hs = c["hs"].clone().requires_grad_()
    ht = c["ht"].clone().requires_grad_()
    wt = c["wt"].clone().requires_grad_()
    with torch.no_grad():
        out = fused_linear_kd_loss(hs, c["ws"], ht, wt, c["labels"], student_bias=c["bs"],
                                   teacher_bias=c["bt"], chunk_size=3)
    assert not out.requires_grad and rel_err(out, ref) <= 1e-5
    out = fused_linear_kd_loss(hs, c["ws"], ht, wt, c["labels"], student_bias=c["bs"],
                               teacher_bias=c["bt"], chunk_size=3)
    out.backward()
    assert hs.grad is not None and ht.grad is None and wt.grad is None


def test_backward_twice_raises():
    c = make_case((4,), 5, 5, 21)
    hs = c["hs"].clone().requires_grad_()
    out = fused_linear_kd_loss(hs, c["ws"], c["ht"], c["wt"])
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was called twice"):
        out.backward()


def test_chunk_size_choice(monkeypatch):
    v, h = 128256, 4096
    c = choose_chunk_size(v, h, h, torch.bfloat16, torch.bfloat16)
    assert c & (c - 1) == 0 and MIN_ROWS <= c <= MAX_ROWS
    assert c * chunk_bytes_per_row(v, h, h, torch.bfloat16, torch.bfloat16,
                                   student_softcap=False) <= 256 * 2**20
    capped = choose_chunk_size(v, h, h, torch.bfloat16, torch.bfloat16, student_softcap=True)
    assert capped <= c
    assert choose_chunk_size(v, h, h, torch.float32, torch.float32) < c
    assert choose_chunk_size(1000, 64, 64, torch.float32, torch.float32) == MAX_ROWS
    monkeypatch.setenv(BUDGET_ENV, "1024")
    assert choose_chunk_size(v, h, h, torch.bfloat16, torch.bfloat16) == 4 * c
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        choose_chunk_size(v, h, h, torch.bfloat16, torch.bfloat16)


def test_module_matches_function():
    c = make_case((2, 4), 8, 6, 37)
    mod = FusedLinearKDLoss(divergence="jsd", beta=0.25, student_softcap=30.0, chunk_size=3)
    a, ga = run(lambda *x, **k: mod(*x[:5], k["student_bias"], k["teacher_bias"]), c)
    b, gb = run(fused_linear_kd_loss, c, divergence="jsd", beta=0.25, student_softcap=30.0,
                chunk_size=3)
    assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert "jsd" in repr(mod)
    with pytest.raises(TypeError, match="unknown keyword"):
        FusedLinearKDLoss(softcap=3.0)


def test_torch_compile_fullgraph():
    """The chunk loop is one opaque custom op: no graph break, for two different N.

    Labels are left out: on CPU tensors the label range check reads values, which a
    traced graph cannot (on CUDA tensors the check is skipped)."""
    c = make_case((6,), 8, 8, 29)
    c["labels"] = None

    def f(hs, ws, ht, wt, labels, **kw):
        return fused_linear_kd_loss(hs, ws, ht, wt, labels, chunk_size=4, backend="torch",
                                    student_softcap=20.0, **kw)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n in (6, 9):
        c = make_case((n,), 8, 8, 29)
        c["labels"] = None
        a, ga = run(compiled, c)
        b, gb = run(f, c)
        assert rel_err(a, b) <= 1e-6
        assert all(rel_err(ga[k], gb[k]) <= 1e-6 for k in ga)


def _args(c, **over):
    a = dict(student_hidden=c["hs"], student_weight=c["ws"], teacher_hidden=c["ht"],
             teacher_weight=c["wt"], labels=c["labels"], student_bias=c["bs"],
             teacher_bias=c["bt"])
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (lambda c: dict(student_weight=c["ws"][:, :-1]), ValueError, "student_hidden has hidden"),
        (lambda c: dict(teacher_hidden=c["ht"][..., :-1]), ValueError, "teacher_hidden has"),
        (lambda c: dict(student_weight=c["ws"][0]), ValueError, "student_weight must have"),
        (lambda c: dict(student_weight=c["ws"][None]), ValueError, "student_weight must be 2-D"),
        (lambda c: dict(student_weight=c["ws"].double()), TypeError, "same dtype"),
        (lambda c: dict(teacher_bias=c["bt"].half()), TypeError, "teacher_bias"),
        (lambda c: dict(student_bias=c["bs"][:-1]), ValueError, "student_bias must have shape"),
        (lambda c: dict(teacher_weight=c["wt"][:-2], teacher_bias=None), ValueError,
         "vocabulary sizes differ"),
        (lambda c: dict(teacher_hidden=c["ht"][:-1]), ValueError, "same leading shape"),
        (lambda c: dict(labels=c["labels"].float()), TypeError, "labels"),
        (lambda c: dict(labels=torch.full_like(c["labels"], 99)), ValueError, "labels must be"),
        (lambda c: dict(student_softcap=0.0), ValueError, "student_softcap"),
        (lambda c: dict(teacher_softcap=-1.0), ValueError, "teacher_softcap"),
        (lambda c: dict(student_logit_scale=float("inf")), ValueError, "student_logit_scale"),
        (lambda c: dict(teacher_logit_scale="2"), TypeError, "teacher_logit_scale"),
        (lambda c: dict(chunk_size=0), ValueError, "chunk_size"),
        (lambda c: dict(chunk_size=2.0), TypeError, "chunk_size"),
        (lambda c: dict(student_hidden=c["hs"].long()), TypeError, "student_hidden"),
        (lambda c: dict(teacher_weight=None), TypeError, "teacher_weight"),
        (lambda c: dict(divergence="kl"), ValueError, "divergence"),
        (lambda c: dict(backend="cuda"), Exception, "backend"),
    ],
)
def test_bad_input_raises_before_any_kernel(over, exc, match, monkeypatch):
    c = make_case((2, 3), 6, 5, 17)

    def boom(*a, **k):
        raise AssertionError("a kernel ran before validation finished")

    monkeypatch.setattr("kdkernels.fused_linear.function.fused_linear_kd_fwd", boom)
    with pytest.raises(exc, match=match):
        fused_linear_kd_loss(**_args(c, **over(c)))


# ----------------------------------------------------------------------------- GPU

def _chunked_reference(c, compute_dtype, rows=512, **kw):
    """The oracle row chunk by row chunk (reduction='sum' per chunk, then the mean), so the
    N x V logits of the target shape never exist at once; gradients summed in float64."""
    n = c["hs"].shape[0]
    leaf = {k: c[k].to(compute_dtype).detach().requires_grad_() for k in ("ws", "bs")}
    wt, bt = c["wt"].to(compute_dtype), c["bt"].to(compute_dtype)
    total, gh = 0.0, []
    gw = torch.zeros(c["ws"].shape, dtype=torch.float64, device=c["ws"].device)
    gb = torch.zeros(c["bs"].shape, dtype=torch.float64, device=c["bs"].device)
    for r0 in range(0, n, rows):
        h = c["hs"][r0:r0 + rows].to(compute_dtype).detach().requires_grad_()
        out = fused_linear_kd_loss_ref(
            h, leaf["ws"], c["ht"][r0:r0 + rows], wt, c["labels"][r0:r0 + rows],
            student_bias=leaf["bs"], teacher_bias=bt, compute_dtype=compute_dtype,
            reduction="sum", **kw)
        out.backward()
        total += float(out)
        gh.append(h.grad.double())
        gw += leaf["ws"].grad.double()
        gb += leaf["bs"].grad.double()
        leaf["ws"].grad = leaf["bs"].grad = None
    count = max(1, int((c["labels"] != -100).sum()))
    return total / count, torch.cat(gh) / count, gw / count, gb / count


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_target_shape_bf16(backend):
    """N=8192, H=4096, V=128256, bf16: within twice PyTorch's own bf16 error of float64,
    and the peak memory above inputs and returned gradients within the documented formula
    (float32 weight accumulator + chunk buffers), far below the unfused path's."""
    n, h, v = 8192, 4096, 128256
    c = make_case((n,), h, h, v, std=6.0, dtype=torch.bfloat16, device="cuda")
    kw = dict(divergence="forward_kl", hard_label_weight=0.1, temperature=2.0)
    hs, ws, bs = (c[k].detach().clone().requires_grad_() for k in ("hs", "ws", "bs"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_kd_loss(hs, ws, c["ht"], c["wt"], c["labels"], student_bias=bs,
                                teacher_bias=c["bt"], backend=backend, **kw)
    loss.backward()
    torch.cuda.synchronize()
    grads = (hs.grad, ws.grad, bs.grad)
    extra = torch.cuda.max_memory_allocated() - base - sum(
        g.numel() * g.element_size() for g in grads)
    assert extra <= 4 * v * (h + 1) + 512 * 2**20, extra / 2**30
    ref = _chunked_reference(c, torch.float64, **kw)
    low = _chunked_reference(c, torch.bfloat16, **kw)
    bf16 = torch.bfloat16
    # one scalar: PyTorch's own error can cancel by chance, so allow one bf16 ulp of it too
    as_t = lambda x: torch.as_tensor(float(x), dtype=torch.float64)  # noqa: E731
    assert_lowp(as_t(loss), as_t(low[0]), as_t(ref[0]), bf16, slack=2**-8 * abs(ref[0]))
    for g, r, lo in zip(grads, ref[1:], low[1:]):
        assert g.dtype == bf16 and torch.isfinite(g).all()
        assert_lowp(g, lo, r, bf16, measure=rel_err)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n", [8192, 32768])
def test_gpu_weight_dtype_accumulation_within_one_gib(n):
    """weight_grad_accumulation='weight' at H=4096, V=128256, bf16: peak memory above the
    inputs and the returned gradients stays within 1 GiB (the DEVELOPERS.md target)."""
    h, v = 4096, 128256
    c = make_case((n,), h, h, v, std=6.0, dtype=torch.bfloat16, device="cuda", bias=False)
    hs, ws = (c[k].detach().clone().requires_grad_() for k in ("hs", "ws"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_kd_loss(hs, ws, c["ht"], c["wt"], c["labels"], divergence="jsd",
                                weight_grad_accumulation="weight")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - sum(
        g.numel() * g.element_size() for g in (hs.grad, ws.grad))
    assert extra <= 2**30, extra / 2**30
    assert torch.isfinite(ws.grad).all() and torch.isfinite(hs.grad).all()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gpu_every_divergence_float32(divergence):
    """Moderate shape on the GPU in float32 (TF32 off), every feature on, vs float64."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        c = make_case((4, 129), 256, 192, 32000, device="cuda")
        check_against_ref(c, torch.tensor(0.7, device="cuda"), divergence=divergence,
                          backend="triton", chunk_size=100, tol=2e-5, **FULL)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
