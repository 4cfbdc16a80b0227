"""The vocab-parallel group: what the vocabulary-parallel losses communicate per step.

Each case runs forward+backward of one loss with `vocab_parallel=` on 2 ranks, at two
vocabulary sizes, on one backend passed explicitly, and counts the bytes every rank
all-reduces during the step with `kdkernels.parallel.count_bytes()` (every collective of
the two-phase launchers and the fused loss's hidden-gradient reduction goes through
`kdkernels.parallel.all_reduce`; the per-call validation all-gather of 3 int64 per rank
is not counted). The check: the bytes per step are the same at both vocabulary sizes and
on both ranks (O(N), whatever V is), and not zero.

Backends: on the CPU (gloo) every case runs on 'torch' (the Triton kernels run there only
under the interpreter, far too slow to time). With 2 GPUs (NCCL) every case runs on
'torch', 'triton' and 'cuda' (the fused loss too: its loop on the two-phase launchers of
that backend). Each step runs inside `kdkernels._core.backend.recording()`; a row is
labelled with the backend that ran (`kdkernels[triton] nccl×2`), and a step that
recorded nothing or another backend than the one asked for is an error row
(`providers.label_mismatch`), as in the timing suite.

The ranks are fresh processes (`python -m kdkernels.bench.vocabpar --rank R ...`), one
job for the whole group: gloo on the CPU (each rank one thread), or, where
`torch.cuda.device_count() >= 2`, NCCL with rank r on cuda:r. Each rank makes the same
replicated full tensors from one seed and keeps its columns ([start, stop) of the
vocabulary: V/2 each), runs one warm-up step, then `reps` timed steps (perf_counter, the
device synchronised around each step), and writes its bytes and times to a JSON file.

Run it by hand: `python -m kdkernels.bench.vocabpar` (the default sizes) or
`python -m kdkernels.bench.vocabpar --tiny`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

WORLD = 2


BACKENDS_GPU = ("torch", "triton", "cuda")  # with NCCL (2 GPUs); gloo: torch only


@dataclass(frozen=True)
class VPCase:
    """One loss at two vocabulary sizes on one backend; `shape` holds N (and k, H),
    `vocabs` the two V."""

    op: str
    shape: dict
    vocabs: tuple[int, int]
    reps: int = 3
    backend: str = "torch"

    @property
    def id(self) -> str:
        return self.op if self.backend == "torch" else f"{self.op}[{self.backend}]"

    @property
    def provider(self) -> str:
        """The provider asked for (rows that ran are labelled from what was recorded)."""
        return f"kdkernels[{self.backend}]"

    def shape_at(self, v: int) -> dict:
        return {"N": self.shape["N"], "V": v,
                **{k: x for k, x in self.shape.items() if k != "N"}}


def nccl_available() -> bool:
    """Whether the ranks will run on NCCL (one GPU each), and so every backend."""
    import torch

    return torch.cuda.device_count() >= WORLD


def cases(tiny: bool = False, nccl: bool | None = None) -> tuple[VPCase, ...]:
    """The group's cases: N=256 at V=8192 and 65536 (tiny: N=8 at V=64 and 256), on
    'torch'; with NCCL (nccl None: 2 GPUs here) each op on 'torch', 'triton', 'cuda'."""
    n, vocabs, h, reps = (8, (64, 256), 16, 2) if tiny else (256, (8192, 65536), 256, 3)
    if nccl is None:
        nccl = nccl_available()
    ops = (("kd.forward_kl", {"N": n}), ("kd.jsd", {"N": n}),
           ("topk_kd.bucket", {"N": n, "k": 16}), ("fused_linear.forward_kl", {"N": n, "H": h}))
    backends = BACKENDS_GPU if nccl else ("torch",)
    return tuple(VPCase(op, shape, vocabs, reps, be) for op, shape in ops for be in backends)


def select(patterns: list[str] | None, tiny: bool = False,
           nccl: bool | None = None) -> list[VPCase]:
    """Cases whose op matches a shell pattern, an op name or a family (`kd`)."""
    every = list(cases(tiny, nccl))
    if not patterns:
        return every
    return [c for c in every
            if any(fnmatch.fnmatchcase(c.op, p) or fnmatch.fnmatchcase(c.op, p + ".*")
                   or c.op.split(".")[0] == p for p in patterns)]


@dataclass
class VPResult:
    case: VPCase
    status: str = "ok"  # ok | error | timeout
    note: str = ""
    backend: str = "gloo"  # the collectives' backend (gloo | nccl)
    ran: list = field(default_factory=list)  # the kdkernels backends recorded (every rank)
    # per vocabulary size (the keys of case.vocabs, as str): one entry per rank
    bytes: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    times: dict = field(default_factory=dict)  # median s per step, per rank

    def step_bytes(self, v: int) -> float:
        got = self.bytes.get(str(v))
        return float(got[0]) if got else float("nan")

    def bytes_per_row(self, v: int) -> float:
        return self.step_bytes(v) / self.case.shape["N"]

    @property
    def ratio(self) -> float:
        small, large = self.case.vocabs
        b = self.step_bytes(small)
        return self.step_bytes(large) / b if b else float("nan")

    def rank_times(self, v: int) -> list[float]:
        return list(self.times.get(str(v), []))

    @property
    def provider(self) -> str:
        """The provider column: the kdkernels backend(s) recorded while the steps ran (the
        one asked for, for a row that did not run), the collectives' backend and the
        ranks: `kdkernels[torch] gloo×2`."""
        ran = "+".join(self.ran) if self.status == "ok" and self.ran else self.case.backend
        return f"kdkernels[{ran}] {self.backend}×{WORLD}"

    @property
    def passed(self) -> bool | None:
        """Bytes per step the same at both V and on every rank, and not zero."""
        if self.status != "ok":
            return None
        seen = {b for v in self.case.vocabs for b in self.bytes.get(str(v), [])}
        return len(seen) == 1 and seen.pop() > 0 and all(
            len(self.bytes.get(str(v), [])) == WORLD for v in self.case.vocabs)


# -- rank ------------------------------------------------------------------------------


def _step_fn(op: str, shape: dict, v: int, a: int, b: int, device, gen, backend: str):
    """(leaves, step) for one case on columns [a, b): step() runs forward+backward on
    `backend`."""
    import torch

    import kdkernels as K

    n = shape["N"]
    vp = K.VocabParallel(a, b)
    y = torch.randint(0, v, (n,), generator=gen).to(device)

    def cols(x):
        return x[..., a:b].contiguous().to(device)

    if op.startswith("kd."):
        div = op.split(".", 1)[1]
        s = cols(torch.randn(n, v, generator=gen) * 3).requires_grad_()
        t = cols(torch.randn(n, v, generator=gen) * 3)

        def step():
            K.kd_loss(s, t, y, divergence=div, temperature=2.0, hard_label_weight=0.1,
                      backend=backend, vocab_parallel=vp).backward()
        return [s], step
    if op == "topk_kd.bucket":
        k = shape["k"]
        s = cols(torch.randn(n, v, generator=gen) * 3).requires_grad_()
        idx = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]).to(device)
        vals = (torch.log_softmax(torch.randn(n, k, generator=gen), -1) - 1.0).to(device)

        def step():
            K.topk_kd_loss(s, idx, vals, y, values="logprobs", tail="bucket",
                           backend=backend, vocab_parallel=vp).backward()
        return [s], step
    if op == "fused_linear.forward_kl":
        h = shape["H"]
        hs = torch.randn(n, h, generator=gen).to(device).requires_grad_()
        ht = torch.randn(n, h, generator=gen).to(device)
        ws = (torch.randn(v, h, generator=gen) / h ** 0.5)[a:b].contiguous().to(device)
        wt = (torch.randn(v, h, generator=gen) / h ** 0.5)[a:b].contiguous().to(device)
        ws.requires_grad_()

        def step():
            K.fused_linear_kd_loss(hs, ws, ht, wt, y, divergence="forward_kl",
                                   temperature=2.0, hard_label_weight=0.1, backend=backend,
                                   vocab_parallel=vp).backward()
        return [hs, ws], step
    raise KeyError(f"unknown vocab-parallel case {op!r}")


def backends_ran(case: VPCase, dispatched: list[tuple[str, str]]) -> set[str]:
    """The backends recorded in one step of `case`; RuntimeError (the case's error row)
    when nothing was recorded or anything ran on another backend than the one asked for."""
    from .providers import label_mismatch

    why = label_mismatch(case.provider, dispatched)
    if why is not None:
        raise RuntimeError(f"backend={case.backend!r}: {why}")
    return {be for _, be in dispatched}


def _rank_main(rank: int, world: int, init: str, out: str, tiny: bool,
               patterns: list[str] | None) -> None:
    import torch
    import torch.distributed as dist

    from kdkernels._core.backend import recording
    from kdkernels.parallel import count_bytes

    nccl = torch.cuda.device_count() >= world
    if nccl:  # one GPU per rank; time per rank with the device synchronised
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        backend = "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    res: dict = {"backend": backend, "cases": {}}
    try:
        for case in select(patterns, tiny, nccl):
            row: dict = {"bytes": {}, "calls": {}, "times": {}}
            ran: set = set()
            try:
                for v in case.vocabs:
                    a, b = rank * v // world, (rank + 1) * v // world
                    gen = torch.Generator().manual_seed(v)  # the same full tensors everywhere
                    leaves, step = _step_fn(case.op, case.shape, v, a, b, device, gen,
                                            case.backend)
                    times, counted = [], None
                    for i in range(1 + case.reps):
                        for t in leaves:
                            t.grad = None
                        sync()
                        dist.barrier()
                        t0 = time.perf_counter()
                        with count_bytes() as calls, recording() as dispatched:
                            step()
                        sync()
                        dt = time.perf_counter() - t0
                        ran.update(backends_ran(case, dispatched))
                        if counted is not None and sum(calls) != sum(counted):
                            raise RuntimeError(f"bytes differ between steps at V={v}: "
                                               f"{sum(counted)} then {sum(calls)}")
                        counted = list(calls)
                        if i >= 1:
                            times.append(dt)
                    row["bytes"][str(v)] = sum(counted)
                    row["calls"][str(v)] = len(counted)
                    row["times"][str(v)] = statistics.median(times)
                    del leaves, step
                row["ran"] = sorted(ran)
            except Exception as e:  # noqa: BLE001 - reported as the case's error row
                row = {"error": f"{type(e).__name__}: {e}"[:300]}
            res["cases"][case.id] = row
    finally:
        with open(out, "w") as f:
            json.dump(res, f)
        dist.destroy_process_group()


# -- parent ----------------------------------------------------------------------------


def run_all(selected: list[VPCase], tiny: bool = False, patterns: list[str] | None = None,
            timeout_s: float | None = None, progress=None) -> list[VPResult]:
    """Run `selected` (which must be `select(patterns, tiny)`) in one 2-rank job, within
    `timeout_s` (default: 600 s, plus 60 s per case past the CPU's four)."""
    if not selected:
        return []
    if timeout_s is None:
        timeout_s = 600.0 + 60.0 * max(0, len(selected) - 4)
    if progress is not None:
        progress.set_postfix_str(f"vocab-parallel: {len(selected)} cases on {WORLD} ranks",
                                 refresh=True)
    results = [VPResult(case=c) for c in selected]
    with tempfile.TemporaryDirectory(prefix="kdkernels-vp-") as tmp:
        init = "file://" + os.path.join(tmp, "store")
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(WORLD)]
        cmd = [sys.executable, "-m", "kdkernels.bench.vocabpar", "--init", init]
        if tiny:
            cmd.append("--tiny")
        for p in patterns or []:
            cmd += ["--pattern", p]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen(cmd + ["--rank", str(r), "--out", outs[r]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for r in range(WORLD)]
        deadline = time.monotonic() + timeout_s
        errs, timed_out = [], False
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                errs.append(err)
            except subprocess.TimeoutExpired:
                timed_out = True
                for q in procs:
                    q.kill()
                for q in procs:
                    q.communicate()
                break
        data = []
        for path in outs:
            try:
                with open(path) as f:
                    data.append(json.load(f))
            except (OSError, ValueError):
                data.append(None)
        if timed_out or any(d is None for d in data):
            tail = next((e.strip().splitlines()[-1] for e in errs if e and e.strip()), "")
            for res in results:
                res.status = "timeout" if timed_out else "error"
                res.note = f"over {timeout_s:g} s" if timed_out else (tail[:200] or
                                                                      "a rank wrote nothing")
            return results
    for res in results:
        rows = [d["cases"].get(res.case.id) for d in data]
        res.backend = data[0]["backend"]
        bad = [r for r in rows if r is None or "error" in r]
        if bad:
            res.status = "error"
            res.note = (bad[0] or {}).get("error", "not run on every rank")
            continue
        res.ran = sorted({be for r in rows for be in r["ran"]})
        for v in map(str, res.case.vocabs):
            res.bytes[v] = [r["bytes"][v] for r in rows]
            res.calls[v] = [r["calls"][v] for r in rows]
            res.times[v] = [r["times"][v] for r in rows]
    if progress is not None:
        progress.update(len(selected))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kdkernels.bench.vocabpar")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--init", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--pattern", action="append", default=None)
    args = p.parse_args(argv)
    if args.rank is not None:
        _rank_main(args.rank, WORLD, args.init, args.out, args.tiny, args.pattern)
        return 0
    for r in run_all(select(args.pattern, args.tiny), args.tiny, args.pattern):
        small, large = r.case.vocabs
        if r.status != "ok":
            print(f"{r.case.id}: {r.status}: {r.note}")
            continue
        print(f"{r.case.op} ({r.provider}) N={r.case.shape['N']}: bytes/step/rank "
              f"{r.bytes[str(small)]} (V={small}) {r.bytes[str(large)]} (V={large}), "
              f"{r.bytes_per_row(small):g} B/row, ratio {r.ratio:g}, s/step/rank "
              f"{r.times[str(small)]} / {r.times[str(large)]}: "
              f"{'PASS' if r.passed else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
