// Host API of the kdkernels CUDA launchers: raw pointers, sizes, strides (in elements)
// and the caller's stream. Shared by the launchers (*.cu) and bindings.cpp; no device
// code and no framework headers. Launchers validate what the kernels rely on and throw
// std::invalid_argument (bad arguments) or std::runtime_error (CUDA errors).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace kdk {

// Divergence codes: kdkernels/kd/params.py (ZERO, FWD_KL, ...) in the same order.
enum Div : int {
    kZero = 0,
    kFwdKL = 1,
    kRevKL = 2,
    kJsd = 3,
    kSkewFwd = 4,
    kSkewRev = 5,
    kTvd = 6,
    kTaid = 7,
};
constexpr int kNumDivs = 8;

// One kd_fwd call. Rows: s[n, :v] (student), t[n, :v] (teacher, same dtype; unused for
// kZero), labels[n] (int32/int64, optional), loss[n] float32, grad[n, :v_g] (same dtype as
// s, may alias s; written when compute_grad). scale: one float32 on the device.
struct KdFwdArgs {
    const void* s;
    const void* t;
    const void* labels;
    const float* scale;
    float* loss;
    void* grad;
    int64_t n_rows;
    int64_t v;
    int64_t v_g;
    int64_t stride_s;
    int64_t stride_t;
    int64_t stride_g;
    int64_t stride_l;
    int64_t ignore_index;
    float inv_temp;
    float w;        // beta (jsd), alpha (skew), taid_t (taid)
    float log_w;    // log w (0 when w == 0)
    float log_1mw;  // log(1 - w) (0 when w == 1)
    float soft_w;
    float hard_w;
    int dtype;  // DType (common.cuh): 0 fp32, 1 fp16, 2 bf16
    int div;    // Div
    bool has_labels;
    bool labels_i64;
    bool hard;      // hard_w != 0 (needs labels)
    bool tempered;  // inv_temp != 1
    bool compute_grad;
};

enum KdPath : int { kPathAuto = -1, kPathStream = 0, kPathSmem = 1 };

// How one row is processed: kPathStream = one block streams the row from global memory
// (two or three passes); kPathSmem = `cluster` blocks (a thread-block cluster when > 1)
// hold the row in shared memory, cols_per_cta columns each, and read it from HBM once.
struct KdPlan {
    int path;
    int cluster;
    int threads;
    int64_t cols_per_cta;
    size_t smem_bytes;  // dynamic shared memory per block
};

// Plan for rows of v columns on `device`. force_path: kPathAuto, kPathStream or kPathSmem;
// force_cluster: 0 = choose, else the cluster size for kPathSmem (1, 2, 4 or 8).
KdPlan kd_fwd_plan(int64_t v, int dtype, int div, int device, int force_path, int force_cluster);

// Launch on `stream` (asynchronous; never synchronises).
void kd_fwd(const KdFwdArgs& args, const KdPlan& plan, cudaStream_t stream);

// grad[n, :v] *= scale (scale[n] when per_row, else scale[0]); rows whose factor is
// exactly 1 are left untouched.
void scale_rows(void* grad, const float* scale, bool per_row, int64_t n_rows, int64_t v,
                int64_t stride_g, int dtype, cudaStream_t stream);

// Per row of x[n, :v]: the k <= kTopkMaxK largest entries, sorted descending, ties by
// lower index; values[n, k] (x's dtype) and indices[n, k] (int64), both contiguous.
constexpr int kTopkMaxK = 256;
void topk_select(const void* x, int64_t stride_x, int64_t n_rows, int64_t v, int k, int dtype,
                 void* values, int64_t* indices, cudaStream_t stream);

}  // namespace kdk
