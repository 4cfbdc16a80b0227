"""The dispatch table of `sample_teacher`'s draws (the loss runs on top-k KD's tables)."""

from __future__ import annotations

from .._core.backend import Dispatch, Impl

# triton stays out of `auto` until it has been run and measured on a GPU.
SAMPLE = Dispatch("sample_teacher", {
    "triton": Impl("kdkernels.sampled.triton:draw_triton", auto=False),
    "torch": Impl("kdkernels.sampled.pytorch:draw_torch"),
})
