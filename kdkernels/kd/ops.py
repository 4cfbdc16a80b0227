"""The dispatch table of the softmax-KL family and its custom op.

`kd_fwd` is the launcher every caller uses (`kd_loss` and the fused linear loss's
divergence step): registered as a custom op with a fake, so `torch.compile` traces
through it, and dispatched through `KD_FWD` to the backend the caller resolved.
"""

from __future__ import annotations

from torch import Tensor

from .._core.backend import Dispatch, Impl
from .._core.customop import custom_op
from .params import KDParams

# In order of preference on a GPU; cuda stays out of `auto` until a GPU benchmark shows
# it faster than Triton (docs/benchmarks.md).
KD_FWD = Dispatch("kd_loss", {
    "cuda": Impl("kdkernels.kd.cuda:kd_fwd_cuda", verify="kdkernels.kd.cuda:unsupported_reason",
                 auto=False),
    "triton": Impl("kdkernels.kd.triton:kd_fwd_triton"),
    "torch": Impl("kdkernels.kd.pytorch:kd_fwd_torch"),
})


@custom_op("kd_fwd", mutates=("loss", "grad"))
def kd_fwd(s: Tensor, scale: Tensor, loss: Tensor, grad: Tensor, backend: str,
           labels: Tensor | None, t: Tensor, div: int, inv_temp: float, w: float, soft_w: float,
           hard_w: float, ignore_index: int, v: int) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad[N, Vg] (skipped if grad is empty).

    s: [N, Vs], t: [N, Vt] with Vs, Vt >= v; labels: [N] or None; scale: 0-dim float32.
    """
    prm = KDParams(div, inv_temp, w, soft_w, hard_w, ignore_index)
    KD_FWD(backend, s, t, labels, scale, loss, grad, prm, v)
