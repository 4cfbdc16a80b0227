"""The fused losses under FSDP2 (`fully_shard`) and the global normaliser
(docs/distributed.md), on 2 gloo ranks on the CPU against one unsharded process.

Every distributed check runs in one `mp.spawn` (the process start dominates the cost):
rank 0 writes what it measured to a file, the test process computes the same steps on
one unsharded model over the whole batch and compares.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from _helpers import spawn_ranks
from torch import nn

import kdkernels
from kdkernels import fused_linear_kd_loss, fused_linear_topk_kd_loss, global_normalizer

WORLD = 2
V, H_S, H_T, K = 300, 16, 12, 8
B, T = 4, 6  # global batch: rank r takes sequences [r*B/2, (r+1)*B/2)
STEPS = 3
KD = dict(divergence="jsd", beta=0.3, temperature=2.0, hard_label_weight=0.2,
          student_softcap=3.0, chunk_size=4, backend="torch")
TOPK = dict(divergence="forward_kl", temperature=1.5, chunk_size=5, backend="torch")


class Student(nn.Module):
    """Embedding, one hidden layer, LM head; the loss is computed inside forward, so the
    head weight FSDP2 all-gathers for this forward is what the fused loss reads."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H_S)
        self.layer = nn.Linear(H_S, H_S)
        self.lm_head = nn.Linear(H_S, V)

    def forward(self, ids, labels, kind, t_a, t_b, normalizer=None, reduction="mean"):
        h = torch.tanh(self.layer(self.emb(ids)))
        w, b = self.lm_head.weight, self.lm_head.bias
        if kind == "kd":  # t_a, t_b: the teacher's hidden states and head weight
            return fused_linear_kd_loss(h, w, t_a, t_b, labels, student_bias=b,
                                        normalizer=normalizer, reduction=reduction, **KD)
        return fused_linear_topk_kd_loss(h, w, t_a, t_b, labels, student_bias=b,
                                         normalizer=normalizer, reduction=reduction, **TOPK)


class Teacher(nn.Module):
    """Its forward returns hidden states; the head weight is read by the loss."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H_T)
        self.lm_head = nn.Linear(H_T, V, bias=False)

    def forward(self, ids):
        return torch.tanh(self.emb(ids)) * 2.0


def _models():
    torch.manual_seed(7)
    student, teacher = Student(), Teacher()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(4.0)  # a peaked teacher
    return student, teacher


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.35] = -100
    labels[:B // 2, :3] = -100  # the ranks' counts differ: the local means are not the global one
    return ids, labels


BATCHES = [_data(100 + i) for i in range(STEPS)]


def _topk(hidden, weight):
    vals, idx = (hidden @ weight.t()).topk(K, dim=-1)
    return idx, vals


def _grads(model):
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _params(model):
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


# --------------------------------------------------------------------------- the ranks


def _shard(module, **kw):
    from torch.distributed.fsdp import fully_shard

    if isinstance(module, Student):
        fully_shard(module.layer)
    return fully_shard(module, **kw)


def _worker(rank, port, path):
    torch.set_num_threads(1)
    # nn.Linear on 3-D input returns a view; nothing here writes into it in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    res = {}
    rows = slice(rank * B // WORLD, (rank + 1) * B // WORLD)

    def local(i):
        ids, labels = BATCHES[i]
        return ids[rows], labels[rows]

    def teacher_inputs(teacher, ids):
        """The teacher under no_grad, FSDP2-sharded: its forward, then an explicit unshard
        for the head weight (the caller reshards after the student's backward)."""
        with torch.no_grad():
            ht = teacher(ids)
            teacher.unshard()
            wt = teacher.lm_head.weight
        return ht, wt

    # the weight the loss sees inside forward: a plain, unsharded tensor
    student, teacher = _models()
    _shard(student)
    _shard(teacher)
    seen = {}
    real_forward = Student.forward

    def spy(self, *args, **kw):
        seen["type"] = type(self.lm_head.weight)
        seen["dtensor"] = isinstance(self.lm_head.weight, DTensor)
        seen["shape"] = tuple(self.lm_head.weight.shape)
        return real_forward(self, *args, **kw)

    ids, labels = local(0)
    ht, wt = teacher_inputs(teacher, ids)
    res["teacher_w_dtensor"] = isinstance(wt, DTensor)
    Student.forward = spy
    try:
        student(ids, labels, "kd", ht, wt).backward()
    finally:
        Student.forward = real_forward
    teacher.reshard()
    res["student_w_dtensor"] = seen["dtensor"]
    res["student_w_shape"] = seen["shape"]
    res["outside_w_dtensor"] = isinstance(student.lm_head.weight, DTensor)
    res["outside_w_local_rows"] = student.lm_head.weight.to_local().shape[0]

    # the global normaliser: count, all-reduce, clamp
    n = global_normalizer(labels)
    res["n"] = n
    res["n_list"] = global_normalizer([labels[:1], labels[1:]])
    res["n_local"] = (labels != -100).sum()
    res["n_empty"] = global_normalizer(torch.full_like(labels, -100))
    res["n_ignore_7"] = global_normalizer(labels, ignore_index=7)

    def one_step(kind, reduction="mean", normalizer="global", divide=False):
        """Gradients of one backward on fresh sharded models; the loss summed over ranks."""
        student, teacher = _models()
        _shard(student, reshard_after_forward=True)
        _shard(teacher)
        if divide:  # FSDP2 sums the gradients instead of averaging them
            for m in student.modules():
                if isinstance(m, FSDPModule):
                    m.set_gradient_divide_factor(1.0)
                    m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        ids, labels = local(0)
        ht, wt = teacher_inputs(teacher, ids)
        a, b = (ht, wt) if kind == "kd" else _topk(ht, wt)
        n = global_normalizer(labels) if normalizer == "global" else None
        if reduction == "none":
            loss = student(ids, labels, kind, a, b, reduction="none").sum() / n
        else:
            loss = student(ids, labels, kind, a, b, normalizer=n)
        total = loss.detach().clone() / (WORLD if normalizer == "local" else 1)
        # the global normaliser makes the losses add up over ranks; FSDP2 averages the
        # gradients, so scale by the world size (or divide by 1); the local mean is
        # the naive recipe (FSDP2's average of per-rank means)
        (loss if divide or normalizer == "local" else loss * WORLD).backward()
        teacher.reshard()
        dist.all_reduce(total)
        return {"loss": total, "grads": _grads(student)}

    res["kd"] = one_step("kd")
    res["kd_none"] = one_step("kd", reduction="none")
    res["topk"] = one_step("topk", divide=True)
    res["kd_local_mean"] = one_step("kd", normalizer="local")

    # gradient accumulation: two micro-batches per rank, one reduce-scatter at the end
    student, teacher = _models()
    _shard(student)
    _shard(teacher)
    ids, labels = local(1)
    micro = [(ids[i:i + 1], labels[i:i + 1]) for i in range(ids.shape[0])]
    n = global_normalizer([y for _, y in micro])
    total = torch.zeros(())
    for i, (x, y) in enumerate(micro):
        student.set_requires_gradient_sync(i == len(micro) - 1)
        ht, wt = teacher_inputs(teacher, x)
        loss = student(x, y, "kd", ht, wt, normalizer=n)
        (loss * WORLD).backward()
        teacher.reshard()
        total += loss.detach()
    dist.all_reduce(total)
    res["kd_accum"] = {"loss": total, "grads": _grads(student)}

    # a few AdamW steps
    student, teacher = _models()
    _shard(student)
    _shard(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for i in range(STEPS):
        ids, labels = local(i)
        ht, wt = teacher_inputs(teacher, ids)
        loss = student(ids, labels, "kd", ht, wt, normalizer=global_normalizer(labels))
        (loss * WORLD).backward()
        teacher.reshard()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total)
    res["train_losses"] = torch.stack(losses)
    res["train_params"] = _params(student)
    res["train_sharded"] = all(isinstance(p, DTensor) for p in student.parameters())

    if rank == 0:
        torch.save(res, path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    path = os.fspath(tmp_path_factory.mktemp("fsdp2") / "rank0.pt")
    spawn_ranks(_worker, WORLD, path)
    return torch.load(path, weights_only=False)


# ------------------------------------------------------------------- the single process


def _reference_step(kind, reduction="mean", batch=0):
    student, teacher = _models()
    ids, labels = BATCHES[batch]
    with torch.no_grad():
        ht = teacher(ids)
        wt = teacher.lm_head.weight
    a, b = (ht, wt) if kind == "kd" else _topk(ht, wt)
    if reduction == "none":
        loss = student(ids, labels, kind, a, b, reduction="none").sum() / (labels != -100).sum()
    else:
        loss = student(ids, labels, kind, a, b)  # the mean over the whole batch's valid rows
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(student)}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-7)


def test_loss_inside_forward_sees_the_unsharded_weight(ranks):
    assert ranks["student_w_dtensor"] is False
    assert ranks["student_w_shape"] == (V, H_S)
    assert ranks["outside_w_dtensor"] is True  # sharded between steps
    assert ranks["outside_w_local_rows"] == V // WORLD
    assert ranks["teacher_w_dtensor"] is False  # after teacher.unshard()


def test_global_normalizer_on_ranks(ranks):
    ids, labels = BATCHES[0]
    total = (labels != -100).sum()
    for key in ("n", "n_list"):
        n = ranks[key]
        assert n.dtype == torch.float32 and n.dim() == 0 and n.device.type == "cpu"
        assert n.item() == total.item()
    assert ranks["n_local"].item() < total.item() / WORLD  # rank 0 has fewer valid tokens
    assert ranks["n_empty"].item() == 1.0
    assert ranks["n_ignore_7"].item() == (labels != 7).sum().item()


@pytest.mark.parametrize("case, kind, reduction, batch", [
    ("kd", "kd", "mean", 0), ("kd_none", "kd", "none", 0), ("topk", "topk", "mean", 0),
    ("kd_accum", "kd", "mean", 1),  # 2 micro-batches per rank, gradient sync on the last
])
def test_one_step_gradients_match_one_process(ranks, case, kind, reduction, batch):
    ref = _reference_step(kind, reduction, batch)
    got = ranks[case]
    _close(got["loss"], ref["loss"])  # per-rank losses with the global normaliser add up
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().max() > 1e-4, name  # every parameter gets a real gradient
        _close(got["grads"][name], g)


def test_local_means_would_not_match(ranks):
    ref = _reference_step("kd")
    got = ranks["kd_local_mean"]
    assert (got["loss"] - ref["loss"]).abs() > 2e-4  # the mean of the ranks' means
    g, r = got["grads"]["lm_head.weight"], ref["grads"]["lm_head.weight"]
    assert (g - r).abs().max() > 100 * 2e-5 * r.abs().max()


def test_adamw_steps_match_one_process(ranks):
    student, teacher = _models()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.1)
    start = _params(student)
    losses = []
    for ids, labels in BATCHES:
        with torch.no_grad():
            ht = teacher(ids)
        loss = student(ids, labels, "kd", ht, teacher.lm_head.weight)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    _close(ranks["train_losses"], torch.stack(losses))
    assert ranks["train_sharded"]
    for name, p in _params(student).items():
        assert (p - start[name]).abs().max() > 1e-3, name  # the steps moved it
        torch.testing.assert_close(ranks["train_params"][name], p, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- without torch.distributed


def test_global_normalizer_without_distributed():
    assert not (dist.is_available() and dist.is_initialized())
    labels = torch.randint(0, 50, (3, 7))
    labels[torch.rand(3, 7) < 0.4] = -100
    n = global_normalizer(labels)
    assert n.dtype == torch.float32 and n.dim() == 0
    assert n.item() == (labels != -100).sum().item()
    assert global_normalizer([labels[0], labels[1:]]).item() == n.item()
    assert global_normalizer(torch.full((4,), -100)).item() == 1.0
    assert kdkernels.global_normalizer is global_normalizer
    with pytest.raises(TypeError, match="integer"):
        global_normalizer(labels.float())
    with pytest.raises(ValueError, match="non-empty"):
        global_normalizer([])


def test_summed_micro_batch_losses_with_the_normalizer_are_the_batch_mean():
    """Gradient accumulation in one process: micro-batch losses with the step's
    normaliser add up to the mean over the whole step, gradients included."""
    hs = torch.randn(4, 5, H_S, requires_grad=True)
    ws = (torch.randn(V, H_S) * 0.3).requires_grad_()
    ht, wt = torch.randn(4, 5, H_T), torch.randn(V, H_T)
    labels = torch.randint(0, V, (4, 5))
    labels[torch.rand(4, 5) < 0.4] = -100
    labels[0, :4] = -100
    full = fused_linear_kd_loss(hs, ws, ht, wt, labels, **KD)
    g_full = torch.autograd.grad(full, (hs, ws))
    n = global_normalizer([labels[:1], labels[1:]])
    parts = [fused_linear_kd_loss(hs[sl], ws, ht[sl], wt, labels[sl], normalizer=n, **KD)
             for sl in (slice(0, 1), slice(1, 4))]
    g_parts = torch.autograd.grad(parts[0] + parts[1], (hs, ws))
    _close(parts[0] + parts[1], full)
    for a, b in zip(g_parts, g_full):
        _close(a, b)
    local = [fused_linear_kd_loss(hs[sl], ws, ht[sl], wt, labels[sl], **KD)
             for sl in (slice(0, 1), slice(1, 4))]
    assert (local[0] + local[1] - 2 * full).abs() > 1e-3  # a mean of means is not the mean
