"""Backends and their dispatch: one table per op, one resolution rule for all of them.

Every op lists its implementations in a `Dispatch` table, `{backend: Impl}`, in order of
preference on a GPU. An `Impl` names its function by import path (loaded on first use,
so Triton and the CUDA extension are never imported unless asked for) and, optionally,
a verifier that says why the backend cannot take these particular inputs.

Resolution (`Dispatch.resolve`), the same for every op:
- an unknown backend name raises ValueError;
- an explicit backend (the argument, or KDKERNELS_BACKEND when the argument is `auto`)
  runs, or raises BackendUnavailableError with the reason and the fix: never another one;
- `auto` on a GPU takes the first listed backend that may be chosen automatically, can
  run on the device and accepts the inputs; on a CPU it takes `torch`.

`Dispatch.__call__(backend, ...)` runs the chosen implementation and reports the call to
every active `recording()` (what benchmarks label their rows with, and what tests check).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from .validate import check_choice

Backend = Literal["auto", "torch", "triton", "cuda"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "cuda")
ENV = "KDKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and how to fix it."""


def requested(backend) -> tuple[str, bool]:
    """(backend name, explicit?): the argument, or KDKERNELS_BACKEND when it is `auto`."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend, True
    env = os.environ.get(ENV, "auto").strip().lower() or "auto"
    check_choice(ENV, env, BACKENDS)
    return env, env != "auto"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_gpu(device) -> bool:
    """Is `device` a CUDA device? (One place, so that tests can fake a GPU.)"""
    return device.type == "cuda"


def device_reason(backend: str, device) -> str | None:
    """Why `backend` cannot run on `device` at all (None when it can)."""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'kdkernels[triton]'; Linux only)"
        if on_gpu(device) or (device.type == "cpu" and triton_interpreting()):
            return None
        return (
            f"the triton backend runs on CUDA tensors (got {device.type}); on the CPU it runs "
            "only under TRITON_INTERPRET=1 (slow, for testing). Use backend='torch' or 'auto'"
        )
    if backend == "cuda":
        if not on_gpu(device):
            return (
                f"the cuda backend needs CUDA tensors (got {device.type}); "
                "use backend='torch' or 'auto'"
            )
        from .. import _ext

        return _ext.unavailable_reason()
    return None


def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Impl:
    """One backend of one op.

    target: "package.module:function", imported on first use; or the function itself
        (for implementations that torch.compile traces, where an import cannot run).
    verify: optional "package.module:function" taking the op's input facts (keywords)
        and returning why this backend cannot take them, or None.
    auto: whether `auto` may choose it on a GPU (a backend joins `auto` once a GPU
        benchmark shows it faster than the one before it).
    """

    target: str | Callable
    verify: str | None = None
    auto: bool = True


_recorders: list[list[tuple[str, str]]] = []
TABLES: list[Dispatch] = []  # every table, in creation order (for tests and docs)


@contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Collect (op, backend) for every implementation that runs inside the block."""
    calls: list[tuple[str, str]] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:  # by identity: two blocks (threads) may hold equal lists
        for i in range(len(_recorders) - 1, -1, -1):
            if _recorders[i] is calls:
                del _recorders[i]
                break


class Dispatch:
    """The `{backend: Impl}` table of one op (in order of preference on a GPU)."""

    def __init__(self, op: str, impls: dict[str, Impl]):
        if "torch" not in impls or any(b not in BACKENDS[1:] for b in impls):
            raise ValueError(f"{op}: a table needs 'torch' and only known backends")
        self.op = op
        self.impls = dict(impls)
        self._fns: dict[str, Callable] = {}
        TABLES.append(self)

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(self.impls)

    def reason(self, backend: str, device, facts: dict) -> str | None:
        """Why `backend` cannot run this op here on these inputs (None when it can)."""
        if backend not in self.impls:
            return (
                f"not implemented for this op (available: {', '.join(self.impls)})"
            )
        why = device_reason(backend, device)
        verify = self.impls[backend].verify
        if why is None and verify is not None:
            why = _load(verify)(**facts)
        return why

    def resolve(self, backend, device, **facts) -> str:
        """The concrete backend for a call with `backend` on `device`; `facts` go to the
        verifiers (e.g. dtypes, k). Raises on an explicit backend that cannot run."""
        name, explicit = requested(backend)
        if explicit:
            why = self.reason(name, device, facts)
            if why is not None:
                raise BackendUnavailableError(f"{self.op}: backend={name!r} cannot run: {why}")
            return name
        if on_gpu(device):
            for cand, impl in self.impls.items():
                # `auto` first, then the device: a cuda device check may build the extension
                if cand != "torch" and impl.auto and self.reason(cand, device, facts) is None:
                    return cand
        return "torch"

    def implementation(self, backend: str) -> Callable:
        fn = self._fns.get(backend)
        if fn is None:
            if backend not in self.impls:
                raise BackendUnavailableError(
                    f"{self.op}: backend={backend!r} is not implemented for this op"
                )
            target = self.impls[backend].target
            fn = self._fns[backend] = _load(target) if isinstance(target, str) else target
        return fn

    def __call__(self, backend: str, *args, **kwargs):
        fn = self.implementation(backend)
        for calls in _recorders:
            calls.append((self.op, backend))
        return fn(*args, **kwargs)
