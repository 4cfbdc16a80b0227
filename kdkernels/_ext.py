"""Loader of the optional CUDA extension `kdkernels_cuda` (csrc/).

The module is found, in order:
1. an installed build next to this file (`KDKERNELS_BUILD_CUDA=1 pip install ...`, see
   setup.py), unless it was built from other sources than the ones shipped beside it;
2. a just-in-time build (`_build.py`): nvcc + pybind11 + ninja compile csrc/ for the
   current GPU's architecture into a cache directory outside the package. A failed build
   is not retried in the same process.

Nothing here runs at import time: the first `load()` (from `unavailable_reason()`, which
backend resolution calls for `backend="cuda"` on CUDA tensors) does the work.
`KDKERNELS_CUDA_EXT=0` switches the extension off. The build helpers are re-exported
here (`build_cached`, `find_nvcc`, ...), so callers need one module.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import threading

from ._build import (  # noqa: F401  (re-exported)
    DEFAULT_INSTALL_ARCHS,
    MODULE_NAME,
    BuildError,
    build,
    build_cached,
    build_key,
    cache_root,
    default_arch_list,
    find_ninja,
    find_nvcc,
    parse_arch_list,
    source_dir,
    source_hash,
    toolchain_problem,
)

_log = logging.getLogger("kdkernels")
_lock = threading.Lock()
_state: dict = {}  # "module" / "reason" once load() has run


def load_module(path):
    """Import the extension module from a file path (a fresh module object)."""
    path = str(path)
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, path)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def disabled() -> bool:
    return os.environ.get("KDKERNELS_CUDA_EXT", "").strip().lower() in ("0", "false", "off", "no")


def _installed():
    """The module installed in the package, if present and built from the present sources."""
    try:
        mod = importlib.import_module(f"{__package__ or 'kdkernels'}.{MODULE_NAME}")
    except ImportError:
        return None
    src = source_dir()
    built_from = mod.build_info().get("source_hash", "")
    if src is not None and built_from != f"h{source_hash(src)}":
        _log.warning(
            "kdkernels: ignoring the installed CUDA extension: csrc/ changed since it was "
            "built; a matching build is compiled just in time"
        )
        return None
    return mod


def _load_uncached():
    if disabled():
        return None, "the CUDA extension is disabled by KDKERNELS_CUDA_EXT=0 (unset it to enable)"
    mod = _installed()
    if mod is not None:
        return mod, None
    if source_dir() is None:
        return None, (
            "the CUDA extension is not installed and the CUDA sources are not available to "
            "build it; reinstall with KDKERNELS_BUILD_CUDA=1 (see ENVS.md)"
        )
    problem = toolchain_problem()
    if problem:
        return None, problem + "; or install a prebuilt one with KDKERNELS_BUILD_CUDA=1"
    try:
        path = build_cached()
    except (BuildError, ValueError, OSError) as exc:
        return None, f"{exc}\n(set KDKERNELS_CUDA_EXT=0 to stop trying)"
    try:
        return load_module(path), None
    except ImportError as exc:
        return None, f"the CUDA extension at {path} failed to import: {exc}"


def load():
    """The extension module, or None (then `unavailable_reason()` says why). Builds it just
    in time on the first call when needed; never raises."""
    with _lock:
        if "module" not in _state:
            mod, reason = _load_uncached()
            _state["module"], _state["reason"] = mod, reason
        return _state["module"]


def unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here, else the reason and how to fix it."""
    mod = load()
    if mod is None:
        return _state["reason"]
    problem = mod.device_unavailable_reason()
    if problem:
        return f"the CUDA extension is built but {problem}"
    return None


def reset() -> None:
    """Forget the loaded module and any failure (tests; after changing the environment)."""
    with _lock:
        _state.clear()
