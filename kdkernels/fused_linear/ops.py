"""The chunked forward of the fused linear losses, as `torch.library` custom ops.

Both fused losses share one chunk loop (`chunk_loop`). Per chunk of C token rows
(n0 .. n0+C):

  Z_s = h_s W_sᵀ + b_s,  S = f_s(Z_s)                  (student logits, C x v)
  step(S) -> per-row losses L_n and, in place in S, dS = scale·∂L_n/∂S
  dZ = dS · f_s'(Z_s) · r_n                            (chain rule; r_n per-row upstream)
  grad_h[n0:n0+C] = dZ W_s        grad_W += dZᵀ h_s    grad_b += Σ_rows dZ

The divergence step is the only difference between them:
- `fused_linear_kd_loss` (`_KDStep`): the teacher logits Z_t = h_t W_tᵀ + b_t,
  T = f_t(Z_t) into a C x v buffer of their own, then `kd_fwd(S, T)`;
- `fused_linear_kd_loss` with a stored teacher (`_StoredStep`): `kd_fwd(S, T)` on the
  chunk's rows of the stored logits / log-probabilities, read in place (no teacher GEMM);
- `fused_linear_topk_kd_loss` (`_TopKStep`): `topk_kd_fwd(S, idx, vals)` on the chunk's
  rows of the stored teacher top-k (no teacher buffer, no teacher GEMM).

with f(z) = c·tanh(m·z/c) when a softcap c is given (f' = m·sech²(m·z/c)), else m·z
(f' = m, folded into the GEMMs' alpha). `scale` is the mean's 1/denominator over *all*
rows, so the chunks' gradients simply add up. The softcap's argument u = m·z/c comes
straight out of the GEMM (alpha = beta = m/c), so only one extra C x v buffer (u, kept
for f') exists, and only when the student has a softcap.

GEMMs run in the weights' dtype (cuBLAS: bf16/fp16 operands, float32 accumulation). The
weight and bias gradients accumulate across chunks in float32 buffers supplied by the
caller. Registered as custom ops (out-variant, fake implementation), the whole loop is
opaque to `torch.compile`: no graph break, no recompilation when N changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core import backend as _backend
from .._core.backend import Dispatch, Impl
from .._core.chunking import chunk_rows
from .._core.customop import custom_op
from ..kd.ops import kd_fwd
from ..kd.params import ZERO, KDParams, resolve
from ..topk.ops import TOPK_KD_FWD, topk_kd_fwd

_CUDA_OUT_DTYPE_GEMM = [True]  # addmm(..., out_dtype=float32) works here (until it raises)

# The whole chunk loop runs for every backend; the backend picks the divergence step
# (kd_loss's table), the softcap kernels and the gradient rescale.
FUSED = Dispatch("fused_linear_kd_loss", {
    "cuda": Impl("kdkernels.fused_linear.ops:run_chunks",
                 verify="kdkernels.kd.cuda:unsupported_reason", auto=False),
    "triton": Impl("kdkernels.fused_linear.ops:run_chunks"),
    "torch": Impl("kdkernels.fused_linear.ops:run_chunks"),
})


class _StepTable(Dispatch):
    """The table of a fused loss whose divergence step is another op's table (`step`).

    The chunk loop runs every step on one backend, so a backend exists for the fused loss
    only while `step` has it: `backends` lists only those, `reason` (checked when a call
    resolves, so a backend added to `step` later works at once) refuses the others with
    a reason that says so and otherwise adds `step`'s own verifier (given the same
    facts), and `auto` takes a backend only if `step` lets `auto` take it too."""

    def __init__(self, op: str, impls: dict[str, Impl], step: Dispatch):
        super().__init__(op, impls)
        self.step = step

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b in self.impls if b in self.step.impls)

    def reason(self, backend: str, device, facts: dict) -> str | None:
        if backend in self.impls and backend not in self.step.impls:
            return (
                f"not implemented for this op until {self.step.op} has a {backend!r} backend "
                f"(its divergence step runs there; available: {', '.join(self.backends)})"
            )
        why = super().reason(backend, device, facts)
        return why if why is not None else self.step.reason(backend, device, facts)

    def resolve(self, backend, device, **facts) -> str:
        _, explicit = _backend.requested(backend)
        if explicit or not _backend.on_gpu(device):
            return super().resolve(backend, device, **facts)
        for cand in self.backends:
            if (cand != "torch" and self.impls[cand].auto and self.step.impls[cand].auto
                    and self.reason(cand, device, facts) is None):
                return cand
        return "torch"


# The top-k fused loss: the same loop with `topk_kd_loss`'s divergence step, which must
# run on the requested backend too (its table's verifiers get topk_facts()).
FUSED_TOPK = _StepTable("fused_linear_topk_kd_loss", {
    "cuda": Impl("kdkernels.fused_linear.ops:run_topk_chunks",
                 verify="kdkernels.fused_linear.ops:cuda_softcap_reason", auto=False),
    "triton": Impl("kdkernels.fused_linear.ops:run_topk_chunks"),
    "torch": Impl("kdkernels.fused_linear.ops:run_topk_chunks"),
}, step=TOPK_KD_FWD)


def cuda_softcap_reason(s_dtype, **_facts) -> str | None:
    """The cuda softcap kernels' dtypes (the divergence step's own verifier runs after)."""
    from .._core.cuda import dtype_reason

    return dtype_reason("softcap kernels", s_dtype)

SOFTCAP_FWD = Dispatch("softcap_fwd", {
    "cuda": Impl("kdkernels.fused_linear.cuda:softcap_fwd_cuda"),
    "triton": Impl("kdkernels.fused_linear.triton:softcap_fwd_triton"),
    "torch": Impl("kdkernels.fused_linear.pytorch:softcap_fwd_torch"),
})
SOFTCAP_BWD = Dispatch("softcap_bwd", {
    "cuda": Impl("kdkernels.fused_linear.cuda:softcap_bwd_cuda"),
    "triton": Impl("kdkernels.fused_linear.triton:softcap_bwd_triton"),
    "torch": Impl("kdkernels.fused_linear.pytorch:softcap_bwd_torch"),
})


def _logits(h, w, b, alpha: float, out: torch.Tensor) -> None:
    """out[C, v] = alpha·(h[C, H] @ w[v, H]ᵀ + b[v]) in one GEMM (alpha in the epilogue)."""
    if b is not None:
        torch.addmm(b, h, w.t(), beta=alpha, alpha=alpha, out=out)
    elif alpha == 1.0:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(out, h, w.t(), beta=0.0, alpha=alpha, out=out)  # beta=0: out not read


def _accumulate_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc[P, Q] += alpha·a[P, K] @ b[K, Q], with float32-or-wider accumulation inside the
    GEMM (acc float32/64, or a's own dtype: then each call rounds once into acc)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    if a.is_cuda and _CUDA_OUT_DTYPE_GEMM[0]:
        try:  # cuBLAS: 16-bit operands, float32 accumulator read and written in place
            torch.addmm(acc, a, b, torch.float32, alpha=alpha, out=acc)
            return
        except (RuntimeError, TypeError):
            _CUDA_OUT_DTYPE_GEMM[0] = False  # older torch: fall through, once
    rows = chunk_rows(acc.shape[1])
    if a.is_cuda:
        # One GEMM per row block (float32 accumulation inside), rounded once, added in float32.
        for r0 in range(0, a.shape[0], rows):
            acc[r0 : r0 + rows].add_(torch.mm(a[r0 : r0 + rows], b), alpha=alpha)
    else:
        b32 = b.to(acc.dtype)
        for r0 in range(0, a.shape[0], rows):
            acc[r0 : r0 + rows].addmm_(a[r0 : r0 + rows].to(acc.dtype), b32, alpha=alpha)


@custom_op("fused_linear_kd_fwd", mutates=("loss", "grad_h", "grad_w", "grad_b", "parts"))
def fused_linear_kd_fwd(hs: Tensor, ws: Tensor, bs: Tensor | None, ht: Tensor,
                        wt: Tensor | None, bt: Tensor | None, labels: Tensor | None, scale: Tensor,
                        row_scale: Tensor | None, loss: Tensor, grad_h: Tensor, grad_w: Tensor,
                        grad_b: Tensor, backend: str, chunk: int, s_cap: float, s_mult: float,
                        t_cap: float, t_mult: float, div: int, inv_temp: float, w: float,
                        soft_w: float, hard_w: float, ignore_index: int, v: int,
                        temperature: Tensor | None = None,
                        taid_t: Tensor | None = None, inv_temp_t: float | None = None,
                        tau_sq: bool = False, teacher_temperature: Tensor | None = None,
                        parts: Tensor | None = None) -> None:
    """Per-row losses into loss[N] and the student gradients, chunk by chunk.

    hs: [N, H_s] student hidden rows; ws: [V_s, H_s]; bs: [V_s] or None.
    ht: [N, H_t] teacher hidden rows; wt: [V_t, H_t]; bt: [V_t] or None. A stored teacher
    instead: wt and bt None, ht its values [N, V_t] (or a [N1, N2, V_t] row view; any float
    dtype, unit column stride), t_cap 0, t_mult 1 (`StoredRows`).
    labels: [N] or None; scale: 0-dim float32 (multiplies every gradient);
    row_scale: [N] float32 or None (per-row upstream gradient, for reduction='none').
    loss: [N] float32 (unscaled per-row losses). Gradients of Σ_n scale·r_n·L_n, each
    skipped when its buffer is empty: grad_h [N, H_s] (hs' dtype, overwritten), grad_w
    [v, H_s] and grad_b [v] (accumulated into; float32, or the weight's dtype when the
    caller asked for weight_grad_accumulation='weight'). s_cap/t_cap: softcap c,
    0 for none; s_mult/t_mult: logit scale m. v: vocabulary columns used (<= V_s, V_t).
    temperature / taid_t / teacher_temperature: 0-dim tensors whose values replace
    inv_temp / w / inv_temp_t (read and checked here, before any GEMM:
    kd.params.resolve); inv_temp_t, tau_sq: KDParams' (None: the student's 1/τ).
    parts: None or [N, 2] float32, each row's soft and hard addends (kd.ops.kd_fwd).
    """
    prm = KDParams(div, inv_temp, w, soft_w, hard_w, ignore_index, inv_temp_t, tau_sq)
    if temperature is not None or taid_t is not None or teacher_temperature is not None:
        prm = resolve(prm, temperature, taid_t, teacher_temperature)
    FUSED(backend, hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss, grad_h, grad_w,
          grad_b, backend, chunk, s_cap, s_mult, t_cap, t_mult, *prm[:6], v, prm.inv_temp_t,
          parts)


@custom_op("fused_linear_topk_kd_fwd", mutates=("loss", "grad_h", "grad_w", "grad_b"))
def fused_linear_topk_kd_fwd(hs: Tensor, ws: Tensor, bs: Tensor | None, idx: Tensor,
                             vals: Tensor, labels: Tensor | None, scale: Tensor,
                             row_scale: Tensor | None, loss: Tensor, grad_h: Tensor,
                             grad_w: Tensor, grad_b: Tensor, backend: str, chunk: int,
                             s_cap: float, s_mult: float, code: int, beta: float,
                             inv_temp: float, logprobs: bool, bucket: bool,
                             ignore_index: int, soft_w: float, hard_w: float) -> None:
    """`fused_linear_kd_fwd` against a stored teacher top-k: idx [N, k] (−1 = padding) and
    vals [N, k] replace the teacher head; code, beta (`topk_kd_fwd`'s w), inv_temp,
    logprobs, bucket, ignore_index, soft_w and hard_w are `topk_kd_fwd`'s. Every
    vocabulary column of ws is used (v = V_s)."""
    FUSED_TOPK(backend, hs, ws, bs, idx, vals, labels, scale, row_scale, loss, grad_h, grad_w,
               grad_b, backend, chunk, s_cap, s_mult, code, beta, inv_temp, logprobs, bucket,
               ignore_index, soft_w, hard_w)


class _KDStep:
    """The divergence step of `fused_linear_kd_loss`: per chunk, the teacher logits
    T = f_t(h_t W_tᵀ + b_t) into a buffer of its own, then `kd_fwd` (the logit gradient
    in place over the student logits)."""

    def __init__(self, ht, wt, bt, t_cap, t_mult, div, inv_temp, w, soft_w, hard_w,
                 ignore_index, v, scale, backend, rows, s_buf):
        self.ht, self.wt_v, self.scale = ht, wt[:v], scale
        self.bt_v = bt[:v] if bt is not None else None
        self.t_cap, self.t_mult, self.backend = t_cap, t_mult, backend
        self.kd_args = (div, inv_temp, w, soft_w, hard_w, ignore_index, v)
        self.need_teacher = div != ZERO
        self.t_buf = (torch.empty(rows, v, dtype=wt.dtype, device=ht.device)
                      if self.need_teacher else s_buf)

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        t_blk = self.t_buf[: r1 - r0]
        if self.need_teacher:
            ht = self.ht[r0:r1]
            if self.t_cap > 0:
                _logits(ht, self.wt_v, self.bt_v, self.t_mult / self.t_cap, t_blk)
                SOFTCAP_FWD(self.backend, t_blk, t_blk, self.t_cap)
            else:
                _logits(ht, self.wt_v, self.bt_v, self.t_mult, t_blk)
        _kd_chunk(self, r0, r1, s_blk, loss_blk, grad_blk, y, t_blk)


class _TopKStep:
    """The divergence step of `fused_linear_topk_kd_loss`: `topk_kd_fwd` on the chunk's
    rows of the stored teacher top-k (nothing to compute for the teacher)."""

    def __init__(self, idx, vals, code, beta, inv_temp, logprobs, bucket, ignore_index,
                 soft_w, hard_w, scale, backend):
        self.idx, self.vals, self.scale, self.backend = idx, vals, scale, backend
        self.args = (code, beta, inv_temp, logprobs, bucket, ignore_index, soft_w, hard_w)

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        topk_kd_fwd(s_blk, self.scale, loss_blk, grad_blk, self.backend, y, self.idx[r0:r1],
                    self.vals[r0:r1], *self.args)


class StoredRows:
    """Rows r0..r1 of a stored teacher t ([N, V_t], or a [N1, N2, V_t] row view: rows at two
    strides, e.g. `logits[:, :-1]` of [B, T, V_t]; unit column stride) as an [r1 − r0, ≥ v]
    block with one row stride and unit column stride, which every divergence launcher
    takes: a slice of t itself (no copy) when t is [N, V_t] in the wanted dtype; else
    copied into a chunk buffer [rows, v] (one copy per outer index the chunk spans), in
    t's own dtype or in `dtype` (the cuda kd kernels take one dtype for both operands)."""

    def __init__(self, t, v, rows, dtype=None):
        self.t, self.v = t, v
        dtype = t.dtype if dtype is None else dtype
        self.buf = (torch.empty(rows, v, dtype=dtype, device=t.device)
                    if t.dim() == 3 or dtype != t.dtype else None)

    def __call__(self, r0, r1):
        t = self.t
        if self.buf is None:
            return t[r0:r1]
        out = self.buf[: r1 - r0]
        if t.dim() == 2:
            return out.copy_(t[r0:r1, : self.v])
        n2 = t.shape[1]
        for b in range(r0 // n2, (r1 - 1) // n2 + 1):
            lo, hi = max(r0, b * n2), min(r1, (b + 1) * n2)
            out[lo - r0 : hi - r0].copy_(t[b, lo - b * n2 : hi - b * n2, : self.v])
        return out


class _StoredStep:
    """The divergence step of `fused_linear_kd_loss` with a stored teacher (no teacher
    head): `kd_fwd` on the chunk's rows of the stored values, read in place in their own
    dtype (`StoredRows`). On 'cuda', whose kd kernels take one dtype, a teacher of
    another dtype is widened chunk by chunk into a buffer of the student's (the caller
    allows exact widenings only: bf16/fp16 into float32)."""

    def __init__(self, t, div, inv_temp, w, soft_w, hard_w, ignore_index, v, scale, backend,
                 rows, s_buf):
        self.scale, self.backend = scale, backend
        self.kd_args = (div, inv_temp, w, soft_w, hard_w, ignore_index, v)
        widen = s_buf.dtype if backend == "cuda" and t.dtype != s_buf.dtype else None
        self.rows = StoredRows(t, v, rows, widen) if div != ZERO else None

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        t_blk = self.rows(r0, r1) if self.rows is not None else s_blk  # ZERO: never read
        _kd_chunk(self, r0, r1, s_blk, loss_blk, grad_blk, y, t_blk)


def _kd_chunk(step, r0, r1, s_blk, loss_blk, grad_blk, y, t_blk) -> None:
    """`kd_fwd` on rows r0..r1 with a step's kd arguments, its teacher's 1/τ_t and its rows
    of the parts buffer (set by run_chunks: None when not asked for)."""
    parts = getattr(step, "parts", None)
    kd_fwd(s_blk, step.scale, loss_blk, grad_blk, step.backend, y, t_blk, *step.kd_args,
           inv_temp_t=getattr(step, "inv_temp_t", None),
           parts=None if parts is None else parts[r0:r1])


def run_chunks(
        hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
        chunk, s_cap, s_mult, t_cap, t_mult, div, inv_temp, w, soft_w, hard_w, ignore_index, v,
        inv_temp_t=None, parts=None,
) -> None:
    """The chunk loop of `fused_linear_kd_fwd` (same arguments), every step on `backend`;
    wt None: ht is the stored teacher (`_StoredStep`). inv_temp_t: the teacher's 1/τ_t
    (None: inv_temp); parts: None or [N, 2] (kd.ops.kd_fwd)."""
    def make_step(rows, s_buf):
        if wt is None:
            step = _StoredStep(ht, div, inv_temp, w, soft_w, hard_w, ignore_index, v, scale,
                               backend, rows, s_buf)
        else:
            step = _KDStep(ht, wt, bt, t_cap, t_mult, div, inv_temp, w, soft_w, hard_w,
                           ignore_index, v, scale, backend, rows, s_buf)
        step.inv_temp_t, step.parts = inv_temp_t, parts
        return step

    chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
               chunk, s_cap, s_mult, v, ignore_index, make_step)


def run_topk_chunks(
        hs, ws, bs, idx, vals, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
        chunk, s_cap, s_mult, code, beta, inv_temp, logprobs, bucket, ignore_index, soft_w,
        hard_w,
) -> None:
    """The chunk loop of `fused_linear_topk_kd_fwd` (same arguments), every step on `backend`."""
    chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
               chunk, s_cap, s_mult, ws.shape[0], ignore_index,
               lambda rows, s_buf: _TopKStep(idx, vals, code, beta, inv_temp, logprobs, bucket,
                                             ignore_index, soft_w, hard_w, scale, backend))


def chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
               chunk, s_cap, s_mult, v, ignore_index, make_step) -> None:
    """The loop both fused losses share (module docstring): per chunk the student logits
    S = f_s(h_s W_sᵀ + b_s) [C, v], then `step(r0, r1, S, loss[r0:r1], dS, labels[r0:r1])`,
    which writes the chunk's per-row losses and, when dS is S itself (not an empty tensor),
    scale·∂L/∂S in place over S; then the softcap's chain rule and the gradient GEMMs.
    `make_step(rows, s_buf)` builds the step once per call (it may allocate chunk buffers
    of its own, or reuse s_buf where it needs none). Ignored rows' hidden states are
    replaced by zeros before the GEMM: an inf/NaN there reaches no logit and no gradient
    (not even through 0·NaN in the weight GEMM). Autocast is off inside: the caller
    casts the GEMM inputs (as autocast would for a linear layer), and the loop's own
    GEMMs and kernels run in exactly those dtypes."""
    n = hs.shape[0]
    rows = min(chunk, n)
    if rows == 0:
        return
    with torch.autocast(hs.device.type, enabled=False):
        _chunk_loop(hs, ws, bs, labels, row_scale, loss, grad_h, grad_w, grad_b, backend,
                    s_cap, s_mult, v, ignore_index, make_step, rows)


def _chunk_loop(hs, ws, bs, labels, row_scale, loss, grad_h, grad_w, grad_b, backend, s_cap,
                s_mult, v, ignore_index, make_step, rows) -> None:
    n = hs.shape[0]
    want_h, want_w, want_b = grad_h.numel() > 0, grad_w.numel() > 0, grad_b.numel() > 0
    want_grad = want_h or want_w or want_b
    ws_v = ws[:v]
    bs_v = bs[:v] if bs is not None else None
    s_buf = torch.empty(rows, v, dtype=ws.dtype, device=hs.device)
    step = make_step(rows, s_buf)
    u_buf = torch.empty(rows, v, dtype=ws.dtype, device=hs.device) if s_cap > 0 else None
    no_grad = s_buf.new_empty(0)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        h = hs[r0:r1]
        y = labels[r0:r1] if labels is not None else None
        if y is not None:
            h = h.masked_fill((y == ignore_index).unsqueeze(1), 0)
        s_blk = s_buf[:m]
        if s_cap > 0:
            u_blk = u_buf[:m]
            _logits(h, ws_v, bs_v, s_mult / s_cap, u_blk)
            SOFTCAP_FWD(backend, u_blk, s_blk, s_cap)
        else:
            u_blk = None
            _logits(h, ws_v, bs_v, s_mult, s_blk)
        # The divergence kernel reads each logit before overwriting it with its gradient.
        step(r0, r1, s_blk, loss[r0:r1], s_blk if want_grad else no_grad, y)
        if not want_grad:
            continue
        rs = row_scale[r0:r1] if row_scale is not None else None
        if u_blk is not None:  # dZ = dS · m·sech²(u) · r  (in place)
            SOFTCAP_BWD(backend, s_blk, u_blk, s_mult, rs)
            alpha = 1.0
        else:  # dZ = m · dS · r; m goes into the GEMMs' alpha
            if rs is not None:
                SOFTCAP_BWD(backend, s_blk, None, 1.0, rs)
            alpha = s_mult
        if want_h:
            g = grad_h[r0:r1]
            torch.addmm(g, s_blk, ws_v, beta=0.0, alpha=alpha, out=g)  # beta=0: g not read
        if want_w:
            _accumulate_f32(grad_w, s_blk.t(), h, alpha)
        if want_b:
            grad_b.add_(s_blk.sum(0, dtype=grad_b.dtype), alpha=alpha)
