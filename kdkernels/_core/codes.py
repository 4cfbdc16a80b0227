"""Integer codes shared by the Python layers, the Triton kernels and the CUDA kernels.

The C++ side declares the same enums in csrc/include/kdkernels/api.h; a test compares
the two (names and values), so neither can drift. Kernels take these as plain ints
(Triton constexprs, CUDA template switches).
"""

from __future__ import annotations

from enum import IntEnum


class Div(IntEnum):
    """Divergence of the softmax-KL family (after canonicalisation, see kd/params.py)."""

    ZERO = 0  # identically 0 (e.g. skew KL with alpha = 1): only the hard-label term
    FWD_KL = 1
    REV_KL = 2
    JSD = 3
    SKEW_FWD = 4
    SKEW_REV = 5
    TVD = 6
    TAID = 7
    DKD = 8  # decoupled KD: needs the row's label (the target class)
    NKD = 9  # normalized KD: needs the row's label
    COSINE = 10  # 1 − cosine similarity of the logit rows


class DType(IntEnum):
    """Element types of the CUDA kernels."""

    FLOAT32 = 0
    FLOAT16 = 1
    BFLOAT16 = 2


class KdPath(IntEnum):
    """How the CUDA kd kernel processes a row (AUTO: its own plan)."""

    AUTO = -1
    STREAM = 0
    SMEM = 1


class Cost(IntEnum):
    """Per-entry cost of the Sinkhorn loss between two probability rows."""

    L1 = 0
    SQEUCLIDEAN = 1


class Tail(IntEnum):
    """How top-k KD treats the classes outside the teacher's k entries."""

    RENORMALIZE = 0
    BUCKET = 1


ENUMS = (Div, DType, KdPath, Cost, Tail)
