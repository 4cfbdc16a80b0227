"""`TeacherSamples`: a teacher's sparse, sampled distribution per token (docs/sampled_kd.md).

    indices             int32 | int64 [..., k]   distinct class ids in [0, vocab_size),
                        ascending, then -1 padding (at most min(draws, V) ids per row)
    weights             float32 [..., k]   p̂ at those classes: Σ over a row = 1 for a
                        sampled row, 0 for a row the sampler skipped, 0 at padding; NaN
                        marks a row whose teacher logits were not a distribution
    vocab_size          V
    temperature         τ of the estimated distribution p = softmax(t/τ)
    proposal_temperature τ_r of the proposal r = softmax(t/τ_r) the ids were drawn from
                        (τ_r = τ: p̂ = counts / draws, unbiased; else self-normalised
                        importance weights, see `sample_teacher`)
    draws               k, the number of draws per row

`as_topk()` turns the record into a `TeacherTopK` with values = log p̂ (values_kind
'logprobs'), which the top-k file format stores; `from_topk` reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._core.validate import check_int, check_number

_PROPOSAL_KEY = "sampled_proposal_temperature"
_DRAWS_KEY = "sampled_draws"


def _check_values(idx: torch.Tensor, w: torch.Tensor, v: int) -> None:
    """Indices in [-1, V), no repeats, weights >= 0 (NaN allowed: it is data) and rows
    summing to at most 1 (CPU tensors only: no host sync on a GPU; not while tracing)."""
    if idx.device.type != "cpu" or idx.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (idx < -1) | (idx >= v)
    if bool(bad.any()):
        raise ValueError(
            f"indices must be class ids in [0, vocab_size={v}) or -1 (padding); "
            f"found {idx[bad][0].item()}"
        )
    srt = torch.sort(idx, dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        raise ValueError(
            f"indices must not repeat a class within a row; class "
            f"{srt[..., 1:][dup][0].item()} appears twice (merge duplicates, pad with -1)"
        )
    if bool((w < 0).any()):
        raise ValueError(f"weights must be >= 0, found {w[w < 0][0].item():g}")
    total = torch.where(idx >= 0, w.double(), 0.0).sum(-1)
    if bool((total > 1.0 + 1e-3).any()):
        raise ValueError(
            "weights must sum to at most 1 per row (an estimate of a distribution); found "
            f"{total[total > 1.0 + 1e-3].max().item():.6g}"
        )


@dataclass(frozen=True, eq=False)  # tensors: no element-wise ==
class TeacherSamples:
    """A teacher's sampled sparse distribution per token (module docstring); checked on
    construction. Made by `sample_teacher`; consumed by `sampled_kd_loss` and
    `fused_linear_sampled_kd_loss`."""

    indices: torch.Tensor
    weights: torch.Tensor
    vocab_size: int
    temperature: float = 1.0
    proposal_temperature: float | None = None
    draws: int | None = None

    def __post_init__(self):
        idx, w = self.indices, self.weights
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                "indices must be an int32 or int64 torch.Tensor, got "
                f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}"
            )
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32:
            raise TypeError(
                "weights must be a float32 torch.Tensor, got "
                f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}"
            )
        if idx.dim() < 1 or idx.shape[-1] < 1:
            raise ValueError(f"indices must have shape [..., k] with k >= 1, got "
                             f"{tuple(idx.shape)}")
        if tuple(w.shape) != tuple(idx.shape):
            raise ValueError(f"weights must have the shape of indices {tuple(idx.shape)}, "
                             f"got {tuple(w.shape)}")
        if idx.device != w.device:
            raise ValueError(f"indices is on {idx.device} but weights is on {w.device}")
        v = check_int("vocab_size", self.vocab_size, lo=idx.shape[-1])
        tau = check_number("temperature", self.temperature, lo=0.0, lo_open=True)
        tau_r = (tau if self.proposal_temperature is None else
                 check_number("proposal_temperature", self.proposal_temperature, lo=0.0,
                              lo_open=True))
        draws = (idx.shape[-1] if self.draws is None
                 else check_int("draws", self.draws, lo=idx.shape[-1]))
        object.__setattr__(self, "vocab_size", v)
        object.__setattr__(self, "temperature", tau)
        object.__setattr__(self, "proposal_temperature", tau_r)
        object.__setattr__(self, "draws", draws)
        _check_values(idx, w, v)

    @property
    def k(self) -> int:
        """Slots per row (min(draws, V))."""
        return self.indices.shape[-1]

    @property
    def unbiased(self) -> bool:
        """True when the ids were drawn from p itself (τ_r = τ): E[p̂] = p exactly."""
        return self.proposal_temperature == self.temperature

    def log_weights(self) -> torch.Tensor:
        """log p̂ [..., k] float32 (-inf at padding and zero weights, NaN kept)."""
        return torch.log(self.weights)

    def to(self, device) -> TeacherSamples:
        return TeacherSamples(self.indices.to(device), self.weights.to(device),
                              self.vocab_size, self.temperature, self.proposal_temperature,
                              self.draws)

    def as_topk(self, metadata: dict | None = None):
        """The record as a `TeacherTopK` (int32 indices, values = log p̂, 'logprobs'),
        which `save` writes in the top-k file format."""
        from ..topk.storage import TeacherTopK

        meta = dict(metadata or {})
        meta[_PROPOSAL_KEY] = self.proposal_temperature
        meta[_DRAWS_KEY] = self.draws
        vals = torch.where(self.indices >= 0, self.log_weights(), 0.0)
        return TeacherTopK(self.indices.to(torch.int32), vals, "logprobs", self.vocab_size,
                           self.temperature, meta)

    @classmethod
    def from_topk(cls, rec) -> TeacherSamples:
        """Back from `as_topk()` (e.g. after `TeacherTopK.load`)."""
        if getattr(rec, "values_kind", None) != "logprobs":
            raise ValueError("a sampled record is stored with values_kind='logprobs' "
                             f"(log p̂), got {getattr(rec, 'values_kind', None)!r}")
        w = torch.where(rec.indices >= 0, rec.values.float().exp(), 0.0)
        return cls(rec.indices, w, rec.vocab_size, rec.temperature,
                   rec.metadata.get(_PROPOSAL_KEY), rec.metadata.get(_DRAWS_KEY))
