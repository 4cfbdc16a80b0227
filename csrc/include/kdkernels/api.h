// Host API of the kdkernels CUDA launchers: raw pointers, sizes, strides (in elements)
// and the caller's stream. Shared by the launchers (*.cu) and bindings.cpp; no device
// code and no framework headers. Launchers validate what the kernels rely on and throw
// std::invalid_argument (bad arguments) or std::runtime_error (CUDA errors).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace kdk {

// The integer codes below mirror kdkernels/_core/codes.py (same names without the k,
// same values); tests/test_codes.py fails when the two drift apart.

// Element types of the kernels (codes.DType).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Divergences of the softmax-KL family (codes.Div).
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

// Per-entry cost of the Sinkhorn loss (codes.Cost) and top-k KD tail modes (codes.Tail).
enum Cost : int { kL1 = 0, kSqEuclidean = 1 };
enum Tail : int { kRenormalize = 0, kBucket = 1 };

// How the kd kernel processes a row (codes.KdPath).
enum KdPath : int { kAuto = -1, kStream = 0, kSmem = 1 };

// How one row is processed: kStream = one block streams the row from global memory
// (two or three passes); kSmem = `cluster` blocks (a thread-block cluster when > 1)
// hold the row in shared memory, cols_per_cta columns each, and read it from HBM once.
struct KdPlan {
    int path;
    int cluster;
    int threads;
    int64_t cols_per_cta;
    size_t smem_bytes;  // dynamic shared memory per block
};

// Plan for rows of v columns on `device`. force_path: kAuto, kStream or kSmem;
// force_cluster: 0 = choose, else the cluster size for kSmem (1, 2, 4 or 8).
KdPlan kd_fwd_plan(int64_t v, int dtype, int div, int device, int force_path, int force_cluster);

// Launch on `stream` (asynchronous; never synchronises).
void kd_fwd(const KdFwdArgs& args, const KdPlan& plan, cudaStream_t stream);

// grad[n, :v] *= scale (scale[n] when per_row, else scale[0]); rows whose factor is
// exactly 1 are left untouched.
void scale_rows(void* grad, const float* scale, bool per_row, int64_t n_rows, int64_t v,
                int64_t stride_g, int dtype, cudaStream_t stream);

// Fused linear loss, element-wise on rows of v columns (strides in elements):
// out[n, j] = cap·tanh(u[n, j]) (out may alias u), and
// g[n, j] *= (k·sech²(u[n, j]) when u) · (row_scale[n] when row_scale), in place.
void softcap_fwd(const void* u, void* out, int64_t n_rows, int64_t v, int64_t stride_u,
                 int64_t stride_o, float cap, int dtype, cudaStream_t stream);
void softcap_bwd(void* g, const void* u, const float* row_scale, int64_t n_rows, int64_t v,
                 int64_t stride_g, int64_t stride_u, float k, int dtype, cudaStream_t stream);

// Per row of x[n, :v]: the k <= kTopkMaxK largest entries, sorted descending, ties by
// lower index; values[n, k] (x's dtype) and indices[n, k] (int64), both contiguous.
constexpr int kTopkMaxK = 256;
void topk_select(const void* x, int64_t stride_x, int64_t n_rows, int64_t v, int k, int dtype,
                 void* values, int64_t* indices, cudaStream_t stream);

}  // namespace kdk
