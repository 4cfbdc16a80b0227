"""`temperature_scaling` and `return_components` of `kd_loss` and `fused_linear_kd_loss`.

return_components=True returns (total, soft, hard) from one pass: the launchers write each
row's two addends of the loss, soft_w·D_n and hard_w·CE_n, into a [N, 2] buffer
(`parts`) next to the loss, and each column is reduced exactly as the loss is (the same
scale: the same normalizer or count). Dividing by the user's weights gives Liger's
convention (`return_soft_hard_loss`): total = soft_label_weight·soft +
hard_label_weight·hard, soft the distillation term (τ²·D under tau_squared), hard the
cross-entropy. A part whose weight is 0 does not enter the loss, so the kernels never
compute it; it comes from one extra gradient-free pass (the hard part without labels is
0). The parts are detached: only the total carries the gradient.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from .._core.rowgrad import reduce_rows

TemperatureScaling = Literal["none", "tau_squared"]
TEMPERATURE_SCALINGS: tuple[str, ...] = get_args(TemperatureScaling)

def check_return_components(divergence: str, value) -> bool:
    """The flag as a bool (TypeError for anything else). Every divergence's launchers
    write the per-row parts (`divergence` is for a refusal should one not)."""
    if not isinstance(value, bool):
        raise TypeError(f"return_components must be a bool, got {type(value).__name__}")
    return value


def new_parts(n: int, device, wanted: bool) -> torch.Tensor | None:
    """The [N, 2] float32 buffer the launchers fill, or None."""
    return torch.empty(n, 2, dtype=torch.float32, device=device) if wanted else None


def rerun_with(fn, args: dict):
    """`rerun` for `components`: fn(**args) with other weights, without components and
    without a gradient (args: the public function's arguments, as called)."""
    def rerun(soft_w: float, hard_w: float) -> torch.Tensor:
        with torch.no_grad():
            return fn(**{**args, "soft_label_weight": soft_w, "hard_label_weight": hard_w,
                         "return_components": False})
    return rerun


def components(parts: torch.Tensor, scale: torch.Tensor, *, reduction: str, lead,
               soft_w: float, hard_w: float, has_labels: bool,
               rerun) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, hard) from the filled parts, reduced like the loss (`scale`: the loss's,
    rowgrad.loss_scale) and divided by the user's weights. `rerun(soft_w, hard_w)`: the
    loss with those weights, for a part whose weight is 0 (hard without labels: zeros)."""
    device = parts.device
    out = []
    for col, weight, alone in ((0, soft_w, (1.0, 0.0)), (1, hard_w, (0.0, 1.0))):
        if weight != 0.0:
            part = reduce_rows(parts[:, col].contiguous(), scale, reduction)  # (as the loss)
            part = part / weight if weight != 1.0 else part
            out.append(part.reshape(lead) if reduction == "none" else part)
        elif col == 1 and not has_labels:
            out.append(torch.zeros(lead if reduction == "none" else (), dtype=torch.float32,
                                   device=device))
        else:
            out.append(rerun(*alone))
    return out[0].detach(), out[1].detach()
