"""The `torch` backend of `sample_teacher`'s draws: the inverse CDF, a block of rows at a
time.

Per row: e = exp((x − max)·(1/τ_r)) (in float32, float64 for float64 logits: 2⁻²⁴
relative per class probability), the running sum c = cumsum(e) in float64, and each of
the k uniforms u ~ U[0, 1) (53 bits; one `torch.rand` call for all N·k of them, from the
caller's generator) picks the first class with c > u·c_V: class v with probability
e_v / Σe = r_v. A class of zero mass (a −inf logit) leaves c flat and is never picked; a
product u·c_V that rounds up to c_V (probability ~2⁻⁵³) takes the last class with mass.
Temporaries: a float32 and a float64 row block (~4 MiB each) and the [N, k] uniforms.
"""

from __future__ import annotations

import torch

from .._core.chunking import chunk_rows

IGNORED, BAD = -1, -2  # the draw codes of a skipped row and of a row that is no distribution


def draw_torch(x: torch.Tensor, k: int, inv_temp: float, labels, ignore_index: int,
               generator, out: torch.Tensor) -> None:
    """out[N, k] (int32) := k independent draws per row from softmax(x·inv_temp).

    x: [N, V] float teacher logits (rows with unit column stride); labels: [N] or None.
    A row whose label is ignore_index is not read and gets IGNORED in every slot; a
    counted row holding NaN or +inf, or only −inf, gets BAD. generator: a
    torch.Generator (any device) or None (the default generator of x's device).
    """
    n, v = x.shape
    if n == 0 or k == 0:
        return
    dev = generator.device if generator is not None else x.device
    u = torch.rand(n, k, dtype=torch.float64, generator=generator, device=dev).to(x.device)
    skip = labels == ignore_index if labels is not None else None
    rows = chunk_rows(v, 8)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        e = x[r0:r1].to(wide, copy=True)
        if skip is not None:  # ignored rows never matter: whatever they hold is replaced
            e.masked_fill_(skip[r0:r1, None], 0.0)
        m = e.amax(1, keepdim=True)  # NaN propagates: NaN, +inf or all −inf rows are BAD
        bad = ~torch.isfinite(m.squeeze(1))
        e.sub_(torch.where(bad[:, None], 0.0, m))
        if inv_temp != 1.0:
            e.mul_(inv_temp)
        c = torch.cumsum(e.exp_(), 1, dtype=torch.float64)
        del e
        tot = c[:, -1:].contiguous()
        ix = torch.searchsorted(c, u[r0:r1] * tot, right=True)
        last = torch.searchsorted(c, tot)  # the last class with mass (c reaches c_V there)
        ix = torch.minimum(ix, last)
        ix = torch.where(bad[:, None], BAD, ix)
        if skip is not None:
            ix = torch.where(skip[r0:r1, None], IGNORED, ix)
        out[r0:r1] = ix.to(out.dtype)
