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
"""

from __future__ import annotations

from ..kd.parallel import kd_fwd_vocab_parallel
from ..kd.params import ZERO, KDParams
from ..parallel import Shards, all_reduce
from ..topk.parallel import topk_kd_fwd_vocab_parallel
from .ops import SOFTCAP_FWD, _logits, chunk_loop

_BACKEND = "torch"


class _VocabParallelKDStep:
    """Per chunk: the local teacher logits T_r = f_t(h_t W_t,rᵀ + b_t,r) into a buffer of
    their own, then the two-phase `kd_loss` launcher on (S_r, T_r)."""

    def __init__(self, ht, wt, bt, t_cap, t_mult, prm: KDParams, sh: Shards, scale, rows,
                 s_buf):
        self.ht, self.wt, self.bt, self.scale = ht, wt, bt, scale
        self.t_cap, self.t_mult, self.prm, self.sh = t_cap, t_mult, prm, sh
        self.need_teacher = prm.div != ZERO
        self.t_buf = (s_buf.new_empty(rows, wt.shape[0], dtype=wt.dtype)
                      if self.need_teacher else s_buf)

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        t_blk = self.t_buf[: r1 - r0]
        if self.need_teacher:
            ht = self.ht[r0:r1]
            if self.t_cap > 0:
                _logits(ht, self.wt, self.bt, self.t_mult / self.t_cap, t_blk)
                SOFTCAP_FWD(_BACKEND, t_blk, t_blk, self.t_cap)
            else:
                _logits(ht, self.wt, self.bt, self.t_mult, t_blk)
        kd_fwd_vocab_parallel(s_blk, self.scale, loss_blk, grad_blk, _BACKEND, y, t_blk,
                              self.prm, self.sh)


class _VocabParallelTopKStep:
    """Per chunk: the two-phase `topk_kd_loss` launcher on the local student logits and
    the chunk's rows of the (replicated, global-id) teacher top-k."""

    def __init__(self, idx, vals, args, sh: Shards, scale):
        self.idx, self.vals, self.args, self.sh, self.scale = idx, vals, args, sh, scale

    def __call__(self, r0, r1, s_blk, loss_blk, grad_blk, y):
        topk_kd_fwd_vocab_parallel(s_blk, self.scale, loss_blk, grad_blk, _BACKEND, y,
                                   self.idx[r0:r1], self.vals[r0:r1], *self.args, self.sh)


def reduce_hidden(grad_h, sh: Shards, reduce: bool) -> None:
    """Sum the ranks' partial hidden-state gradients in place (once per pass), in
    grad_h's dtype; nothing when `reduce` is False or there is no hidden gradient."""
    if reduce and grad_h.numel() > 0:
        all_reduce(grad_h, "sum", sh.group)


def run_kd_chunks_vocab_parallel(hs, ws, bs, ht, wt, bt, labels, scale, row_scale, loss,
                                 grad_h, grad_w, grad_b, chunk, s_cap, s_mult, t_cap, t_mult,
                                 prm: KDParams, sh: Shards, reduce: bool) -> None:
    """`ops.run_chunks` on this rank's head rows (ws [W, H_s], wt [W, H_t], W = stop −
    start; grad_w [W, H_s], grad_b [W]), then the hidden-gradient all-reduce."""
    chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, _BACKEND,
               chunk, s_cap, s_mult, ws.shape[0], prm.ignore_index,
               lambda rows, s_buf: _VocabParallelKDStep(ht, wt, bt, t_cap, t_mult, prm, sh,
                                                        scale, rows, s_buf))
    reduce_hidden(grad_h, sh, reduce)


def run_topk_chunks_vocab_parallel(hs, ws, bs, idx, vals, labels, scale, row_scale, loss,
                                   grad_h, grad_w, grad_b, chunk, s_cap, s_mult, code, beta,
                                   inv_temp, logprobs, bucket, ignore_index, sh: Shards,
                                   reduce: bool) -> None:
    """`ops.run_topk_chunks` on this rank's head rows (idx: global class ids), then the
    hidden-gradient all-reduce."""
    args = (code, beta, inv_temp, logprobs, bucket, ignore_index)
    chunk_loop(hs, ws, bs, labels, scale, row_scale, loss, grad_h, grad_w, grad_b, _BACKEND,
               chunk, s_cap, s_mult, ws.shape[0], ignore_index,
               lambda rows, s_buf: _VocabParallelTopKStep(idx, vals, args, sh, scale))
    reduce_hidden(grad_h, sh, reduce)
