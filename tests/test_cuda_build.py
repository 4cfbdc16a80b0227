"""The CUDA extension builds here, with nvcc, for sm_80 and sm_90a, warnings as errors.

CI has nvcc but no GPU: these tests compile every source in csrc/ (nvcc, host compiler
and ptxas warnings, register spills included, are errors), link the pybind11 module,
import it, and check that calling a kernel raises a clear error instead of crashing.
The build is cached by its hash (sources, archs, flags, toolchain versions) in
$KDKERNELS_CACHE_DIR or the system temp dir, so it costs compile time once per CI run
(about a minute on two cores). They skip only when nvcc is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

import kdkernels
from kdkernels import _ext

ARCHS = ["80", "90a"]
CSRC = Path(__file__).resolve().parent.parent / "csrc"

pytestmark = pytest.mark.skipif(_ext.find_nvcc() is None, reason="needs nvcc (CUDA toolkit)")


def _cache_dir() -> Path:
    env = os.environ.get("KDKERNELS_CACHE_DIR", "").strip()
    return Path(env) if env else Path(tempfile.gettempdir()) / "kdkernels-test-cache"


@pytest.fixture(scope="module")
def built():
    """(path of the module built with warnings as errors, seconds the build took here)."""
    problem = _ext.toolchain_problem()
    assert problem is None, problem  # nvcc is here: pybind11, ninja and Python.h must be too
    t0 = time.perf_counter()
    path = _ext.build_cached(ARCHS, werror=True, cache_dir=_cache_dir())
    return path, time.perf_counter() - t0


@pytest.fixture(scope="module")
def mod(built):
    return _ext.load_module(built[0])


def test_build_compiles_all_sources_and_imports(built, mod):
    path, seconds = built
    print(f"\nCUDA extension for sm_{', sm_'.join(ARCHS)}: {path} ({seconds:.1f} s)")
    info = mod.build_info()
    assert mod.version() == kdkernels.__version__
    assert info["archs"] == "_".join(ARCHS)
    assert info["source_hash"] == "h" + _ext.source_hash(CSRC)
    assert info["max_topk"] == 256
    assert info["pld_smem_k"] == 4096
    log = (path.parent / "build.log").read_text()
    units = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))
    assert {"bindings.cpp", "kd.cu", "topk.cu", "pld.cu", "topk_kd.cu", "sinkhorn.cu",
            "graph.cu", "kd_parallel.cu", "topk_kd_parallel.cu"} <= set(units)
    assert info["sinkhorn_segment"] == 16
    for unit in units:  # every translation unit went through nvcc (in this or a copied tree)
        assert re.search(rf"NVCC \S*/{re.escape(unit)}$", log, re.M), unit


def _fatbin_archs(data: bytes) -> set[int]:
    """SM numbers of the cubins embedded in a binary's fatbins (best effort, for machines
    without cuobjdump): a fatbin is a 16-byte header (magic 0xBA55ED50, version, header
    size, payload size) then entries (kind 2 = cubin, header size, payload size, ...,
    the SM number in the header's 7th 32-bit word)."""
    archs: set[int] = set()
    magic = struct.pack("<I", 0xBA55ED50)
    i = data.find(magic)
    while i >= 0:
        _, hsz, fsz = struct.unpack_from("<HHQ", data, i + 4)
        off, end = i + hsz, i + hsz + fsz
        while off + 32 <= end:
            kind, _, ehsz, psz = struct.unpack_from("<HHIQ", data, off)
            if ehsz < 32:
                break
            if kind == 2:
                archs.add(struct.unpack_from("<I", data, off + 28)[0])
            off += ehsz + psz
        i = data.find(magic, max(end, i + 4))
    return archs


def test_binary_holds_sm80_and_sm90a_code(built):
    cuobjdump = shutil.which("cuobjdump") or str(Path(_ext.find_nvcc()).parent / "cuobjdump")
    if Path(cuobjdump).is_file():
        out = subprocess.run([cuobjdump, "--list-elf", str(built[0])], capture_output=True,
                             text=True, check=True).stdout
        assert {"sm_80", "sm_90a"} <= set(re.findall(r"sm_\d+a?", out)), out
    else:
        assert {80, 90} <= _fatbin_archs(built[0].read_bytes())
    ninja = (built[0].parent / "build" / "build.ninja").read_text()
    assert "arch=compute_80,code=sm_80" in ninja
    assert "arch=compute_90a,code=sm_90a" in ninja


def test_no_torch_headers_in_csrc():
    for p in CSRC.rglob("*"):
        if p.suffix in (".cu", ".cuh", ".cpp", ".h"):
            text = p.read_text()
            assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), p


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less behaviour")
def test_kernel_call_without_gpu_raises_clear_error(mod):
    assert mod.device_available() is False
    reason = mod.device_unavailable_reason()
    assert "CUDA device" in reason
    with pytest.raises(RuntimeError, match="cannot run a CUDA kernel: no usable CUDA device"):
        mod.topk(0, 1, 1, 10, 1, 0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="use backend='torch'"):
        mod.scale_rows(0, 0, False, 1, 10, 10, 0, 0, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.kd_fwd_plan(32000, 2, 1, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.topk_kd_plan(32000, 64, 2, True, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.pld_fwd(0, 0, 0, 1, 0, 0, False, 0, 0, 0, 0, 0, 0, 1, 10, 1, 10, 10, 10, 0, 1.0,
                    -100, False, 0, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.sinkhorn_plan(64, 64, False, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.sinkhorn_fwd(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 4, 4, 3, 1, 0.1, False, 0.0, False,
                         False, True, 0, 0)
    with pytest.raises(RuntimeError, match="no usable CUDA device"):
        mod.graph_rows_bwd(0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 1, 10, 2, 1, 1.0, 0, 0, 0)
    kd_vp = dict(s=0, t=0, labels=0, labels_i64=False, stride_l=0, stats=0, piv=0, norm=0,
                 flags=0, part=0, scale=0, grad=0, n_rows=1, width=10, start=0, stride_s=10,
                 stride_t=10, stride_g=10, dtype=0, is_double=False, div=1, inv_temp=1.0, w=0.0,
                 log_w=0.0, log_1mw=0.0, soft_w=1.0, hard_w=0.0, ignore_index=-100,
                 use_x=False, device=0, stream=0)
    for name in ("kd_vp_stats", "kd_vp_partials", "kd_vp_grad"):
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            getattr(mod, name)(**kd_vp)
    topk_vp = dict(s=0, idx=0, labels=0, labels_i64=False, stride_l=0, sel=0, tstat=0, r=0,
                   tail=0, mode=0, grad=0, n_rows=1, width=10, k=2, start=0, stride_s=10,
                   stride_i=2, stride_o=3, stride_r=3, stride_g=10, dtype=2, is_double=False,
                   inv_temp=1.0, bucket=True, ignore_index=-100, device=0, stream=0)
    for name in ("topk_vp_gather", "topk_vp_grad"):
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            getattr(mod, name)(**topk_vp)
    # the slot rule needs no device (it mirrors the Triton solver's)
    assert mod.sinkhorn_slots(20, False, True, True) == 20
    assert mod.sinkhorn_slots(20, True, False, True) == 16
    assert mod.sinkhorn_slots(20, True, False, False) == 2
    assert mod.sinkhorn_slots(20, False, False, True) == 0


def test_kd_loss_cuda_backend_on_cpu_tensors_raises():
    s, t = torch.randn(4, 11), torch.randn(4, 11)
    with pytest.raises(kdkernels.BackendUnavailableError, match="needs CUDA tensors"):
        kdkernels.kd_loss(s, t, backend="cuda")


def test_kill_switch_and_reason(monkeypatch):
    monkeypatch.setenv("KDKERNELS_CUDA_EXT", "0")
    _ext.reset()
    try:
        assert _ext.load() is None
        assert "KDKERNELS_CUDA_EXT=0" in _ext.unavailable_reason()
    finally:
        monkeypatch.delenv("KDKERNELS_CUDA_EXT")
        _ext.reset()


def test_cache_key_depends_on_archs_and_flags():
    k1 = _ext.build_key(["80"], False)
    assert k1 == _ext.build_key(["80"], False)
    assert k1 != _ext.build_key(["90a"], False)
    assert k1 != _ext.build_key(["80"], True)


def test_arch_list_parsing(monkeypatch):
    assert _ext.parse_arch_list("80;90a") == ["80", "90a"]
    assert _ext.parse_arch_list("sm_80, 9.0a 8.0") == ["80", "90a"]
    with pytest.raises(ValueError, match="KDKERNELS_CUDA_ARCH"):
        _ext.parse_arch_list("hopper")
    monkeypatch.setenv("KDKERNELS_CUDA_ARCH", "8.6")
    assert _ext.default_arch_list() == ["86"]
