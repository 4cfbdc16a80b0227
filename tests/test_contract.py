"""The contract every loss keeps (docs/spec.md, shared rules), one parametrised test per rule.

Each loss is described once below: how to build its inputs for N rows (the student
tensor that gets the gradient, the teacher tensors that must not) and how to call it.
The rules: ignored rows / masked positions give zero loss and zero gradient and do not
matter; the reductions and `normalizer` agree with each other; double backward is
refused with a message that names it; inputs are never modified; the teacher never gets
a gradient; an empty batch works; `torch.compile(fullgraph=True)` traces the loss
without graph breaks and matches eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from _helpers import rel_err

import kdkernels as K

V = 23
IGNORE = -100


def _labels(n, v=V):
    y = torch.randint(0, v, (n,))
    y[::3] = IGNORE  # rows 0, 3, 6, ... are ignored
    return y


@dataclass
class Loss:
    """make(n) -> dict of input tensors: 'student' gets the gradient, names in `teacher`
    must not; call(inputs, **kw) -> loss. `labels`: takes labels/ignore_index, reductions
    and normalizer; `rows`: how student rows map to loss rows (None: not row-wise)."""

    make: object
    call: object
    teacher: tuple = ()
    labels: bool = False
    kw: dict = field(default_factory=dict)


def _logits(n, v=V, std=4.0):
    return torch.randn(n, v) * std


def _sampled(n, k=8):
    smp = K.sample_teacher(_logits(n), k)
    return dict(idx=smp.indices, w=smp.weights)


def _record(x):
    return K.TeacherSamples(x["idx"], x["w"], V, draws=8)


LOSSES = {
    "kd_loss": Loss(
        make=lambda n: dict(student=_logits(n), t=_logits(n), y=_labels(n)),
        call=lambda x, **kw: K.kd_loss(x["student"], x["t"], x["y"], divergence="jsd",
                                       hard_label_weight=0.3, **kw),
        teacher=("t",), labels=True),
    "fused_linear_kd_loss": Loss(
        make=lambda n: dict(student=torch.randn(n, 7), ws=torch.randn(V, 7) / 2,
                            ht=torch.randn(n, 5), wt=torch.randn(V, 5) / 2, y=_labels(n)),
        call=lambda x, **kw: K.fused_linear_kd_loss(
            x["student"], x["ws"], x["ht"], x["wt"], x["y"], divergence="skew_forward_kl",
            student_softcap=6.0, chunk_size=4, **kw),
        teacher=("ht", "wt"), labels=True),
    "fused_linear_kd_loss[teacher_logits]": Loss(  # a stored bf16 teacher instead of a head
        make=lambda n: dict(student=torch.randn(n, 7), ws=torch.randn(V, 7) / 2,
                            t=_logits(n).to(torch.bfloat16), y=_labels(n)),
        call=lambda x, **kw: K.fused_linear_kd_loss(
            x["student"], x["ws"], labels=x["y"], teacher_logits=x["t"], divergence="jsd",
            beta=0.3, student_softcap=6.0, chunk_size=4, **kw),
        teacher=("t",), labels=True),
    "fused_linear_topk_kd_loss": Loss(
        make=lambda n: dict(student=torch.randn(n, 7), ws=torch.randn(V, 7) * 2, idx=torch.stack(
            [torch.randperm(V)[:6] for _ in range(n)]) if n else torch.zeros(0, 6).long(),
            vals=_logits(n, 6), y=_labels(n)),
        call=lambda x, **kw: K.fused_linear_topk_kd_loss(
            x["student"], x["ws"], x["idx"], x["vals"], x["y"], divergence="jsd", beta=0.3,
            student_softcap=6.0, chunk_size=4, **kw),
        teacher=("vals",), labels=True),
    "plackett_luce_loss": Loss(
        make=lambda n: dict(student=_logits(n), t=_logits(n), y=_labels(n)),
        call=lambda x, **kw: K.plackett_luce_loss(x["student"], x["t"], x["y"], top_k=5, **kw),
        teacher=("t",), labels=True),
    "topk_kd_loss": Loss(
        make=lambda n: dict(student=_logits(n), idx=torch.stack(
            [torch.randperm(V)[:6] for _ in range(n)]) if n else torch.zeros(0, 6).long(),
            vals=_logits(n, 6), y=_labels(n)),
        call=lambda x, **kw: K.topk_kd_loss(x["student"], x["idx"], x["vals"], x["y"],
                                            divergence="reverse_kl", **kw),
        teacher=("vals",), labels=True),
    "sinkhorn_loss": Loss(
        make=lambda n: dict(student=_logits(n).view(n // 3, 3, V) if n else _logits(0).view(
            0, 3, V), t=_logits(n).view(-1, 3, V)),
        call=lambda x, **kw: K.sinkhorn_loss(x["student"], x["t"], n_iters=4, **kw),
        teacher=("t",)),
    "graph_on_logits_loss": Loss(
        make=lambda n: dict(student=_logits(n).view(-1, 3, V), t=_logits(n).view(-1, 3, V),
                            mask=(torch.arange(n).view(-1, 3) % 4 != 0)),
        call=lambda x, **kw: K.graph_on_logits_loss(x["student"], x["t"], 4, mask=x["mask"],
                                                    **kw),
        teacher=("t",)),
    "sampled_kd_loss": Loss(
        make=lambda n: dict(student=_logits(n), **_sampled(n), y=_labels(n)),
        call=lambda x, **kw: K.sampled_kd_loss(x["student"], _record(x), x["y"],
                                               hard_label_weight=0.3, **kw),
        teacher=("w",), labels=True),
    "fused_linear_sampled_kd_loss": Loss(  # τ ≠ 1 with a hard label: two passes
        make=lambda n: dict(student=torch.randn(n, 7), ws=torch.randn(V, 7) * 2, **_sampled(n),
                            y=_labels(n)),
        call=lambda x, **kw: K.fused_linear_sampled_kd_loss(
            x["student"], x["ws"], _record(x), x["y"], temperature=2.0, hard_label_weight=0.3,
            student_softcap=6.0, chunk_size=4, **kw),
        teacher=("w",), labels=True),
    "uld_loss": Loss(  # a teacher vocabulary of another size
        make=lambda n: dict(student=_logits(n), t=_logits(n, V + 6), y=_labels(n)),
        call=lambda x, **kw: K.uld_loss(x["student"], x["t"], x["y"], top_k=11,
                                        hard_label_weight=0.3, **kw),
        teacher=("t",), labels=True),
}
N = 12  # rows (a multiple of 3: sinkhorn batches and graph groups of 3)


def _inputs(name, n=N, grad_teacher=False):
    loss = LOSSES[name]
    x = loss.make(n)
    x["student"].requires_grad_(True)
    if grad_teacher:
        for k in loss.teacher:
            x[k].requires_grad_(True)
    return x


def _loss_and_grad(name, x, **kw):
    x = dict(x, student=x["student"].detach().clone().requires_grad_(True))
    out = LOSSES[name].call(x, **kw)
    out.backward(torch.ones_like(out))
    return out.detach(), x["student"].grad


ALL = sorted(LOSSES)
LABELLED = [n for n in ALL if LOSSES[n].labels]


@pytest.mark.parametrize("name", LABELLED)
def test_ignored_rows_give_zero_and_do_not_matter(name):
    x = _inputs(name)
    ignored = x["y"] == IGNORE
    loss, grad = _loss_and_grad(name, x, reduction="none")
    assert (loss[ignored] == 0).all() and (loss[~ignored] != 0).all()
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any()
    # garbage (huge, -inf) in the ignored rows changes nothing
    poisoned = dict(x, student=x["student"].detach().clone())
    poisoned["student"][ignored] = torch.where(
        torch.rand_like(poisoned["student"][ignored]) < 0.5, -torch.inf, 1e30)
    loss2, grad2 = _loss_and_grad(name, poisoned, reduction="none")
    assert torch.equal(loss2, loss) and torch.equal(grad2[~ignored], grad[~ignored])


def test_masked_graph_positions_do_not_matter():
    x = _inputs("graph_on_logits_loss")
    loss, grad = _loss_and_grad("graph_on_logits_loss", x)
    masked = ~x["mask"]
    assert (grad[masked] == 0).all() and (grad[~masked] != 0).any()
    poisoned = dict(x, student=x["student"].detach().clone())
    poisoned["student"][masked] = 1e30
    loss2, grad2 = _loss_and_grad("graph_on_logits_loss", poisoned)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)


@pytest.mark.parametrize("name", LABELLED)
def test_reductions_and_normalizer_agree(name):
    x = _inputs(name)
    n_valid = int((x["y"] != IGNORE).sum())
    none, g_none = _loss_and_grad(name, x, reduction="none")
    total, g_sum = _loss_and_grad(name, x, reduction="sum")
    mean, g_mean = _loss_and_grad(name, x, reduction="mean")
    assert rel_err(total, none.sum()) <= 1e-6 and rel_err(g_sum, g_none) <= 1e-6
    assert rel_err(mean, total / n_valid) <= 1e-6 and rel_err(g_mean, g_sum / n_valid) <= 1e-6
    for norm in (7.0, torch.tensor(7.0)):
        m7, g7 = _loss_and_grad(name, x, reduction="mean", normalizer=norm)
        assert rel_err(m7, total / 7) <= 1e-6 and rel_err(g7, g_sum / 7) <= 1e-6


@pytest.mark.parametrize("name", ALL + ["sinkhorn"])
def test_double_backward_is_refused_by_name(name):
    if name == "sinkhorn":
        c = torch.rand(2, 4, 5, requires_grad=True)
        out, inp = K.sinkhorn(c, epsilon=0.3, n_iters=3)[0].sum(), c
    else:
        x = _inputs(name)
        out, inp = LOSSES[name].call(x), x["student"]
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, inp, create_graph=True)


@pytest.mark.parametrize("name", ALL)
def test_inputs_are_never_modified_and_the_teacher_gets_no_gradient(name):
    x = _inputs(name, grad_teacher=True)
    before = {k: v.detach().clone() for k, v in x.items()}
    out = LOSSES[name].call(x)
    out.backward()
    for k, v in x.items():
        assert torch.equal(v.detach(), before[k]), f"{name} modified {k}"
    for k in LOSSES[name].teacher:
        assert x[k].grad is None, f"{name}: the teacher tensor {k} got a gradient"
    assert x["student"].grad is not None and torch.isfinite(x["student"].grad).all()


@pytest.mark.parametrize("name", ALL)
def test_empty_batch(name):
    x = _inputs(name, n=0)
    out = LOSSES[name].call(x)
    assert out.dtype == torch.float32 and out.shape == () and float(out.detach()) == 0.0
    out.backward()
    assert x["student"].grad is not None and x["student"].grad.shape == x["student"].shape
    if LOSSES[name].labels:
        assert LOSSES[name].call(x, reduction="none").shape == (0,)


@pytest.mark.parametrize("name", ALL)
def test_fullgraph_compile_matches_eager(name):
    x = _inputs(name)
    ref, ref_grad = _loss_and_grad(name, x)
    # one lambda code object for every loss: a fresh cache per loss, so the recompile
    # limit counts this loss's graphs only
    torch._dynamo.reset()
    fn = torch.compile(lambda inputs: LOSSES[name].call(inputs), fullgraph=True,
                       backend="aot_eager")
    s = x["student"].detach().clone().requires_grad_(True)
    out = fn(dict(x, student=s))
    out.backward()
    assert rel_err(out.detach(), ref) <= 1e-6
    assert rel_err(s.grad, ref_grad) <= 1e-6


# loss (= its table's op) -> positions of the gradient outputs in the implementation's
# arguments (an empty tensor there: no gradient)
GRAD_ARGS = {"kd_loss": (5,), "plackett_luce_loss": (3,), "topk_kd_loss": (3,),
             "uld_loss": (3,),
             "fused_linear_kd_loss": (10, 11, 12), "fused_linear_topk_kd_loss": (9, 10, 11)}


@pytest.mark.parametrize("name", sorted(GRAD_ARGS))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_is_computed_or_allocated_without_autograd(name, mode, monkeypatch):
    from kdkernels._core.backend import TABLES

    (table,) = [t for t in TABLES if t.op == name]
    real = table.implementation("torch")
    seen = []

    def spy(*args):
        seen.append([args[i].numel() for i in GRAD_ARGS[name]])
        return real(*args)

    monkeypatch.setitem(table._fns, "torch", spy)
    x = _inputs(name)  # the student requires grad
    with getattr(torch, mode)():
        out = LOSSES[name].call(x)
    assert not out.requires_grad
    assert seen and all(n == 0 for sizes in seen for n in sizes), seen
