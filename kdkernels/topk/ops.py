"""The dispatch table of `topk_kd_loss` and its custom op."""

from __future__ import annotations

from torch import Tensor

from .._core.backend import Dispatch, Impl
from .._core.customop import custom_op

# In order of preference on a GPU; cuda and triton stay out of `auto` until a GPU
# benchmark shows them faster than the torch path.
TOPK_KD_FWD = Dispatch("topk_kd_loss", {
    "cuda": Impl("kdkernels.topk.cuda:topk_kd_fwd_cuda",
                 verify="kdkernels.topk.cuda:unsupported_reason", auto=False),
    "triton": Impl("kdkernels.topk.triton:topk_kd_fwd_triton", auto=False),
    "torch": Impl("kdkernels.topk.pytorch:topk_kd_fwd_torch"),
})


@custom_op("topk_kd_fwd", mutates=("loss", "grad"))
def topk_kd_fwd(s: Tensor, scale: Tensor, loss: Tensor, grad: Tensor, backend: str,
                labels: Tensor | None, idx: Tensor, vals: Tensor, code: int, w: float,
                inv_temp: float, logprobs: bool, bucket: bool, ignore_index: int,
                soft_w: float, hard_w: float) -> None:
    """Per-row losses L_n = soft_w·D_n + hard_w·CE_n into loss[N] and scale·∂L_n/∂s into
    grad[N, V] (skipped if grad is empty).

    s: [N, V]; idx: [N, k] (−1 = padding); vals: [N, k]; labels: [N] or None;
    scale: 0-dim float32; code: a Div (forward KL, reverse KL, jsd with w = β, taid with
    w = λ, or ZERO: no divergence term).
    """
    TOPK_KD_FWD(backend, s, scale, loss, grad, labels, idx, vals, code, w, inv_temp,
                logprobs, bucket, ignore_index, soft_w, hard_w)
