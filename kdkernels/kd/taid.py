"""TAIDSchedule: the adaptive interpolation parameter t of TAID (docs/spec.md §1, `taid_t`)."""

from __future__ import annotations

import math

from .._core.validate import check_int, check_number


def _sigmoid(x: float) -> float:
    """1/(1 + e^{−x}) without overflow at any |x| (a loss of exactly 0 followed by a
    positive one gives a relative change of about −1e15)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDSchedule:
    """TAID's adaptive interpolation parameter t, step for step as the official
    implementation updates it, in plain Python (no tensors, no device syncs beyond the
    float(loss) the caller hands in).

    The first `step(loss, global_step, total_steps)` only records the loss (t stays at
    t_start). Each later one:
      δ      = (prev_loss − loss) / (prev_loss + 1e-15)     relative improvement
      m      = β·m + (1 − β)·δ                              momentum
      t_lin  = t_start + (t_end − t_start)·global_step/total_steps
      t      = min(t_end, max(t_lin, t + α·sigmoid(m)·(1 − t)))
    (with adaptive=False, t = t_lin). Pass the returned value as
    `kd_loss(..., divergence="taid", taid_t=t)`.

    The official implementation feeds this update the cross-entropy form of its loss,
    −Σ r log q = KL(r‖q) + H(r), where `kd_loss` returns KL(r‖q): hand `step` the same
    quantity to reproduce its t exactly. A non-finite loss is skipped (the state is kept);
    the official update would carry the NaN in its momentum from then on.
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
        if not math.isfinite(loss):
            return self.t
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        t_lin = self.t_start + (self.t_end - self.t_start) * global_step / total_steps
        if self.adaptive:
            delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            step = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(t_lin, self.t + step))
        else:
            self.t = t_lin
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]
