"""Who computes each case: our backends, eager PyTorch, torch.compile, and peers.

Every provider is looked up lazily and guarded: an op of ours that is not exported, a
peer library that is not installed, or a backend that cannot run on this device raises
`Unavailable`, and the case is reported as skipped with the reason. Nothing here
imports an optional package at module import time.

Provider names (the `--providers` option matches them with shell patterns):
    kdkernels[torch] kdkernels[triton] kdkernels[cuda]   our backends, each passed
                   explicitly; the row is kept only if every dispatch recorded while it
                   ran (`kdkernels._core.backend.recording`) ran that backend
    kdkernels[triton,wacc]  the fused linear loss with weight_grad_accumulation='weight'
                   on the backend `auto` takes on the GPU
    eager          naive PyTorch (kdkernels.bench.naive)
    compile        torch.compile of the eager code
    liger          Liger-Kernel's KL / JSD / TVD / fused linear JSD (GPU only)
    liger-chunked  Liger-Kernel's chunked distillation loss (LigerFusedLinearJSDLoss)
    trl-formula    TRL GKD's generalized_jsd_loss (the installed trl when present,
                   else the same formula transcribed in kdkernels.bench.naive)
    pot            POT's log-domain Sinkhorn (ot.bregman.sinkhorn_log / ot.sinkhorn2)
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable

import torch

OURS_PREFIX = "kdkernels"
_OURS_LABEL = re.compile(r"kdkernels\[(torch|triton|cuda)(?:,[\w.-]+)?\]")


class Unavailable(Exception):
    """This provider cannot run this case here; the message says why."""


def ours(name: str):
    """The public function `kdkernels.<name>`, or Unavailable if it is not exported."""
    try:
        import kdkernels
    except ImportError as e:  # a half-written module must not break the whole suite
        raise Unavailable(f"kdkernels does not import: {e}") from e
    fn = getattr(kdkernels, name, None)
    if not callable(fn):
        raise Unavailable(f"kdkernels.{name} is not available")
    return fn


def _table(op: str):
    from .._core.backend import TABLES

    ours(op)  # importing kdkernels creates the tables
    for table in TABLES:
        if table.op == op:
            return table
    raise Unavailable(f"kdkernels has no dispatch table for {op}")


def our_backends(op: str, device: torch.device) -> list[str]:
    """Backends of `op` that can run on `device`, in the table's order (torch last).

    When the op is not available this is ["torch"]: its kdkernels[torch] cases then
    report why (the factory raises Unavailable) instead of vanishing from the run."""
    from .._core.backend import device_reason

    try:
        listed = _table(op).backends
    except Unavailable:
        return ["torch"]
    out = []
    for be in listed:
        if be != "torch" and device.type != "cuda":
            continue  # triton on a CPU (TRITON_INTERPRET=1) is for tests, not timings
        try:
            if device_reason(be, device) is None:
                out.append(be)
        except Exception:  # the extension loader itself failing means: no such backend
            pass
    return sorted(out, key=lambda b: b == "torch")


def auto_backend(op: str, device: torch.device) -> str:
    """The backend `auto` takes for `op` on `device` (input checks aside)."""
    table = _table(op)
    for be in our_backends(op, device):
        if be == "torch" or table.impls[be].auto:
            return be
    return "torch"


def provider_name(backend: str, variant: str = "") -> str:
    return f"{OURS_PREFIX}[{backend}{',' + variant if variant else ''}]"


def claimed_backend(provider: str) -> str | None:
    """The backend a provider label of ours names (kdkernels[triton] -> triton), else None."""
    m = _OURS_LABEL.fullmatch(provider)
    return m.group(1) if m else None


def label_mismatch(provider: str, recorded: list[tuple[str, str]]) -> str | None:
    """Why `provider`'s label is wrong for the (op, backend) calls recorded while it ran:
    every call must have run the backend the label names. None when the label holds
    (or when the provider is not one of ours)."""
    want = claimed_backend(provider)
    if want is None:
        return None
    if not recorded:
        return f"no kdkernels dispatch was recorded (expected {want})"
    wrong: dict[str, list[str]] = {}
    for op, be in recorded:
        if be != want and op not in wrong.setdefault(be, []):
            wrong[be].append(op)
    if wrong:
        ran = "; ".join(f"{be} ({', '.join(ops)})" for be, ops in sorted(wrong.items()))
        return f"ran {ran}, not {want}"
    return None


_COMPILED: dict = {}


def compiled(fn):
    """torch.compile(fn), one compiled callable per Python function (shared by cases)."""
    if not hasattr(torch, "compile"):
        raise Unavailable("this torch has no torch.compile")
    if fn not in _COMPILED:
        import torch._dynamo as dynamo

        # One compiled graph per (shape, dtype, keyword) combination; keep them all
        # instead of silently falling back to eager after the default 8.
        for knob in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
        if hasattr(dynamo.config, "accumulated_cache_size_limit"):
            dynamo.config.accumulated_cache_size_limit = max(
                dynamo.config.accumulated_cache_size_limit, 4096)
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def ours_factory(op: str, call: Callable, backend: str, **kw):
    """Factory of `call(kdkernels.<op>, inputs, backend=backend, **kw)`."""

    def factory():
        fn = ours(op)
        return lambda x: call(fn, x, backend=backend, **kw)

    return factory


def with_ours(op: str, call: Callable, device: torch.device, extra: dict) -> dict:
    """One provider per backend of `op` that can run on `device`, then `extra`."""
    out = {provider_name(be): ours_factory(op, call, be) for be in our_backends(op, device)}
    out.update(extra)
    return out


def eager_and_compile(eager: Callable, call: Callable) -> dict:
    """`eager` (the naive PyTorch function) and `compile` (torch.compile of it)."""

    def compile_factory():
        c = compiled(eager)
        return lambda x: call(c, x)

    return {"eager": lambda: (lambda x: call(eager, x)), "compile": compile_factory}


def versions() -> dict[str, str]:
    """Versions of everything that can appear in a run (absent peers are left out)."""
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import kdkernels

        out["kdkernels"] = kdkernels.__version__
    except Exception:
        pass
    for mod in ("triton", "liger_kernel", "trl", "ot"):
        if importlib.util.find_spec(mod) is None:
            continue
        try:
            from importlib.metadata import version

            dist = {"ot": "pot", "liger_kernel": "liger-kernel"}.get(mod, mod)
            out[dist] = version(dist)
        except Exception:
            out[mod] = "?"
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    return out
