"""Backend resolution: backend="auto" | "torch" | "triton" | "cuda".

`auto` (or the KDKERNELS_BACKEND environment variable when `auto` is passed) picks the
fastest validated GPU path for CUDA tensors and the exact `torch` path for CPU tensors.
An explicitly requested backend that cannot run raises BackendUnavailableError with the
reason and the fix; only `auto` falls back silently.
"""

from __future__ import annotations

import importlib.util
import os

from ._validate import check_choice

BACKENDS = ("auto", "torch", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_reason(device) -> str | None:
    if not triton_available():
        return "triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return (
        f"the triton backend runs on CUDA tensors (got {device.type}); on the CPU it runs only "
        "under TRITON_INTERPRET=1 (slow, for testing). Use backend='torch' or 'auto'"
    )


def _cuda_reason(device) -> str | None:
    if device.type != "cuda":
        return (
            f"the cuda backend needs CUDA tensors (got {device.type}); "
            "use backend='torch' or 'auto'"
        )
    from . import _ext

    return _ext.unavailable_reason()


def resolve_backend(backend, device, *, op: str, supported=("torch", "triton")) -> str:
    """Return the concrete backend for `op` on `device`.

    `supported` lists the backends this op implements, in order of preference on a GPU.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        env = os.environ.get("KDKERNELS_BACKEND", "auto").strip().lower() or "auto"
        check_choice("KDKERNELS_BACKEND", env, BACKENDS)
        backend = env
        explicit = env != "auto"
    else:
        explicit = True
    if backend != "auto":
        if backend not in supported:
            raise BackendUnavailableError(
                f"{op}: backend={backend!r} is not implemented for this op "
                f"(available: {', '.join(supported)})"
            )
        reason = None
        if backend == "triton":
            reason = _triton_reason(device)
        elif backend == "cuda":
            reason = _cuda_reason(device)
        if reason is None:
            return backend
        if explicit:
            raise BackendUnavailableError(f"{op}: backend={backend!r} cannot run: {reason}")
    # auto
    if device.type == "cuda":
        for cand in supported:
            # the op check first: a cuda reason may build the extension just in time
            if cand == "cuda" and op in _auto_cuda_ops(op) and _cuda_reason(device) is None:
                return "cuda"
            if cand == "triton" and _triton_reason(device) is None:
                return "triton"
    return "torch"


def explicit_backend(backend: str) -> bool:
    """Was a concrete backend asked for, by argument or by KDKERNELS_BACKEND?"""
    env = os.environ.get("KDKERNELS_BACKEND", "auto").strip().lower() or "auto"
    return backend != "auto" or env != "auto"


def _auto_cuda_ops(op: str) -> tuple[str, ...]:
    # Ops for which the benchmark has shown the CUDA kernels faster than Triton.
    # Empty until a GPU run proves it (see docs/benchmarks.md).
    return ()
