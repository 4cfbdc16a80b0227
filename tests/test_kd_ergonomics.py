"""kd_loss and the fused losses in a training loop: tensor taid_t / temperature under
torch.compile, a 0 normalizer, autocast, row-strided logits, mixture keywords a divergence
ignores, TAID-style vocabulary truncation warnings, and a CPU install without Triton.

The `triton` backend runs here under TRITON_INTERPRET=1 (set by conftest.py), tiny shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_err

import kdkernels as K
from kdkernels.fused_linear.reference import fused_linear_kd_loss_ref
from kdkernels.kd.ops import KD_FWD
from kdkernels.kd.reference import kd_loss_ref
from kdkernels.topk.reference import topk_kd_loss_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def logits(*shape, std=8.0, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(dtype)


def grad_of(fn, x, *args, **kw):
    """(fn(x, ...), ∂ fn.sum() / ∂x) on a fresh leaf copy of x."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.sum().backward()
    return out.detach(), x.grad


class GraphCounter:
    """A torch.compile backend that counts the graphs it is handed (one per (re)compile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


# ----------------------------------------------------------------- tensor taid_t / temperature

T_VALUES = (0.05, 0.3, 0.5, 0.71, 0.9, 1.0)  # 1.0: the forward-KL endpoint, inside the op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keyword", ["taid_t", "temperature"])
def test_tensor_keyword_compiles_once(backend, keyword):
    """Six values of a 0-dim tensor taid_t (or temperature): one graph, eager's values."""
    torch._dynamo.reset()
    s, t = logits(3, 5, 40), logits(3, 5, 40)
    y = torch.randint(0, 40, (3, 5))
    y[0, :2] = -100
    div, fixed = ("taid", {}) if keyword == "taid_t" else ("jsd", dict(beta=0.3))

    def f(s, value):
        return K.kd_loss(s, t, y, divergence=div, backend=backend, **fixed, **{keyword: value})

    counter = GraphCounter()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    values = T_VALUES if keyword == "taid_t" else tuple(0.5 + 2 * x for x in T_VALUES)
    for value in values:
        tensor = torch.tensor(value)  # float32: the op reads float(tensor)
        got, got_g = grad_of(compiled, s, tensor)
        value = tensor.item()
        want, want_g = grad_of(f, s, value)  # the Python float, eager
        ref, ref_g = grad_of(kd_loss_ref, s.double(), t.double(), y, divergence=div,
                             **fixed, **{keyword: value})
        assert torch.equal(got, want) and torch.equal(got_g, want_g), value
        assert rel_err(got, ref) <= 1e-5 and rel_err(got_g, ref_g) <= 1e-5
    assert counter.graphs == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_tensor_keywords_compile_once(backend):
    torch._dynamo.reset()
    hs, ws = torch.randn(6, 8), logits(29, 8, std=3.0)
    ht, wt = torch.randn(6, 5), logits(29, 5, std=3.0)
    y = torch.randint(0, 29, (6,))

    def f(h, tt, tau):
        return K.fused_linear_kd_loss(h, ws, ht, wt, y, divergence="taid", taid_t=tt,
                                      temperature=tau, chunk_size=4, backend=backend)

    counter = GraphCounter()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    for tt, tau in ((0.25, 1.0), (0.5, 2.0), (0.75, 0.625), (1.0, 1.5)):  # exact in float32
        got, got_g = grad_of(compiled, hs, torch.tensor(tt), torch.tensor(tau))
        want, want_g = grad_of(f, hs, tt, tau)
        assert torch.equal(got, want) and torch.equal(got_g, want_g)
    assert counter.graphs == 1


def test_module_with_a_tensor_taid_t_filled_each_step():
    """KDLoss(taid_t=tensor), the tensor updated in place from a TAIDSchedule: one graph."""
    torch._dynamo.reset()
    t_now = torch.tensor(0.4)
    loss_fn = K.KDLoss(divergence="taid", taid_t=t_now)
    sched = K.TAIDSchedule(total_steps=10)
    counter = GraphCounter()
    step = torch.compile(lambda s, t: loss_fn(s, t), fullgraph=True, backend=counter)
    s, t = logits(4, 33), logits(4, 33)
    used = []
    for k in range(5):
        used.append(t_now.item())
        loss = step(s * (1 + 0.1 * k), t)
        assert torch.equal(loss, K.kd_loss(s * (1 + 0.1 * k), t, divergence="taid",
                                           taid_t=used[-1]))
        t_now.fill_(sched.step(loss.item()))
    assert counter.graphs == 1 and len(set(used)) == 4  # (the first step only records)


@pytest.mark.parametrize("keyword,value,exc,match", [
    ("taid_t", torch.tensor(1.5), ValueError, "taid_t must be in"),
    ("taid_t", torch.tensor(float("nan")), ValueError, "taid_t must be finite"),
    ("taid_t", torch.tensor([0.5, 0.5]), ValueError, "0-dim tensor"),
    ("taid_t", torch.tensor(True), TypeError, "taid_t"),
    ("temperature", torch.tensor(0.0), ValueError, "temperature must be in"),
    ("temperature", torch.tensor(-2), ValueError, "temperature must be in"),
])
def test_bad_tensor_keyword_raises(keyword, value, exc, match):
    s, t = logits(2, 10), logits(2, 10)
    kw = {"divergence": "taid", "taid_t": 0.5, keyword: value}
    with pytest.raises(exc, match=match):
        K.kd_loss(s, t, **kw)


def test_bad_tensor_value_raises_inside_the_compiled_op():
    """Traced, the value is not read (no graph break); the custom op checks it when it runs."""
    torch._dynamo.reset()
    s, t = logits(2, 10), logits(2, 10)
    f = torch.compile(lambda s, tt: K.kd_loss(s, t, divergence="taid", taid_t=tt),
                      fullgraph=True, backend=GraphCounter())
    assert torch.isfinite(f(s, torch.tensor(0.3)))
    with pytest.raises(ValueError, match="taid_t must be in"):
        f(s, torch.tensor(1.25))


def test_tensor_keywords_need_no_gradient_and_stay_untouched():
    tau = torch.tensor(2.0, requires_grad=True)
    s, t = logits(3, 12), logits(3, 12)
    got, g = grad_of(K.kd_loss, s, t, temperature=tau, divergence="reverse_kl")
    want, wg = grad_of(K.kd_loss, s, t, temperature=2.0, divergence="reverse_kl")
    assert torch.equal(got, want) and torch.equal(g, wg) and tau.grad is None


# ----------------------------------------------------------------------------- normalizer 0

ZEROS = [0, 0.0, torch.tensor(0), torch.tensor(0.0), torch.tensor([0]),
         torch.tensor([0.0], dtype=torch.float64)]


def _losses_with_labels(y):
    """(name, fn(student [N, V] leaf, normalizer) -> loss, student) for every loss taking a
    normalizer, at labels y [N] (V = 20)."""
    n, v = y.shape[0], 20
    s, t = logits(n, v), logits(n, v)
    idx = torch.topk(t, 4).indices
    vals = t.gather(-1, idx)
    hs, ws, ht, wt = torch.randn(n, 6), logits(v, 6, std=2.0), torch.randn(n, 5), logits(v, 5)
    return [
        ("kd_loss", lambda x, nrm: K.kd_loss(x, t, y, normalizer=nrm), s),
        ("plackett_luce_loss", lambda x, nrm: K.plackett_luce_loss(x, t, y, normalizer=nrm), s),
        ("topk_kd_loss", lambda x, nrm: K.topk_kd_loss(x, idx, vals, y, normalizer=nrm), s),
        ("fused_linear_kd_loss",
         lambda x, nrm: K.fused_linear_kd_loss(x, ws, ht, wt, y, normalizer=nrm), hs),
        ("fused_linear_topk_kd_loss",
         lambda x, nrm: K.fused_linear_topk_kd_loss(x, ws, idx, vals, y, normalizer=nrm), hs),
    ]


@pytest.mark.parametrize("zero", ZEROS, ids=lambda z: repr(z).replace(" ", ""))
def test_zero_normalizer_without_valid_rows_gives_zero(zero):
    """An accumulation window without a valid token: Transformers passes 0."""
    y = torch.full((5,), -100)
    for name, fn, x in _losses_with_labels(y):
        loss, grad = grad_of(fn, x, zero)
        assert loss.item() == 0.0 and torch.isfinite(grad).all() and (grad == 0).all(), name


def test_zero_normalizer_with_valid_rows_raises():
    y = torch.tensor([3, -100, 7, 1])
    for _name, fn, x in _losses_with_labels(y):
        for zero in (0, torch.tensor(0), torch.tensor([0.0])):
            with pytest.raises(ValueError, match="normalizer is 0 but 3 row"):
                fn(x, zero)
        with pytest.raises(ValueError, match="normalizer"):
            fn(x, -1)
    with pytest.raises(ValueError, match="normalizer is 0 but 2 row"):
        K.kd_loss(logits(2, 9), logits(2, 9), normalizer=0)  # no labels: every row counts


def test_one_element_and_integer_normalizers_are_numbers():
    y = torch.tensor([3, -100, 7, 1, 0])
    for name, fn, x in _losses_with_labels(y):
        want, want_g = grad_of(fn, x, 6.0)
        for nrm in (torch.tensor([6.0]), torch.tensor(6), torch.tensor([6], dtype=torch.int32)):
            got, got_g = grad_of(fn, x, nrm)
            assert torch.equal(got, want) and torch.equal(got_g, want_g), (name, nrm)
    with pytest.raises(ValueError, match="normalizer"):
        K.kd_loss(logits(2, 9), logits(2, 9), normalizer=torch.ones(1, 1, 2))


def test_zero_normalizer_where_it_cannot_be_checked_is_nan_not_a_number():
    """Traced (as on a GPU, where reading the labels would synchronise), a 0 normalizer is
    not refused: with valid rows the loss and gradient are NaN, without them 0."""
    torch._dynamo.reset()
    s, t = logits(4, 16), logits(4, 16)
    f = torch.compile(lambda x, y, nrm: K.kd_loss(x, t, y, normalizer=nrm), fullgraph=True,
                      backend=GraphCounter())
    loss, grad = grad_of(f, s, torch.tensor([1, -100, 2, 3]), torch.tensor(0))
    assert loss.isnan() and grad.isnan().any()
    loss, grad = grad_of(f, s, torch.full((4,), -100), torch.tensor(0))
    assert loss.item() == 0.0 and (grad == 0).all()


# ----------------------------------------------------------------------------- autocast

def _autocast_reference(fn_ref, hs, ws, bs, *args, **kw):
    """The eager formula: F.linear under CPU autocast (bf16 logits), then the float64 oracle
    on those logits; gradients through autocast's own bf16 backward (PyTorch's error) and,
    in float64 from the same bf16 logits and rounded inputs, the exact chain rule."""
    leaves = [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.linear(*leaves)
    assert z.dtype == torch.bfloat16
    loss = fn_ref(z.double(), *args, **kw)
    loss.sum().backward()
    z64 = z.detach().double().requires_grad_()
    fn_ref(z64, *args, **kw).sum().backward()
    dz = z64.grad
    h16, w16 = (x.to(torch.bfloat16).double() for x in (hs, ws))
    exact = (dz @ w16, dz.t() @ h16, dz.sum(0))
    return loss.detach(), [x.grad for x in leaves], exact


@pytest.mark.parametrize("which", ["kd", "topk"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_losses_follow_cpu_autocast(which, hidden_dtype, reduction):
    """fp32 (or bf16) hidden states with an fp32 head under autocast(bf16): the loss of the
    bf16 logits autocast's linear gives, gradients in each input's own dtype, within
    twice autocast's own gradient error of the float64 chain rule ('none' recomputes the
    chunks in backward, outside the autocast region)."""
    n, h, v = 12, 16, 45
    hs = torch.randn(n, h).to(hidden_dtype)
    ws, bs = logits(v, h, std=2.0), torch.randn(v)
    y = torch.randint(0, v, (n,))
    y[:3] = -100
    if which == "kd":
        ht, wt = torch.randn(n, 7), logits(v, 7, std=2.0)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tz = F.linear(ht, wt).double()
        fn = lambda a, b, c: K.fused_linear_kd_loss(  # noqa: E731
            a, b, ht, wt, y, student_bias=c, divergence="jsd", beta=0.3, chunk_size=5,
            reduction=reduction)
        ref = _autocast_reference(kd_loss_ref, hs, ws, bs, tz, y, divergence="jsd", beta=0.3,
                                  reduction=reduction)
    else:
        idx = torch.stack([torch.randperm(v)[:5] for _ in range(n)])
        vals = logits(n, 5)
        fn = lambda a, b, c: K.fused_linear_topk_kd_loss(  # noqa: E731
            a, b, idx, vals, y, student_bias=c, divergence="reverse_kl", chunk_size=5,
            reduction=reduction)
        ref = _autocast_reference(topk_kd_loss_ref, hs, ws, bs, idx, vals, y,
                                  divergence="reverse_kl", reduction=reduction)
    ref_loss, torch_grads, exact = ref
    leaves = [x.detach().clone().requires_grad_() for x in (hs, ws, bs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fn(*leaves)
    loss.sum().backward()
    assert loss.dtype == torch.float32 and rel_err(loss, ref_loss) <= 1e-5
    for leaf, tg, ex in zip(leaves, torch_grads, exact):
        assert leaf.grad.dtype == leaf.dtype
        assert rel_err(leaf.grad, ex) <= 2 * rel_err(tg, ex) + 1e-3


def test_mismatched_dtypes_outside_autocast_say_what_to_do():
    hs, ws = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(20, 8)
    with pytest.raises(TypeError, match="same dtype.*torch.autocast"):
        K.fused_linear_kd_loss(hs, ws, hs, ws)
    with pytest.raises(TypeError, match="same dtype.*torch.autocast"):
        K.fused_linear_topk_kd_loss(hs, ws, torch.zeros(4, 2, dtype=torch.long),
                                    torch.zeros(4, 2))


def test_float64_stays_float64_under_autocast():
    """Autocast leaves float64 alone (as for a linear layer): the exact float64 result."""
    hs, ws = torch.randn(5, 6, dtype=torch.float64), logits(17, 6, dtype=torch.float64)
    ht, wt = torch.randn(5, 4, dtype=torch.float64), logits(17, 4, dtype=torch.float64)
    want = K.fused_linear_kd_loss(hs, ws, ht, wt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = K.fused_linear_kd_loss(hs, ws, ht, wt)
    assert torch.equal(got, want)
    ref = fused_linear_kd_loss_ref(hs, ws, ht, wt)
    assert rel_err(got, ref) <= 1e-6


# ----------------------------------------------------------------------------- strided rows

def _spy(monkeypatch, backend):
    """Wrap the kd launcher of `backend`: returns the list of (s, t) it is handed."""
    real, seen = KD_FWD.implementation(backend), []

    def spy(s, t, *args):
        seen.append((s, t))
        return real(s, t, *args)

    monkeypatch.setitem(KD_FWD._fns, backend, spy)
    return seen


def _shares(view, base):
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend,shape", [
    ("torch", (2, 41, 4096)),  # rows of one outer index fill a torch-path chunk
    pytest.param("triton", (3, 6, 37), marks=pytest.mark.interpreter),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sliced_logits_reach_the_launcher_without_a_copy(monkeypatch, backend, shape,
                                                         reduction):
    """kd_loss(logits[:, :-1], ...): the launcher reads the full tensors' storage; values and
    gradients equal the contiguous call's; the gradient has the full tensor's shape."""
    b, t_len, v = shape
    s_full, t_full = logits(b, t_len, v, std=20.0), logits(b, t_len, v, std=20.0)
    y = torch.randint(0, v, (b, t_len - 1))
    y[0, 0] = -100
    kw = dict(divergence="reverse_kl", temperature=1.5, hard_label_weight=0.2,
              reduction=reduction, backend=backend)
    seen = _spy(monkeypatch, backend)
    s_leaf = s_full.clone().requires_grad_()
    out = K.kd_loss(s_leaf[:, :-1], t_full[:, :-1], y, **kw)
    out.sum().backward()
    assert seen and all(_shares(s, s_leaf) and _shares(t, t_full) for s, t in seen)
    assert all(s.dim() == (3 if backend == "triton" else 2) for s, _ in seen)
    want, want_g = grad_of(K.kd_loss, s_full[:, :-1].contiguous(),
                           t_full[:, :-1].contiguous(), y, **kw)
    assert torch.equal(out.detach(), want)
    assert s_leaf.grad.shape == s_full.shape and (s_leaf.grad[:, -1] == 0).all()
    assert torch.equal(s_leaf.grad[:, :-1], want_g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_each_form(backend):
    """A sliced student with a contiguous teacher (and the reverse), a column slice of a
    wider tensor (one row stride), truncated vocabularies: all equal the contiguous call."""
    big = logits(2, 5, 3, 30, std=15.0)
    cases = [
        (big[:, 1:, 0], logits(2, 4, 30)),            # two-level student, packed teacher
        (logits(2, 4, 30), big[:, :-1, 2]),           # and the reverse
        (big[0, :, 1, :26], big[1, :, 2, :26]),       # one stride each, columns sliced
    ]
    for s, t in cases:
        want, want_g = grad_of(K.kd_loss, s.contiguous(), t.contiguous(), divergence="tvd",
                               backend=backend)
        got, got_g = grad_of(K.kd_loss, s, t, divergence="tvd", backend=backend)
        assert torch.equal(got, want) and torch.equal(got_g, want_g)


def test_small_inner_blocks_are_grouped_for_one_stride_launchers(monkeypatch):
    """[B, 2, V] slices: the torch launcher gets whole outer indices grouped to about a
    chunk (a chunk-sized copy), not one call per two rows."""
    seen = _spy(monkeypatch, "torch")
    s, t = logits(64, 3, 50), logits(64, 3, 50)
    got = K.kd_loss(s[:, 1:], t[:, 1:], backend="torch")
    assert len(seen) == 1 and seen[0][0].shape == (128, 50)
    assert torch.equal(got, K.kd_loss(s[:, 1:].contiguous(), t[:, 1:].contiguous()))


# ----------------------------------------------------------------- keywords a divergence ignores

@pytest.mark.parametrize("divergence,kw", [
    ("forward_kl", dict(beta=0.3)), ("tvd", dict(beta=0.7)), ("taid", dict(beta=0.2)),
    ("skew_forward_kl", dict(beta=0.3)), ("jsd", dict(alpha=0.3)),
    ("reverse_kl", dict(alpha=0.5)), ("taid", dict(alpha=0.5)),
])
def test_a_keyword_the_divergence_ignores_raises(divergence, kw):
    s, t = logits(3, 11), logits(3, 11)
    extra = dict(taid_t=0.5) if divergence == "taid" else {}
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name}=.* has no effect with divergence"):
        K.kd_loss(s, t, divergence=divergence, **kw, **extra)
    hs, ws = torch.randn(3, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match=f"{name}=.* has no effect"):
        K.fused_linear_kd_loss(hs, ws, hs, ws, divergence=divergence, **kw, **extra)
    with pytest.raises(ValueError, match=f"{name}=.* has no effect"):
        K.KDLoss(divergence=divergence, **kw, **extra)(s, t)
    # the documented defaults, passed explicitly, are fine (configs that pass every key)
    K.kd_loss(s, t, divergence=divergence, beta=0.5, alpha=0.1, **extra)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_taid_t_with_another_divergence_raises(divergence):
    s, t = logits(3, 11), logits(3, 11)
    with pytest.raises(ValueError, match="taid_t has no effect"):
        K.kd_loss(s, t, divergence=divergence, taid_t=0.4)
    hs, ws = torch.randn(3, 4), torch.randn(11, 4)
    with pytest.raises(ValueError, match="taid_t has no effect"):
        K.fused_linear_kd_loss(hs, ws, hs, ws, divergence=divergence, taid_t=0.4)


# ----------------------------------------------------------------------------- truncation

def test_truncating_unrelated_vocabularies_warns():
    y = torch.tensor([5, 7])
    with pytest.warns(UserWarning, match="share the tokenizer"):
        K.kd_loss(logits(2, 32000), logits(2, 50257), y, vocab_mismatch="truncate")
    with pytest.warns(UserWarning, match="share the tokenizer"):  # > 1 %, < 1024 columns
        K.kd_loss(logits(2, 500), logits(2, 520), y, vocab_mismatch="truncate")
    hs, ws, wt = torch.randn(2, 4), torch.randn(2000, 4), torch.randn(3100, 4)
    with pytest.warns(UserWarning, match="share the tokenizer"):
        K.fused_linear_kd_loss(hs, ws, hs, wt, y, vocab_mismatch="truncate")


def test_one_tokenizer_padded_to_two_sizes_does_not_warn():
    """Qwen2.5-7B's head (152064 rows) against Qwen2.5-0.5B's (151936)."""
    s, t = logits(1, 151936, std=3.0), logits(1, 152064, std=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = K.kd_loss(s, t, vocab_mismatch="truncate")
    assert torch.equal(got, K.kd_loss(s, t[:, :151936]))


# ----------------------------------------------------------------------------- without Triton

WITHOUT_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # as if not installed: find_spec None, import fails
    import torch
    import kdkernels as K
    from kdkernels import BackendUnavailableError

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 30, generator=g) * 5, torch.randn(4, 30, generator=g) * 5
    y = torch.tensor([1, 2, -100, 29])
    idx = torch.topk(t, 5).indices
    vals = t.gather(1, idx)
    hs, ws = torch.randn(4, 8, generator=g), torch.randn(30, 8, generator=g)
    ht, wt = torch.randn(4, 6, generator=g), torch.randn(30, 6, generator=g)
    cost = torch.rand(2, 5, 5, generator=g)
    calls = {
        "kd_loss": lambda be: K.kd_loss(s, t, y, backend=be),
        "plackett_luce_loss": lambda be: K.plackett_luce_loss(s, t, y, backend=be),
        "topk_kd_loss": lambda be: K.topk_kd_loss(s, idx, vals, y, backend=be),
        "fused_linear_kd_loss": lambda be: K.fused_linear_kd_loss(hs, ws, ht, wt, y,
                                                                  backend=be),
        "fused_linear_topk_kd_loss": lambda be: K.fused_linear_topk_kd_loss(
            hs, ws, idx, vals, y, backend=be),
        "sinkhorn": lambda be: K.sinkhorn(cost, epsilon=0.1, n_iters=5, backend=be)[0],
        "sinkhorn_loss": lambda be: K.sinkhorn_loss(s, t, backend=be),
        "graph_on_logits_loss": lambda be: K.graph_on_logits_loss(
            s.reshape(2, 2, 30), t.reshape(2, 2, 30), 4, backend=be),
        "topk_select": lambda be: K.topk_select(s, 3, backend=be)[0],
    }
    for name, call in calls.items():
        for be in ("auto", "torch"):
            assert torch.isfinite(call(be)).all(), (name, be)
        try:
            call("triton")
        except BackendUnavailableError as e:
            assert "triton is not installed" in str(e), (name, str(e))
        else:
            raise AssertionError(name + ": backend='triton' ran without triton")
    assert sys.modules["triton"] is None
    assert not [m for m in sys.modules if m.startswith("triton.")]
    print("ok", len(calls))
""")


def test_triton_is_an_extra():
    """pip install kdkernels pulls no Triton; kdkernels[triton] (and [test]) do."""
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert not [d for d in project["dependencies"] if d.startswith("triton")]
    extras = project["optional-dependencies"]
    for extra in ("triton", "test"):
        assert [d for d in extras[extra] if d.startswith("triton>=")], extra


def test_every_cpu_path_works_without_triton():
    """A CPU machine without Triton: import, every op on auto and torch; an explicit
    backend='triton' raises BackendUnavailableError naming the missing package."""
    env = dict(os.environ, KDKERNELS_BACKEND="auto")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True,
                         cwd=root, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok 9"
