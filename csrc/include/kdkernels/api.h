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
    kDkd = 8,
    kNkd = 9,
    kCosine = 10,
};
constexpr int kNumDivs = 11;

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
    // (the two fields below come last: the kernel's registers are tight, and moving the
    // fields above changes which constant loads pair up)
    float inv_temp_t;      // the teacher's 1/τ_t (= inv_temp unless teacher_temperature)
    int64_t parts_stride;  // > 0: loss[n + parts_stride], loss[n + 2·parts_stride] get the
                           // row's soft_w·D and hard_w·CE (return_components); 0: none
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

// One pld_fwd call (plackett_luce_loss, docs/spec.md §3). Rows: s[n, :v] and t[n, :v] (one
// dtype), rank[n, :k] (int64): the first k classes of the row's PLD order, thr[n] (int64,
// contiguous): the last class of rank[n] that is there by teacher order (not as the label),
// -1 if none; labels[n] (int32/int64, optional); loss[n] float32; grad[n, :v] (s's dtype,
// written when compute_grad; may alias s); scale: one float32 on the device. scratch:
// 3·k float32 per row (row stride stride_x) when k > kPldSmemK, else unused (null).
struct PldFwdArgs {
    const void* s;
    const void* t;
    const int64_t* rank;
    const int64_t* thr;
    const void* labels;
    const float* scale;
    float* loss;
    void* grad;
    float* scratch;
    int64_t n_rows;
    int64_t v;
    int64_t k;
    int64_t stride_s;
    int64_t stride_t;
    int64_t stride_g;
    int64_t stride_r;
    int64_t stride_l;
    int64_t stride_x;
    int64_t ignore_index;
    float inv_temp;
    int dtype;
    bool has_labels;
    bool labels_i64;
    bool compute_grad;
};

// Ranked positions whose per-position scratch (3 floats) a block keeps in shared memory;
// longer rankings use the global scratch of PldFwdArgs.
constexpr int64_t kPldSmemK = 4096;

// Launch on `stream` (asynchronous); `device` is the current device (shared-memory limit).
void pld_fwd(const PldFwdArgs& args, int device, cudaStream_t stream);

// One topk_kd_fwd call (topk_kd_loss, docs/spec.md §5). Rows: s[n, :v] (student logits),
// idx[n, :k] (int64, -1 = padding), vals[n, :k] (float32: teacher logits or log-probs),
// labels[n] (int32/int64, optional: only to ignore rows); loss[n] float32; grad[n, :v]
// (s's dtype, written when compute_grad; may alias s). div: kFwdKL, kRevKL or kJsd
// (0 < beta < 1, log_beta = log β, log_1mbeta = log(1 − β)).
struct TopkKdArgs {
    const void* s;
    const int64_t* idx;
    const float* vals;
    const void* labels;
    const float* scale;
    float* loss;
    void* grad;
    int64_t n_rows;
    int64_t v;
    int64_t k;
    int64_t stride_s;
    int64_t stride_i;
    int64_t stride_u;
    int64_t stride_g;
    int64_t stride_l;
    int64_t ignore_index;
    float inv_temp;
    float beta;
    float log_beta;
    float log_1mbeta;
    int dtype;
    int div;
    bool has_labels;
    bool labels_i64;
    bool logprobs;
    bool bucket;
    bool compute_grad;
};

// How topk_kd_fwd processes a row: path kSmem keeps the student row in shared memory
// (bucket mode, which reads the row twice), kStream reads it from global memory;
// bitmap_words: the selected-class bitmap (32 columns per word; a row longer than
// 32·bitmap_words columns is processed in windows); entries: the entry tile (all k when
// k <= entries, else tiles re-read per pass); smem_bytes: dynamic shared memory.
struct TopkKdPlan {
    int path;
    int threads;
    int bitmap_words;
    int entries;
    size_t smem_bytes;
};

// Plan for rows of v columns and k entries; force_path: kAuto, kStream or kSmem.
TopkKdPlan topk_kd_plan(int64_t v, int64_t k, int dtype, bool bucket, int device, int force_path);

// Launch on `stream` (asynchronous; never synchronises).
void topk_kd_fwd(const TopkKdArgs& args, const TopkKdPlan& plan, cudaStream_t stream);

// Vocabulary-parallel kd_loss (docs/vocab_parallel.md; kd_parallel.cuh): the local work of
// one phase of kdkernels/kd/parallel.py on this rank's columns. Rows: s[n, :width] and
// t[n, :width] (one dtype: `dtype`, or float64 when is_double; t unused for kZero),
// labels[n] (int32/int64, optional). The per-row buffers are contiguous, of the compute
// type C (float64 when is_double, else float32): kd_vp_stats writes stats[n, 8] and
// piv[n] (int32); kd_vp_partials reads norm[n, 9] and flags[n] (int32) and writes
// part[n, 4]; kd_vp_grad reads them and scale (one C on the device) and writes
// grad[n, :width] (s's dtype; may alias s, as the fused losses' chunk buffer: each
// element is read before it is written; not t).
struct KdVpArgs {
    const void* s;
    const void* t;
    const void* labels;
    void* stats;
    int* piv;
    const void* norm;
    const int* flags;
    void* part;
    const void* scale;
    void* grad;
    int64_t n_rows;
    int64_t width;  // this rank's columns, stop − start
    int64_t start;  // the global class of local column 0
    int64_t stride_s;
    int64_t stride_t;
    int64_t stride_g;
    int64_t stride_l;
    int64_t ignore_index;
    double inv_temp;
    double inv_temp_t;  // the teacher's 1/τ_t (= inv_temp unless teacher_temperature)
    double w;  // beta (jsd), alpha (skew), taid_t (taid)
    double log_w;
    double log_1mw;
    double soft_w;
    double hard_w;
    int dtype;  // DType of s and t (ignored when is_double)
    int div;    // Div
    bool is_double;
    bool has_labels;
    bool labels_i64;
    bool hard;   // hard_w != 0 (needs labels)
    bool use_x;  // hard and inv_temp != 1: the untempered student's normaliser too
};

// Launch on `stream` (asynchronous; never synchronises).
void kd_vp_stats(const KdVpArgs& args, cudaStream_t stream);
void kd_vp_partials(const KdVpArgs& args, cudaStream_t stream);
void kd_vp_grad(const KdVpArgs& args, cudaStream_t stream);

// Vocabulary-parallel topk_kd_loss (topk_kd_parallel.cuh): rows s[n, :width] (`dtype`, or
// float64 when is_double), idx[n, :k] int64 global class ids (−1 = padding), labels[n]
// (optional, only to skip ignored rows). topk_vp_gather writes sel[n, :k] (float64, row
// stride stride_o: the student's raw logits at the owned indices, 0 elsewhere) and, for
// bucket, tstat[n, 3] (C: tail max, NaN/+inf flag, Σ e^{a − max}). topk_vp_grad reads
// mode[n] (int32: 0 gradient, 1 NaN, 2 zero), r[n, :k (+1)] (C, row stride stride_r),
// tail[n, 2] (C: the tail's max and log Σ; bucket) and writes grad[n, :width] (s's dtype;
// may alias s: each element is read before it is written).
struct TopkVpArgs {
    const void* s;
    const int64_t* idx;
    const void* labels;
    double* sel;
    void* tstat;
    const void* r;
    const void* tail;
    const int* mode;
    void* grad;
    int64_t n_rows;
    int64_t width;
    int64_t k;
    int64_t start;
    int64_t stride_s;
    int64_t stride_i;
    int64_t stride_o;
    int64_t stride_r;
    int64_t stride_g;
    int64_t stride_l;
    int64_t ignore_index;
    double inv_temp;
    int dtype;
    bool is_double;
    bool has_labels;
    bool labels_i64;
    bool bucket;
};

void topk_vp_gather(const TopkVpArgs& args, cudaStream_t stream);
void topk_vp_grad(const TopkVpArgs& args, cudaStream_t stream);

// Per row of x[n, :v]: the k <= kTopkMaxK largest entries, sorted descending, ties by
// lower index; values[n, k] (x's dtype) and indices[n, k] (int64), both contiguous.
constexpr int kTopkMaxK = 256;
void topk_select(const void* x, int64_t stride_x, int64_t n_rows, int64_t v, int k, int dtype,
                 void* values, int64_t* indices, cudaStream_t stream);

// The log-domain Sinkhorn solver (`sinkhorn`, docs/spec.md §4; sinkhorn.cuh). Every buffer
// is contiguous and of one float dtype (double when is_double, else float): cost
// [m, b1, b2], log_a [m, b1], log_b [m, b2]; rh [n_slots, 2, m, b1] and lh [n_slots, 2, m,
// b2] the per-iteration (shift, log-sum) pairs; iters: one int32 on the device, n_iters on
// entry, the iterations run on exit. Forward: f [m, b1], g [m, b2]; part (use_tol) the
// error partials: [segment, m] (fused) or [m, ceil(b1 / 8)] (tiled). Backward: grad_f,
// grad_g (or null), cbar / labar / lbbar zero-initialised outputs; tiled: fb [m, b1] and
// gb [m, b2] hold the upstream gradients (zeros when absent) and are overwritten.
struct SinkhornArgs {
    const void* cost;
    const void* log_a;
    const void* log_b;
    void* rh;
    void* lh;
    void* f;
    void* g;
    void* part;
    int* iters;
    const void* grad_f;
    const void* grad_g;
    void* fb;
    void* gb;
    void* cbar;
    void* labar;
    void* lbbar;
    int64_t m;
    int64_t b1;
    int64_t b2;
    int64_t n_iters;
    int64_t n_slots;
    double epsilon;
    double tol;
    bool is_double;
    bool use_tol;
    bool history;
    bool fused;
};

// Iterations per fused launch when tol is given (a check launch after each).
constexpr int kSinkhornSegment = 16;

// fused: one block per problem holds C/ε and the potentials in shared memory (smem_bytes
// of dynamic shared memory), else the tiled path (two launches per iteration).
struct SinkhornPlan {
    bool fused;
    size_t smem_bytes;
};
SinkhornPlan sinkhorn_plan(int64_t b1, int64_t b2, bool is_double, int device);

// History slots the forward needs (0: none kept); the buffers hold max(slots, 1).
int64_t sinkhorn_slots(int64_t n_iters, bool use_tol, bool history, bool fused);

// Launch on `stream` (asynchronous; never synchronises).
void sinkhorn_fwd(const SinkhornArgs& args, int device, cudaStream_t stream);
void sinkhorn_bwd(const SinkhornArgs& args, int device, cudaStream_t stream);

// graph_on_logits_loss / topk_logit_graph (docs/spec.md §5; graph.cuh). Rows z [n, :v]
// (row stride stride_z, unit column stride, dtype code `dtype`), valid [n] bool or null.
// Row stage: top_idx [n, k] int64 (topk_select's output, contiguous) -> a [n, k] float32,
// idx [n, k] int32, m [n], lse [n] float32 (all contiguous).
void graph_rows(const void* z, int64_t stride_z, const bool* valid, const int64_t* top_idx,
                int64_t n_rows, int64_t v, int k, float inv_temp, int dtype, float* a, int* idx,
                float* m, float* lse, cudaStream_t stream);

// Group stage on `groups` groups of t_len positions, both models (2·groups group-sides),
// p = t_len·k entries each: key [2G, p] int32 classes sorted ascending and perm [2G, p]
// int64 their entry numbers; a [2G·p], m [2G·t_len] float32; du [2G, p] int64 (−1 on
// entry), nu, bad [2G] int32 (0 on entry); uent [G·p] int32 or null.
void graph_runs(const int* key, const int64_t* perm, const float* a, const float* m,
                int64_t* du, int* nu, int* bad, int* uent, int64_t groups, int64_t t_len,
                int k, double fix_scale, cudaStream_t stream);

// sorted [2G, p] int64 strengths sorted descending and order [2G, p] their slots; cost [G]
// float64; gu [G·p] float32 or null (no gradient).
void graph_gw(const int64_t* sorted, const int64_t* order, const int* nu, const int* bad,
              double* cost, float* gu, int64_t groups, int64_t p, double unfix,
              cudaStream_t stream);

// loss, inv: one float32 each.
void graph_finish(const double* cost, const int* nu, float* loss, float* inv, int64_t groups,
                  cudaStream_t stream);

// Backward rows: grad [n, :v] (row stride stride_g, z's dtype) of Σ ā·a, ā = abar [n, k]
// float32 or (abar null) from gu at slots uent (groups of t_len rows, p = t_len·k);
// times scale[0]·inv[0] when scale is not null.
void graph_rows_bwd(const void* z, int64_t stride_z, const bool* valid, const float* a,
                    const int* idx, const float* m, const float* lse, const float* abar,
                    const int* uent, const float* gu, const float* scale, const float* inv,
                    void* grad, int64_t stride_g, int64_t n_rows, int64_t v, int k, int64_t t_len,
                    float inv_temp, int dtype, cudaStream_t stream);

}  // namespace kdk
