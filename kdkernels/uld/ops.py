"""The dispatch table of `uld_loss` and its custom op (the data-dependent sorts stay
opaque to `torch.compile`).

No `cuda` entry: the loss is a library sort plus one elementwise pass over the sorted
arrays, which the Triton kernel already fuses; an explicit backend='cuda' raises
BackendUnavailableError.
"""

from __future__ import annotations

from torch import Tensor

from .._core.backend import Dispatch, Impl
from .._core.customop import custom_op

# triton stays out of `auto` until a GPU run validates it and a benchmark shows it faster
# than the torch path.
ULD_FWD = Dispatch("uld_loss", {
    "triton": Impl("kdkernels.uld.triton:uld_fwd_triton", auto=False),
    "torch": Impl("kdkernels.uld.pytorch:uld_fwd_torch"),
})


@custom_op("uld_fwd", mutates=("loss", "grad"))
def uld_fwd(s: Tensor, scale: Tensor, loss: Tensor, grad: Tensor, backend: str,
            labels: Tensor | None, t: Tensor, inv_temp: float, inv_temp_t: float, top_k: int,
            soft_w: float, hard_w: float, ignore_index: int) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad[N, V_s] (skipped if grad is
    empty).

    s: [N, V_s], t: [N, V_t], labels: [N] or None, scale: 0-dim float32,
    top_k in [1, max(V_s, V_t)].
    """
    ULD_FWD(backend, s, scale, loss, grad, labels, t, inv_temp, inv_temp_t, top_k, soft_w,
            hard_w, ignore_index)
