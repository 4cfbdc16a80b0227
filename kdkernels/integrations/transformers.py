"""Hugging Face Transformers integration (docs/distilling.md).

    from kdkernels.integrations.transformers import KDTrainer, KDForCausalLM
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                        kd=KDForCausalLM(divergence="forward_kl", fused=True))

- `KDForCausalLM`: the KD loss between two causal LMs from one batch (label shift,
  padding, ignore_index, the head's softcap / logit scale, tied embeddings, the teacher
  under no_grad, `num_items_in_batch`; fused: the logits are never materialised).
- `distillation_loss(student, teacher, batch, **kd_kwargs)`: the same as a function.
- `KDTrainer`: a `transformers.Trainer` whose loss is a `KDForCausalLM`'s.
- `TAIDCallback`: feeds each optimizer step's loss to a `TAIDSchedule` and sets the
  loss's `taid_t`.

Importing kdkernels never imports transformers; importing this module does.
"""

from __future__ import annotations

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "kdkernels.integrations.transformers needs Hugging Face Transformers: "
        f"pip install transformers (importing it failed: {exc})"
    ) from exc

import torch

from ..kd import TAIDSchedule
from ._causal_lm import (
    HeadSpec,
    KDForCausalLM,
    check_head,
    count_items,
    distillation_loss,
    shift_labels,
)

__all__ = [
    "HeadSpec",
    "KDForCausalLM",
    "KDTrainer",
    "TAIDCallback",
    "check_head",
    "count_items",
    "distillation_loss",
    "shift_labels",
]


def _counted_targets(batch: dict, ignore_index: int) -> torch.Tensor | None:
    """The batch's targets as Trainer counts them: 0 where a position counts, -100 where
    it does not (whatever the loss's ignore_index is)."""
    y = batch.get("shift_labels")
    if y is None:
        if batch.get("input_ids") is None and batch.get("labels") is None:
            return None
        y = shift_labels(batch.get("input_ids"), batch.get("attention_mask"),
                         batch.get("labels"), ignore_index)
    return torch.where(y != ignore_index, 0, -100)


class KDTrainer(Trainer):
    """`Trainer` whose training loss is `kd(model, teacher_model, **inputs)`.

        trainer = KDTrainer(model=student, teacher_model=teacher, args=args,
                            train_dataset=ds, kd=KDForCausalLM(divergence="jsd", beta=0.5))

    Args (besides Trainer's):
        teacher_model: the teacher (moved to `args.device` when Trainer places the student
            there). Its mode is yours: call `teacher.eval()` for dropout off.
        kd: a `KDForCausalLM` (default: forward KL, fused).

    Gradient accumulation: `num_items_in_batch` is counted with the loss's own rule
    (`count_items`: position i counts when labels[i+1] is not ignored and neither i nor
    i+1 is padding) over the accumulated micro-batches, all-gathered over ranks when
    `average_tokens_across_devices` (Trainer's default), and passed as the losses'
    `normalizer`: the micro-batch losses add up to the mean over the whole batch, and the
    loss is multiplied by the number of processes as Trainer does to undo DDP's average.
    """

    def __init__(self, *args, teacher_model: torch.nn.Module, kd: KDForCausalLM | None = None,
                 **kwargs):
        if kd is not None and not isinstance(kd, KDForCausalLM):
            raise TypeError(f"kd must be a KDForCausalLM, got {type(kd).__name__}")
        if not isinstance(teacher_model, torch.nn.Module):
            raise TypeError(
                f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
        super().__init__(*args, **kwargs)
        self.kd = kd if kd is not None else KDForCausalLM()
        if self.place_model_on_device:
            teacher_model = teacher_model.to(self.args.device)
        self.teacher_model = teacher_model
        # Makes Trainer count num_items_in_batch (with the rule below) for every model.
        self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        counted = []
        for batch in batch_samples:
            y = _counted_targets(batch, self.kd.ignore_index)
            if y is None:
                return None
            counted.append({"labels": y, "shift_labels": y})
        return super()._get_num_items_in_batch(counted, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.kd(model, self.teacher_model, num_items_in_batch=num_items_in_batch,
                       **inputs)
        # Normalised over the accumulated batch: Trainer must not divide by the steps again.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, {"loss": loss}) if return_outputs else loss


class TAIDCallback(TrainerCallback):
    """TAID's adaptive λ in a Trainer run: after every optimizer step, the step's KD loss
    (the micro-batch losses of the step, averaged over data-parallel ranks) goes to
    `schedule.step(loss, global_step=, total_steps=)` and the new λ to `kd.taid_t`:
    global_step is the step's 0-based index, total_steps the schedule's own if it was
    given one, else the run's `max_steps`.

        sched = TAIDSchedule(t_start=0.4, t_end=1.0)
        kd = KDForCausalLM(divergence="taid")
        trainer = KDTrainer(..., kd=kd, callbacks=[TAIDCallback(sched, kd)])

    The schedule sees the value the loss returns (KL(r‖q) plus any hard-label term),
    one host sync per step (float(loss)). `callback.schedule.state_dict()` is what to
    checkpoint.
    """

    def __init__(self, schedule: TAIDSchedule, kd: KDForCausalLM):
        if not isinstance(schedule, TAIDSchedule):
            raise TypeError(f"schedule must be a TAIDSchedule, got {type(schedule).__name__}")
        if not isinstance(kd, KDForCausalLM):
            raise TypeError(f"kd must be a KDForCausalLM, got {type(kd).__name__}")
        if kd.loss_kwargs.get("divergence") != "taid":
            raise ValueError(
                "TAIDCallback drives taid_t, but the loss has divergence="
                f"{kd.loss_kwargs.get('divergence')!r}; use KDForCausalLM(divergence='taid')"
            )
        self.schedule, self.kd = schedule, kd
        kd.taid_t = schedule.t
        kd.track_step_loss = True

    def on_step_end(self, args, state, control, **kwargs):
        rec = self.kd.pop_step_loss()
        if rec is None:
            return
        loss, normalized = rec
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                loss = loss.clone()
                torch.distributed.all_reduce(loss)
                # A loss normalised by the global count is each rank's share of the mean.
                if not (normalized and args.average_tokens_across_devices):
                    loss = loss / world
        # The schedule's own total_steps if it has one, else the run's; global_step is the
        # 0-based index of the step this loss belongs to (as `enumerate` in a plain loop).
        total = getattr(self.schedule, "total_steps", None) or max(int(state.max_steps), 1)
        self.kd.taid_t = self.schedule.step(loss, global_step=max(int(state.global_step) - 1, 0),
                                            total_steps=total)
