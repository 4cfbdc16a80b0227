"""Shared test set-up: the Triton interpreter on CPU-only machines, seeds, GPU skips.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here,
before the tests import kdkernels' Triton modules (they are imported lazily).
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
