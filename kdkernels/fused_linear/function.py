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
from typing import Any, Literal, NamedTuple, get_args

import torch

from .._core.backend import Backend
from .._core.rowgrad import (
    loss_scale,
    reduce_rows,
    refuse_double_backward,
    rescale_stored,
    row_views,
)
from .._core.validate import (
    Reduction,
    check_choice,
    check_float_tensor,
    check_int,
    check_number,
    check_same_device,
    compute_dtype,
)
from ..kd.components import (
    TemperatureScaling,
    check_return_components,
    components,
    new_parts,
    rerun_with,
)
from ..kd.function import VocabMismatch, prepare_kd_args
from ..kd.parallel_target import check_vp_divergence
from ..kd.params import (
    ALPHA_DEFAULT,
    BETA_DEFAULT,
    DKD_ALPHA_DEFAULT,
    DKD_BETA_DEFAULT,
    NKD_GAMMA_DEFAULT,
    ZERO,
    Divergence,
    KDParams,
    resolve,
)
from ..parallel import Shards, VocabParallel, check_vocab_parallel, unwrap_dtensors
from ..topk.function import (
    TopKDivergence,
    TopKTail,
    TopKValues,
    check_topk_tensors,
    prepare_topk_args,
    refuse_vocab_parallel,
    topk_facts,
)
from .chunking import choose_chunk_size
from .ops import FUSED, FUSED_TOPK, fused_linear_kd_fwd, fused_linear_topk_kd_fwd
from .parallel import FUSED_TOPK_VP, FUSED_VP

WeightGradAccumulation = Literal["float32", "weight"]
TeacherValues = Literal["logits", "logprobs"]


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
    beta: float  # the mixture weight: β (jsd) or λ (taid), topk_kd_fwd's w
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
    soft_w: float = 1.0  # soft_label_weight (0: Div.ZERO)
    hard_w: float = 0.0  # hard_label_weight


def _op_name(cfg) -> str:
    return ("fused_linear_topk_kd_loss" if isinstance(cfg, TopKFusedConfig)
            else "fused_linear_kd_loss")


def _run(cfg, hs, ws, bs, consts, labels, scale, row_scale, loss, gh, gw, gb,
         dynamic=(None, None, None), parts=None):
    """One pass of the chunk loop of the loss `cfg` belongs to; consts: its teacher
    tensors ((ht, wt, bt) or (idx, vals)); dynamic: the 0-dim temperature / taid_t /
    teacher_temperature tensors of `fused_linear_kd_loss` (or None), read inside its
    custom op; parts: None or [N, 2] float32, each row's soft and hard addends
    (`fused_linear_kd_loss`'s return_components)."""
    if cfg.vp is not None:  # plain Python: it issues collectives
        sh, red = cfg.vp
        be = cfg.backend
        if isinstance(cfg, TopKFusedConfig):
            idx, vals = consts
            FUSED_TOPK_VP(
                be, hs, ws, bs, idx, vals, labels, scale, row_scale, loss, gh, gw, gb,
                cfg.chunk, cfg.s_cap, cfg.s_mult, cfg.code, cfg.beta, cfg.inv_temp,
                cfg.logprobs, cfg.bucket, cfg.ignore_index, sh, red, be, cfg.soft_w,
                cfg.hard_w)
        else:
            ht, wt, bt = consts
            FUSED_VP(be, hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss, gh, gw, gb,
                     cfg.chunk, cfg.s_cap, cfg.s_mult, cfg.t_cap, cfg.t_mult, cfg.prm, sh, red,
                     be, parts)
        return
    if isinstance(cfg, TopKFusedConfig):
        idx, vals = consts
        fused_linear_topk_kd_fwd(hs, ws, bs, idx, vals, labels, scale, row_scale, loss, gh, gw,
                                 gb, cfg.backend, cfg.chunk, cfg.s_cap, cfg.s_mult, cfg.code,
                                 cfg.beta, cfg.inv_temp, cfg.logprobs, cfg.bucket,
                                 cfg.ignore_index, cfg.soft_w, cfg.hard_w)
        return
    ht, wt, bt = consts
    p = cfg.prm
    fused_linear_kd_fwd(hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss, gh, gw, gb,
                        cfg.backend, cfg.chunk, cfg.s_cap, cfg.s_mult, cfg.t_cap, cfg.t_mult,
                        p.div, p.inv_temp, p.w, p.soft_w, p.hard_w, p.ignore_index, cfg.v,
                        dynamic[0], dynamic[1], p.inv_temp_t, p.tau_sq, dynamic[2], parts)


def _grad_buffers(hs, ws, bs, need, v, in_weight_dtype=False, weight_dtype=None):
    """grad_h [N, H_s] (hs' dtype), and accumulators for W and b: float32 (float64 for
    float64), or the weight's own dtype when `in_weight_dtype` (no extra buffer at all).
    weight_dtype: the caller's weight dtype when ws is its autocast copy."""
    need_h, need_w, need_b = need
    empty = hs.new_empty(0)
    if in_weight_dtype:
        acc_dt = ws.dtype if weight_dtype is None else weight_dtype
    else:
        acc_dt = compute_dtype(ws)
    gh = torch.empty_like(hs) if need_h else empty
    gw = torch.zeros(ws.shape, dtype=acc_dt, device=ws.device) if need_w else None
    gb = torch.zeros(bs.shape, dtype=acc_dt, device=bs.device) if need_b else None
    return gh, gw, gb, (gw[:v] if need_w else empty), (gb[:v] if need_b else empty)


def _finish(acc, like):
    """The float32 accumulator, cast once to the parameter's dtype (no copy when equal)."""
    return None if acc is None else acc.to(like.dtype)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype torch.autocast gives a linear layer on `device` here, or None outside it."""
    kind = device.type
    if kind == "meta" or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _cast(x, dtype):
    """x as autocast casts a linear layer's input: floating tensors other than float64 to
    `dtype` (None: no autocast, x as is)."""
    if x is None or dtype is None or x.dtype in (dtype, torch.float64):
        return x
    return x.to(dtype)


def _cast_teacher(cfg, consts, dtype):
    """The teacher head (ht, wt, bt) cast like the student's; top-k values and a stored
    teacher (wt None) are not GEMM inputs."""
    if dtype is None or isinstance(cfg, TopKFusedConfig) or consts[1] is None:
        return consts
    return tuple(_cast(x, dtype) for x in consts)


def _grads_to(gh, gw, gb, hs, ws, bs):
    """The gradients in their inputs' own dtypes (float32 accumulators rounded once)."""
    gh = gh.to(hs.dtype) if gh is not None and gh.dtype != hs.dtype else gh
    return gh, _finish(gw, ws), _finish(gb, bs)


class FusedLinearFunction(torch.autograd.Function):
    """The autograd of both fused losses. Inputs: hs [N, H_s], ws [V_s, H_s], bs [V_s] |
    None, labels [N] | None, scale 0-dim float32, cfg (FusedConfig or TopKFusedConfig),
    need (3 bools: grad for hs, ws, bs), cast (the autocast dtype of the GEMMs, or None),
    temperature, taid_t, teacher_temperature (0-dim tensors or None), parts ([N, 2] float32
    or None: filled with each row's soft and hard addends, fused_linear_kd_loss only),
    then the teacher's constants: ht [N, H_t],
    wt [V_t, H_t], bt [V_t] | None for FusedConfig; idx [N, k], vals [N, k] for TopK.

    Under autocast the GEMM inputs are cast here (not by autograd), so the weight and bias
    gradients accumulate in float32 and are rounded once into the parameters' own dtypes.
    """

    @staticmethod
    def forward(ctx, hs, ws, bs, labels, scale, cfg, need, cast, temperature, taid_t,
                teacher_temperature, parts, *consts):
        n = hs.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hs.device)
        ctx.cfg, ctx.need, ctx.n_consts, ctx.cast = cfg, need, len(consts), cast
        ctx.backend, ctx.consumed = cfg.backend, False
        dynamic = (temperature, taid_t, teacher_temperature)
        hc, wc, bc = _cast(hs, cast), _cast(ws, cast), _cast(bs, cast)
        consts_c = _cast_teacher(cfg, consts, cast)
        if cfg.reduction == "none":
            empty = hc.new_empty(0)
            _run(cfg, hc, wc, bc, consts_c, labels, scale, None, loss, empty, empty, empty,
                 dynamic, parts)
            ctx.save_for_backward(hs, ws, bs, labels, temperature, taid_t, teacher_temperature,
                                  *consts)
            return loss
        gh, gw, gb, gw_v, gb_v = _grad_buffers(hc, wc, bc, need, cfg.v,
                                               cfg.acc_in_weight_dtype, ws.dtype)
        _run(cfg, hc, wc, bc, consts_c, labels, scale, None, loss, gh, gw_v, gb_v, dynamic,
             parts)
        gh, gw, gb = _grads_to(gh if need[0] else None, gw, gb, hs, ws, bs)
        ctx.save_for_backward(gh, gw, gb)
        return reduce_rows(loss, scale, cfg.reduction)

    @staticmethod
    def backward(ctx, grad_out):
        cfg, need, cast = ctx.cfg, ctx.need, ctx.cast
        if cfg.reduction == "none":
            refuse_double_backward(_op_name(cfg))
            hs, ws, bs, labels, temperature, taid_t, t_temp, *consts = ctx.saved_tensors
            hc, wc, bc = _cast(hs, cast), _cast(ws, cast), _cast(bs, cast)
            gh, gw, gb, gw_v, gb_v = _grad_buffers(hc, wc, bc, need, cfg.v,
                                                   cfg.acc_in_weight_dtype, ws.dtype)
            ones = torch.ones((), dtype=torch.float32, device=hs.device)
            scratch = torch.empty(hs.shape[0], dtype=torch.float32, device=hs.device)
            row_scale = grad_out.reshape(-1).to(torch.float32).contiguous()
            _run(cfg, hc, wc, bc, _cast_teacher(cfg, consts, cast), labels, ones, row_scale,
                 scratch, gh, gw_v, gb_v, (temperature, taid_t, t_temp))
            gh, gw, gb = _grads_to(gh if need[0] else None, gw, gb, hs, ws, bs)
        else:
            gh, gw, gb = rescale_stored(ctx, grad_out, _op_name(cfg))
        return (gh, gw, gb) + (None,) * (9 + ctx.n_consts)


def _check_head(prefix, hidden, weight, bias, cast=None):
    """The head's tensors; their dtypes must agree as the GEMM sees them (after the
    autocast dtype `cast`, when autocast is on)."""
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
    gemm = lambda x: _cast(x, cast).dtype  # noqa: E731
    if gemm(h) != gemm(w):
        raise TypeError(
            f"{prefix}_hidden ({h.dtype}) and {prefix}_weight ({w.dtype}) must have the same "
            "dtype (the matmul takes one operand dtype): cast one of them (e.g. "
            f"{prefix}_hidden.to({prefix}_weight.dtype)), or call the loss inside "
            "torch.autocast, which casts both to its dtype as it would for a linear layer"
        )
    if bias is not None:
        b = check_float_tensor(f"{prefix}_bias", bias)
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(
                f"{prefix}_bias must have shape ({w.shape[0]},) to match {prefix}_weight "
                f"{tuple(w.shape)}, got {tuple(b.shape)}"
            )
        if gemm(b) != gemm(w):
            raise TypeError(
                f"{prefix}_bias ({b.dtype}) must have {prefix}_weight's dtype ({w.dtype}), "
                "or run under torch.autocast"
            )
    return h, w


def _check_cap(name, cap) -> float:
    if cap is None:
        return 0.0
    return check_number(name, cap, lo=0.0, lo_open=True)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _widens(t_dtype: torch.dtype, s_dtype: torch.dtype) -> bool:
    """Does every value of t_dtype convert exactly to s_dtype (bf16/fp16 -> float32)?"""
    return torch.promote_types(t_dtype, s_dtype) == s_dtype


def _stored_teacher(args, teacher_values, teacher_softcap, teacher_logit_scale):
    """The stored teacher `teacher_logits` (checked), or None when the teacher is a head.
    Exactly one teacher source (both: ValueError; none or half a head: TypeError, a
    missing argument); the head-only keywords are refused with stored values."""
    check_choice("teacher_values", teacher_values, get_args(TeacherValues))
    t = args["teacher_logits"]
    head = [n for n in ("teacher_hidden", "teacher_weight") if args[n] is not None]
    if t is None:
        if teacher_values != "logits":
            raise ValueError(
                f"teacher_values={teacher_values!r} describes teacher_logits, which was not "
                "given; a teacher head's values are its logits. Pass the stored teacher as "
                "teacher_logits=, or drop teacher_values")
        missing = [n for n in ("teacher_hidden", "teacher_weight") if n not in head]
        if missing:  # a missing argument: TypeError, as Python's own
            raise TypeError(
                "fused_linear_kd_loss needs a teacher: teacher_hidden and teacher_weight (a "
                "linear head), or teacher_logits= (stored logits or log-probabilities "
                f"[..., V_t]); {' and '.join(missing)} missing")
        return None
    if head:
        raise ValueError(
            "pass the teacher either as a head (teacher_hidden, teacher_weight) or as "
            f"teacher_logits, not both; got teacher_logits and {', '.join(head)}")
    given = [name for name, on in (("teacher_bias", args["teacher_bias"] is not None),
                                   ("teacher_softcap", teacher_softcap is not None),
                                   ("teacher_logit_scale", teacher_logit_scale != 1.0)) if on]
    if given:
        raise ValueError(
            f"{', '.join(given)} transform(s) a teacher head's logits; teacher_logits are "
            "used as stored. Apply the transform before storing them, or drop "
            f"{', '.join(given)}")
    return check_float_tensor("teacher_logits", t)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    teacher_logits: torch.Tensor | None = None,
    teacher_values: TeacherValues = "logits",
    # the kd_loss keywords
    divergence: Divergence = "forward_kl", beta: float = BETA_DEFAULT,
    alpha: float = ALPHA_DEFAULT, taid_t: float | torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0, ignore_index: int = -100,
    reduction: Reduction = "mean", normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0, soft_label_weight: float = 1.0,
    vocab_mismatch: VocabMismatch = "error",
    dkd_alpha: float = DKD_ALPHA_DEFAULT, dkd_beta: float = DKD_BETA_DEFAULT,
    nkd_gamma: float = NKD_GAMMA_DEFAULT,
    chunk_size: int | None = None,
    weight_grad_accumulation: WeightGradAccumulation = "float32",
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
    teacher_temperature: float | torch.Tensor | None = None,
    temperature_scaling: TemperatureScaling = "none",
    return_components: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD loss on the logits of two linear heads, without materialising them (docs/spec.md §2).

    Equal to `kd_loss(S, T, labels, ...)` with S = f_s(student_hidden @ student_weightᵀ +
    student_bias) and T = f_t(teacher_hidden @ teacher_weightᵀ + teacher_bias), where
    f(x) = c·tanh(m·x/c) with softcap c, else m·x (m the logit scale). Only a chunk of
    `chunk_size` token rows of logits exists at a time (see docs/fused_linear.md).
    The teacher is either that head (teacher_hidden, teacher_weight) or stored values
    T = teacher_logits (offline teacher; read chunk by chunk where they are, never copied
    whole): `fused_linear_kd_loss(h_s, w_s, labels=y, teacher_logits=T)`.
    Under torch.autocast the GEMM inputs are cast to its dtype, as for a linear layer
    (float64 ones excepted); gradients come back in each input's own dtype.

    Args:
        student_hidden: [..., H_s] float tensor; gets a gradient when it requires one.
        student_weight: [V_s, H_s], same dtype as student_hidden; gets a float32-accumulated
            gradient when it requires one (a frozen head costs no weight-gradient work).
        teacher_hidden: [..., H_t] float tensor, same leading shape; a constant.
        teacher_weight: [V_t, H_t], same dtype as teacher_hidden; a constant. Both None
            when the teacher is `teacher_logits`.
        labels: optional [...] integer tensor; `ignore_index` rows are ignored.
        student_bias: optional [V_s] (student_weight's dtype); teacher_bias: optional [V_t].
        student_softcap, teacher_softcap: None or c > 0 (Gemma-style logit softcapping).
        student_logit_scale, teacher_logit_scale: finite m (applied inside the softcap).
        teacher_logits: instead of a teacher head, its stored values [..., V_t] (the hidden
            states' leading shape; any float dtype, read in place in it; a constant); the
            teacher_bias / teacher_softcap / teacher_logit_scale of a head are refused.
        teacher_values: what `teacher_logits` holds: 'logits' or 'logprobs' (log-softmax).
            Both enter the same softmax(T/τ): softmax(log p) = p (to rounding; renormalised
            when the stored values do not sum to 1), softmax(log p / τ) ∝ p^(1/τ) is the
            tempered teacher. Only with teacher_logits.
        divergence, beta, alpha, taid_t, temperature, ignore_index, reduction, normalizer,
        hard_label_weight, soft_label_weight, vocab_mismatch, dkd_alpha, dkd_beta, nkd_gamma:
            as in `kd_loss` (docs/spec.md §1; taid_t and temperature may be 0-dim tensors).
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
            Weights (and biases) given as DTensors sharded on dim 0 imply it. Backend
            'torch' ('auto') or 'triton' (docs/vocab_parallel.md, "The fused form").
        backend: 'auto' | 'torch' | 'triton' | 'cuda'.
        teacher_temperature, temperature_scaling, return_components: as in `kd_loss`
            (the teacher's τ_t, the soft term's τ², and (total, soft, hard) from one pass).

    Returns:
        float32 loss: a scalar, or [...] per-row losses for reduction='none'; with
        return_components a tuple (total, soft, hard) of such tensors (soft and hard
        detached).
    """
    call = dict(locals())  # the arguments, for a part return_components computes apart
    vocab_parallel, args = unwrap_dtensors(
        vocab_parallel, _KD_VOCAB_DIMS, student_hidden=student_hidden,
        student_weight=student_weight, student_bias=student_bias, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_bias=teacher_bias, labels=labels,
        teacher_logits=teacher_logits)
    student_bias, teacher_bias, labels = args["student_bias"], args["teacher_bias"], args["labels"]
    cast = _autocast_dtype(args["student_hidden"].device) if isinstance(
        args["student_hidden"], torch.Tensor) else None
    hs, ws = _check_head("student", args["student_hidden"], args["student_weight"], student_bias,
                         cast)
    stored = _stored_teacher(args, teacher_values, teacher_softcap, teacher_logit_scale)
    ht, wt = (_check_head("teacher", args["teacher_hidden"], args["teacher_weight"],
                          teacher_bias, cast) if stored is None else (stored, None))
    device = check_same_device(
        student_hidden=hs, student_weight=ws, student_bias=student_bias,
        teacher_hidden=args["teacher_hidden"], teacher_weight=wt, teacher_bias=teacher_bias,
        teacher_logits=stored,
    )
    # the GEMMs' dtypes (a stored teacher: its own, never cast)
    s_dt, t_dt = _cast(ws, cast).dtype, (_cast(wt, cast) if stored is None else stored).dtype
    vt_here = ht.shape[-1] if stored is not None else wt.shape[0]
    chunk = None if chunk_size is None else check_int("chunk_size", chunk_size, lo=1)
    grad_on = torch.is_grad_enabled()
    bs = student_bias
    need = (
        grad_on and hs.requires_grad,
        grad_on and ws.requires_grad,
        grad_on and bs is not None and bs.requires_grad,
    )
    if vocab_parallel is not None:  # (before any collective)
        check_vp_divergence("fused_linear_kd_loss", divergence,
                            FUSED_VP.resolve(backend, device))
    shards, vp_be = _check_vocab_parallel(vocab_parallel, FUSED_VP, "fused_linear_kd_loss",
                                          backend, (ws.shape[0], vt_here), hs, chunk, need,
                                          device)
    vs = ws.shape[0] if shards is None else shards.v
    vt = vt_here if shards is None else shards.v
    s_meta = _LogitsMeta(tuple(hs.shape[:-1]) + (vs,), s_dt, device)
    t_meta = _LogitsMeta(tuple(ht.shape[:-1]) + (vt,), t_dt, device)
    prm, v, normalizer, dynamic = prepare_kd_args(
        s_meta, t_meta, labels, divergence=divergence, beta=beta, alpha=alpha, taid_t=taid_t,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight, vocab_mismatch=vocab_mismatch,
        student_name="student_hidden",
        teacher_name="teacher_hidden" if stored is None else "teacher_logits",
        dkd_alpha=dkd_alpha, dkd_beta=dkd_beta, nkd_gamma=nkd_gamma,
        teacher_temperature=teacher_temperature, temperature_scaling=temperature_scaling,
    )
    want_parts = check_return_components(divergence, return_components)
    s_cap = _check_cap("student_softcap", student_softcap)
    t_cap = _check_cap("teacher_softcap", teacher_softcap)
    s_mult = check_number("student_logit_scale", student_logit_scale)
    t_mult = check_number("teacher_logit_scale", teacher_logit_scale)
    if shards is not None:  # local columns; the chunk from the widest shard: every rank alike
        v = ws.shape[0]
        prm, dynamic = resolve(prm, *dynamic), (None, None, None)  # (collectives: not traced)
    be = (vp_be if shards is not None  # (kernels see a stored teacher widened exactly)
          else FUSED.resolve(backend, device, s_dtype=s_dt,
                             t_dtype=s_dt if stored is not None and _widens(t_dt, s_dt)
                             else t_dt))
    if stored is None:
        ht2, buf_dt, h_t = _rows(ht.detach()), t_dt, ht.shape[-1]
    else:  # rows in place: [N, V_t], or [N1, N2, V_t] at two row strides (StoredRows)
        ht2, h_t = row_views(stored.detach())[0], 0
        buf_dt = (s_dt if be == "cuda" and shards is None and t_dt != s_dt
                  else t_dt if ht2.dim() == 3 else None)  # the chunk's teacher buffer
    if chunk is None:
        chunk = choose_chunk_size(
            v if shards is None else shards.max_width, hs.shape[-1], h_t, s_dt,
            buf_dt or t_dt, student_softcap=s_cap > 0,
            need_teacher=prm.div != ZERO and buf_dt is not None,
        )
    lead = hs.shape[:-1]
    hs2 = _rows(hs)
    wt = wt.detach() if wt is not None else None
    bt = teacher_bias.detach() if teacher_bias is not None else None
    y = labels.reshape(-1).contiguous() if labels is not None else None
    n = hs2.shape[0]
    scale = loss_scale(reduction, y, n, normalizer, prm.ignore_index, device,
                       compute_dtype(_cast(ws, cast)))
    check_choice("weight_grad_accumulation", weight_grad_accumulation, ("float32", "weight"))
    cfg = FusedConfig(prm, v, reduction, be, chunk, s_cap, s_mult, t_cap, t_mult,
                      weight_grad_accumulation == "weight", _vp_config(vocab_parallel, shards))
    parts = new_parts(n, device, want_parts)
    out = _apply(cfg, need, hs2, ws, bs, y, scale, (ht2, wt, bt), cast, dynamic, parts)
    out = out.reshape(lead) if reduction == "none" else out
    if parts is None:
        return out
    soft, hard = components(parts, scale, reduction=reduction, lead=lead,
                            soft_w=soft_label_weight, hard_w=hard_label_weight,
                            has_labels=y is not None,
                            rerun=rerun_with(fused_linear_kd_loss, call))
    return out, soft, hard


# The arguments a DTensor may shard on the vocabulary (their dim 0: the head's rows; a
# stored teacher's last dim).
_KD_VOCAB_DIMS = {"student_weight": 0, "student_bias": 0, "teacher_weight": 0,
                  "teacher_bias": 0, "teacher_logits": -1}
_TOPK_VOCAB_DIMS = {"student_weight": 0, "student_bias": 0}


def _check_vocab_parallel(vp, table, op, backend, widths, hs, chunk, need, device):
    """(None, None) without `vp`; else (the validated shards, the backend from `table`,
    resolved first: a backend that cannot run raises before any collective). Besides the
    checks of the logits losses, every rank must pass the same chunk_size (or None) and
    agree on whether the hidden state needs a gradient: the chunks' and the hidden
    all-reduce's collectives must line up across the group."""
    if vp is None:
        return None, None
    be = table.resolve(backend, device)
    shards = check_vocab_parallel(
        vp, op, backend, widths, math.prod(hs.shape[:-1]), device,
        agree={"chunk_size": chunk or 0, "student_hidden's requires_grad": int(need[0])})
    return shards, be


def _vp_config(vp, shards):
    return None if shards is None else VocabParallelConfig(shards, vp.reduce_hidden_grad)


def _apply(cfg, need, hs, ws, bs, labels, scale, consts, cast=None,
           dynamic=(None, None, None), parts=None):
    """The loss through the autograd.Function when any student tensor needs a gradient,
    else one gradient-free pass of the chunk loop. cast: the autocast dtype (or None);
    parts: None or [N, 2], filled with each row's soft and hard addends."""
    if any(need):
        return FusedLinearFunction.apply(hs, ws, bs, labels, scale, cfg, need, cast, *dynamic,
                                         parts, *consts)
    hs, ws, bs = (_cast(x.detach() if x is not None else None, cast) for x in (hs, ws, bs))
    loss = torch.empty(hs.shape[0], dtype=torch.float32, device=hs.device)
    empty = hs.new_empty(0)
    _run(cfg, hs, ws, bs, _cast_teacher(cfg, consts, cast), labels, scale, None, loss, empty,
         empty, empty, dynamic, parts)
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
    taid_t: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    chunk_size: int | None = None,
    weight_grad_accumulation: WeightGradAccumulation = "float32",
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
    temperature_scaling: TemperatureScaling = "none",
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
        labels: optional [...] integer tensor: rows equal to ignore_index are ignored; the
            hard-label term's classes.
        values, tail, divergence, beta, taid_t, temperature, ignore_index, reduction,
        normalizer, hard_label_weight, soft_label_weight: as in `topk_kd_loss`
            (docs/spec.md §5).
        student_bias: optional [V] (student_weight's dtype).
        student_softcap: None or c > 0; student_logit_scale: finite m.
        chunk_size: token rows per chunk (int >= 1); default from V, H, the dtype and
            KDKERNELS_FUSED_CHUNK_BUDGET_MB (256 MiB), not from N.
        weight_grad_accumulation: 'float32' (default) or 'weight', as in
            `fused_linear_kd_loss`.
        vocab_parallel: a `VocabParallel`: this rank holds rows [start, stop) of the head
            (the top-k indices stay global ids), as in `fused_linear_kd_loss`; a DTensor
            weight (and bias) sharded on dim 0 implies it.
        backend: 'auto' | 'torch' | 'triton' | 'cuda' (the divergence step runs on
            `topk_kd_loss`'s backend of that name: a backend it lacks is refused).
        temperature_scaling: 'none' | 'tau_squared' (the soft term times τ², as kd_loss).

    Returns:
        float32 loss: a scalar, or [...] per-row losses for reduction='none'.
    """
    vocab_parallel, args = unwrap_dtensors(
        vocab_parallel, _TOPK_VOCAB_DIMS, student_hidden=student_hidden,
        student_weight=student_weight, student_bias=student_bias,
        teacher_topk_indices=teacher_topk_indices, teacher_topk_values=teacher_topk_values,
        labels=labels)
    student_bias, labels = args["student_bias"], args["labels"]
    cast = _autocast_dtype(args["student_hidden"].device) if isinstance(
        args["student_hidden"], torch.Tensor) else None
    hs, ws = _check_head("student", args["student_hidden"], args["student_weight"], student_bias,
                         cast)
    s_dt = _cast(ws, cast).dtype  # the GEMM's dtype
    idx, vals = check_topk_tensors(args["teacher_topk_indices"], args["teacher_topk_values"])
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
    shards, vp_be = _check_vocab_parallel(vocab_parallel, FUSED_TOPK_VP,
                                          "fused_linear_topk_kd_loss", backend, (ws.shape[0],),
                                          hs, chunk, need, device)
    v = ws.shape[0]
    a = prepare_topk_args(
        lead, v if shards is None else shards.v, device, idx, vals, labels, values=values,
        tail=tail, divergence=divergence, beta=beta, temperature=temperature,
        ignore_index=ignore_index, reduction=reduction, normalizer=normalizer, taid_t=taid_t,
        hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
        temperature_scaling=temperature_scaling)
    if shards is not None:
        refuse_vocab_parallel("fused_linear_topk_kd_loss", vp_be, a)
    s_cap = _check_cap("student_softcap", student_softcap)
    s_mult = check_number("student_logit_scale", student_logit_scale)
    if chunk is None:
        chunk = choose_chunk_size(v if shards is None else shards.max_width, hs.shape[-1], 0,
                                  s_dt, s_dt, student_softcap=s_cap > 0,
                                  need_teacher=False)
    check_choice("weight_grad_accumulation", weight_grad_accumulation, ("float32", "weight"))
    be = (vp_be if shards is not None
          else FUSED_TOPK.resolve(backend, device, **topk_facts(s_dt, a)))
    hs2 = _rows(hs)
    y = labels.reshape(-1).contiguous() if labels is not None else None
    scale = loss_scale(reduction, y, hs2.shape[0], a.normalizer, a.ignore_index, device,
                       compute_dtype(_cast(ws, cast)))
    cfg = TopKFusedConfig(a.code, a.w, a.inv_temp, a.logprobs, a.bucket, a.ignore_index, v,
                          reduction, be, chunk, s_cap, s_mult,
                          weight_grad_accumulation == "weight", _vp_config(vocab_parallel, shards),
                          a.soft_w, a.hard_w)
    out = _apply(cfg, need, hs2, ws, bs, y, scale, (a.idx, a.vals), cast)
    return out.reshape(lead) if reduction == "none" else out
