"""Offline teacher top-k: the record that `topk_kd_loss` and `fused_linear_topk_kd_loss`
consume, how to make it from dense teacher logits, and its file format (docs/spec.md §5).

A teacher run keeps, per token, the k classes it ranks highest and their logits or
log-probabilities (what DistillKit and axolotl store for offline distillation). A record:

    indices      int32 [..., k]   class ids in [0, vocab_size), -1 = padding (no repeats)
    values       bfloat16 | float16 | float32 [..., k]   at those classes (ignored at -1)
    values_kind  'logits'  : values = t / temperature           (t: the teacher's logits)
                 'logprobs': values = log_softmax(t / temperature)  (over the full vocabulary)
    vocab_size   V (the teacher's vocabulary; k <= V)
    temperature  the τ the values were computed with (1.0: raw logits / plain log-probs)
    metadata     free {str: str | int | float | bool | None} (model name, dataset, ...)

File format (version 1): one file written by `torch.save` holding a dict with exactly
these entries plus "format" = "kdkernels.teacher_topk", "version" = 1, "k" and "dtype"
(the values' dtype by name), so that the file describes itself. `load` reads it with
`torch.load(weights_only=True)` (tensors and plain Python values only, no code) and checks
everything again. Store a large dataset as one file per shard of rows.

Loss: `topk_kd_loss(student_logits, rec.indices, rec.values, labels, **rec.loss_kwargs())`
(the same for `fused_linear_topk_kd_loss`). With values_kind='logits' any training
temperature applies on top of the stored values; 'logprobs' needs the loss's temperature 1
(the stored distribution is the teacher's at `temperature`).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import get_args

import torch

from .._core.chunking import chunk_rows
from .._core.validate import check_float_tensor, check_int, check_number
from .function import TopKValues, _check_logprobs

FORMAT = "kdkernels.teacher_topk"
FORMAT_VERSION = 1
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VALUE_KINDS: tuple[str, ...] = get_args(TopKValues)
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in VALUE_DTYPES}
_KEYS = ("format", "version", "indices", "values", "values_kind", "vocab_size", "k", "dtype",
         "temperature", "metadata")
# Temporaries of `from_logits`: row blocks of about this many bytes in float32.
_BLOCK_BYTES = 64 << 20


def _check_indices(idx: torch.Tensor, v: int) -> None:
    bad = (idx < -1) | (idx >= v)
    if bool(bad.any()):
        raise ValueError(
            f"indices must be class ids in [0, vocab_size={v}) or -1 (padding); "
            f"found {idx[bad][0].item()}"
        )
    if idx.shape[-1] > 1:
        srt = torch.sort(idx, dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            raise ValueError(
                f"indices must not repeat a class within a row; class "
                f"{srt[..., 1:][dup][0].item()} appears twice (pad unused slots with -1)"
            )


def _check_metadata(meta) -> dict:
    if not isinstance(meta, dict):
        raise TypeError(f"metadata must be a dict, got {type(meta).__name__}")
    for key, val in meta.items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be str, got {key!r}")
        if val is not None and not isinstance(val, (str, bool, numbers.Real)):
            raise TypeError(
                f"metadata[{key!r}] must be a str, int, float, bool or None (what "
                f"torch.load(weights_only=True) reads back), got {type(val).__name__}"
            )
    return dict(meta)


@dataclass
class TeacherTopK:
    """A teacher's top-k per token (module docstring): validated on construction.

    Make one with `TeacherTopK.from_logits(teacher_logits, k)`, or from stored tensors
    (`indices` int32, `values` bf16/fp16/fp32, same shape [..., k]); `save(path)` and
    `TeacherTopK.load(path)` write and read the documented file format.
    """

    indices: torch.Tensor
    values: torch.Tensor
    values_kind: str
    vocab_size: int
    temperature: float = 1.0
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        idx, vals = self.indices, self.values
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(idx).__name__}")
        if idx.dtype != torch.int32:
            raise TypeError(
                f"indices must be int32 (the storage format), got {idx.dtype}; "
                "convert with indices.to(torch.int32)"
            )
        if not isinstance(vals, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(vals).__name__}")
        if vals.dtype not in VALUE_DTYPES:
            raise TypeError(
                f"values must be bfloat16, float16 or float32 (the storage format), got "
                f"{vals.dtype}; convert with values.to(torch.bfloat16) (or float32)"
            )
        if idx.dim() < 1 or idx.shape[-1] < 1:
            raise ValueError(f"indices must have shape [..., k] with k >= 1, got "
                             f"{tuple(idx.shape)}")
        if tuple(vals.shape) != tuple(idx.shape):
            raise ValueError(
                f"values must have the shape of indices {tuple(idx.shape)}, got "
                f"{tuple(vals.shape)}"
            )
        if idx.device != vals.device:
            raise ValueError(f"indices is on {idx.device} but values is on {vals.device}")
        if self.values_kind not in VALUE_KINDS:
            raise ValueError(
                f"values_kind must be one of {', '.join(map(repr, VALUE_KINDS))}; got "
                f"{self.values_kind!r}"
            )
        k = idx.shape[-1]
        self.vocab_size = check_int("vocab_size", self.vocab_size, lo=k)
        self.temperature = check_number("temperature", self.temperature, lo=0.0,
                                        lo_open=True)
        self.metadata = _check_metadata(self.metadata)
        _check_indices(idx, self.vocab_size)
        if self.values_kind == "logprobs":
            _check_logprobs(vals.cpu(), idx.cpu(), None, 0)

    # -- what the loss needs ------------------------------------------------------------

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def loss_kwargs(self) -> dict:
        """The keywords `topk_kd_loss` / `fused_linear_topk_kd_loss` need for these values."""
        return {"values": self.values_kind}

    def to(self, device) -> TeacherTopK:
        """The same record with its tensors on `device`."""
        return TeacherTopK(self.indices.to(device), self.values.to(device), self.values_kind,
                           self.vocab_size, self.temperature, dict(self.metadata))

    # -- the file format ----------------------------------------------------------------

    def state_dict(self) -> dict:
        """The dict `save` writes (module docstring)."""
        return {
            "format": FORMAT, "version": FORMAT_VERSION,
            "indices": self.indices.detach().cpu().contiguous(),
            "values": self.values.detach().cpu().contiguous(),
            "values_kind": self.values_kind, "vocab_size": self.vocab_size, "k": self.k,
            "dtype": str(self.dtype).removeprefix("torch."), "temperature": self.temperature,
            "metadata": dict(self.metadata),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the record to `path` (one torch.save file, CPU tensors)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def from_state_dict(cls, state) -> TeacherTopK:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a teacher top-k record (expected format {FORMAT!r})")
        version = state.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"teacher top-k record has an invalid version {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"teacher top-k record has format version {version}, newer than this "
                f"kdkernels reads ({FORMAT_VERSION}); upgrade kdkernels"
            )
        missing = [key for key in _KEYS if key not in state]
        if missing:
            raise ValueError(f"teacher top-k record lacks {', '.join(missing)}")
        rec = cls(state["indices"], state["values"], state["values_kind"],
                  state["vocab_size"], state["temperature"], state["metadata"])
        if state["k"] != rec.k or _DTYPE_NAMES.get(state["dtype"]) != rec.dtype:
            raise ValueError(
                f"teacher top-k record is inconsistent: it says k={state['k']!r}, "
                f"dtype={state['dtype']!r} but holds k={rec.k}, {rec.dtype}"
            )
        return rec

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> TeacherTopK:
        """Read and check a record written by `save`."""
        state = torch.load(path, map_location=map_location, weights_only=True)
        return cls.from_state_dict(state)

    # -- from dense teacher logits ------------------------------------------------------

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, k: int, *, values: str = "logprobs",
                    temperature: float = 1.0, dtype: torch.dtype | None = None,
                    rows_per_chunk: int | None = None, metadata: dict | None = None,
                    backend: str = "auto") -> TeacherTopK:
        """The teacher's top-k of `teacher_logits` [..., V], a block of rows at a time.

        The k classes are `topk_select`'s (descending, ties by lower index), taken in the
        logits' own dtype; 'logprobs' subtracts the row's log-sum-exp, computed in float32
        (float64 for float64) one block of `rows_per_chunk` rows at a time (default: about
        64 MiB of float32), so no [N, V] float32 copy of the logits is ever made.
        dtype: the values' stored dtype (default: the logits' dtype, float32 for float64).
        backend: topk_select's backend.
        """
        from ..select import topk_select

        x = check_float_tensor("teacher_logits", teacher_logits)
        v = x.shape[-1]
        k = check_int("k", k, lo=1, hi=max(v, 1))
        if values not in VALUE_KINDS:
            raise ValueError(
                f"values must be one of {', '.join(map(repr, VALUE_KINDS))}; got {values!r}"
            )
        tau = check_number("temperature", temperature, lo=0.0, lo_open=True)
        if dtype is None:
            dtype = x.dtype if x.dtype in VALUE_DTYPES else torch.float32
        if dtype not in VALUE_DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        rows = (chunk_rows(v, 4, _BLOCK_BYTES) if rows_per_chunk is None
                else check_int("rows_per_chunk", rows_per_chunk, lo=1))
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, v)
        n = x2.shape[0]
        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        out_i = torch.empty(n, k, dtype=torch.int32, device=x.device)
        out_v = torch.empty(n, k, dtype=dtype, device=x.device)
        for r0 in range(0, n, rows):
            blk = x2[r0 : r0 + rows]
            top, ix = topk_select(blk, k, backend=backend)
            top = top.to(wide)
            if tau != 1.0:
                top = top / tau
            if values == "logprobs":
                full = blk.to(wide, copy=True)
                if tau != 1.0:
                    full.mul_(1.0 / tau)
                top = top - torch.logsumexp(full, -1, keepdim=True)
                del full
            out_i[r0 : r0 + rows] = ix.to(torch.int32)
            out_v[r0 : r0 + rows] = top.to(dtype)
        meta = {} if metadata is None else metadata
        return cls(out_i.reshape(*lead, k), out_v.reshape(*lead, k), values, v, tau, meta)


def save_teacher_topk(path: str | os.PathLike, indices: torch.Tensor, values: torch.Tensor, *,
                      values_kind: str, vocab_size: int, temperature: float = 1.0,
                      metadata: dict | None = None) -> TeacherTopK:
    """Check and write a teacher top-k record (module docstring); returns it."""
    rec = TeacherTopK(indices, values, values_kind, vocab_size, temperature,
                      {} if metadata is None else metadata)
    rec.save(path)
    return rec


def load_teacher_topk(path: str | os.PathLike, map_location="cpu") -> TeacherTopK:
    """Read and check a record written by `save_teacher_topk` / `TeacherTopK.save`."""
    return TeacherTopK.load(path, map_location=map_location)


def teacher_topk_from_logits(teacher_logits: torch.Tensor, k: int, **kwargs) -> TeacherTopK:
    """`TeacherTopK.from_logits` as a function (same arguments)."""
    return TeacherTopK.from_logits(teacher_logits, k, **kwargs)
