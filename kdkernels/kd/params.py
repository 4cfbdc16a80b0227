"""Divergence names, their kernel codes, and the canonical form of the parameters.

Every backend consumes a `KDParams`: the divergence is reduced to a canonical case
first so kernels never see a degenerate mixture weight (log 0):
- jsd with beta=0 is forward KL and beta=1 reverse KL (TRL's endpoints);
- skew KL with alpha=0 is plain forward/reverse KL, and with alpha=1 is identically 0;
- TAID with t=1 is forward KL, with t=0 identically 0;
- dkd's two weights become one mixture weight w = α/(α+β) with soft_w·(α+β) (both 0:
  identically 0), so that the kernels take one weight as for the others: soft_w·D =
  soft_w'·(w·TCKD + (1−w)·NCKD); nkd's γ is w; cosine takes none.

`temperature`, `teacher_temperature` and `taid_t` may also be 0-dim tensors (a TAID
schedule under torch.compile): their values are read inside the custom op (`resolve`), so
a new value neither recompiles nor breaks the graph. The teacher's temperature is a
separate inverse temperature (`inv_temp_t`, None: the student's), never a rescaled copy
of the teacher logits; temperature_scaling='tau_squared' is folded into soft_w.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch

from .._core.codes import Div
from .._core.validate import check_number

Divergence = Literal[
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "taid",
    "dkd", "nkd", "cosine",
]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

# Kernel codes (constexpr in Triton, template switch in CUDA): the shared enum, as ints.
ZERO, FWD_KL, REV_KL, JSD = int(Div.ZERO), int(Div.FWD_KL), int(Div.REV_KL), int(Div.JSD)
SKEW_FWD, SKEW_REV, TVD, TAID = int(Div.SKEW_FWD), int(Div.SKEW_REV), int(Div.TVD), int(Div.TAID)
DKD, NKD, COSINE = int(Div.DKD), int(Div.NKD), int(Div.COSINE)
# the divergences that read the row's label (the target class): labels are required
NEEDS_LABELS = ("dkd", "nkd")
_CODES = {
    "forward_kl": FWD_KL,
    "reverse_kl": REV_KL,
    "jsd": JSD,
    "skew_forward_kl": SKEW_FWD,
    "skew_reverse_kl": SKEW_REV,
    "tvd": TVD,
    "taid": TAID,
    "dkd": DKD,
    "nkd": NKD,
    "cosine": COSINE,
}


# The documented defaults of the mixture weights. A weight the divergence does not use must
# keep its default: any other value is refused (check_unused), not silently ignored.
BETA_DEFAULT = 0.5
ALPHA_DEFAULT = 0.1
# DKD's α (TCKD) and β (NCKD) and NKD's γ: the papers' defaults (Zhao et al. 2022; Yang
# et al. 2023)
DKD_ALPHA_DEFAULT = 1.0
DKD_BETA_DEFAULT = 8.0
NKD_GAMMA_DEFAULT = 1.5
_USES = {"beta": ("jsd",), "alpha": ("skew_forward_kl", "skew_reverse_kl"),
         "dkd_alpha": ("dkd",), "dkd_beta": ("dkd",), "nkd_gamma": ("nkd",)}
_DEFAULTS = {"beta": BETA_DEFAULT, "alpha": ALPHA_DEFAULT, "dkd_alpha": DKD_ALPHA_DEFAULT,
             "dkd_beta": DKD_BETA_DEFAULT, "nkd_gamma": NKD_GAMMA_DEFAULT}


def check_unused(divergence: str, **values: float) -> None:
    """ValueError when a weight (`beta`: jsd only, `alpha`: skew KL only, `dkd_alpha` /
    `dkd_beta`: dkd only, `nkd_gamma`: nkd only) has a non-default value for a divergence
    that ignores it. Values are already validated numbers."""
    for name, value in values.items():
        default = _DEFAULTS[name]
        users = _USES[name]
        if divergence not in users and value != default:
            raise ValueError(
                f"{name}={value:g} has no effect with divergence={divergence!r}: only "
                f"{' and '.join(map(repr, users))} use{'s' if len(users) == 1 else ''} {name}. "
                f"Drop {name} (or pass divergence={users[0]!r})"
                + (" (TAID's interpolation is taid_t)" if divergence == "taid" else "")
            )


class KDParams(NamedTuple):
    div: int  # kernel code
    inv_temp: float  # 1 / temperature (the student's)
    w: float  # mixture weight: beta (jsd), alpha (skew), taid_t (taid),
    #           α/(α+β) (dkd), γ (nkd); else 0
    soft_w: float  # soft_label_weight (0 when the divergence is identically 0; dkd: ·(α+β);
    #                temperature_scaling='tau_squared': ·τ², τ the student's temperature)
    hard_w: float  # hard_label_weight
    ignore_index: int
    inv_temp_t: float | None = None  # 1 / teacher_temperature; None: the student's inv_temp
    tau_sq: bool = False  # temperature_scaling='tau_squared' (resolve folds a tensor τ's τ²)

    @property
    def teacher_inv_temp(self) -> float:
        """1/τ_t: the teacher's distribution is softmax(t · teacher_inv_temp)."""
        return self.inv_temp if self.inv_temp_t is None else self.inv_temp_t

    @property
    def log_w(self) -> float:
        return math.log(self.w) if self.w > 0 else 0.0

    @property
    def log_1mw(self) -> float:
        return math.log1p(-self.w) if self.w < 1 else 0.0


def canonical(divergence, *, beta, alpha, taid_t, temperature, soft_w, hard_w, ignore_index,
              dkd_alpha=DKD_ALPHA_DEFAULT, dkd_beta=DKD_BETA_DEFAULT,
              nkd_gamma=NKD_GAMMA_DEFAULT, teacher_temperature=None, tau_squared=False):
    """Map the user's (already validated) arguments to KDParams. teacher_temperature: None
    (the student's) or a number; tau_squared: multiply the soft term by temperature²."""
    code = _CODES[divergence]
    w = 0.0
    if tau_squared:
        soft_w = soft_w * temperature * temperature
    if code == DKD:  # α·TCKD + β·NCKD = (α+β)·(w·TCKD + (1−w)·NCKD)
        total = dkd_alpha + dkd_beta
        if total == 0.0:
            code = ZERO
        else:
            w = dkd_alpha / total
            soft_w = soft_w * total
    elif code == NKD:
        w = nkd_gamma
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
    inv_temp_t = None if teacher_temperature is None else 1.0 / teacher_temperature
    return KDParams(code, 1.0 / temperature, w, soft_w, hard_w, ignore_index, inv_temp_t,
                    bool(tau_squared))


def check_scalar_tensor(name: str, x: torch.Tensor, device) -> torch.Tensor:
    """A 0-dim real tensor (float or integer) on the CPU or `device`, detached: a value the
    custom op reads (`resolve`), so that torch.compile neither guards on it nor breaks."""
    if x.dim() != 0:
        raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(x.shape)}")
    if x.dtype == torch.bool or x.dtype.is_complex:
        raise TypeError(f"{name} must be a real number tensor, got {x.dtype}")
    if x.device.type == "meta" or (x.device.type != "cpu" and x.device != device):
        raise ValueError(
            f"{name} is a tensor on {x.device} but the logits are on {device}; pass a number, "
            "or a 0-dim tensor on the logits' device or the CPU"
        )
    return x.detach()


def check_temperature(value) -> float:
    return check_number("temperature", value, lo=0.0, lo_open=True)


def check_taid_t(value) -> float:
    return check_number("taid_t", value, lo=0.0, hi=1.0)


def check_teacher_temperature(value) -> float:
    return check_number("teacher_temperature", value, lo=0.0, lo_open=True)


def resolve(prm: KDParams, temperature: torch.Tensor | None,
            taid_t: torch.Tensor | None,
            teacher_temperature: torch.Tensor | None = None) -> KDParams:
    """`prm` with the values of a tensor `temperature` / `taid_t` / `teacher_temperature`
    read and checked (ValueError outside their ranges) and the canonical form applied
    (TAID with t = 1 is forward KL, with t = 0 identically 0; tau_squared: soft_w·τ²).
    Runs inside the custom ops, before any kernel: a tensor's value is read there, opaque
    to torch.compile (on a GPU, one host sync)."""
    div, inv_temp, w, soft_w = prm.div, prm.inv_temp, prm.w, prm.soft_w
    inv_temp_t = prm.inv_temp_t
    if temperature is not None:
        tau = check_temperature(temperature)
        inv_temp = 1.0 / tau
        if prm.tau_sq:  # (canonical folded the placeholder τ = 1)
            soft_w = soft_w * tau * tau
    if teacher_temperature is not None:
        inv_temp_t = 1.0 / check_teacher_temperature(teacher_temperature)
    if taid_t is not None:
        t = check_taid_t(taid_t)
        if div == TAID:
            div, w = (FWD_KL, 0.0) if t == 1.0 else (ZERO, 0.0) if t == 0.0 else (TAID, t)
            if div == ZERO:
                soft_w = 0.0
    return KDParams(div, inv_temp, w, soft_w, prm.hard_w, prm.ignore_index, inv_temp_t,
                    prm.tau_sq)
