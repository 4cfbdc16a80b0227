"""Divergence names, their kernel codes, and the canonical form of the parameters.

Every backend consumes a `KDParams`: the divergence is reduced to a canonical case
first so kernels never see a degenerate mixture weight (log 0):
- jsd with beta=0 is forward KL and beta=1 reverse KL (TRL's endpoints);
- skew KL with alpha=0 is plain forward/reverse KL, and with alpha=1 is identically 0;
- TAID with t=1 is forward KL, with t=0 identically 0.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

from .._core.codes import Div

Divergence = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "taid"
]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

# Kernel codes (constexpr in Triton, template switch in CUDA): the shared enum, as ints.
ZERO, FWD_KL, REV_KL, JSD = int(Div.ZERO), int(Div.FWD_KL), int(Div.REV_KL), int(Div.JSD)
SKEW_FWD, SKEW_REV, TVD, TAID = int(Div.SKEW_FWD), int(Div.SKEW_REV), int(Div.TVD), int(Div.TAID)
_CODES = {
    "forward_kl": FWD_KL,
    "reverse_kl": REV_KL,
    "jsd": JSD,
    "skew_forward_kl": SKEW_FWD,
    "skew_reverse_kl": SKEW_REV,
    "tvd": TVD,
    "taid": TAID,
}


class KDParams(NamedTuple):
    div: int  # kernel code
    inv_temp: float  # 1 / temperature
    w: float  # mixture weight: beta (jsd), alpha (skew), taid_t (taid); else 0
    soft_w: float  # soft_label_weight (0 when the divergence is identically 0)
    hard_w: float  # hard_label_weight
    ignore_index: int

    @property
    def log_w(self) -> float:
        return math.log(self.w) if self.w > 0 else 0.0

    @property
    def log_1mw(self) -> float:
        return math.log1p(-self.w) if self.w < 1 else 0.0


def canonical(divergence, *, beta, alpha, taid_t, temperature, soft_w, hard_w, ignore_index):
    """Map the user's (already validated) arguments to KDParams."""
    code = _CODES[divergence]
    w = 0.0
    if code == JSD:
        if beta == 0.0:
            code = FWD_KL
        elif beta == 1.0:
            code = REV_KL
        else:
            w = beta
    elif code in (SKEW_FWD, SKEW_REV):
        if alpha == 0.0:
            code = FWD_KL if code == SKEW_FWD else REV_KL
        elif alpha == 1.0:
            code = ZERO
        else:
            w = alpha
    elif code == TAID:
        if taid_t == 1.0:
            code = FWD_KL
        elif taid_t == 0.0:
            code = ZERO
        else:
            w = taid_t
    if soft_w == 0.0:
        code = ZERO
    if code == ZERO:
        soft_w = 0.0
    return KDParams(code, 1.0 / temperature, w, soft_w, hard_w, ignore_index)
