"""TRL: kdkernels in place of the losses of TRL's GKD and distillation trainers.

- `generalized_jsd_loss`: `GKDTrainer.generalized_jsd_loss` (same signature, same numbers),
  computed by `kd_loss(divergence="jsd")`.
- `chunked_divergence_loss`: the loss `DistillationTrainer` computes from the hidden states
  and the two LM heads (same signature and return values as its module-level
  `_chunked_divergence_loss`), computed by `fused_linear_kd_loss`.
- `patch_gkd_trainer`, `KDGKDTrainer`, `patch_distillation_trainer`,
  `KDDistillationTrainer`: plug them into the trainers.

Only the last four import trl (`pip install trl`); the two losses work without it.
docs/distilling.md, "Coming from TRL", shows the use and where the numbers differ.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys

import torch

from .._core.backend import Backend
from .._core.validate import check_choice, check_float_tensor, check_int_tensor, check_number
from ..fused_linear.function import fused_linear_kd_loss
from ..kd.function import kd_loss

__all__ = [
    "generalized_jsd_loss",
    "chunked_divergence_loss",
    "patch_gkd_trainer",
    "patch_distillation_trainer",
]  # + KDGKDTrainer, KDDistillationTrainer: built on first access (they import trl)

IGNORE = -100  # TRL's label mask, fixed (it has no ignore_index argument)
TRL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _valid_rows(labels: torch.Tensor) -> torch.Tensor:
    """Labels with only TRL's distinction left: -100 is masked, any other value counts."""
    check_int_tensor("labels", labels)
    return torch.where(labels != IGNORE, 0, IGNORE)


def _normalizer_tensor(n, device):
    """num_items_in_batch as kd_loss's normalizer: a number, or a 0-dim tensor there."""
    if isinstance(n, torch.Tensor):
        if n.numel() == 1:
            n = n.reshape(())
        if n.device.type != "cpu" and n.device != device:
            n = n.to(device)
    return n


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """TRL's generalized JSD (GKD, Agarwal et al. 2024, eq. 1) computed by kdkernels.

    With p = softmax(teacher/τ), q = softmax(student/τ) and m = βp + (1−β)q, each token's
    loss is β·KL(p‖m) + (1−β)·KL(q‖m); β = 0 is KL(p‖q) and β = 1 is KL(q‖p). No τ².
    Positions whose label is -100 are left out. Reductions, as TRL's:

    - `num_items_in_batch` given: sum / num_items_in_batch (whatever `reduction` says);
    - "batchmean": sum / (valid tokens, at least 1), or / `student_logits.shape[0]` without
      labels (the batch size for [B, T, V] logits, as TRL);
    - "sum": the sum; "mean": sum / (valid tokens · V), the element-wise mean;
    - "none": TRL's per-element terms, [valid tokens, V] with labels (the masked rows
      dropped), else the logits' shape (a plain PyTorch evaluation: these are N·V values
      by definition; for per-token losses call `kd_loss(..., reduction="none")`).

    The loss is float32 (TRL returns the logits' dtype); the teacher is a constant (no
    gradient, as in the trainers, which run it under no_grad). `backend` is kd_loss's.
    """
    check_choice("reduction", reduction, TRL_REDUCTIONS)
    s = check_float_tensor("student_logits", student_logits)
    t = check_float_tensor("teacher_logits", teacher_logits)
    rows = None if labels is None else _valid_rows(labels)
    kw = dict(divergence="jsd", beta=beta, temperature=temperature, backend=backend)
    if num_items_in_batch is not None:
        n = _normalizer_tensor(num_items_in_batch, s.device)
        return kd_loss(s, t, rows, reduction="mean", normalizer=n, **kw)
    if reduction == "none":
        return _jsd_terms(s, t, rows, beta=beta, temperature=temperature)
    if reduction == "sum":
        return kd_loss(s, t, rows, reduction="sum", **kw)
    if reduction == "batchmean":
        norm = None if rows is not None else max(s.shape[0], 1)
        return kd_loss(s, t, rows, reduction="mean", normalizer=norm, **kw)
    # "mean": over every element of the (masked) per-element tensor
    v = s.shape[-1]
    if rows is None:
        norm = max(s.numel(), 1)
    else:
        # No valid token: 0 (TRL's torch.mean of an empty tensor gives NaN there).
        norm = ((rows != IGNORE).sum() * v).clamp_min(1)
    return kd_loss(s, t, rows, reduction="mean", normalizer=norm, **kw)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a·(log a − log b) element-wise, 0 where a = 0 (a −inf logit is a mask)."""
    a = log_a.exp()
    pos = a > 0
    diff = torch.where(pos, log_a, 0.0) - torch.where(pos, log_b, 0.0)
    return torch.where(pos, a * diff, 0.0)


def _jsd_terms(s, t, rows, *, beta, temperature):
    """reduction='none': the per-element terms of the generalized JSD, as float32."""
    beta = check_number("beta", beta, lo=0.0, hi=1.0)
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    if s.shape != t.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(s.shape)} and {tuple(t.shape)}")
    if rows is not None:
        if rows.shape != s.shape[:-1]:
            raise ValueError(f"labels must have the logits' leading shape "
                             f"{tuple(s.shape[:-1])}, got {tuple(rows.shape)}")
        keep = rows != IGNORE
        s, t = s[keep], t[keep]
    dt = torch.float64 if s.dtype == torch.float64 else torch.float32
    log_q = torch.log_softmax(s.to(dt) / temperature, -1)
    log_p = torch.log_softmax(t.detach().to(dt) / temperature, -1)
    if beta == 0.0:
        out = _kl_terms(log_p, log_q)
    elif beta == 1.0:
        out = _kl_terms(log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        out = beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)
    return out.float()


# --- DistillationTrainer: the loss on hidden states and LM heads --------------------------


def _full(w):
    """A DTensor head (FSDP2 outside the head's forward) as one plain tensor, as TRL does."""
    full = getattr(w, "full_tensor", None)
    return w if w is None or full is None else full()


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the projection runs in: autocast's when it is on, else the hidden state's."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _gather_heads(*params):
    """TRL's DeepSpeed ZeRO-3 gather of the LM heads (a null context elsewhere, and when
    trl was never imported: only TRL's trainers shard heads that way)."""
    if "trl" not in sys.modules:
        return contextlib.nullcontext()
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(*params)


def _cast(x, dtype):
    return x if x is None or x.dtype == dtype else x.to(dtype)


@torch.no_grad()
def _entropy_sum(h, w, b, valid, scale, softcap, temperature) -> torch.Tensor:
    """Σ over valid positions of the student's entropy at temperature τ, in nats (float32).

    One extra student projection, a block of rows (~64 MiB of float32 logits) at a time.
    """
    h = h.reshape(-1, h.shape[-1])
    valid = valid.reshape(-1)
    rows = max(1, (64 << 20) // (4 * max(w.shape[0], 1)))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(0, h.shape[0], rows):
        z = torch.nn.functional.linear(h[i:i + rows], w, b).float() * scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        logp = torch.log_softmax(z / temperature, -1)
        ent = -(logp.exp() * logp.clamp_min(torch.finfo(logp.dtype).min)).sum(-1)
        total += torch.where(valid[i:i + rows], ent, 0.0).sum()
    return total


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    entropy: bool = True,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DistillationTrainer's loss, computed by `fused_linear_kd_loss`.

    The generalized JSD of `generalized_jsd_loss` between the logits
    f(h W_ᵀ + b)/τ of the two heads (f: the logit scale, then the optional softcap),
    summed over the positions where `completion_mask` is nonzero and divided by
    `num_items_in_batch`, or by the number of those positions (at least 1).

    Returns (loss, entropy_sum, n_valid) as TRL's does: entropy_sum is the student's
    entropy at τ summed over the valid positions (a detached metric: one extra student
    projection, no gradient; `entropy=False` skips it and returns NaN), n_valid the count.
    The projection runs in autocast's dtype when autocast is on (else the hidden
    states'); DTensor heads are gathered with `full_tensor()`, ZeRO-3 heads with TRL's
    gather context, both as TRL does.
    """
    valid = completion_mask != 0
    labels = torch.where(valid, 0, IGNORE)
    n_valid = valid.sum()
    normalizer = None
    if num_items_in_batch is not None:
        normalizer = _normalizer_tensor(num_items_in_batch, student_hidden_states.device)
    ws, bs = _full(student_lm_head_weight), _full(student_lm_head_bias)
    wt, bt = _full(teacher_lm_head_weight), _full(teacher_lm_head_bias)
    ds, dt = _compute_dtype(student_hidden_states), _compute_dtype(teacher_hidden_states)
    with _gather_heads(ws, bs), _gather_heads(wt, bt):
        h_s, ws, bs = (_cast(x, ds) for x in (student_hidden_states, ws, bs))
        h_t, wt, bt = (_cast(x, dt) for x in (teacher_hidden_states.detach(), wt, bt))
        loss = fused_linear_kd_loss(
            h_s, ws, h_t, wt.detach(), labels,
            student_bias=bs, teacher_bias=None if bt is None else bt.detach(),
            student_softcap=student_final_logit_softcapping,
            teacher_softcap=teacher_final_logit_softcapping,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            divergence="jsd", beta=beta, temperature=temperature,
            reduction="mean", normalizer=normalizer, backend=backend,
        )
        if entropy:
            ent = _entropy_sum(h_s.detach(), ws.detach(), None if bs is None else bs.detach(),
                               valid, student_logit_scale, student_final_logit_softcapping,
                               temperature)
        else:
            ent = torch.full((), math.nan, dtype=torch.float32, device=loss.device)
    return loss, ent, n_valid


# --- plugging them into the trainers ----------------------------------------------------


def _positional_names(fn) -> list[str]:
    return [n for n, p in inspect.signature(fn).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _check_same_signature(theirs, ours, what: str) -> None:
    """Refuse to replace a function whose parameters differ from the drop-in's."""
    a, b = _positional_names(theirs), _positional_names(ours)
    if a != b:
        raise TypeError(
            f"{what} takes ({', '.join(a)}), the kdkernels drop-in takes ({', '.join(b)}): "
            "this trainer's loss is not the one the drop-in reproduces; not replaced"
        )


def _need_trl(what: str):
    return ImportError(
        f"kdkernels.integrations.trl.{what} needs trl (pip install trl); "
        "generalized_jsd_loss and chunked_divergence_loss work without it"
    )


def patch_gkd_trainer(target):
    """Make a GKD trainer compute its loss with `generalized_jsd_loss`; returns `target`.

    `target`: the `GKDTrainer` class or a subclass (every instance made afterwards, and
    existing ones, use kdkernels), or one trainer instance (only that one). The replaced
    method must have TRL's signature (GKDTrainer's; trainers whose
    `generalized_jsd_loss` takes other arguments raise TypeError).
    """
    current = getattr(target, "generalized_jsd_loss", None)
    if current is None:
        raise TypeError(
            f"{target!r} has no generalized_jsd_loss; pass trl's GKDTrainer (a subclass) "
            "or a trainer instance")
    _check_same_signature(current, generalized_jsd_loss,
                          f"{getattr(target, '__name__', type(target).__name__)}"
                          ".generalized_jsd_loss")
    if isinstance(target, type):
        target.generalized_jsd_loss = staticmethod(generalized_jsd_loss)
    else:
        target.generalized_jsd_loss = generalized_jsd_loss
    return target


def _distillation_module():
    try:
        from trl.trainer import distillation_trainer
    except ImportError as e:
        raise _need_trl("patch_distillation_trainer / KDDistillationTrainer") from e
    if not hasattr(distillation_trainer, "_chunked_divergence_loss"):
        raise ImportError(
            "this trl version's DistillationTrainer has no _chunked_divergence_loss "
            "(the loss the kdkernels drop-in replaces); use chunked_divergence_loss directly")
    _check_same_signature(distillation_trainer._chunked_divergence_loss,
                          chunked_divergence_loss, "trl's _chunked_divergence_loss")
    return distillation_trainer


def patch_distillation_trainer(*, entropy: bool = True):
    """Make every trl `DistillationTrainer` compute its loss with `chunked_divergence_loss`.

    Replaces `trl.trainer.distillation_trainer._chunked_divergence_loss`, the function the
    trainer calls; returns the function it replaced (assign it back to undo).
    `entropy=False` skips the extra projection of the entropy metric (logged as NaN).
    `KDDistillationTrainer` does the same for its own instances only.
    """
    mod = _distillation_module()
    old = mod._chunked_divergence_loss
    mod._chunked_divergence_loss = functools.partial(chunked_divergence_loss, entropy=entropy)
    return old


def _gkd_trainer_class():
    for where in ("trl.experimental.gkd", "trl"):
        try:
            mod = __import__(where, fromlist=["GKDTrainer"])
            return mod.GKDTrainer
        except (ImportError, AttributeError):
            continue
    raise _need_trl("KDGKDTrainer")


def _make_kd_gkd_trainer():
    base = _gkd_trainer_class()
    _check_same_signature(base.generalized_jsd_loss, generalized_jsd_loss,
                          "GKDTrainer.generalized_jsd_loss")
    return type("KDGKDTrainer", (base,), {
        "__doc__": "trl's GKDTrainer with its loss computed by kdkernels "
                   "(kdkernels.integrations.trl.generalized_jsd_loss).",
        "__module__": __name__,
        "generalized_jsd_loss": staticmethod(generalized_jsd_loss),
    })


def _make_kd_distillation_trainer():
    mod = _distillation_module()

    class KDDistillationTrainer(mod.DistillationTrainer):
        """trl's DistillationTrainer with its loss computed by kdkernels
        (`chunked_divergence_loss`); `kd_entropy = False` skips the entropy metric."""

        kd_entropy = True

        def _compute_loss(self, *args, **kwargs):
            old = mod._chunked_divergence_loss
            mod._chunked_divergence_loss = functools.partial(
                chunked_divergence_loss, entropy=self.kd_entropy)
            try:
                return super()._compute_loss(*args, **kwargs)
            finally:
                mod._chunked_divergence_loss = old

    KDDistillationTrainer.__module__ = __name__
    return KDDistillationTrainer


_LAZY = {"KDGKDTrainer": _make_kd_gkd_trainer,
         "KDDistillationTrainer": _make_kd_distillation_trainer}


def __getattr__(name: str):
    # The trainer subclasses are built on first access, so importing this module never
    # imports trl.
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
