"""Benchmarks of every kdkernels op: `kdkernels bench` (see docs/benchmarks.md).

- `specs`: the registry (every op: inputs, bytes/FLOPs, providers, shape sweeps per
  device), shared by `kdkernels bench` and the pytest-benchmark suites in `bench/`;
  `model`: its data model (Sweep, OpSpec, Case); `cases`: which cases run, in what order;
- `providers`: our backends (labels checked against what ran), eager PyTorch,
  torch.compile; `peers`: Liger-Kernel, TRL, POT — each guarded, so a missing op or peer
  is reported as not measured;
- `harness`: timing (CUDA events or perf_counter, warm-up excluded, median + IQR) and
  peak memory during one call; `floors`: copy bandwidth and GEMM throughput measured in
  the same run;
- `runner`: runs the cases within the time budget; `cpumem`: the fresh-process peak-RSS
  group for the CPU fallback at real sizes;
- `report`: tidy CSV, markdown table, PNG plots; `cli`: the command line.
"""
