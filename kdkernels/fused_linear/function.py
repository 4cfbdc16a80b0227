"""`fused_linear_kd_loss` and `fused_linear_topk_kd_loss`: validation, dispatch and the
autograd.Function they share (docs/spec.md §2).

The two differ only in the teacher: a second linear head, or a stored top-k (the
divergence step of the shared chunk loop, see ops.py). The whole loss and, when any
student tensor needs a gradient, all student gradients are computed in the forward pass
(chunked, see ops.py); the N x V logits never exist.

Backward by reduction:
- 'mean' / 'sum': the loss is linear in the per-row losses with one scalar upstream
  gradient g, so the stored gradients are multiplied by g in place (on the device,
  skipped when g == 1). Nothing but the returned gradients is kept between passes.
- 'none': the upstream gradient r_n differs per row and must multiply dZ_n *before* the
  weight GEMM (grad_W = Σ_n r_n dZ_nᵀ h_n cannot be rebuilt from the unweighted sum), and
  storing dZ would be the N x V tensor this op exists to avoid. So the forward computes
  only the losses and the backward recomputes the chunks (both GEMMs and the divergence
  kernel, a second forward's cost) with r_n folded in. The inputs are kept by reference.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from .._core.backend import Backend
from .._core.rowgrad import loss_scale, reduce_rows, refuse_double_backward, rescale_stored
from .._core.validate import (
    Reduction,
    check_choice,
    check_float_tensor,
    check_int,
    check_number,
    check_same_device,
    compute_dtype,
)
from ..kd.function import VocabMismatch, prepare_kd_args
from ..kd.params import ZERO, Divergence, KDParams
from ..parallel import Shards, VocabParallel, check_vocab_parallel
from ..topk.function import (
    TopKDivergence,
    TopKTail,
    TopKValues,
    check_topk_tensors,
    prepare_topk_args,
    topk_facts,
)
from .chunking import choose_chunk_size
from .ops import FUSED, FUSED_TOPK, fused_linear_kd_fwd, fused_linear_topk_kd_fwd
from .parallel import run_kd_chunks_vocab_parallel, run_topk_chunks_vocab_parallel

WeightGradAccumulation = Literal["float32", "weight"]


class _LogitsMeta(NamedTuple):
    """Shape/dtype/device of the virtual logits, for the shared `kd_loss` validation."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


class VocabParallelConfig(NamedTuple):
    """A validated `vocab_parallel=` of a fused loss: the shards and whether the hidden
    gradient is all-reduced over the group."""

    shards: Shards
    reduce_hidden_grad: bool


class FusedConfig(NamedTuple):
    """The scalar arguments of `fused_linear_kd_loss` (constants: ht, wt, bt)."""

    prm: KDParams
    v: int
    reduction: str
    backend: str
    chunk: int
    s_cap: float  # 0: no softcap
    s_mult: float
    t_cap: float
    t_mult: float
    acc_in_weight_dtype: bool = False  # weight_grad_accumulation="weight"
    vp: Any = None  # VocabParallelConfig: v, chunk are then this rank's / every rank's


class TopKFusedConfig(NamedTuple):
    """The scalar arguments of `fused_linear_topk_kd_loss` (constants: idx, vals)."""

    code: int
    beta: float
    inv_temp: float
    logprobs: bool
    bucket: bool
    ignore_index: int
    v: int  # V_s: every column
    reduction: str
    backend: str
    chunk: int
    s_cap: float
    s_mult: float
    acc_in_weight_dtype: bool = False
    vp: Any = None  # VocabParallelConfig


def _op_name(cfg) -> str:
    return ("fused_linear_topk_kd_loss" if isinstance(cfg, TopKFusedConfig)
            else "fused_linear_kd_loss")


def _run(cfg, hs, ws, bs, consts, labels, scale, row_scale, loss, gh, gw, gb):
    """One pass of the chunk loop of the loss `cfg` belongs to; consts: its teacher
    tensors ((ht, wt, bt) or (idx, vals))."""
    if cfg.vp is not None:  # plain Python: it issues collectives
        sh, red = cfg.vp
        if isinstance(cfg, TopKFusedConfig):
            idx, vals = consts
            run_topk_chunks_vocab_parallel(
                hs, ws, bs, idx, vals, labels, scale, row_scale, loss, gh, gw, gb, cfg.chunk,
                cfg.s_cap, cfg.s_mult, cfg.code, cfg.beta, cfg.inv_temp, cfg.logprobs,
                cfg.bucket, cfg.ignore_index, sh, red)
        else:
            ht, wt, bt = consts
            run_kd_chunks_vocab_parallel(
                hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss, gh, gw, gb, cfg.chunk,
                cfg.s_cap, cfg.s_mult, cfg.t_cap, cfg.t_mult, cfg.prm, sh, red)
        return
    if isinstance(cfg, TopKFusedConfig):
        idx, vals = consts
        fused_linear_topk_kd_fwd(hs, ws, bs, idx, vals, labels, scale, row_scale, loss, gh, gw,
                                 gb, cfg.backend, cfg.chunk, cfg.s_cap, cfg.s_mult, cfg.code,
                                 cfg.beta, cfg.inv_temp, cfg.logprobs, cfg.bucket,
                                 cfg.ignore_index)
        return
    ht, wt, bt = consts
    p = cfg.prm
    fused_linear_kd_fwd(hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss, gh, gw, gb,
                        cfg.backend, cfg.chunk, cfg.s_cap, cfg.s_mult, cfg.t_cap, cfg.t_mult,
                        p.div, p.inv_temp, p.w, p.soft_w, p.hard_w, p.ignore_index, cfg.v)


def _grad_buffers(hs, ws, bs, need, v, in_weight_dtype=False):
    """grad_h [N, H_s] (hs' dtype), and accumulators for W and b: float32 (float64 for
    float64), or the weight's own dtype when `in_weight_dtype` (no extra buffer at all)."""
    need_h, need_w, need_b = need
    empty = hs.new_empty(0)
    if in_weight_dtype:
        acc_dt = ws.dtype
    else:
        acc_dt = compute_dtype(ws)
    gh = torch.empty_like(hs) if need_h else empty
    gw = torch.zeros(ws.shape, dtype=acc_dt, device=ws.device) if need_w else None
    gb = torch.zeros(bs.shape, dtype=acc_dt, device=bs.device) if need_b else None
    return gh, gw, gb, (gw[:v] if need_w else empty), (gb[:v] if need_b else empty)


def _finish(acc, like):
    """The float32 accumulator, cast once to the parameter's dtype (no copy when equal)."""
    return None if acc is None else acc.to(like.dtype)


class FusedLinearFunction(torch.autograd.Function):
    """The autograd of both fused losses. Inputs: hs [N, H_s], ws [V_s, H_s], bs [V_s] |
    None, labels [N] | None, scale 0-dim float32, cfg (FusedConfig or TopKFusedConfig),
    need (3 bools: grad for hs, ws, bs), then the teacher's constants: ht [N, H_t],
    wt [V_t, H_t], bt [V_t] | None for FusedConfig; idx [N, k], vals [N, k] for TopK.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, labels, scale, cfg, need, *consts):
        n = hs.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hs.device)
        ctx.cfg, ctx.need, ctx.n_consts = cfg, need, len(consts)
        ctx.backend, ctx.consumed = cfg.backend, False
        if cfg.reduction == "none":
            empty = hs.new_empty(0)
            _run(cfg, hs, ws, bs, consts, labels, scale, None, loss, empty, empty, empty)
            ctx.save_for_backward(hs, ws, bs, labels, *consts)
            return loss
        gh, gw, gb, gw_v, gb_v = _grad_buffers(hs, ws, bs, need, cfg.v,
                                               cfg.acc_in_weight_dtype)
        _run(cfg, hs, ws, bs, consts, labels, scale, None, loss, gh, gw_v, gb_v)
        gw, gb = _finish(gw, ws), _finish(gb, bs)
        ctx.save_for_backward(gh if need[0] else None, gw, gb)
        return reduce_rows(loss, scale, cfg.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        cfg, need = ctx.cfg, ctx.need
        if cfg.reduction == "none":
            refuse_double_backward(_op_name(cfg))
            hs, ws, bs, labels, *consts = ctx.saved_tensors
            gh, gw, gb, gw_v, gb_v = _grad_buffers(hs, ws, bs, need, cfg.v,
                                                   cfg.acc_in_weight_dtype)
            ones = torch.ones((), dtype=torch.float32, device=hs.device)
            scratch = torch.empty(hs.shape[0], dtype=torch.float32, device=hs.device)
            row_scale = grad_out.reshape(-1).to(torch.float32).contiguous()
            _run(cfg, hs, ws, bs, consts, labels, ones, row_scale, scratch, gh, gw_v, gb_v)
            gh = gh if need[0] else None
            gw, gb = _finish(gw, ws), _finish(gb, bs)
        else:
            gh, gw, gb = rescale_stored(ctx, grad_out, _op_name(cfg))
        return (gh, gw, gb, None, None, None, None) + (None,) * ctx.n_consts


def _check_head(prefix, hidden, weight, bias):
    h = check_float_tensor(f"{prefix}_hidden", hidden)
    w = check_float_tensor(f"{prefix}_weight", weight, min_dim=2)
    if w.dim() != 2:
        raise ValueError(
            f"{prefix}_weight must be 2-D [vocab, hidden], got shape {tuple(w.shape)}"
        )
    if h.shape[-1] != w.shape[1]:
        raise ValueError(
            f"{prefix}_hidden has hidden size {h.shape[-1]} but {prefix}_weight has shape "
            f"{tuple(w.shape)}; the weight must be [vocab, {h.shape[-1]}] (the lm_head's "
            "weight, as nn.Linear stores it)"
        )
    if h.dtype != w.dtype:
        raise TypeError(
            f"{prefix}_hidden ({h.dtype}) and {prefix}_weight ({w.dtype}) must have the same "
            "dtype (the matmul takes one operand dtype); cast one of them"
        )
    if bias is not None:
        b = check_float_tensor(f"{prefix}_bias", bias)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(
                f"{prefix}_bias must have shape ({w.shape[0]},) to match {prefix}_weight "
                f"{tuple(w.shape)}, got {tuple(b.shape)}"
            )
        if b.dtype != w.dtype:
            raise TypeError(
                f"{prefix}_bias ({b.dtype}) must have {prefix}_weight's dtype ({w.dtype})"
            )
    return h, w


def _check_cap(name, cap) -> float:
    if cap is None:
        return 0.0
    return check_number(name, cap, lo=0.0, lo_open=True)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    # the kd_loss keywords
    divergence: Divergence = "forward_kl", beta: float = 0.5, alpha: float = 0.1,
    taid_t: float | None = None, temperature: float = 1.0, ignore_index: int = -100,
    reduction: Reduction = "mean", normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
    vocab_mismatch: VocabMismatch = "error",
    chunk_size: int | None = None,
    weight_grad_accumulation: WeightGradAccumulation = "float32",
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """KD loss on the logits of two linear heads, without materialising them (docs/spec.md §2).

    Equal to `kd_loss(S, T, labels, ...)` with S = f_s(student_hidden @ student_weightᵀ +
    student_bias) and T = f_t(teacher_hidden @ teacher_weightᵀ + teacher_bias), where
    f(x) = c·tanh(m·x/c) with softcap c, else m·x (m the logit scale). Only a chunk of
    `chunk_size` token rows of logits exists at a time (see docs/fused_linear.md).

    Args:
        student_hidden: [..., H_s] float tensor; gets a gradient when it requires one.
        student_weight: [V_s, H_s], same dtype as student_hidden; gets a float32-accumulated
            gradient when it requires one (a frozen head costs no weight-gradient work).
        teacher_hidden: [..., H_t] float tensor, same leading shape; a constant.
        teacher_weight: [V_t, H_t], same dtype as teacher_hidden; a constant.
        labels: optional [...] integer tensor; `ignore_index` rows are ignored.
        student_bias: optional [V_s] (student_weight's dtype); teacher_bias: optional [V_t].
        student_softcap, teacher_softcap: None or c > 0 (Gemma-style logit softcapping).
        student_logit_scale, teacher_logit_scale: finite m (applied inside the softcap).
        divergence, beta, alpha, taid_t, temperature, ignore_index, reduction, normalizer,
        hard_label_weight, soft_label_weight, vocab_mismatch: as in `kd_loss` (docs/spec.md §1).
        chunk_size: token rows per chunk (int >= 1); default from the vocabulary, hidden
            sizes, dtypes and KDKERNELS_FUSED_CHUNK_BUDGET_MB (256 MiB), not from N.
        weight_grad_accumulation: 'float32' (default, docs/spec.md §2: the weight and bias
            gradients accumulate across chunks in float32, cast once at the end; costs a
            4·V·(H_s+1)-byte buffer) or 'weight' (accumulate in the weight's own dtype:
            each chunk's GEMM adds in float32 and rounds once into the gradient; no extra
            buffer, as Liger-Kernel does; identical for float32 weights).
        vocab_parallel: a `VocabParallel`: this rank holds rows [start, stop) of both
            heads (weights and biases; hidden states and labels replicated, labels global
            ids). Every rank of its group returns the full-vocabulary loss; the weight and
            bias gradients are this rank's rows; the hidden-state gradient is summed over
            the group (all-reduced unless `vocab_parallel.reduce_hidden_grad` is False).
            Backend 'torch' only (docs/vocab_parallel.md, "The fused form").
        backend: 'auto' | 'torch' | 'triton' | 'cuda'.

    Returns:
        float32 loss: a scalar, or [...] per-row losses for reduction='none'.
    """
    hs, ws = _check_head("student", student_hidden, student_weight, student_bias)
    ht, wt = _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    device = check_same_device(
        student_hidden=hs, student_weight=ws, student_bias=student_bias, teacher_hidden=ht,
        teacher_weight=wt, teacher_bias=teacher_bias,
    )
    chunk = None if chunk_size is None else check_int("chunk_size", chunk_size, lo=1)
    grad_on = torch.is_grad_enabled()
    bs = student_bias
    need = (
        grad_on and hs.requires_grad,
        grad_on and ws.requires_grad,
        grad_on and bs is not None and bs.requires_grad,
    )
    shards = _check_vocab_parallel(vocab_parallel, "fused_linear_kd_loss", backend,
                                   (ws.shape[0], wt.shape[0]), hs, chunk, need, device)
    vs = ws.shape[0] if shards is None else shards.v
    vt = wt.shape[0] if shards is None else shards.v
    s_meta = _LogitsMeta(tuple(hs.shape[:-1]) + (vs,), ws.dtype, device)
    t_meta = _LogitsMeta(tuple(ht.shape[:-1]) + (vt,), wt.dtype, device)
    prm, v, normalizer = prepare_kd_args(
        s_meta, t_meta, labels, divergence=divergence, beta=beta, alpha=alpha, taid_t=taid_t,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight, vocab_mismatch=vocab_mismatch,
        student_name="student_hidden", teacher_name="teacher_hidden",
    )
    s_cap = _check_cap("student_softcap", student_softcap)
    t_cap = _check_cap("teacher_softcap", teacher_softcap)
    s_mult = check_number("student_logit_scale", student_logit_scale)
    t_mult = check_number("teacher_logit_scale", teacher_logit_scale)
    if shards is not None:  # local columns; the chunk from the widest shard: every rank alike
        v = ws.shape[0]
    if chunk is None:
        chunk = choose_chunk_size(
            v if shards is None else shards.max_width, hs.shape[-1], ht.shape[-1], ws.dtype,
            wt.dtype, student_softcap=s_cap > 0, need_teacher=prm.div != ZERO,
        )
    be = ("torch" if shards is not None
          else FUSED.resolve(backend, device, s_dtype=ws.dtype, t_dtype=wt.dtype))
    lead = hs.shape[:-1]
    hs2 = _rows(hs)
    ht2 = _rows(ht.detach())
    wt, bt = wt.detach(), teacher_bias.detach() if teacher_bias is not None else None
    y = labels.reshape(-1).contiguous() if labels is not None else None
    n = hs2.shape[0]
    scale = loss_scale(reduction, y, n, normalizer, prm.ignore_index, device, compute_dtype(ws))
    check_choice("weight_grad_accumulation", weight_grad_accumulation, ("float32", "weight"))
    cfg = FusedConfig(prm, v, reduction, be, chunk, s_cap, s_mult, t_cap, t_mult,
                      weight_grad_accumulation == "weight", _vp_config(vocab_parallel, shards))
    out = _apply(cfg, need, hs2, ws, bs, y, scale, (ht2, wt, bt))
    return out.reshape(lead) if reduction == "none" else out


def _check_vocab_parallel(vp, op, backend, widths, hs, chunk, need, device):
    """None without `vp`; else the validated shards. Besides the checks of the logits
    losses, every rank must pass the same chunk_size (or None) and agree on whether the
    hidden state needs a gradient: the chunks' and the hidden all-reduce's collectives
    must line up across the group."""
    if vp is None:
        return None
    return check_vocab_parallel(
        vp, op, backend, widths, math.prod(hs.shape[:-1]), device,
        agree={"chunk_size": chunk or 0, "student_hidden's requires_grad": int(need[0])})


def _vp_config(vp, shards):
    return None if shards is None else VocabParallelConfig(shards, vp.reduce_hidden_grad)


def _apply(cfg, need, hs, ws, bs, labels, scale, consts):
    """The loss through the autograd.Function when any student tensor needs a gradient,
    else one gradient-free pass of the chunk loop."""
    if any(need):
        return FusedLinearFunction.apply(hs, ws, bs, labels, scale, cfg, need, *consts)
    loss = torch.empty(hs.shape[0], dtype=torch.float32, device=hs.device)
    empty = hs.new_empty(0)
    _run(cfg, hs.detach(), ws.detach(), bs.detach() if bs is not None else None, consts,
         labels, scale, None, loss, empty, empty, empty)
    return reduce_rows(loss, scale, cfg.reduction)


def fused_linear_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    values: TopKValues = "logits",
    tail: TopKTail = "renormalize",
    divergence: TopKDivergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    chunk_size: int | None = None,
    weight_grad_accumulation: WeightGradAccumulation = "float32",
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Top-k KD on the logits of a linear head, without materialising them (docs/spec.md §2).

    Equal to `topk_kd_loss(S, teacher_topk_indices, teacher_topk_values, labels, ...)` with
    S = f(student_hidden @ student_weightᵀ + student_bias), f(x) = c·tanh(m·x/c) with
    softcap c, else m·x (m the logit scale), as in `fused_linear_kd_loss`. Only a chunk of
    `chunk_size` token rows of logits exists at a time.

    Args:
        student_hidden: [..., H] float tensor; gets a gradient when it requires one.
        student_weight: [V, H], student_hidden's dtype; gets a float32-accumulated gradient
            when it requires one (a frozen head costs no weight-gradient work).
        teacher_topk_indices: [..., k] integer tensor (int32 or int64), classes in [0, V)
            without repeats in a row, −1 for padding (1 <= k <= V); checked on CPU only.
        teacher_topk_values: [..., k] float tensor, the teacher's logits or log-probs at
            those indices (ignored at padding); a constant.
        labels: optional [...] integer tensor, used only to ignore rows (== ignore_index).
        values, tail, divergence, beta, temperature, ignore_index, reduction, normalizer:
            as in `topk_kd_loss` (docs/spec.md §5).
        student_bias: optional [V] (student_weight's dtype).
        student_softcap: None or c > 0; student_logit_scale: finite m.
        chunk_size: token rows per chunk (int >= 1); default from V, H, the dtype and
            KDKERNELS_FUSED_CHUNK_BUDGET_MB (256 MiB), not from N.
        weight_grad_accumulation: 'float32' (default) or 'weight', as in
            `fused_linear_kd_loss`.
        vocab_parallel: a `VocabParallel`: this rank holds rows [start, stop) of the head
            (the top-k indices stay global ids), as in `fused_linear_kd_loss`.
        backend: 'auto' | 'torch' | 'triton' | 'cuda' (the divergence step runs on
            `topk_kd_loss`'s backend of that name: a backend it lacks is refused).

    Returns:
        float32 loss: a scalar, or [...] per-row losses for reduction='none'.
    """
    hs, ws = _check_head("student", student_hidden, student_weight, student_bias)
    idx, vals = check_topk_tensors(teacher_topk_indices, teacher_topk_values)
    device = check_same_device(student_hidden=hs, student_weight=ws, student_bias=student_bias,
                               teacher_topk_indices=idx, teacher_topk_values=vals)
    lead = hs.shape[:-1]
    chunk = None if chunk_size is None else check_int("chunk_size", chunk_size, lo=1)
    grad_on = torch.is_grad_enabled()
    bs = student_bias
    need = (
        grad_on and hs.requires_grad,
        grad_on and ws.requires_grad,
        grad_on and bs is not None and bs.requires_grad,
    )
    shards = _check_vocab_parallel(vocab_parallel, "fused_linear_topk_kd_loss", backend,
                                   (ws.shape[0],), hs, chunk, need, device)
    v = ws.shape[0]
    a = prepare_topk_args(
        lead, v if shards is None else shards.v, device, idx, vals, labels, values=values,
        tail=tail, divergence=divergence, beta=beta, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, normalizer=normalizer)
    s_cap = _check_cap("student_softcap", student_softcap)
    s_mult = check_number("student_logit_scale", student_logit_scale)
    if chunk is None:
        chunk = choose_chunk_size(v if shards is None else shards.max_width, hs.shape[-1], 0,
                                  ws.dtype, ws.dtype, student_softcap=s_cap > 0,
                                  need_teacher=False)
    check_choice("weight_grad_accumulation", weight_grad_accumulation, ("float32", "weight"))
    be = ("torch" if shards is not None
          else FUSED_TOPK.resolve(backend, device, **topk_facts(ws.dtype, a)))
    hs2 = _rows(hs)
    y = labels.reshape(-1).contiguous() if labels is not None else None
    scale = loss_scale(reduction, y, hs2.shape[0], a.normalizer, a.ignore_index, device,
                       compute_dtype(ws))
    cfg = TopKFusedConfig(a.code, a.beta, a.inv_temp, a.logprobs, a.bucket, a.ignore_index, v,
                          reduction, be, chunk, s_cap, s_mult,
                          weight_grad_accumulation == "weight", _vp_config(vocab_parallel, shards))
    out = _apply(cfg, need, hs2, ws, bs, y, scale, (a.idx, a.vals))
    return out.reshape(lead) if reduction == "none" else out
