"""The floor: copy bandwidth and matmul throughput, measured in the same run.

Every case states the bytes it must move (each input read once, each output written
once) and, where its main work is matrix products, its FLOPs. Its floor is

    floor = max(bytes / copy_bandwidth, flops / gemm_throughput[dtype])

and the report shows time ÷ floor: 1.0 would be an op running at the speed of a plain
copy (or of the best GEMM) on this device; the distance from 1 is what is left to win.
Bandwidth is counted as bytes moved (read + written), so a copy of X bytes moves 2X.
Both are taken as the best of several timed calls: the floor is what the device can do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .harness import time_fn


@dataclass
class Floors:
    device: str
    copy_bytes_per_s: float
    gemm_flops_per_s: dict[str, float] = field(default_factory=dict)
    copy_size: int = 0
    gemm_size: int = 0

    def gemm(self, dtype: torch.dtype) -> float:
        key = _dtype_key(dtype)
        if key in self.gemm_flops_per_s:
            return self.gemm_flops_per_s[key]
        return self.gemm_flops_per_s.get("float32", float("nan"))

    def floor_s(self, nbytes: float, flops: float, dtype: torch.dtype) -> float:
        t_bytes = nbytes / self.copy_bytes_per_s if nbytes else 0.0
        t_flops = flops / self.gemm(dtype) if flops else 0.0
        return max(t_bytes, t_flops)

    def floor_kind(self, nbytes: float, flops: float, dtype: torch.dtype) -> str:
        t_bytes = nbytes / self.copy_bytes_per_s if nbytes else 0.0
        t_flops = flops / self.gemm(dtype) if flops else 0.0
        return "gemm" if t_flops > t_bytes else "copy"


def _dtype_key(dtype: torch.dtype) -> str:
    # Half-precision ops are held to the bf16 GEMM (fp16 runs at the same rate on GPUs).
    if dtype in (torch.bfloat16, torch.float16):
        return "bfloat16"
    return "float32"


def measure_copy(device: torch.device, nbytes: int) -> float:
    """Bytes moved per second by `dst.copy_(src)` of `nbytes` (read + write = 2·nbytes)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, min_reps=5, max_reps=20,
                target_s=0.5)
    return 2 * n * 4 / t.min


def measure_gemm(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """FLOP/s of a `size`³ matmul in `dtype` (fp32 GEMMs run without TF32)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    prev = None
    if device.type == "cuda":
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t = time_fn(lambda: torch.mm(a, b, out=out), device=device, warmup=2, min_reps=3,
                    max_reps=20, target_s=0.5)
    finally:
        if prev is not None:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * size**3 / t.min


def measure_floors(device: torch.device | str, *, quick: bool = False) -> Floors:
    """Copy bandwidth and GEMM throughput (fp32 and bf16) on `device`.

    Sizes: a 1 GiB copy and 8192³ GEMMs on a GPU, 256 MiB and 2048³ on a CPU (large
    enough to leave the caches and reach the steady rate); `quick` (the tiny preset, for
    tests) uses 32 MiB and 512³.
    """
    device = torch.device(device)
    if quick:
        copy_size, gemm_size = 32 << 20, 512
    elif device.type == "cuda":
        copy_size, gemm_size = 1 << 30, 8192
    else:
        copy_size, gemm_size = 256 << 20, 2048
    fl = Floors(device=str(device), copy_bytes_per_s=measure_copy(device, copy_size),
                copy_size=copy_size, gemm_size=gemm_size)
    for dt in (torch.float32, torch.bfloat16):
        fl.gemm_flops_per_s[_dtype_key(dt)] = measure_gemm(device, gemm_size, dt)
    return fl
