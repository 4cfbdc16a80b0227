"""The cpu-memory group: peak resident memory of the CPU fallback at real sizes.

Each case runs forward+backward in a fresh Python process, so nothing else the run has
allocated (or the allocator has kept) is counted:

0. one call at a tiny shape (every dimension capped at 64), so that first-call costs of
   the libraries (dispatcher caches, thread pools, allocator arenas) are not counted; it
   also checks that a kdkernels[<b>] provider ran backend <b> (as the timing rows do);
1. build the inputs (they are written, so every page is resident), `gc.collect()`;
2. read VmRSS from /proc/self/status: the baseline (interpreter + torch + inputs);
3. reset the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), so that
   building the inputs does not count; where that is refused, VmHWM since start is used
   and the row says so;
4. warm-up call(s), then timed call(s) (perf_counter); gradients are cleared before
   each call, so one set of gradients is alive at a time;
5. peak delta = VmHWM − baseline: everything the op allocated, the returned gradients
   included, at its highest.

Each case states its bound and the reason for it (`MemCase.source`): `kd_loss` ≤ 1.3 ×
the gradient (and no slower than eager log_softmax + kl_div + backward measured in the
same run); fused linear (both forms) ≤ 0.5 GiB above the inputs and the returned
gradients; PLD, Sinkhorn, top-k KD and the graph loss: no N × V float32 temporary besides
the inputs and the returned gradient, i.e. peak Δ − gradient < one float32 block of the
logits' size.

Run one case by hand: `python -m kdkernels.bench.cpumem kd.forward_kl/kdkernels[torch]`.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

GIB = 1 << 30
_MARK = "KDKERNELS_CPUMEM_RESULT "


@dataclass(frozen=True)
class MemCase:
    op: str
    provider: str
    shape: dict
    # "grad": Δ ≤ bound_value × gradient bytes; "abs": Δ ≤ bound_value bytes;
    # "extra": Δ − gradient ≤ bound_value bytes; "extra_grad": Δ − gradient < bound_value × grad
    bound: str | None = None
    bound_value: float = 0.0
    source: str = ""
    warmup: int = 1
    reps: int = 1
    compare: str | None = None  # a provider (same op and shape) this one must not be slower than
    timeout_s: float = 240.0

    @property
    def id(self) -> str:
        return f"{self.op}/{self.provider}"

    def bound_bytes(self, grad_bytes: float) -> float | None:
        """The largest peak delta the bound allows."""
        if self.bound == "grad":
            return self.bound_value * grad_bytes
        if self.bound == "abs":
            return self.bound_value
        if self.bound == "extra":
            return grad_bytes + self.bound_value
        if self.bound == "extra_grad":
            return grad_bytes + self.bound_value * grad_bytes
        return None

    def bound_text(self) -> str:
        if self.bound == "grad":
            return f"≤ {self.bound_value:g} × grad"
        if self.bound == "abs":
            return f"≤ {self.bound_value / GIB:g} GiB"
        if self.bound == "extra":
            return f"Δ − grad ≤ {self.bound_value / GIB:g} GiB"
        if self.bound == "extra_grad":
            return "Δ − grad < one N×V fp32 block"
        return ""


_KD_SHAPE = {"N": 2048, "V": 131072}
_OURS = "kdkernels[torch]"

# Why each bound is what it is (the CSV's bound note shows it).
_KD_WHY = "the returned gradient plus at most 30% scratch; eager needs 5×"
_FUSED_WHY = "chunk buffers only (2 × 64 MiB at C=256), never the N×V logits"
_FUSED_TOPK_WHY = "one chunk buffer (128 MiB at C=512), never the N×V logits"
_NO_NXV = "no N×V fp32 temporary besides the returned gradient"
# uld.topk: one row block's temporaries (~4 MiB each, at least a row per thread: ~100 bytes
# per column and row, 16 threads) and O(N·k) (16 bytes per sorted entry); never N×V
_ULD_EXTRA = 16 * 2048 * 64 + (256 << 20)
_ULD_WHY = "row-block temporaries + O(N·k); never an N×V temporary besides the gradient"
# sampled_kd: top-k KD's bucket path on the record: float64 row blocks (~4 MiB each, a few
# alive, and the library's per-thread scratch) and O(N·k) for the record's log-weights;
# nothing N×V besides the gradient (measured: 17 MB above the gradient on 2 threads)
_SAMPLED_EXTRA = 32 * 2048 * 64 + (128 << 20)
_SAMPLED_WHY = "the gradient + row-block temporaries + O(N·k), never an N×V temporary"

MEM_CASES: tuple[MemCase, ...] = (
    MemCase("kd.forward_kl", _OURS, _KD_SHAPE, "grad", 1.3, _KD_WHY, warmup=1, reps=2,
            compare="eager"),
    MemCase("kd.forward_kl", "eager", _KD_SHAPE, None, 0.0, "baseline", warmup=1, reps=2),
    MemCase("fused_linear.forward_kl", _OURS, {"N": 4096, "H": 1024, "V": 65536}, "extra",
            0.5 * GIB, _FUSED_WHY, warmup=0, reps=1),
    MemCase("fused_linear.topk", _OURS, {"N": 4096, "H": 1024, "V": 65536, "k": 64}, "extra",
            0.5 * GIB, _FUSED_TOPK_WHY, warmup=0, reps=1),
    MemCase("pld", _OURS, {"N": 256, "V": 131072}, "extra_grad", 1.0, _NO_NXV),
    MemCase("sinkhorn_loss", _OURS, {"B": 256, "V": 131072, "iters": 20}, "extra_grad", 1.0,
            _NO_NXV, warmup=0, reps=1),
    MemCase("topk_kd", _OURS, {"N": 2048, "V": 131072, "k": 64}, "extra_grad", 1.0, _NO_NXV),
    MemCase("graph", _OURS, {"G": 4, "T": 512, "V": 131072, "k": 16}, "extra_grad", 1.0,
            _NO_NXV),
    MemCase("uld.topk", _OURS, {"N": 2048, "V": 131072, "k": 64}, "extra", _ULD_EXTRA,
            _ULD_WHY, warmup=0, reps=1),
    MemCase("sampled_kd", _OURS, {"N": 2048, "V": 131072, "k": 64}, "extra", _SAMPLED_EXTRA,
            _SAMPLED_WHY, warmup=1, reps=2),
)


def get_mem_case(case_id: str) -> MemCase:
    for c in MEM_CASES:
        if c.id == case_id:
            return c
    raise KeyError(f"unknown cpu-memory case {case_id!r}; known: {[c.id for c in MEM_CASES]}")


@dataclass
class MemResult:
    case: MemCase
    status: str = "ok"  # ok | unavailable | error | timeout | skipped
    note: str = ""
    peak_delta: float = float("nan")
    grad_bytes: float = float("nan")
    input_bytes: float = float("nan")
    times: list[float] = field(default_factory=list)
    hwm_reset: bool = True
    time_vs_compare: float = float("nan")
    wall_s: float = 0.0

    @property
    def time_s(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def ratio_to_grad(self) -> float:
        if not self.grad_bytes or self.grad_bytes != self.grad_bytes:
            return float("nan")
        return self.peak_delta / self.grad_bytes

    @property
    def mem_ok(self) -> bool | None:
        b = self.case.bound_bytes(self.grad_bytes)
        if b is None or self.status != "ok":
            return None
        return self.peak_delta <= b

    @property
    def time_ok(self) -> bool | None:
        if self.case.compare is None or self.time_vs_compare != self.time_vs_compare:
            return None
        return self.time_vs_compare <= 1.0

    @property
    def passed(self) -> bool | None:
        checks = [c for c in (self.mem_ok, self.time_ok) if c is not None]
        if self.status != "ok" or not checks:
            return None
        return all(checks)


# -- child -----------------------------------------------------------------------------


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(case_id: str) -> dict:
    import torch

    from .providers import Unavailable
    from .runner import WrongBackend, backend_check
    from .specs import get_spec

    mc = get_mem_case(case_id)
    spec = get_spec(mc.op)
    device = torch.device("cpu")
    factories = spec.providers(device)
    if mc.provider not in factories:
        return {"status": "unavailable", "note": f"no provider {mc.provider} for {mc.op}"}
    try:
        fn = factories[mc.provider]()
    except Unavailable as e:
        return {"status": "unavailable", "note": str(e)}
    torch.manual_seed(0)
    tiny = {k: (min(v, 64) if isinstance(v, int) else v) for k, v in mc.shape.items()}
    warm = spec.make_inputs(tiny, torch.float32, device)
    for k in spec.grad_inputs:
        warm[k].requires_grad_(True)
    try:
        with backend_check(mc.provider):  # the row's label is the backend that ran
            fn(warm).backward()
    except WrongBackend as e:
        return {"status": "error", "note": str(e)}
    del warm
    inputs = spec.make_inputs(mc.shape, torch.float32, device)
    leaves = [inputs[k].requires_grad_(True) for k in spec.grad_inputs]
    grad_bytes = sum(t.numel() * t.element_size() for t in leaves)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs.values()
                      if isinstance(t, torch.Tensor))
    gc.collect()
    base_kib = _status_kib("VmRSS")
    reset = _reset_hwm()
    times = []
    for i in range(mc.warmup + mc.reps):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        loss = fn(inputs)
        loss.backward()
        dt = time.perf_counter() - t0
        del loss
        if i >= mc.warmup:
            times.append(dt)
    peak_kib = _status_kib("VmHWM")
    return {"status": "ok", "peak_delta": (peak_kib - base_kib) * 1024.0,
            "grad_bytes": grad_bytes, "input_bytes": input_bytes, "times": times,
            "hwm_reset": reset}


def _selftest_child(nbytes: int) -> dict:
    """The harness on a known cost: a call that allocates and writes `nbytes`."""
    import torch

    gc.collect()
    base_kib = _status_kib("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    del x
    dt = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM")
    return {"status": "ok", "peak_delta": (peak_kib - base_kib) * 1024.0, "grad_bytes": nbytes,
            "input_bytes": 0, "times": [dt], "hwm_reset": reset}


# -- parent ----------------------------------------------------------------------------


def available() -> str | None:
    """None when this platform can run the group, else the reason."""
    if not os.path.exists("/proc/self/status"):
        return "needs Linux /proc/self/status (VmRSS, VmHWM)"
    return None


def selftest(nbytes: int) -> MemResult:
    """Run the fresh-process measurement on a call that allocates exactly `nbytes`."""
    mc = MemCase("selftest", "torch.ones", {"bytes": nbytes}, "abs", float(nbytes), "test")
    return run_one(mc, ["--selftest", str(nbytes)])


def run_one(mc: MemCase, child_args: list[str] | None = None) -> MemResult:
    res = MemResult(case=mc)
    why = available()
    if why:
        res.status, res.note = "unavailable", why
        return res
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "kdkernels.bench.cpumem",
                               *(child_args or [mc.id])],
                              capture_output=True, text=True, timeout=mc.timeout_s,
                              env=dict(os.environ))
    except subprocess.TimeoutExpired:
        res.status, res.note = "timeout", f"over {mc.timeout_s:g} s"
        res.wall_s = time.monotonic() - t0
        return res
    res.wall_s = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        res.status = "error"
        res.note = tail[-1][:200] if tail else f"exit code {proc.returncode}"
        if proc.returncode < 0 or "MemoryError" in res.note:
            res.note = f"killed (signal {-proc.returncode}): out of memory?" \
                if proc.returncode < 0 else res.note
        return res
    data = json.loads(lines[-1][len(_MARK):])
    res.status = data.get("status", "error")
    res.note = data.get("note", "")
    if res.status == "ok":
        res.peak_delta = data["peak_delta"]
        res.grad_bytes = data["grad_bytes"]
        res.input_bytes = data["input_bytes"]
        res.times = data["times"]
        res.hwm_reset = data["hwm_reset"]
        if not res.hwm_reset:
            res.note = "peak RSS counter could not be reset: includes building the inputs"
    return res


def select(patterns: list[str] | None) -> list[MemCase]:
    import fnmatch

    if not patterns:
        return list(MEM_CASES)
    return [c for c in MEM_CASES
            if any(fnmatch.fnmatchcase(c.op, p) or fnmatch.fnmatchcase(c.op, p + ".*")
                   or c.op.split(".")[0] == p for p in patterns)]


def run_all(cases: list[MemCase], progress=None) -> list[MemResult]:
    results = []
    for mc in cases:
        if progress is not None:
            progress.set_postfix_str(f"cpu-memory {mc.id} {mc.shape}", refresh=True)
        results.append(run_one(mc))
        if progress is not None:
            progress.update(1)
    by_id = {(r.case.op, r.case.provider): r for r in results}
    for r in results:
        if r.case.compare and r.status == "ok":
            other = by_id.get((r.case.op, r.case.compare))
            if other is not None and other.status == "ok":
                r.time_vs_compare = r.time_s / other.time_s
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--selftest":
        print(_MARK + json.dumps(_selftest_child(int(argv[1]))), flush=True)
        return 0
    if len(argv) != 1:
        print("usage: python -m kdkernels.bench.cpumem OP/PROVIDER", file=sys.stderr)
        print("cases: " + ", ".join(c.id for c in MEM_CASES), file=sys.stderr)
        return 2
    out = _child(argv[0])
    print(_MARK + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
