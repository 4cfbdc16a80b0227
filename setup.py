"""Build hook for the optional CUDA extension (see ENVS.md: KDKERNELS_BUILD_CUDA).

Everything else lives in pyproject.toml. By default the package installs as pure
Python; the CUDA module is built just in time on first use on a CUDA machine.
"""

from setuptools import setup

setup()
