"""TAIDSchedule: the adaptive interpolation parameter t of TAID (docs/spec.md §1, `taid_t`)."""

from __future__ import annotations

import math
import warnings

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

    The first `step(loss)` only records the loss (t stays at t_start). Each later one:
      δ      = (prev_loss − loss) / (prev_loss + 1e-15)     relative improvement
      m      = β·m + (1 − β)·δ                              momentum
      t_lin  = t_start + (t_end − t_start)·global_step/total_steps
      t      = min(t_end, max(t_lin, t + step_size·sigmoid(m)·(1 − t)))
    (with adaptive=False, t = t_lin). Pass the returned value as
    `kd_loss(..., divergence="taid", taid_t=t)` (under torch.compile, as a 0-dim tensor:
    `t_tensor.fill_(t)`, so that a new value does not recompile).

    `total_steps` is given once to the constructor (or to `step`, which wins); without
    `global_step`, `step` counts its own calls from 0 (a given global_step resets the
    count to it). `step_size` is TAID's momentum step (the official code's alpha, renamed:
    `kd_loss`'s alpha is the skew-KL weight); `alpha=` still works, with a
    DeprecationWarning.

    The official implementation feeds this update the cross-entropy form of its loss,
    −Σ r log q = KL(r‖q) + H(r), where `kd_loss` returns KL(r‖q): hand `step` the same
    quantity to reproduce its t exactly. A non-finite loss is skipped (the state is kept,
    the step is counted); the official update would carry the NaN in its momentum from
    then on.
    """

    def __init__(self, t_start=0.4, t_end=1.0, step_size=None, beta=0.99, adaptive=True, *,
                 total_steps=None, alpha=None):
        self.t_start = check_number("t_start", t_start, lo=0.0, hi=1.0, hi_open=True)
        self.t_end = check_number("t_end", t_end, lo=0.0, hi=1.0, lo_open=True)
        if self.t_end < self.t_start:
            raise ValueError(f"t_end ({t_end}) must be >= t_start ({t_start})")
        if alpha is not None:
            if step_size is not None:
                raise TypeError("pass step_size only (alpha is its deprecated name)")
            warnings.warn(
                "TAIDSchedule(alpha=...) is deprecated: the momentum step is now step_size= "
                "(kd_loss's alpha is the skew-KL weight, a different thing)",
                DeprecationWarning, stacklevel=2,
            )
            step_size = alpha
        step_size = 5e-4 if step_size is None else step_size
        self.step_size = check_number("step_size", step_size, lo=0.0, hi=1.0)
        self.beta = check_number("beta", beta, lo=0.0, hi=1.0)
        self.adaptive = bool(adaptive)
        self.total_steps = (None if total_steps is None
                            else check_int("total_steps", total_steps, lo=1))
        self.t = self.t_start
        self.momentum = 0.0
        self.prev_loss = None
        self.num_steps = 0  # calls of step() so far: the next default global_step

    @property
    def alpha(self) -> float:
        """Deprecated name of `step_size`."""
        warnings.warn("TAIDSchedule.alpha is deprecated: use step_size", DeprecationWarning,
                      stacklevel=2)
        return self.step_size

    def step(self, loss, global_step: int | None = None, total_steps: int | None = None) -> float:
        """Record `loss` and return the new t. global_step: default this schedule's own
        count of calls (0 on the first); total_steps: default the constructor's."""
        loss = float(loss)
        if total_steps is None:
            total_steps = self.total_steps
        if total_steps is None:
            raise ValueError(
                "TAIDSchedule.step needs total_steps (the length of the linear schedule): "
                "pass TAIDSchedule(total_steps=...) once, or step(loss, total_steps=...)"
            )
        total_steps = check_int("total_steps", total_steps, lo=1)
        if global_step is None:
            global_step = self.num_steps
        global_step = check_int("global_step", global_step, lo=0)
        self.num_steps = global_step + 1
        if not math.isfinite(loss):
            return self.t
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        t_lin = self.t_start + (self.t_end - self.t_start) * global_step / total_steps
        if self.adaptive:
            delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            step = self.step_size * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(t_lin, self.t + step))
        else:
            self.t = t_lin
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return {"t": self.t, "momentum": self.momentum, "prev_loss": self.prev_loss,
                "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.momentum, self.prev_loss = state["t"], state["momentum"], state["prev_loss"]
        self.num_steps = state.get("num_steps", 0)  # (absent from older checkpoints)
