#!/usr/bin/env bash
# GPU validation in few large calls (the device tool's machine: python3, torch+CUDA, triton,
# nvcc; no package registry). Usage, from the repository root on the GPU machine:
#   bash scripts/gpu_validate.sh tests   # GPU test suite  -> $OUT/tests.log
#   bash scripts/gpu_validate.sh bench [--ops kd,fused_linear ...]  -> $OUT/results/
# Wheels carried in wheels/ (pybind11, ninja, liger-kernel, matplotlib, tqdm, pot, pytest,
# pytest-benchmark) are installed first without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kdkernels-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export KDKERNELS_CACHE_DIR="${KDKERNELS_CACHE_DIR:-$OUT/cache}"
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps wheels/*.whl >"$OUT/pip.log" 2>&1 || true
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    nvcc --version | tail -1
} | tee "$OUT/device.txt"
what="${1:-tests}"
shift || true
case "$what" in
    tests)
        python3 -m pytest -q -x -p no:cacheprovider \
            tests/test_dispatch.py tests/test_kd_gpu.py tests/test_cuda_build.py tests/test_cuda_kd.py \
            tests/test_topk_select.py tests/test_fused_linear.py tests/test_bench_harness.py \
            tests/test_pld_triton.py tests/test_topk_kd_triton.py tests/test_pld_topk_gpu.py \
            tests/test_fused_linear_topk.py tests/test_sinkhorn_triton.py \
            tests/test_sinkhorn_loss_triton.py tests/test_graph_triton.py \
            tests/test_vocab_parallel_cuda.py tests/test_sampled_kd.py tests/test_uld.py \
            tests/test_fused_linear_dense_teacher.py tests/test_kd_ergonomics.py \
            tests/test_kd_dkd_nkd_cosine.py \
            tests/test_kd_conveniences.py \
            "$@" 2>&1 | tee "$OUT/tests.log" | tail -25
        ;;
    bench)
        python3 -m kdkernels bench --out "$OUT/results" "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
        ;;
    *)
        echo "usage: $0 tests|bench [args]" >&2
        exit 2
        ;;
esac
