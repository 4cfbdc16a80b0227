"""Vocabulary parallelism: `VocabParallel`, its validation, the collectives the two-phase
losses use, and DTensor inputs (docs/vocab_parallel.md).

Each rank of a process group holds the vocabulary columns [start, stop) of the student
(and teacher) logits; the ranks' ranges partition [0, V). The losses of `kd_loss` and
`topk_kd_loss` then need only O(N) numbers per rank and step on the wire, whatever V is:
per row maxima, sums of exponentials and partial sums (kdkernels/kd/parallel.py,
kdkernels/topk/parallel.py). Every collective of those launchers goes through
`all_reduce` below, so `count_bytes()` sees what one step communicates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._core.backend import BackendUnavailableError, requested


@dataclass(frozen=True)
class VocabParallel:
    """This rank holds vocabulary columns [start, stop) of the logits.

    start, stop: global class ids, 0 <= start < stop; the logits' last dimension on this
        rank must be stop − start, and the ranges of the ranks of `group` must partition
        [0, V) (V, the global vocabulary, is the largest `stop`).
    group: the torch.distributed process group of the ranks that share the vocabulary
        (a tensor-parallel group); None means the default group.
    reduce_hidden_grad: for the fused losses only (`fused_linear_kd_loss`,
        `fused_linear_topk_kd_loss`, whose rank holds rows [start, stop) of the LM heads
        and the replicated hidden states): True (default) all-reduces the hidden-state
        gradient over `group`, so every rank gets the full Σ_r dZ_r W_r; False leaves each
        rank its partial dZ_r W_r, for frameworks whose tensor-parallel region sums it in
        its own backward (Megatron's copy to the tensor-parallel region). The logits
        losses ignore it.

    Labels and teacher top-k indices stay global class ids. Every rank gets the loss one
    process holding the whole vocabulary would compute, and the gradient of its own
    columns. Building one is free; the first loss call validates it against the group
    (one tiny all-gather of (start, stop, rows) per call).
    """

    start: int
    stop: int
    group: Any = None
    reduce_hidden_grad: bool = True

    def __post_init__(self):
        if not isinstance(self.reduce_hidden_grad, bool):
            raise TypeError("VocabParallel.reduce_hidden_grad must be a bool, got "
                            f"{type(self.reduce_hidden_grad).__name__}")
        for name in ("start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"VocabParallel.{name} must be an int, got {type(value).__name__}")
        if not 0 <= self.start < self.stop:
            raise ValueError(
                f"VocabParallel needs 0 <= start < stop, got start={self.start}, stop={self.stop}"
            )

    @property
    def width(self) -> int:
        return self.stop - self.start


class Shards(NamedTuple):
    """A validated VocabParallel, with what the group told: the global vocabulary `v`,
    the widest shard `max_width` (every rank chunks rows alike from it) and the group."""

    start: int
    stop: int
    v: int
    max_width: int
    group: Any


# --- communication -------------------------------------------------------------------

_counters: list[list[int]] = []


@contextmanager
def count_bytes() -> Iterator[list[int]]:
    """Collect the bytes of every all-reduce the vocabulary-parallel losses issue in the
    block (one entry per call: numel × itemsize of the reduced tensor, per rank)."""
    calls: list[int] = []
    _counters.append(calls)
    try:
        yield calls
    finally:
        _counters.remove(calls)


def all_reduce(x: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all-reduce of `x` ('max' or 'sum') over `group`; returns x."""
    import torch.distributed as dist

    for calls in _counters:
        calls.append(x.numel() * x.element_size())
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return x


# --- validation ----------------------------------------------------------------------

def check_vocab_parallel(vp, op: str, backend, widths: tuple[int, ...], rows: int,
                         device, agree: dict[str, int] | None = None) -> Shards:
    """Validate `vp` for `op` on tensors whose last dims are `widths` with `rows` rows.

    Local checks first (type, torch.distributed initialised, widths == stop − start, the
    backend); then one all-gather of (start, stop, rows, *agree.values()) over the group,
    after which every rank raises alike if the ranges do not partition [0, V), the row
    counts differ, or any `agree` value (named by its key) differs between ranks.
    """
    if not isinstance(vp, VocabParallel):
        raise TypeError(
            f"vocab_parallel must be a kdkernels.VocabParallel, got {type(vp).__name__}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "vocab_parallel needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) on every rank of its group"
        )
    for w in widths:
        if w != vp.width:
            raise ValueError(
                f"vocab_parallel: the logits' last dimension on this rank must be "
                f"stop - start = {vp.stop} - {vp.start} = {vp.width}, got {w}"
            )
    name, _ = requested(backend)
    two_phase = ("kd_loss", "topk_kd_loss", "fused_linear_kd_loss",
                 "fused_linear_topk_kd_loss")
    kernels = {"triton": two_phase, "cuda": two_phase}  # the ops with two-phase kernels
    if op not in kernels.get(name, (op,)):
        have = " and ".join(["'torch'"] + [repr(b) for b, ops in kernels.items() if op in ops])
        raise BackendUnavailableError(
            f"{op}: backend={name!r} cannot run with vocab_parallel: the two-phase "
            f"vocabulary-parallel kernels of this op exist only for backend={have} so far "
            "(backend='auto' takes torch)"
        )
    world = dist.get_world_size(vp.group)
    agree = agree or {}
    mine = torch.tensor([vp.start, vp.stop, rows, *agree.values()], dtype=torch.int64)
    if dist.get_backend(vp.group) == "nccl":
        mine = mine.to(device)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=vp.group)
    full = sorted(tuple(int(x) for x in g.cpu()) for g in got)
    table = [row[:3] for row in full]
    if len({r for _, _, r in table}) != 1:
        raise ValueError(
            f"vocab_parallel: every rank of the group must hold the same rows; got row "
            f"counts {sorted({r for _, _, r in table})}"
        )
    for i, key in enumerate(agree):
        seen = sorted({row[3 + i] for row in full})
        if len(seen) != 1:
            raise ValueError(
                f"vocab_parallel: every rank of the group must pass the same {key}; "
                f"got {seen}"
            )
    edge = 0
    for start, stop, _ in table:
        if start != edge:
            raise ValueError(
                "vocab_parallel: the ranks' [start, stop) ranges must partition [0, V) "
                f"without gaps or overlaps; got {[(a, b) for a, b, _ in table]}"
            )
        edge = stop
    return Shards(vp.start, vp.stop, edge, max(b - a for a, b, _ in table), vp.group)


# --- DTensor -------------------------------------------------------------------------

def _is_dtensor(x) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before its import
    return mod is not None and isinstance(x, mod.DTensor)


def _vocab_shard(x, name: str, vocab_dim: int | None):
    """(local tensor, VocabParallel | None) of a DTensor argument: the VocabParallel its
    shard implies when it is Shard(vocab_dim) on one mesh dim and Replicate() on the
    others, None when it is replicated. vocab_dim None: it must be replicated."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = x.device_mesh, tuple(x.placements)
    nd = max(x.dim(), 1)
    vdim = None if vocab_dim is None else vocab_dim % nd
    sharded = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    if (any(not isinstance(p, (Shard, Replicate)) for p in placements) or len(sharded) > 1
            or any(placements[i].dim % nd != vdim for i in sharded)):
        want = ("Replicate() on every mesh dim (only the vocabulary-sharded arguments may "
                "be sharded)" if vdim is None else
                f"Replicate(), or Shard({vocab_dim}) (the vocabulary dim) on one mesh dim "
                "and Replicate() on the others")
        raise ValueError(f"{name}: a DTensor here must be {want}; got placements {placements}")
    local = x.to_local()
    if not sharded:
        return local, None
    _, offset = compute_local_shape_and_global_offset(x.shape, mesh, placements)
    start = int(offset[vdim])
    return local, VocabParallel(start, start + local.shape[vdim], mesh.get_group(sharded[0]))


def unwrap_dtensors(vp, vocab_dims: dict[str, int] | None = None, **tensors):
    """Plain local tensors for DTensor arguments, and the VocabParallel they imply.

    vocab_dims names the arguments that may be sharded on the vocabulary, with their
    vocabulary dim (default: every argument whose name ends in "logits", dim -1; the
    fused losses pass their weights and biases, dim 0). Such an argument sharded there
    on one mesh dim gives a VocabParallel (start/stop from the local shard's global
    offset, torch's uneven splits included; the group of that mesh dim); every one of
    them that is given must then be sharded alike (same mesh dim, same offsets), and
    `vp` must be None. Replicated DTensors act as plain tensors; the other arguments
    (hidden states, labels, top-k indices and values) must be plain or replicated. The
    local tensors come from `to_local()`, whose backward returns the gradient as a
    DTensor with the input's placements. Returns (vp, {name: tensor}).
    """
    if not any(_is_dtensor(t) for t in tensors.values()):
        return vp, tensors
    if vocab_dims is None:
        vocab_dims = {n: -1 for n in tensors if n.endswith("logits")}
    out, found = {}, {}
    for name, t in tensors.items():
        if not _is_dtensor(t):
            out[name] = t
            continue
        out[name], shard = _vocab_shard(t, name, vocab_dims.get(name))
        if shard is not None:
            found[name] = shard
    if found:
        if vp is not None:
            raise ValueError(
                "vocab_parallel is derived from vocabulary-sharded DTensor arguments "
                f"({', '.join(found)}); pass either DTensors or local tensors with "
                "vocab_parallel, not both"
            )
        given = [n for n in vocab_dims if tensors.get(n) is not None]
        if len(set(found.values())) != 1 or len(found) != len(given):
            seen = {n: (found[n].start, found[n].stop) if n in found else "not sharded"
                    for n in given}
            raise ValueError(
                f"{', '.join(given)} must be sharded alike on the vocabulary (DTensors "
                f"sharded on the same mesh dim, the same offsets); got {seen}"
            )
        vp = next(iter(found.values()))
    return vp, out


class _Meta(NamedTuple):
    """What argument checks read of a tensor: shape, dtype, device."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


def global_shape(x: torch.Tensor, shards: Shards | None):
    """`x` itself, or (vocabulary-parallel) its metadata with the global vocabulary as the
    last dim, for the checks that compare labels and indices with V."""
    if shards is None:
        return x
    return _Meta(tuple(x.shape[:-1]) + (shards.v,), x.dtype, x.device)
