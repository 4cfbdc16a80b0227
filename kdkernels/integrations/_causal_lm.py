"""KD losses between two causal language models (the model-facing half of the Hugging Face
integration; `kdkernels.integrations.transformers` is the public module).

Nothing here imports transformers: a model is anything with `config` and
`get_output_embeddings()` whose forward takes `input_ids` / `attention_mask` and calls that
head once on the final hidden states, as every `*ForCausalLM` of transformers does.

Two ways to get the loss:
- unfused: run both models, take their `logits` [B, T, V] and call `kd_loss` /
  `topk_kd_loss` on them (the labels are shifted, the logits are passed whole);
- fused: a forward pre-hook on the output head hands us the head's input h [B, T, H] (the
  hidden states exactly as the model feeds its head), and gives the head an empty slice
  instead, so no logits are computed. The student's loss is computed inside that hook,
  i.e. inside the student's forward, where FSDP / ZeRO-3 hold the head's full weight.
  What the model does to the head's output (Gemma's softcap, Cohere's logit scale, ...)
  is read from its config (`HeadSpec.from_config`) and, on the first call, checked
  against the model's own logits on a few tokens.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._core.chunking import chunk_rows
from .._core.validate import check_choice, check_int
from ..fused_linear import fused_linear_kd_loss, fused_linear_topk_kd_loss
from ..kd import kd_loss
from ..select import topk_select
from ..topk import TeacherTopK, topk_kd_loss
from ._heads import (
    HeadSpec,
    check_head,
    head_of,
    head_weights,
    logits_of,
    run_head_hooked,
    with_no_cache,
)

LossKind = Literal["kd", "topk"]

# Keywords the integration sets itself; everything else goes to the kdkernels function.
_OWN = {
    "student_logits", "teacher_logits", "student_hidden", "student_weight", "teacher_hidden",
    "teacher_weight", "teacher_topk_indices", "teacher_topk_values", "labels", "normalizer",
    "student_bias", "teacher_bias", "student_softcap", "teacher_softcap",
    "student_logit_scale", "teacher_logit_scale", "ignore_index", "taid_t",
}
_TARGETS = {
    ("kd", False): kd_loss, ("kd", True): fused_linear_kd_loss,
    ("topk", False): topk_kd_loss, ("topk", True): fused_linear_topk_kd_loss,
}
# Rows of teacher logits per block when the top-k is taken on the fly (float32 bytes).
_TOPK_BLOCK_BYTES = 64 << 20


# -- labels -----------------------------------------------------------------------------


def shift_labels(input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The target of every position [B, T]: position i predicts labels[i+1] (labels default
    to input_ids); `ignore_index` where there is no next token, where the next token's label
    is ignored, and where either position i or i+1 is padding (attention_mask 0)."""
    y = labels if labels is not None else input_ids
    if y is None:
        raise ValueError("pass input_ids or labels (the targets come from them)")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(y.shape):
            raise ValueError(
                f"attention_mask must be a [batch, seq] 0/1 mask shaped like the labels "
                f"{tuple(y.shape)}, got {tuple(attention_mask.shape)}"
            )
        pad = attention_mask == 0
        y = y.masked_fill(pad, ignore_index)
    out = F.pad(y[..., 1:], (0, 1), value=ignore_index)
    if attention_mask is not None:
        out = out.masked_fill(pad, ignore_index)
    return out


_shift_labels = shift_labels  # KDForCausalLM.__call__ has an argument of that name


def count_items(input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, *,
                shift_labels: torch.Tensor | None = None,
                ignore_index: int = -100) -> torch.Tensor:
    """The number of positions of a batch that count (0-dim int64 tensor): sum it over the
    micro-batches of an accumulated batch (and over data-parallel ranks) for
    `num_items_in_batch`."""
    y = shift_labels if shift_labels is not None else _shift_labels(
        input_ids, attention_mask, labels, ignore_index)
    return (y != ignore_index).sum()


# -- the loss ---------------------------------------------------------------------------


class KDForCausalLM:
    """A KD loss between two causal LMs, from one batch: `kd(student, teacher, input_ids=,
    attention_mask=, labels=, num_items_in_batch=)` (docs/distilling.md).

    Args:
        loss: 'kd' (`kd_loss` / `fused_linear_kd_loss`, every divergence) or 'topk'
            (`topk_kd_loss` / `fused_linear_topk_kd_loss`: the teacher's top `top_k`
            classes, taken on the fly, or a stored `teacher_topk=` record and teacher None).
        fused: True (default): hidden states × head weight, the [tokens × vocab] logits are
            never materialised (the teacher's top-k is taken a block of rows at a time);
            False: from the models' logits.
        divergence, temperature, hard_label_weight: as in `kd_loss` (docs/spec.md §1).
        top_k: the teacher's classes per token for loss='topk' with a teacher model.
        topk_values: 'logits' | 'logprobs': what the on-the-fly top-k stores (as
            `TeacherTopK`; 'logprobs' needs temperature 1).
        ignore_index: the label of positions that do not count.
        taid_t: λ for divergence='taid'; an attribute (`kd.taid_t = ...`, or TAIDCallback).
        student_head, teacher_head: a `HeadSpec` overriding what is read from the config.
        check_head: on the first fused call per model, check the head transform against the
            model's own logits on a few tokens (one small extra forward without gradients).
        **loss_kwargs: any other keyword of the kdkernels function (beta, alpha,
            soft_label_weight, vocab_mismatch, reduction, chunk_size, backend, tail, ...).

    The teacher runs under `torch.no_grad()` in whatever mode it is in: call
    `teacher.eval()` yourself for a deterministic teacher (dropout off).
    """

    def __init__(self, *, loss: LossKind = "kd", fused: bool = True,
                 divergence: str = "forward_kl", temperature: float = 1.0,
                 hard_label_weight: float = 0.0, top_k: int | None = None,
                 topk_values: str = "logits", ignore_index: int = -100,
                 taid_t: float | None = None, student_head: HeadSpec | None = None,
                 teacher_head: HeadSpec | None = None, check_head: bool = True,
                 **loss_kwargs: Any):
        self.loss = check_choice("loss", loss, ("kd", "topk"))
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.fused = fused
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.top_k = None if top_k is None else check_int("top_k", top_k, lo=1)
        self.topk_values = check_choice("topk_values", topk_values, ("logits", "logprobs"))
        for nm, hs in (("student_head", student_head), ("teacher_head", teacher_head)):
            if hs is not None and not isinstance(hs, HeadSpec):
                raise TypeError(f"{nm} must be a HeadSpec, got {type(hs).__name__}")
        self.student_head, self.teacher_head = student_head, teacher_head
        self.check_head = bool(check_head)
        self.taid_t = taid_t
        kw = dict(loss_kwargs, divergence=divergence, temperature=temperature)
        if hard_label_weight != 0.0 or loss == "kd":
            kw["hard_label_weight"] = hard_label_weight
        params = inspect.signature(_TARGETS[(self.loss, self.fused)]).parameters
        unknown = sorted(k for k in kw if k in _OWN or k not in params)
        if unknown:
            fn = _TARGETS[(self.loss, self.fused)].__name__
            raise TypeError(
                f"KDForCausalLM(loss={loss!r}, fused={fused}) got keyword(s) {unknown} that "
                f"{fn} does not take (or that the integration sets itself)"
            )
        self.loss_kwargs = kw
        # TAIDCallback's record of this optimizer step's losses (off unless it asks).
        self.track_step_loss = False
        self._step_sum = None
        self._step_parts = 0
        self._step_normalized = False

    def __repr__(self) -> str:
        kw = ", ".join(f"{k}={v!r}" for k, v in self.loss_kwargs.items())
        return f"KDForCausalLM(loss={self.loss!r}, fused={self.fused}, {kw})"

    # -- the call -----------------------------------------------------------------------

    def __call__(self, student: nn.Module, teacher: nn.Module | None,
                 input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, *,
                 num_items_in_batch: int | float | torch.Tensor | None = None,
                 shift_labels: torch.Tensor | None = None,
                 teacher_topk: TeacherTopK | tuple | None = None,
                 **model_kwargs: Any) -> torch.Tensor:
        """The loss of one (micro-)batch.

        Args:
            student, teacher: causal LMs (transformers `*ForCausalLM`, or wrapped: DDP,
                FSDP, PEFT, torch.compile); teacher None with a stored `teacher_topk`.
            input_ids: [B, T]; attention_mask: [B, T] (1 = token, 0 = padding) or None.
            labels: [B, T] (default input_ids), aligned with input_ids as for a
                transformers causal LM: position i is trained to predict labels[i+1].
            num_items_in_batch: the positions that count in the whole accumulated batch
                (Trainer's argument of that name; `count_items` per micro-batch, summed):
                the mean's denominator, so micro-batch losses add up to the batch's mean.
                Default: this micro-batch's count.
            shift_labels: [B, T] targets already aligned to positions (replaces labels).
            teacher_topk: for loss='topk' without a teacher model: a `TeacherTopK` (or
                (indices, values)) [B, T, k] of the teacher's logits at each position.
            **model_kwargs: passed to both models' forward (position_ids, ...).
        """
        y = shift_labels if shift_labels is not None else _shift_labels(
            input_ids, attention_mask, labels, self.ignore_index)
        inputs = dict(model_kwargs, input_ids=input_ids)
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        inputs = with_no_cache(student, inputs)
        kw = dict(self.loss_kwargs)
        if num_items_in_batch is not None:
            if kw.get("reduction", "mean") != "mean":
                raise ValueError(
                    "num_items_in_batch is the denominator of reduction='mean'; this loss "
                    f"has reduction={kw['reduction']!r}"
                )
            # 0 is legal when nothing counts (the loss is then 0); the core refuses a 0
            # against valid rows where it can check without a host sync.
            kw["normalizer"] = num_items_in_batch
        if self.taid_t is not None:
            kw["taid_t"] = self.taid_t
        kw["ignore_index"] = self.ignore_index
        if self.loss == "topk":
            loss = self._topk(student, teacher, inputs, y, kw, teacher_topk)
        elif self.fused:
            loss = self._kd_fused(student, teacher, inputs, y, kw)
        else:
            loss = self._kd_logits(student, teacher, inputs, y, kw)
        self._record(loss, num_items_in_batch is not None)
        return loss

    def _kd_logits(self, student, teacher, inputs, y, kw):
        _need_teacher(teacher)
        with torch.no_grad():
            t_logits = logits_of(teacher(**inputs))
        s_logits = logits_of(student(**inputs))
        return kd_loss(s_logits, t_logits, y, **kw)

    def _spec(self, model, override, name, input_ids):
        inner, _ = head_of(model, name)
        spec = override if override is not None else HeadSpec.from_config(inner.config)
        if self.check_head and input_ids is not None:
            check_head(model, spec, input_ids, name)
        return spec

    def _teacher_hidden(self, teacher, inputs):
        spec = self._spec(teacher, self.teacher_head, "teacher", inputs.get("input_ids"))
        _, head = head_of(teacher, "teacher")
        with torch.no_grad():
            (ht, wt, bt), _ = run_head_hooked(
                teacher, head, lambda h, m: head_weights(m, h, spec), inputs, "teacher")
        return spec, ht, wt.detach(), (bt.detach() if bt is not None else None)

    def _kd_fused(self, student, teacher, inputs, y, kw):
        _need_teacher(teacher)
        t_spec, ht, wt, bt = self._teacher_hidden(teacher, inputs)
        s_spec = self._spec(student, self.student_head, "student", inputs.get("input_ids"))
        _, head = head_of(student, "student")

        def loss_in_forward(h, module):
            hs, ws, bs = head_weights(module, h, s_spec)
            return fused_linear_kd_loss(
                hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt,
                student_softcap=s_spec.softcap, teacher_softcap=t_spec.softcap,
                student_logit_scale=s_spec.logit_scale,
                teacher_logit_scale=t_spec.logit_scale, **kw)

        loss, _ = run_head_hooked(student, head, loss_in_forward, inputs, "student")
        return loss

    def _topk(self, student, teacher, inputs, y, kw, teacher_topk):
        if teacher_topk is not None:
            if teacher is not None:
                raise ValueError("pass either a teacher model or teacher_topk, not both")
            if isinstance(teacher_topk, TeacherTopK):
                idx, vals = teacher_topk.indices, teacher_topk.values
                kw.setdefault("values", teacher_topk.values_kind)
            else:
                idx, vals = teacher_topk
        else:
            _need_teacher(teacher)
            if self.top_k is None:
                raise ValueError("loss='topk' with a teacher model needs top_k=")
            idx, vals = self._teacher_topk(teacher, inputs)
            kw.setdefault("values", self.topk_values)
        if not self.fused:
            s_logits = logits_of(student(**inputs))
            return topk_kd_loss(s_logits, idx, vals, y, **kw)
        s_spec = self._spec(student, self.student_head, "student", inputs.get("input_ids"))
        _, head = head_of(student, "student")

        def loss_in_forward(h, module):
            hs, ws, bs = head_weights(module, h, s_spec)
            return fused_linear_topk_kd_loss(
                hs, ws, idx, vals, y, student_bias=bs, student_softcap=s_spec.softcap,
                student_logit_scale=s_spec.logit_scale, **kw)

        loss, _ = run_head_hooked(student, head, loss_in_forward, inputs, "student")
        return loss

    def _teacher_topk(self, teacher, inputs):
        """The teacher's top_k classes and values [B, T, k] (topk_select's order), from its
        logits (unfused) or from hidden states × head a block of rows at a time (fused)."""
        with torch.no_grad():
            if not self.fused:
                logits = logits_of(teacher(**inputs))
                return _topk_blocks(logits.reshape(-1, logits.shape[-1]), None,
                                    logits.shape[:-1], self.top_k, self.topk_values)
            spec, ht, wt, bt = self._teacher_hidden(teacher, inputs)
            h2 = ht.reshape(-1, ht.shape[-1])
            return _topk_blocks(h2, (wt, bt, spec), ht.shape[:-1], self.top_k,
                                self.topk_values)

    # -- TAIDCallback's per-step record ---------------------------------------------------

    def _record(self, loss, normalized):
        if not self.track_step_loss or not torch.is_grad_enabled() or loss.dim() != 0:
            return
        d = loss.detach()
        self._step_sum = d if self._step_sum is None else self._step_sum + d
        self._step_parts += 1
        self._step_normalized = normalized

    def pop_step_loss(self):
        """(loss of the optimizer step, whether it was normalised by num_items_in_batch),
        or None if no loss was recorded since the last call; the record is cleared. With a
        global count the micro-batch losses add up to the step's mean; else they are
        averaged."""
        if self._step_sum is None:
            return None
        total, parts, normalized = self._step_sum, self._step_parts, self._step_normalized
        self._step_sum, self._step_parts = None, 0
        return (total if normalized else total / parts), normalized


def _need_teacher(teacher):
    if teacher is None:
        raise ValueError("teacher is None; pass the teacher model (or, for loss='topk', "
                         "a stored teacher_topk)")


def _topk_blocks(x2, head, lead, k, kind):
    """topk_select over rows of x2 [N, V] (logits), or of f(x2 Wᵀ + b) when head = (W, b,
    spec) and x2 are hidden states [N, H]; values as TeacherTopK stores them ('logits', or
    'logprobs': minus the row's logsumexp), in float32 (float64 for float64)."""
    n = x2.shape[0]
    v = x2.shape[-1] if head is None else head[0].shape[0]
    k = min(k, v)
    rows = chunk_rows(v, 4, _TOPK_BLOCK_BYTES)
    idx = torch.empty(n, k, dtype=torch.int64, device=x2.device)
    wide = torch.float64 if x2.dtype == torch.float64 else torch.float32
    vals = torch.empty(n, k, dtype=wide, device=x2.device)
    for r0 in range(0, n, rows):
        blk = x2[r0: r0 + rows]
        if head is not None:
            w, b, spec = head
            blk = F.linear(blk, w, b)
            if spec.softcap is not None or spec.logit_scale != 1.0:
                blk = spec.apply(blk.to(wide))
        top, ix = topk_select(blk, k)
        if kind == "logprobs":
            top = top.to(wide) - torch.logsumexp(blk.to(wide), -1, keepdim=True)
        idx[r0: r0 + rows] = ix
        vals[r0: r0 + rows] = top
    return idx.reshape(*lead, k), vals.reshape(*lead, k)


def distillation_loss(student: nn.Module, teacher: nn.Module | None, batch: dict,
                      **kd_kwargs: Any) -> torch.Tensor:
    """`KDForCausalLM(**kd_kwargs)(student, teacher, **batch)`: the loss of one batch (a
    dict with input_ids, attention_mask, labels, and optionally num_items_in_batch)."""
    return KDForCausalLM(**kd_kwargs)(student, teacher, **batch)
