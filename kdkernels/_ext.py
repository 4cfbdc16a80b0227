"""Loader and builder of the optional CUDA extension `kdkernels_cuda` (csrc/).

The module is found, in order:
1. an installed build next to this file (`KDKERNELS_BUILD_CUDA=1 pip install ...`, see
   setup.py), unless it was built from other sources than the ones shipped beside it;
2. a just-in-time build: nvcc + pybind11 + ninja compile csrc/ for the current GPU's
   architecture into a cache directory outside the package, keyed by a hash of the
   sources, architectures, flags, nvcc, Python and pybind11 versions
   (`$KDKERNELS_CACHE_DIR`, else `$XDG_CACHE_HOME/kdkernels`, else `~/.cache/kdkernels`).
   Concurrent processes build once (a file lock); a failed build is not retried in the
   same process.

Nothing here runs at import time: the first `load()` (from `unavailable_reason()`, which
backend resolution calls for `backend="cuda"` on CUDA tensors) does the work.
`KDKERNELS_CUDA_EXT=0` switches the extension off; `KDKERNELS_CUDA_ARCH` overrides the
architectures (e.g. `"80;90a"`); `KDKERNELS_BUILD_JOBS` caps ninja's parallelism.

This file imports neither torch nor the rest of the package at module level, so setup.py
can load it by path to build the extension at install time.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

MODULE_NAME = "kdkernels_cuda"
# Bump when the build recipe below changes in a way the hash would not see.
_RECIPE = "1"
# Element type codes of the kernels (csrc/include/kdkernels/common.cuh: DType).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
DEFAULT_INSTALL_ARCHS = ("80", "90a")

_log = logging.getLogger("kdkernels")
_lock = threading.Lock()
_state: dict = {}  # "module" / "reason" once load() has run


class BuildError(RuntimeError):
    """The extension failed to compile or link; the message holds the log's tail and path."""


# ---------------------------------------------------------------------------- sources


def source_dir() -> Path | None:
    """csrc/ shipped in the package (`_csrc`, wheels) or beside it (a source checkout)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "_csrc", here.parent / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    return None


def _source_files(src: Path) -> list[Path]:
    exts = {".cu", ".cuh", ".cpp", ".h"}
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix in exts)


def _units(src: Path) -> list[Path]:
    """Translation units: every .cu and .cpp directly in csrc/."""
    return sorted(p for p in src.iterdir() if p.suffix in (".cu", ".cpp"))


def source_hash(src: Path) -> str:
    h = hashlib.sha256()
    for p in _source_files(src):
        h.update(p.relative_to(src).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------- toolchain


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    beside = Path(sys.executable).parent / "ninja"
    if beside.is_file():
        return str(beside)
    try:
        import ninja  # type: ignore[import-not-found]

        cand = Path(ninja.BIN_DIR) / "ninja"
        return str(cand) if cand.is_file() else None
    except (ImportError, AttributeError):
        return None


def _pybind11():
    try:
        import pybind11  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pybind11


def _python_include() -> str:
    return sysconfig.get_paths()["include"]


def toolchain_problem() -> str | None:
    """None when nvcc, ninja, pybind11 and Python.h are all present, else what is missing."""
    missing = []
    if find_nvcc() is None:
        missing.append("nvcc (install the CUDA toolkit and put its bin/ on PATH or set CUDA_HOME)")
    if find_ninja() is None:
        missing.append("ninja (pip install ninja)")
    if _pybind11() is None:
        missing.append("pybind11 (pip install pybind11)")
    if not (Path(_python_include()) / "Python.h").is_file():
        missing.append(f"the Python headers (Python.h in {_python_include()}; install python3-dev)")
    if not missing:
        return None
    return "cannot build the CUDA extension: missing " + "; ".join(missing)


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "unknown"


# ------------------------------------------------------------------------ architectures


def parse_arch_list(text: str) -> list[str]:
    """'80;90a', '8.0 9.0a', 'sm_80,sm_90a' -> ['80', '90a'] (order kept, duplicates dropped)."""
    archs: list[str] = []
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d*)([af]?)", tok)
        if not m:
            raise ValueError(
                f"KDKERNELS_CUDA_ARCH: cannot read architecture {tok!r}; use e.g. '80;90a'"
            )
        major, minor, suffix = m.groups()
        arch = f"{major}{minor}{suffix}" if minor else f"{major}{suffix}"
        if len(arch.rstrip("af")) < 2:
            raise ValueError(f"KDKERNELS_CUDA_ARCH: {tok!r} is not a compute capability like 80")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError("KDKERNELS_CUDA_ARCH is empty; use e.g. '80;90a'")
    return archs


def _device_arch() -> str | None:
    """The current GPU's architecture (90 -> '90a': the clusters path targets sm_90a)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
    except Exception:  # noqa: BLE001 - any failure means: no device to target
        return None
    arch = f"{major}{minor}"
    return "90a" if arch == "90" else arch


def default_arch_list() -> list[str]:
    env = os.environ.get("KDKERNELS_CUDA_ARCH", "").strip()
    if env:
        return parse_arch_list(env)
    dev = _device_arch()
    return [dev] if dev else list(DEFAULT_INSTALL_ARCHS)


# ------------------------------------------------------------------------------ build


def _flags(src: Path, archs: list[str], werror: bool, ptx: bool) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for nvcc."""
    pyb = _pybind11()
    if pyb is None:
        raise BuildError("pybind11 is not installed (pip install pybind11)")
    cflags = [
        "-std=c++17",
        "-O3",
        f"-I{src / 'include'}",
        f"-I{src}",
        "-isystem",
        _python_include(),
        "-isystem",
        pyb.get_include(),
        "-Xcompiler",
        "-fPIC,-fvisibility=hidden",
        f"-DKDK_BUILD_ARCHS={'_'.join(archs)}",
        f"-DKDK_SOURCE_HASH=h{source_hash(src)}",
    ]
    for i, arch in enumerate(archs):
        code = f"sm_{arch}"
        if ptx and i == 0:  # PTX of the lowest target: newer GPUs can still JIT it
            code = f"[sm_{arch},compute_{arch}]"
        cflags.append(f"-gencode=arch=compute_{arch},code={code}")
    if werror:
        cflags += [
            "-Werror",
            "all-warnings",
            "-Xcompiler",
            "-Wall,-Wextra,-Werror",
            "-Xptxas",
            "-warn-spills,-warn-lmem-usage",
        ]
    lflags = ["-shared", "-cudart", "static"]
    return cflags, lflags


def _ninja_path(p: Path | str) -> str:
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ext_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def build_key(archs: list[str], werror: bool, ptx: bool = False) -> str:
    """Cache key: sources, architectures, flags, nvcc, Python and pybind11 versions."""
    src = source_dir()
    nvcc = find_nvcc()
    pyb = _pybind11()
    if src is None or nvcc is None or pyb is None:
        raise BuildError(toolchain_problem() or "the CUDA sources (csrc/) are not available")
    cflags, lflags = _flags(src, archs, werror, ptx)
    h = hashlib.sha256()
    for part in (
        _RECIPE,
        source_hash(src),
        " ".join(archs),
        # paths out of the flags: the same sources elsewhere build the same module
        " ".join(f for f in cflags if not f.startswith("-I")),
        " ".join(lflags),
        _nvcc_version(nvcc),
        sys.version,
        _ext_suffix(),
        pyb.__version__,
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def build(arch_list, out_dir, werror: bool = False, *, ptx: bool = False,
          jobs: int | None = None) -> Path:
    """Compile csrc/ for `arch_list` (e.g. ['80', '90a']) into `out_dir` with ninja.

    Returns the path of the built module (`out_dir/kdkernels_cuda<EXT_SUFFIX>`). `werror`
    turns every nvcc, host-compiler and ptxas warning (register spills included) into an
    error. Raises BuildError with the log's tail when a step fails.
    """
    archs = parse_arch_list(";".join(arch_list) if not isinstance(arch_list, str) else arch_list)
    problem = toolchain_problem()
    if problem:
        raise BuildError(problem)
    src = source_dir()
    if src is None:
        raise BuildError("the CUDA sources (csrc/) are not available in this installation")
    nvcc, ninja = find_nvcc(), find_ninja()
    cflags, lflags = _flags(src, archs, werror, ptx)
    out_dir = Path(out_dir).resolve()
    bdir = out_dir / "build"
    bdir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{MODULE_NAME}{_ext_suffix()}"
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(nvcc)}",
        "cflags = " + " ".join(shlex.quote(f) for f in cflags),
        "ldflags = " + " ".join(shlex.quote(f) for f in lflags),
        "rule compile",
        "  command = $nvcc $cflags -c $in -o $out",
        "  description = NVCC $in",
        "rule link",
        "  command = $nvcc $ldflags $in -o $out",
        "  description = LINK $out",
    ]
    objs = []
    for unit in _units(src):
        obj = bdir / (unit.name + ".o")
        objs.append(obj)
        lines.append(f"build {_ninja_path(obj)}: compile {_ninja_path(unit)}")
    lines.append(
        f"build {_ninja_path(target)}: link " + " ".join(_ninja_path(o) for o in objs)
    )
    lines.append(f"default {_ninja_path(target)}")
    (bdir / "build.ninja").write_text("\n".join(lines) + "\n")
    if jobs is None:
        env_jobs = os.environ.get("KDKERNELS_BUILD_JOBS", "").strip()
        jobs = int(env_jobs) if env_jobs else max(1, min(os.cpu_count() or 1, 8))
    log = out_dir / "build.log"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [ninja, "-C", str(bdir), "-j", str(max(1, jobs))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
    )
    log.write_text(proc.stdout)
    if proc.returncode != 0 or not target.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise BuildError(f"building the CUDA extension failed (full log: {log}):\n{tail}")
    _log.debug("kdkernels: built %s in %.1f s", target, time.perf_counter() - t0)
    return target


def cache_root() -> Path:
    env = os.environ.get("KDKERNELS_CACHE_DIR", "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kdkernels"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): no cross-process lock
            pass
        yield


def build_cached(arch_list=None, *, werror: bool = False, ptx: bool = False,
                 cache_dir=None) -> Path:
    """The module built for `arch_list` (default: default_arch_list()), compiled once per
    cache key into `<cache_dir>/cuda-<key>/` and reused afterwards."""
    archs = list(arch_list) if arch_list is not None else default_arch_list()
    archs = parse_arch_list(";".join(archs))
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    key = build_key(archs, werror, ptx)
    final = root / f"cuda-{key}"
    target = final / f"{MODULE_NAME}{_ext_suffix()}"
    if target.is_file():
        return target
    with _file_lock(root / f"cuda-{key}.lock"):
        if target.is_file():  # another process finished while we waited
            return target
        tmp = root / f"cuda-{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        _log.warning(
            "kdkernels: compiling the CUDA extension for sm_%s into %s (first use; "
            "takes a minute or two)", ",".join(archs), final,
        )
        try:
            build(archs, tmp, werror=werror, ptx=ptx)
        except BuildError:
            failed = root / f"cuda-{key}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return target


# ------------------------------------------------------------------------------- load


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
