// The kd_loss kernel (docs/spec.md §1): per-row loss and, in the same launch, the gradient
// w.r.t. the student logits. Same algorithm and contract as kdkernels/kd/triton.py.
//
// Notation: a = s/τ, b = t/τ_t (τ_t = τ unless a teacher temperature is given),
// q = softmax(a), p = softmax(b), M_a = max a at the pivot
// column j* (lowest column among ties), Z' = Σ_{v≠j*} e^{a_v − M_a}, lse_a = M_a + log1p(Z').
// Per row:
//   stage 1  log-sum-exp statistics: PivotMax of a, SumExp of b (of the TAID mix
//            c = (1−λ)a + λb for TAID), SumExp of the untempered s when a tempered run has
//            a hard-label term. Forward KL and TAID also accumulate
//            KL(p‖q) = Σ p(b − a) − lse_b + lse_a,  Σ p(b − a) = Σ e^{b−M_b}(b − a) / Z_b.
//   stage 2  (reverse KL, jsd, skew KL, tvd) D = Σ d_v, G' = Σ_{v≠j*} q_v g_v and g_{j*}
//            (divergence.cuh) with the final normalisers; ḡ = q_{j*} g_{j*} + G'.
//   stage 3  the gradient, written once in the input dtype:
//            ∂L/∂s_j = scale·[soft_w/τ·∂D/∂a_j + hard_w·(softmax(s)_j − [j = y])],
//            ∂D/∂a_j = q_j (g_j − ḡ); forward KL: q − p; TAID: q − r. The pivot's entry
//            is written last as minus the sum of the others (the row sums to 0), so
//            no 1 − 1 cancels there when q, p or softmax(s) is one-hot.
//   loss     L = soft_w·max(D, 0) + hard_w·(lse(s) − s_y); 0 and a zero gradient at
//            ignored rows; NaN (loss and gradient row) for a row with a NaN or +inf
//            logit, or without any finite one.
//
// Where the columns live (KdPlan, chosen on the host):
//   stream   one block per row reads the row from global memory in every stage
//            (2 passes, 3 for the stage-2 divergences), like the Triton kernel.
//   smem     the row's student and teacher logits are copied once into shared memory
//            (cp.async), split over `csize` blocks of a thread-block cluster (sm_90), each
//            holding cols_per_cta columns; the stages read shared memory, each block's
//            partial statistics are combined across the cluster through distributed
//            shared memory (every block merges all ranks' partials in rank order, so all
//            blocks hold bit-identical totals), and each block writes its slice of the
//            gradient once. HBM traffic: each logit read once, each gradient written once.
#pragma once

#include <cuda_pipeline.h>

#include "common.cuh"
#include "divergence.cuh"
#include "online_softmax.cuh"
#include "reduce.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#define KDK_HAS_CLUSTERS 1
#else
#define KDK_HAS_CLUSTERS 0
#endif

namespace kdk {

// Threads per block of the kd kernels, and the blocks per SM the register budget is sized
// for (65536 / (256·3) = 85 registers per thread): on the smem path three blocks of at
// most 64 KiB shared memory each share an SM, so one block loads while others compute.
constexpr int kKdThreads = 256;
constexpr int kKdMinBlocks = 3;

// Stage-1 state of one row (or of the columns one thread has seen).
struct RowStats {
    PivotMax a;  // student a = s/τ, with its pivot
    SumExp b;    // teacher b = t/τ (TAID: the mix c); .a accumulates the forward-KL sum
    SumExp x;    // untempered student s (hard-label CE when τ != 1)
    int nf;      // NaN / +inf logits seen: the row has no softmax (its loss is NaN)

    __device__ __forceinline__ static RowStats identity() {
        return {PivotMax::identity(), SumExp::identity(), SumExp::identity(), 0};
    }
};
__device__ __forceinline__ RowStats shfl_xor(const RowStats& s, int o) {
    return {shfl_xor(s.a, o), shfl_xor(s.b, o), shfl_xor(s.x, o), shfl_xor(s.nf, o)};
}
struct MergeRowStats {
    __device__ __forceinline__ RowStats operator()(const RowStats& x, const RowStats& y) const {
        return {merge(x.a, y.a), merge(x.b, y.b), merge(x.x, y.x), x.nf + y.nf};
    }
};
struct AddFloat {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// NaN or +inf (a -inf logit is a mask, not an error).
__device__ __forceinline__ int nonfinite(float x) { return (x != x) || (x == KDK_INF); }

// Combine one block-reduced state per cluster rank (csize > 1, sm_90 only). Every block
// reads all ranks' `part` through DSMEM in rank order, so all blocks get the same total.
// `part` must stay untouched until the kernel's final cluster barrier (peers read it).
template <typename S, typename Merge>
__device__ __forceinline__ S cluster_combine(const S& mine, Merge mrg, S* part, S* total,
                                             int csize) {
#if KDK_HAS_CLUSTERS
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) *part = mine;
    cluster.sync();
    if (threadIdx.x == 0) {
        S acc = *cluster.map_shared_rank(part, 0);
        for (int r = 1; r < csize; ++r) acc = mrg(acc, *cluster.map_shared_rank(part, r));
        *total = acc;
    }
    __syncthreads();
    return *total;
#else
    (void)mrg;
    (void)part;
    (void)total;
    (void)csize;
    __trap();  // the host never launches clusters for code built below sm_90
    return mine;
#endif
}

__device__ __forceinline__ void cluster_barrier() {
#if KDK_HAS_CLUSTERS
    cooperative_groups::this_cluster().sync();
#else
    __trap();
#endif
}

// Start asynchronous copies of n elements src (global) -> dst (shared, 16-byte aligned);
// 16-byte cp.async when src is 16-byte aligned, element copies for the rest.
template <typename T>
__device__ __forceinline__ void copy_to_smem(T* dst, const T* src, int n) {
    constexpr int V = Vec<T>::N;
    const int nvec = aligned16(src) ? n / V : 0;
    for (int k = threadIdx.x; k < nvec; k += blockDim.x) {
        __pipeline_memcpy_async(dst + static_cast<int64_t>(k) * V,
                                src + static_cast<int64_t>(k) * V, 16);
    }
    for (int i = nvec * V + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) dst[i] = src[i];
}

// grid.x = rows·csize (blocks of one row adjacent: a cluster), block = plan.threads
// (a multiple of 32, at most kKdThreads).
// csize > 1 only with a cluster launch of (csize, 1, 1) on sm_90. cpc: columns per block
// (a multiple of 8; the stream path passes cpc >= v and csize = 1). use_smem: copy the
// block's columns to dynamic shared memory (2·cpc elements, cpc without a teacher).
template <int DIV, typename T>
__global__ void __launch_bounds__(kKdThreads, kKdMinBlocks)
    kd_fwd_kernel(KdFwdArgs p, int64_t row0, int csize, int cpc, int use_smem) {
    constexpr bool NEED_T = DIV != kZero;
    constexpr bool ONLINE = DIV == kZero || DIV == kFwdKL || DIV == kTaid;
    constexpr bool NEED_B = NEED_T && DIV != kTaid;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ RowStats red_stats[kWarp];
    __shared__ Sum3 red_sum3[kWarp];
    __shared__ float red_rest[kWarp];
    __shared__ RowStats part1, total1;
    __shared__ Sum3 part2, total2;
    __shared__ float part3, total3;

    const int64_t row = row0 + blockIdx.x / csize;
    const int rank = static_cast<int>(blockIdx.x % csize);
    const int v = static_cast<int>(p.v);
    const int c0 = static_cast<int>(min(static_cast<int64_t>(rank) * cpc, p.v));
    const int n = min(cpc, v - c0);  // this block's columns: [c0, c0 + n)
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = NEED_T ? static_cast<const T*>(p.t) + row * p.stride_t : nullptr;
    T* g_row = p.compute_grad ? static_cast<T*>(p.grad) + row * p.stride_g : nullptr;

    int64_t y = 0;
    if (p.has_labels) {
        y = p.labels_i64 ? static_cast<const int64_t*>(p.labels)[row * p.stride_l]
                         : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[row * p.stride_l]);
        if (y == p.ignore_index) {  // the same for every block of the row: no barrier skipped
            if (rank == 0 && threadIdx.x == 0) {
                float* out = p.loss + row;
                out[0] = 0.0f;
                if (p.parts_stride > 0) out[p.parts_stride] = out[2 * p.parts_stride] = 0.0f;
            }
            if (p.compute_grad) {
                zero_cols(g_row, c0, c0 + n, 0, 1);
                zero_cols(g_row, p.v, p.v_g, rank, csize);
            }
            return;
        }
    }
    // s_y for the hard-label term, read before any block writes the gradient (grad may
    // alias s). An out-of-range label (only CPU labels are range-checked) gives NaN.
    float x_y = 0.0f;
    if (p.hard && rank == 0 && threadIdx.x == 0) {
        x_y = (y >= 0 && y < p.v) ? to_float(s_row[y]) : __int_as_float(0x7fffffff);
    }

    const T* src_s = s_row + c0;
    const T* src_t = NEED_T ? t_row + c0 : nullptr;
    bool vec = aligned16(src_s) && (!NEED_T || aligned16(src_t));
    if (use_smem) {
        T* sm_s = reinterpret_cast<T*>(smem);
        T* sm_t = sm_s + cpc;  // cpc·sizeof(T) is a multiple of 16
        copy_to_smem(sm_s, src_s, n);
        if constexpr (NEED_T) copy_to_smem(sm_t, src_t, n);
        __pipeline_commit();
        __pipeline_wait_prior(0);
        __syncthreads();
        src_s = sm_s;
        src_t = NEED_T ? sm_t : nullptr;
        vec = true;
    }

    // ---- stage 1: log-sum-exp statistics
    const float inv_temp = p.inv_temp;
    const float inv_temp_t = p.inv_temp_t;  // the teacher's 1/τ_t
    const float w = p.w;
    const bool sep_ce = p.hard && p.tempered;
    RowStats st = RowStats::identity();
    for_each_col<T, NEED_T>(src_s, src_t, n, vec, [&](int i, float xs, float xt) {
        const float a = xs * inv_temp;
        st.nf += nonfinite(xs) + (NEED_T ? nonfinite(xt) : 0);
        st.a.update(a, c0 + i);
        if constexpr (NEED_B) {
            const float b = xt * inv_temp_t;
            st.b.update(b, DIV == kFwdKL ? b - a : 0.0f);
        }
        if constexpr (DIV == kTaid) {
            const float c = (1.0f - w) * a + w * (xt * inv_temp_t);
            st.b.update(c, c - a);
        }
        if (sep_ce) st.x.update(xs, 0.0f);
    });
    st = block_reduce(st, RowStats::identity(), MergeRowStats{}, red_stats);
    if (csize > 1) st = cluster_combine(st, MergeRowStats{}, &part1, &total1, csize);

    // no softmax: a NaN or +inf logit, or every entry -inf (student, teacher or mix)
    const bool bad = st.nf > 0 || st.a.m == KDK_NEG_INF || (NEED_T && st.b.m == KDK_NEG_INF);
    const float nan = __int_as_float(0x7fffffff);
    const float m_a = safe_max(st.a.m);
    const float zp = st.a.z;
    const int piv = st.a.p;
    const float m_b = safe_max(st.b.m);
    const float z_b = st.b.z;
    const float c_a = log1pf(zp);  // lse_a = m_a + c_a
    const float c_b = logf(z_b);   // lse_b = m_b + c_b (TAID: of the mix)
    const float m_x = sep_ce ? safe_max(st.x.m) : m_a;
    const float c_x = sep_ce ? logf(st.x.z) : c_a;
    const float q_piv = 1.0f / (1.0f + zp);

    float d_row = 0.0f;
    if constexpr (DIV == kFwdKL || DIV == kTaid) d_row = (st.b.a / z_b - m_b + m_a) - c_b + c_a;

    // ---- stage 2: divergences that need the normalised distributions
    float g_bar = 0.0f;
    if constexpr (!ONLINE) {
        // (D, G', g_{j*}); tvd: (D without the pivot, G', Σ_{v≠j*} p_v)
        Sum3 acc = {0.0f, 0.0f, 0.0f};
        for_each_col<T, true>(src_s, src_t, n, vec, [&](int i, float xs, float xt) {
            const float la = xs * inv_temp - m_a;
            const float lb = xt * inv_temp_t - m_b;
            const float logq = la - c_a;
            const Terms e = pair_terms<DIV>(logq, lb - c_b, la - lb, w, p.log_w, p.log_1mw);
            if (c0 + i == piv) {
                if constexpr (DIV != kTvd) {
                    acc.x += e.d;
                    acc.z += e.g;
                }
            } else {
                acc.x += e.d;
                acc.y += expf(logq) * e.g;
                if constexpr (DIV == kTvd) acc.z += expf(lb - c_b);
            }
        });
        acc = block_reduce(acc, Sum3{0.0f, 0.0f, 0.0f}, AddSum3{}, red_sum3);
        if (csize > 1) acc = cluster_combine(acc, AddSum3{}, &part2, &total2, csize);
        d_row = acc.x;
        float g_piv = acc.z;
        if constexpr (DIV == kTvd) {
            // the pivot's p − q as Σ_{v≠j*} q − Σ_{v≠j*} p (both peak at j*: 1 − 1)
            const float diff = zp * q_piv - acc.z;
            d_row += 0.5f * fabsf(diff);
            g_piv = diff > 0.0f ? -0.5f : (diff < 0.0f ? 0.5f : 0.0f);
        }
        g_bar = q_piv * g_piv + acc.y;
    }

    if (rank == 0 && threadIdx.x == 0) {
        // every divergence is >= 0: rounding may not make it negative (NaN stays NaN)
        const float soft = p.soft_w * (d_row < 0.0f ? 0.0f : d_row);
        const float hard = p.hard ? p.hard_w * (c_x - (x_y - m_x)) : 0.0f;
        // the loss and (return_components) its two addends, addressed from one pointer:
        // a separate parts pointer costs the bf16 jsd kernel a spilled register on sm_90a
        float* out = p.loss + row;
        out[0] = bad ? nan : (p.hard ? soft + hard : soft);
        if (p.parts_stride > 0) {
            out[p.parts_stride] = bad ? nan : soft;
            out[2 * p.parts_stride] = bad ? nan : hard;
        }
    }

    // ---- stage 3: the gradient w.r.t. the student logits
    if (p.compute_grad) {
        const float sc = *p.scale;
        const float c_soft = p.soft_w * inv_temp * sc;
        const float c_hard = p.hard_w * sc;
        const bool hard = p.hard;
        // Every term of the gradient sums to 0 over the row (softmax Jacobians), so the
        // pivot's entry, where q (and p, softmax(s)) may round to 1 and q − p or
        // softmax_y − 1 to 1 − 1, is rewritten at the end as minus the sum of the others.
        float rest = 0.0f;
        T* out = g_row + c0;
        map_cols<T, NEED_T>(src_s, src_t, out, n, vec && aligned16(out),
                            [&](int i, float xs, float xt) -> float {
            const int j = c0 + i;
            const float la = xs * inv_temp - m_a;
            const float logq = la - c_a;
            const float q = expf(logq);
            float g = 0.0f;
            if constexpr (DIV == kFwdKL) {
                g = q - expf((xt * inv_temp_t - m_b) - c_b);
            } else if constexpr (DIV == kTaid) {
                const float c = (1.0f - w) * (xs * inv_temp) + w * (xt * inv_temp_t);
                g = q - expf((c - m_b) - c_b);
            } else if constexpr (!ONLINE) {
                const float lb = xt * inv_temp_t - m_b;
                const Terms e = pair_terms<DIV>(logq, lb - c_b, la - lb, w, p.log_w, p.log_1mw);
                g = q * (e.g - g_bar);
            }
            g *= c_soft;
            if (hard) {
                const float sm = expf((xs - m_x) - c_x);
                g += c_hard * ((j == y) ? sm - 1.0f : sm);
            }
            if (j != piv) rest += g;
            return bad ? nan : g;
        });
        rest = block_reduce(rest, 0.0f, AddFloat{}, red_rest);
        if (csize > 1) rest = cluster_combine(rest, AddFloat{}, &part3, &total3, csize);
        // the barrier inside the reductions orders this store after map_cols' store of it
        if (threadIdx.x == 0 && piv >= c0 && piv < c0 + n) g_row[piv] = from_float<T>(bad ? nan : -rest);
        zero_cols(g_row, p.v, p.v_g, rank, csize);
    }
    // Peers may still read this block's part1/part2: leave together.
    if (csize > 1) cluster_barrier();
}

// grad[row, :v] *= scale (scale[row] when per_row), skipped when the factor is exactly 1.
// grid = (rows, column blocks).
template <typename T>
__global__ void __launch_bounds__(256)
    scale_rows_kernel(T* grad, const float* scale, int per_row, int64_t row0, int64_t stride_g,
                      int v) {
    const int64_t row = row0 + blockIdx.x;
    const float sc = per_row ? scale[row] : scale[0];
    if (sc == 1.0f) return;
    constexpr int V = Vec<T>::N;
    T* r = grad + row * stride_g;
    const int nvec = aligned16(r) ? v / V : 0;
    const int step = gridDim.y * blockDim.x;
    const int first = blockIdx.y * blockDim.x + threadIdx.x;
    for (int k = first; k < nvec; k += step) {
        float x[V];
        load_vec(r + static_cast<int64_t>(k) * V, x);
#pragma unroll
        for (int u = 0; u < V; ++u) x[u] *= sc;
        store_vec(r + static_cast<int64_t>(k) * V, x);
    }
    for (int i = nvec * V + first; i < v; i += step) r[i] = from_float<T>(to_float(r[i]) * sc);
}

}  // namespace kdk
