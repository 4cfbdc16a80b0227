"""Benchmarks of every kdkernels op: `kdkernels bench` (see docs/benchmarks.md).

- `harness`: timing (CUDA events or perf_counter, warm-up excluded, median + IQR) and
  peak memory during one call;
- `floors`: copy bandwidth and GEMM throughput measured in the same run;
- `cases`: the op registry (inputs, bytes/FLOPs, providers, shape sweeps per device);
- `providers`: our backends, eager PyTorch, torch.compile, Liger-Kernel, TRL, POT —
  each guarded, so a missing op or peer is reported as skipped;
- `cpumem`: the fresh-process peak-RSS group for the CPU fallback at real sizes;
- `report`: tidy CSV, markdown table, PNG plots; `cli`: the command line.
"""
