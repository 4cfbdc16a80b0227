"""Compiling the optional CUDA extension `kdkernels_cuda` from csrc/ (nvcc + pybind11 + ninja).

Used by the just-in-time path of `_ext.py` and, loaded by file path, by setup.py at
install time (`KDKERNELS_BUILD_CUDA=1`), so it imports neither torch (except to ask for the
current GPU's architecture) nor the rest of the package. A build goes into a cache
directory outside the package, keyed by a hash of the sources, architectures, flags,
nvcc, Python and pybind11 versions (`$KDKERNELS_CACHE_DIR`, else
`$XDG_CACHE_HOME/kdkernels`, else `~/.cache/kdkernels`); concurrent processes build once
(a file lock). `KDKERNELS_CUDA_ARCH` overrides the architectures (e.g. `"80;90a"`);
`KDKERNELS_BUILD_JOBS` caps ninja's parallelism.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

MODULE_NAME = "kdkernels_cuda"
# Bump when the build recipe below changes in a way the hash would not see.
_RECIPE = "1"
DEFAULT_INSTALL_ARCHS = ("80", "90a")

_log = logging.getLogger("kdkernels")


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


def package_version() -> str:
    """__version__ from kdkernels/_version.py, read as text (no package import)."""
    text = (Path(__file__).resolve().parent / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


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
        f"-DKDK_VERSION={package_version()}",
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
