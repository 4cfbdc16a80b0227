"""Compile every Triton kernel variant to GPU code (cubin) without a GPU.

Run as a script in a process without TRITON_INTERPRET (the interpreter replaces the
kernels), by tests/test_triton_compile.py. Prints one line per kernel with its register
and spill counts; exits non-zero on the first compile error. This catches what the
interpreter cannot: type errors of loop-carried values, unsupported ops, constexpr misuse.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import os
import sys

import triton
from triton.backends.compiler import GPUTarget

from kdkernels._triton import rows as ROWS
from kdkernels.fused_linear import triton as FL
from kdkernels.kd import triton as KD
from kdkernels.select import triton as SEL

ARCHS = [int(a) for a in os.environ.get("KDKERNELS_AOT_ARCHS", "80,90").split(",")]


def compile_one(fn, sig: dict, const: dict, arch: int, num_warps: int):
    s = dict(sig)
    s.update({k: "constexpr" for k in const})
    src = triton.compiler.ASTSource(
        fn=fn, signature=s, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()}
    )
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def kd_variants():
    sig = {"S": "*bf16", "T": "*fp32", "LABELS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32",
           "GRAD": "*bf16", "PARTS": "*fp32", "n_inner": "i64", "stride_s_outer": "i64",
           "stride_s": "i64", "stride_t_outer": "i64", "stride_t": "i64", "stride_g": "i64",
           "V": "i32", "V_G": "i32", "inv_temp": "fp32", "inv_temp_t": "fp32", "w": "fp32",
           "log_w": "fp32", "log_1mw": "fp32", "soft_w": "fp32", "hard_w": "fp32",
           "ignore_index": "i32"}
    flags = [(True, True, True, True, True), (False, False, False, True, False),
             (True, True, False, False, False)]
    for div, (lab, hard, temp, grad, tail) in itertools.product(range(8), flags):
        const = dict(DIV=div, HAS_LABELS=lab, HARD=hard, TEMPERED=temp, COMPUTE_GRAD=grad,
                     ZERO_TAIL=tail, WRITE_PARTS=hard, BLOCK_V=4096)
        yield f"kd div={div} labels={lab} hard={hard} tempered={temp} grad={grad}", \
            KD._kd_fwd_kernel, sig, const, 8
    sig = {"G": "*bf16", "SCALE": "*fp32", "stride_g": "i64", "V": "i32"}
    for per_row in (True, False):
        yield f"scale_rows per_row={per_row}", ROWS._scale_rows_kernel, sig, \
            dict(PER_ROW=per_row, BLOCK_V=4096), 8
    sig = {"U": "*bf16", "S": "*bf16", "stride_u": "i64", "stride_s": "i64", "V": "i32",
           "cap": "fp32"}
    yield "softcap_fwd", FL._softcap_fwd_kernel, sig, dict(BLOCK_V=1024), 4
    sig = {"G": "*bf16", "U": "*bf16", "RS": "*fp32", "stride_g": "i64", "stride_u": "i64",
           "V": "i32", "k": "fp32"}
    for cap, rs in itertools.product((True, False), repeat=2):
        yield f"softcap_bwd cap={cap} rs={rs}", FL._softcap_bwd_kernel, sig, \
            dict(HAS_CAP=cap, HAS_RS=rs, BLOCK_V=1024), 4
    # the dtype only changes the loads and the value store: the smallest and the largest
    # buffer, once each (every variant costs seconds to compile)
    for dt, k in (("fp32", 256), ("bf16", 5)):
        sig = {"X": f"*{dt}", "VALUES": f"*{dt}", "INDICES": "*i64", "stride_x": "i64",
               "V": "i32", "k": "i32"}
        const = SEL.launch_config(151936, k, on_cpu=False)
        warps = const.pop("num_warps")
        yield f"topk_select {dt} K_PAD={const['K_PAD']}", SEL._topk_select_kernel, sig, \
            const, warps


# Kernel modules that list their own compile variants: `aot_variants()` yields
# (name, jit function, signature, constexprs, num_warps) like kd_variants above.
VARIANT_MODULES = ("kdkernels.pld.triton", "kdkernels.topk.triton",
                   "kdkernels.sinkhorn.cost_triton", "kdkernels.graph.triton",
                   "kdkernels.sinkhorn.triton", "kdkernels.kd.parallel_triton",
                   "kdkernels.topk.parallel_triton", "kdkernels.uld.triton",
                   "kdkernels.sampled.triton", "kdkernels.kd.decoupled_triton",
                   "kdkernels.kd.cosine_triton")


def all_variants():
    yield from kd_variants()
    for name in VARIANT_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        yield from module.aot_variants()


def _compile_job(job):
    """Compile variant `i` for `arch` (in a worker process); returns a report line."""
    arch, i = job
    name, fn, sig, const, warps = list(all_variants())[i]
    try:
        cc = compile_one(fn, sig, const, arch, warps)
    except Exception as e:  # noqa: BLE001 - report which variant failed, then fail
        return False, f"FAIL sm_{arch} {name}: {type(e).__name__}: {e}"
    return True, f"ok sm_{arch} {name}: shared={getattr(cc.metadata, 'shared', '?')}"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    jobs = [(arch, i) for arch in ARCHS for i in range(len(list(all_variants())))]
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:  # compiles are CPU-bound
        results = list(pool.map(_compile_job, jobs))
    for ok, line in results:
        print(line)
        if not ok:
            return 1
    print(f"compiled {len(results)} kernel variants with triton {triton.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
