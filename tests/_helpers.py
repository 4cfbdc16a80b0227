"""Helpers shared by the test modules (import as `from _helpers import ...`)."""

from __future__ import annotations

import math

import pytest
import torch

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

# Absolute error floors per dtype for the low-precision rule
# |fast - ref64| <= 2 |torch_lowp - ref64| + ATOL[dtype].
ATOL = {torch.float16: 1e-5, torch.bfloat16: 1e-4, torch.float32: 1e-6, torch.float64: 1e-12}


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| in float64 (NaN counts as infinitely wrong)."""
    return (x.double() - ref.double()).nan_to_num(nan=math.inf).abs().max().item()


def assert_lowp(fast, low, ref, dtype, *, measure=max_abs_err, slack: float = 0.0) -> None:
    """The low-precision rule: |fast − ref64| <= 2·|torch_lowp − ref64| + ATOL[dtype] + slack.

    fast: our result; low: PyTorch's own computation in the low-precision dtype; ref: the
    float64 oracle. measure: max_abs_err (element-wise) or rel_err (norm-wise). slack:
    a documented extra floor (e.g. one ulp of a gradient rounded, then rescaled).
    """
    bound = 2 * measure(low, ref) + ATOL[dtype] + slack
    err = measure(fast, ref)
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g} (2 × PyTorch's {dtype} error)"


def grad_ulp(ref_grad: torch.Tensor, dtype) -> float:
    """One ulp of `dtype` at the gradient's largest magnitude: the slack for a gradient that
    is stored in `dtype` and then rescaled by the upstream gradient."""
    return torch.finfo(dtype).eps * ref_grad.abs().max().item()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref|| in float64 (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    den = ref.norm()
    num = (x - ref).norm()
    if den == 0:
        return float(num)
    return float(num / den)


def kernels_launched(fn) -> list[str]:
    """Names of the GPU kernels that `fn()` launched (torch.profiler), in launch order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def assert_launched(fn, *names: str, absent: tuple[str, ...] = ()) -> list[str]:
    """Run `fn` under the profiler; every `names` entry must be a substring of a launched
    kernel's name, no `absent` entry may be. CUDA kernels are `kdk::<name>`, Triton
    kernels `_<name>`. Returns the launched names."""
    launched = kernels_launched(fn)
    for name in names:
        assert any(name in k for k in launched), f"{name} did not launch: {launched}"
    for name in absent:
        assert not any(name in k for k in launched), f"{name} launched: {launched}"
    return launched


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a gloo rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_ranks(worker, nprocs: int, *args) -> None:
    """Run worker(rank, port, *args) on `nprocs` processes (mp.spawn), port a fresh
    rendezvous port for the gloo process group. A launch whose process is killed
    by a signal (e.g. gloo aborting while the machine is overloaded) is retried once with
    a new port; a Python exception in a worker is never retried (it is the test failing)."""
    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs)
    except mp.ProcessExitedException:
        mp.spawn(worker, args=(free_port(), *args), nprocs=nprocs)


def _rank_main(rank, port, world, path, cases, extra):
    """One rank of run_ranks: a gloo group, every case(rank, *extra, out), out as JSON."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    out = {}
    try:
        for case in cases:
            case(rank, *extra, out)
    finally:
        with open(f"{path}.{rank}", "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()


def run_ranks(cases, world: int, tmp_dir, *extra) -> list[dict]:
    """Run module-level case functions case(rank, *extra, out) on `world` gloo ranks (one
    launch for all of them: process start-up dominates) and return each rank's `out`."""
    import json
    import os

    path = os.path.join(os.fspath(tmp_dir), "out")
    spawn_ranks(_rank_main, world, world, path, tuple(cases), extra)
    res = []
    for r in range(world):
        with open(f"{path}.{r}") as f:
            res.append(json.load(f))
    return res


def kd_params(divergence: str, *, beta: float = 0.3, alpha: float = 0.2,
              taid_t: float = 0.6) -> dict:
    """The mixture keyword `divergence` reads: beta (jsd), alpha (skew KL), taid_t (taid),
    dkd_alpha / dkd_beta (dkd), nkd_gamma (nkd), all away from their defaults. kd_loss
    refuses a non-default weight that the divergence would ignore."""
    if divergence == "dkd":
        return dict(dkd_alpha=0.7, dkd_beta=3.0)
    if divergence == "nkd":
        return dict(nkd_gamma=0.8)
    if divergence == "jsd":
        return dict(beta=beta)
    if divergence.startswith("skew_"):
        return dict(alpha=alpha)
    if divergence == "taid":
        return dict(taid_t=taid_t)
    return {}
