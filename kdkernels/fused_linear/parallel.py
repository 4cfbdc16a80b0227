"""The fused linear losses over a vocabulary-parallel LM head (docs/vocab_parallel.md,
"The fused form").

Each rank holds rows [start, stop) of the student head (and of the teacher head for
`fused_linear_kd_loss`); the hidden states are replicated. The chunk loop is the
single-process one (`ops.chunk_loop`) on the local rows, with a divergence step that runs
the two-phase vocabulary-parallel launcher on the chunk's local logits
(kdkernels/kd/parallel.py, kdkernels/topk/parallel.py): every rank gets the
full-vocabulary per-row losses and, in place over its local logits, its columns' dS.
The softcap chain rule and the GEMMs are then local:

  grad_W_r += dZ_rᵀ h_s,  grad_b_r += Σ_rows dZ_r   (this rank's rows: stay local)
  grad_h    = Σ_r dZ_r W_r                           (a sum over ranks)

Each rank's chunk loop writes its partial dZ_r W_r into grad_h; `reduce_hidden` sums
it over the group once, after the loop (N·H_s numbers, one all-reduce), unless the
`VocabParallel` asks to leave that to the framework (reduce_hidden_grad=False).

Every rank runs the same chunks (the chunk size is chosen from the widest shard, or the
caller's chunk_size, which the validation all-gather checks is equal on every rank), so
the launchers' collectives line up. Plain Python, not a `torch.library` custom op (it
issues collectives).

Backends (FUSED_VP, FUSED_TOPK_VP): every entry is the same loop; the backend is that
of the two-phase launcher of the divergence step and of the softcap kernels, as in the
single-process loop (the GEMMs are torch's on every backend). 'triton' and 'cuda'
(explicit only, until measured on a GPU) run the launchers' Triton kernels
(kd/parallel_triton.py, topk/parallel_triton.py) or CUDA kernels (kd/parallel_cuda.py,
topk/parallel_cuda.py) and that backend's softcap and rescale kernels; 'auto' takes
'torch'. The cuda softcap and rescale kernels take 16/32-bit heads only, as in the
single-process cuda loop: other heads raise BackendUnavailableError before the loop
(`_LoopTable`).
"""

from __future__ import annotations

from .._core.backend import BackendUnavailableError, Dispatch, Impl
from ..kd.parallel import kd_fwd_vocab_parallel
from ..kd.params import ZERO, KDParams
from ..parallel import Shards, all_reduce
from ..topk.parallel import topk_kd_fwd_vocab_parallel
from .ops import SOFTCAP_FWD, StoredRows, _logits, chunk_loop


class _VocabParallelKDStep:
    """Per chunk: the local teacher logits T_r = f_t(h_t W_t,rᵀ + b_t,r) into a buffer of
    their own, then the two-phase `kd_loss` launcher on (S_r, T_r). A stored teacher (wt
    None: ht is this rank's columns [N, W] of the stored values, or a row view) is read
    in place instead (`StoredRows`; the launchers take a teacher of any dtype)."""

    def __init__(self, ht, wt, bt, t_cap, t_mult, prm: KDParams, sh: Shards, scale, backend,
                 rows, s_buf):
        self.ht, self.wt, self.bt, self.scale, self.backend = ht, wt, bt, scale, backend
        self.t_cap, self.t_mult, self.prm, self.sh = t_cap, t_mult, prm, sh
        self.need_teacher = prm.div != ZERO
        self.stored = (StoredRows(ht, ht.shape[-1], rows)
                       if wt is None and self.need_teacher else None)
        self.t_buf = (s_buf.new_empty(rows, wt.shape[0], dtype=wt.dtype)
                      if self.need_teacher and wt is not None else s_buf)

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        t_blk = self.t_buf[: r1 - r0] if self.stored is None else self.stored(r0, r1)
        if self.need_teacher and self.stored is None:
            ht = self.ht[r0:r1]
            if self.t_cap > 0:
                _logits(ht, self.wt, self.bt, self.t_mult / self.t_cap, t_blk)
                SOFTCAP_FWD(self.backend, t_blk, t_blk, self.t_cap)
            else:
                _logits(ht, self.wt, self.bt, self.t_mult, t_blk)
        parts = getattr(self, "parts", None)  # (run_kd_chunks_vocab_parallel sets it)
        kd_fwd_vocab_parallel(s_blk, self.scale, loss_blk, grad_blk, self.backend, y, t_blk,
                              self.prm, self.sh, None if parts is None else parts[r0:r1])


class _VocabParallelTopKStep:
    """Per chunk: the two-phase `topk_kd_loss` launcher on the local student logits and
    the chunk's rows of the (replicated, global-id) teacher top-k."""

    def __init__(self, idx, vals, args, sh: Shards, scale, backend):
        self.idx, self.vals, self.args, self.sh, self.scale = idx, vals, args, sh, scale
        self.backend = backend

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        topk_kd_fwd_vocab_parallel(s_blk, self.scale, loss_blk, grad_blk, self.backend, y,
                                   self.idx[r0:r1], self.vals[r0:r1], *self.args[:6], self.sh,
                                   *self.args[6:])


def reduce_hidden(grad_h, sh: Shards, reduce: bool) -> None:
    """Sum the ranks' partial hidden-state gradients in place (once per pass), in
    grad_h's dtype; nothing when `reduce` is False or there is no hidden gradient."""
    if reduce and grad_h.numel() > 0:
        all_reduce(grad_h, "sum", sh.group)


def run_kd_chunks_vocab_parallel(hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss,
                                 grad_h, grad_w, grad_b, chunk, s_cap, s_mult, t_cap, t_mult,
                                 prm: KDParams, sh: Shards, reduce: bool, backend: str,
                                 parts=None) -> None:
    """`ops.run_chunks` on this rank's head rows (ws [W, H_s], wt [W, H_t], W = stop −
    start; grad_w [W, H_s], grad_b [W]), every step on `backend`, then the
    hidden-gradient all-reduce. parts: None or [N, 2] (kd.ops.kd_fwd)."""
    def make_step(rows, s_buf):
        step = _VocabParallelKDStep(ht, wt, bt, t_cap, t_mult, prm, sh, scale, backend, rows,
                                    s_buf)
        step.parts = parts
        return step

    chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
               chunk, s_cap, s_mult, ws.shape[0], prm.ignore_index, make_step)
    reduce_hidden(grad_h, sh, reduce)


def run_topk_chunks_vocab_parallel(hs, ws, bs, idx, vals, labels, scale, row_scale, loss,
                                   grad_h, grad_w, grad_b, chunk, s_cap, s_mult, code, beta,
                                   inv_temp, logprobs, bucket, ignore_index, sh: Shards,
                                   reduce: bool, backend: str, soft_w: float = 1.0,
                                   hard_w: float = 0.0) -> None:
    """`ops.run_topk_chunks` on this rank's head rows (idx: global class ids), every step
    on `backend`, then the hidden-gradient all-reduce."""
    args = (code, beta, inv_temp, logprobs, bucket, ignore_index, soft_w, hard_w)
    chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, backend,
               chunk, s_cap, s_mult, ws.shape[0], ignore_index,
               lambda rows, s_buf: _VocabParallelTopKStep(idx, vals, args, sh, scale, backend))
    reduce_hidden(grad_h, sh, reduce)


class _LoopTable(Dispatch):
    """The table of one loop. backend='cuda' also needs heads the cuda softcap and
    row-rescale kernels take (float32, float16, bfloat16: the chunk buffers are in the
    heads' dtypes), as in the single-process cuda loop: others raise
    BackendUnavailableError when the table is called, before the loop runs (nothing is
    recorded, no collective of the loop is issued; every rank holds heads of the same
    dtypes, so every rank raises alike). `heads(args)`: the loop's head weights."""

    def __init__(self, op: str, public: str, impls: dict[str, Impl], heads):
        super().__init__(op, impls)
        self.public, self.heads = public, heads

    def __call__(self, backend: str, *args, **kwargs):
        if backend == "cuda":
            from .._core.cuda import dtype_reason

            for w in self.heads(args):
                why = dtype_reason("fused loop's softcap and rescale step", w.dtype)
                if why is not None:
                    raise BackendUnavailableError(
                        f"{self.public}: backend='cuda' cannot run with vocab_parallel: {why}")
        return super().__call__(backend, *args, **kwargs)


# The loops as dispatch tables (so recording() sees which ran). The backend is passed on
# to the loop, which runs its divergence step, softcap kernels and rescale there. Where
# 'triton' or 'cuda' cannot run (device, extension), `resolve` raises before any
# collective.
FUSED_VP = _LoopTable("fused_linear_kd_loss_vocab_parallel", "fused_linear_kd_loss", {
    "cuda": Impl(run_kd_chunks_vocab_parallel, auto=False),
    "triton": Impl(run_kd_chunks_vocab_parallel, auto=False),
    "torch": Impl(run_kd_chunks_vocab_parallel),
}, heads=lambda args: tuple(w for w in (args[1], args[4]) if w is not None))  # ws, wt
FUSED_TOPK_VP = _LoopTable("fused_linear_topk_kd_loss_vocab_parallel",
                           "fused_linear_topk_kd_loss", {
    "cuda": Impl(run_topk_chunks_vocab_parallel, auto=False),
    "triton": Impl(run_topk_chunks_vocab_parallel, auto=False),
    "torch": Impl(run_topk_chunks_vocab_parallel),
}, heads=lambda args: (args[1],))  # ws
