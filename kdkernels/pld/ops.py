"""The dispatch table of `plackett_luce_loss` and its custom op (the data-dependent ranking
and scans stay opaque to `torch.compile`)."""

from __future__ import annotations

from torch import Tensor

from .._core.backend import Dispatch, Impl
from .._core.customop import custom_op

# In order of preference on a GPU; cuda and triton stay out of `auto` until a GPU run
# validates them and a benchmark shows them faster than the torch path.
PLD_FWD = Dispatch("plackett_luce_loss", {
    "cuda": Impl("kdkernels.pld.cuda:pld_fwd_cuda", verify="kdkernels.pld.cuda:unsupported_reason",
                 auto=False),
    "triton": Impl("kdkernels.pld.triton:pld_fwd_triton", auto=False),
    "torch": Impl("kdkernels.pld.pytorch:pld_fwd_torch"),
})


@custom_op("pld_fwd", mutates=("loss", "grad"))
def pld_fwd(s: Tensor, scale: Tensor, loss: Tensor, grad: Tensor, backend: str,
            labels: Tensor | None, t: Tensor, inv_temp: float, top_k: int,
            ignore_index: int) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad[N, V] (skipped if grad is empty).

    s: [N, V], t: [N, V], labels: [N] or None, scale: 0-dim float32, top_k in [1, V].
    """
    PLD_FWD(backend, s, scale, loss, grad, labels, t, inv_temp, top_k, ignore_index)
