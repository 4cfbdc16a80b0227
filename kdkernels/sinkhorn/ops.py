"""The dispatch tables of `sinkhorn` and `sinkhorn_loss`. Their torch paths are autograd
compositions that `torch.compile` traces, so the tables hold the functions themselves."""

from __future__ import annotations

from .._core.backend import Dispatch, Impl
from .pytorch import sinkhorn_loss_torch, sinkhorn_torch

SINKHORN = Dispatch("sinkhorn", {"torch": Impl(sinkhorn_torch)})
SINKHORN_LOSS = Dispatch("sinkhorn_loss", {"torch": Impl(sinkhorn_loss_torch)})
