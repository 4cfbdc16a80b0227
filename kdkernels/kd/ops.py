"""The dispatch table of the softmax-KL family and its custom op.

`kd_fwd` is the launcher every caller uses (`kd_loss` and the fused linear loss's
divergence step): registered as a custom op with a fake, so `torch.compile` traces
through it, and dispatched through `KD_FWD` to the backend the caller resolved.
"""

from __future__ import annotations

from torch import Tensor

from .._core.backend import Dispatch, Impl
from .._core.chunking import chunk_rows
from .._core.customop import custom_op
from .params import KDParams, resolve

# In order of preference on a GPU; cuda stays out of `auto` until a GPU benchmark shows
# it faster than Triton (docs/benchmarks.md).
KD_FWD = Dispatch("kd_loss", {
    "cuda": Impl("kdkernels.kd.cuda:kd_fwd_cuda", verify="kdkernels.kd.cuda:unsupported_reason",
                 auto=False),
    "triton": Impl("kdkernels.kd.triton:kd_fwd_triton"),
    "torch": Impl("kdkernels.kd.pytorch:kd_fwd_torch"),
})


@custom_op("kd_fwd", mutates=("loss", "grad", "parts"))
def kd_fwd(s: Tensor, scale: Tensor, loss: Tensor, grad: Tensor, backend: str,
           labels: Tensor | None, t: Tensor, div: int, inv_temp: float, w: float, soft_w: float,
           hard_w: float, ignore_index: int, v: int, temperature: Tensor | None = None,
           taid_t: Tensor | None = None, inv_temp_t: float | None = None, tau_sq: bool = False,
           teacher_temperature: Tensor | None = None, parts: Tensor | None = None) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad (skipped if grad is empty).

    s: [N, Vs] or a [N1, N2, Vs] row view (rowgrad.row_views), t likewise with Vt columns
    (Vs, Vt >= v); grad: empty, or s's rows contiguous ([N, Vg] or [N1, N2, Vg]);
    labels: [N] or None; scale: 0-dim float32. div .. ignore_index, inv_temp_t, tau_sq:
    the fields of KDParams (inv_temp_t None: the student's 1/τ).
    temperature / taid_t / teacher_temperature: 0-dim tensors whose values replace
    inv_temp / w / inv_temp_t (params.resolve: read and checked here, before any kernel).
    parts: None, or [N, 2] float32 (contiguous) that receives each row's two addends,
    soft_w·D_n and hard_w·CE_n (the latter 0 without labels): return_components.
    """
    prm = KDParams(div, inv_temp, w, soft_w, hard_w, ignore_index, inv_temp_t, tau_sq)
    if temperature is not None or taid_t is not None or teacher_temperature is not None:
        prm = resolve(prm, temperature, taid_t, teacher_temperature)
    if grad.dim() == 3:
        grad = grad.view(-1, grad.shape[-1])
    extra = {} if parts is None else {"parts": parts}  # (launchers without it stay valid)
    if (s.dim() == 2 and t.dim() == 2) or backend == "triton":  # Triton: two row strides
        KD_FWD(backend, s, t, labels, scale, loss, grad, prm, v, **extra)
        return
    for r0, r1 in _outer_blocks(s if s.dim() == 3 else t, v):
        if parts is not None:
            extra = {"parts": parts[r0:r1]}
        KD_FWD(backend, _take(s, r0, r1), _take(t, r0, r1),
               labels[r0:r1] if labels is not None else None, scale, loss[r0:r1],
               grad[r0:r1] if grad.numel() > 0 else grad, prm, v, **extra)


def _outer_blocks(x: Tensor, v: int):
    """Row ranges of a [N1, N2, V] view for the launchers that take one row stride: one
    range per outer index (a view, no copy) when N2 fills an eighth of a torch-path chunk
    or more (at V = 128k that is one row); else whole outer indices grouped to about a
    chunk (copied, a chunk at a time, by _take), not a launch per few rows."""
    n1, n2 = x.shape[0], x.shape[1]
    rows = chunk_rows(v)
    per = 1 if 8 * n2 >= rows else -(-rows // max(n2, 1))
    for b0 in range(0, n1, per):
        yield b0 * n2, min(n1, b0 + per) * n2


def _take(x: Tensor, r0: int, r1: int) -> Tensor:
    """Rows r0..r1 of a [N, V] tensor or of a [N1, N2, V] view, as [r1 − r0, V] at one
    stride (r0, r1 whole outer indices for a 3-D x; a copy only across outer indices)."""
    if x.dim() == 2:
        return x[r0:r1]
    n2 = x.shape[1]
    b0, b1 = r0 // n2, r1 // n2
    return x[b0] if b1 == b0 + 1 else x[b0:b1].reshape(-1, x.shape[-1])
