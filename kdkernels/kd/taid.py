"""TAIDSchedule: the adaptive interpolation parameter t of TAID (docs/spec.md §1, `taid_t`)."""

from __future__ import annotations

import math

from .._core.validate import check_int, check_number


class TAIDSchedule:
    """Adaptive update of TAID's λ = t, in plain Python (no tensors, no device syncs
    beyond the float(loss) the caller hands in).

    Each `step(loss, global_step, total_steps)`:
      δ    = (prev_loss − loss) / (prev_loss + 1e-15)        relative improvement (0 at first)
      m    = β·m + (1 − β)·δ                                  momentum
      t    = min(t_end, max(t_linear, t + α·sigmoid(m)))
    with the floor t_linear = t_start + (t_end − t_start)·global_step/total_steps.
    Pass the returned value as `kd_loss(..., divergence="taid", taid_t=t)`.
    """

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True):
        self.t_start = check_number("t_start", t_start, lo=0.0, hi=1.0, hi_open=True)
        self.t_end = check_number("t_end", t_end, lo=0.0, hi=1.0, lo_open=True)
        if self.t_end < self.t_start:
            raise ValueError(f"t_end ({t_end}) must be >= t_start ({t_start})")
        self.alpha = check_number("alpha", alpha, lo=0.0, hi=1.0)
        self.beta = check_number("beta", beta, lo=0.0, hi=1.0)
        self.adaptive = bool(adaptive)
        self.t = self.t_start
        self.momentum = 0.0
        self.prev_loss = None

    def step(self, loss, global_step: int, total_steps: int) -> float:
        loss = float(loss)
        total_steps = check_int("total_steps", total_steps, lo=1)
        global_step = check_int("global_step", global_step, lo=0)
        floor = self.t_start + (self.t_end - self.t_start) * min(1.0, global_step / total_steps)
        if not math.isfinite(loss):
            return self.t  # skip non-finite losses, keep the state
        if self.adaptive:
            delta = 0.0 if self.prev_loss is None else (
                (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            )
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            proposal = self.t + self.alpha / (1.0 + math.exp(-self.momentum))
        else:
            proposal = floor
        self.t = min(self.t_end, max(floor, proposal))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]
