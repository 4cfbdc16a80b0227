"""Build hooks: the CUDA sources ship in the package, and the CUDA extension can be
compiled at install time (see ENVS.md).

By default the package installs as pure Python (fast; csrc/ is copied into the package as
`kdkernels/_csrc` so the extension can be built just in time on first use on a CUDA
machine). With KDKERNELS_BUILD_CUDA=1 the extension `kdkernels.kdkernels_cuda` is
compiled now, with nvcc + pybind11 + ninja, by the same builder the just-in-time path
uses (kdkernels/_build.py), for KDKERNELS_CUDA_ARCH (default "80;90a", plus PTX of the
lowest). pybind11 and ninja must be importable by the build, e.g.
    pip install pybind11 ninja
    KDKERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .
Everything else lives in pyproject.toml.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _builder():
    """kdkernels/_build.py loaded by path: it imports neither torch nor the package."""
    spec = importlib.util.spec_from_file_location("_kdkernels_ext_builder",
                                                  ROOT / "kdkernels" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildPy(build_py):
    """Also copy csrc/ into the built package as kdkernels/_csrc (for just-in-time builds)."""

    def run(self):
        super().run()
        src = ROOT / "csrc"
        if src.is_dir():
            dst = Path(self.build_lib) / "kdkernels" / "_csrc"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)


class BuildCudaExt(build_ext):
    """Compile the CUDA extension with kdkernels/_build.py's ninja builder."""

    def build_extension(self, ext):
        builder = _builder()
        problem = builder.toolchain_problem()
        if problem:
            raise SystemExit(f"KDKERNELS_BUILD_CUDA=1: {problem}")
        archs = builder.parse_arch_list(
            os.environ.get("KDKERNELS_CUDA_ARCH", "").strip()
            or ";".join(builder.DEFAULT_INSTALL_ARCHS)
        )
        built = builder.build(archs, Path(self.build_temp).resolve() / "kdkernels_cuda",
                              werror=False, ptx=True)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


ext_modules = []
cmdclass = {"build_py": BuildPy}
if _truthy("KDKERNELS_BUILD_CUDA"):
    units = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir()
                   if p.suffix in (".cu", ".cpp"))
    ext_modules.append(Extension("kdkernels.kdkernels_cuda", sources=units))
    cmdclass["build_ext"] = BuildCudaExt

setup(ext_modules=ext_modules, cmdclass=cmdclass)
