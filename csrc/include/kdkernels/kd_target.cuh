// The kd_loss kernels of dkd, nkd (a row split at its label y) and cosine: the same launch
// contract, plans (stream / smem / cluster) and helpers as kd.cuh's kd_fwd_kernel, which
// kd.cu's with_kernel picks by divergence code. The math mirrors kdkernels/kd/decoupled.py
// and kdkernels/kd/cosine.py (the torch paths, where it is derived) and their Triton
// kernels (kdkernels/kd/decoupled_triton.py, cosine_triton.py):
//
// dkd / nkd. Stage 1 reads the non-target classes N = {v ≠ y} (column y reads as −inf):
//   a = s/τ's PivotMax (the non-target pivot k*), b = t/τ's SumExp whose sum A is the
//   NCKD term: dkd Σ e^{b−M_b}(b − a); nkd Σ e^{b−M_b}(M_a − a), shifted by (M_a' − M_a)·Z_b
//   whenever the student's max moves (every increment ≥ 0: no cancellation); where τ ≠ 1
//   the untempered s and t too. With column y (read once, before any block writes the
//   gradient, which may alias s): z = (d_y − M) − L, L = log Σ_N e^{d − M}, the binary
//   logits of p_y; TCKD, Δ = q_y − p_y and 1 − softmax(s)_y come from sigmoids and
//   softplus of z, never from 1 − p_y. Stage 3 writes the gradient, the pivot k* last.
// cosine. Stage 1: each row's norm as (m, z), m = max |entry|, z = Σ (entry/m)² (no
//   overflow at any finite logit); stage 2: D = ½‖b̂ − â‖²; stage 3: −(δ + D·â)/‖a‖.
#pragma once

#include "kd.cuh"

namespace kdk {

__device__ __forceinline__ float sigmoidf_(float x) {
    const float e = expf(-fabsf(x));
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

__device__ __forceinline__ float softplusf_(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

// log z, −inf for z = 0.
__device__ __forceinline__ float log_or_ninf(float z) { return z > 0.0f ? logf(z) : KDK_NEG_INF; }

// Stage-1 state of dkd / nkd over the non-target columns.
struct DecStats {
    PivotMax a;  // student a = s/τ, with the non-target pivot
    SumExp b;    // teacher b = t/τ; .a: the NCKD sum
    SumExp x;    // untempered student (sep_x)
    SumExp u;    // untempered teacher (nkd, τ ≠ 1)
    int nf;      // NaN / +inf logits seen (every column)

    __device__ __forceinline__ static DecStats identity() {
        return {PivotMax::identity(), SumExp::identity(), SumExp::identity(),
                SumExp::identity(), 0};
    }
};
__device__ __forceinline__ DecStats shfl_xor(const DecStats& s, int o) {
    return {shfl_xor(s.a, o), shfl_xor(s.b, o), shfl_xor(s.x, o), shfl_xor(s.u, o),
            shfl_xor(s.nf, o)};
}

// nkd: the sum Σ e^{b−M_b}(M_a − a) of a state whose student max was m_old, relative to
// m_new >= m_old (+inf when earlier teacher mass met only masked students).
__device__ __forceinline__ void shift_to(SumExp& b, float m_old, float m_new) {
    if (m_new > m_old && b.z > 0.0f) b.a += (m_old == KDK_NEG_INF) ? KDK_INF : (m_new - m_old) * b.z;
}

template <int DIV>
struct MergeDecStats {
    __device__ __forceinline__ DecStats operator()(const DecStats& x, const DecStats& y) const {
        const PivotMax a = merge(x.a, y.a);
        SumExp bx = x.b, by = y.b;
        if constexpr (DIV == kNkd) {
            shift_to(bx, x.a.m, a.m);
            shift_to(by, y.a.m, a.m);
        }
        return {a, merge(bx, by), merge(x.x, y.x), merge(x.u, y.u), x.nf + y.nf};
    }
};

// grid and arguments as kd_fwd_kernel (kd.cuh).
template <int DIV, typename T>
__global__ void __launch_bounds__(kKdThreads, kKdMinBlocks)
    kd_fwd_kernel_decoupled(KdFwdArgs p, int64_t row0, int csize, int cpc, int use_smem) {
    static_assert(DIV == kDkd || DIV == kNkd, "dkd and nkd");
    constexpr bool NKD = DIV == kNkd;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ DecStats red_stats[kWarp];
    __shared__ float red_rest[kWarp];
    __shared__ DecStats part1, total1;
    __shared__ float part3, total3;

    const int64_t row = row0 + blockIdx.x / csize;
    const int rank = static_cast<int>(blockIdx.x % csize);
    const int v = static_cast<int>(p.v);
    const int c0 = static_cast<int>(min(static_cast<int64_t>(rank) * cpc, p.v));
    const int n = min(cpc, v - c0);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = static_cast<const T*>(p.t) + row * p.stride_t;
    T* g_row = p.compute_grad ? static_cast<T*>(p.grad) + row * p.stride_g : nullptr;

    const int64_t y = p.labels_i64 ? static_cast<const int64_t*>(p.labels)[row * p.stride_l]
                                   : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[row * p.stride_l]);
    if (y == p.ignore_index) {
        if (rank == 0 && threadIdx.x == 0) {
            float* out = p.loss + row;  // (parts: loss[n + k·parts_stride], api.h)
            out[0] = 0.0f;
            if (p.parts_stride > 0) out[p.parts_stride] = out[2 * p.parts_stride] = 0.0f;
        }
        if (p.compute_grad) {
            zero_cols(g_row, c0, c0 + n, 0, 1);
            zero_cols(g_row, p.v, p.v_g, rank, csize);
        }
        return;
    }
    // the target column, read before any block writes the gradient (it may alias s); an
    // out-of-range label (only CPU labels are range-checked) makes the row NaN
    const float nan = __int_as_float(0x7fffffff);
    const bool y_ok = y >= 0 && y < p.v;
    const float x_y = y_ok ? to_float(s_row[y]) : nan;
    const float t_y = y_ok ? to_float(t_row[y]) : nan;
    const int yc = y_ok ? static_cast<int>(y) : -1;

    const T* src_s = s_row + c0;
    const T* src_t = t_row + c0;
    bool vec = aligned16(src_s) && aligned16(src_t);
    if (use_smem) {
        T* sm_s = reinterpret_cast<T*>(smem);
        T* sm_t = sm_s + cpc;
        copy_to_smem(sm_s, src_s, n);
        copy_to_smem(sm_t, src_t, n);
        __pipeline_commit();
        __pipeline_wait_prior(0);
        __syncthreads();
        src_s = sm_s;
        src_t = sm_t;
        vec = true;
    }

    // ---- stage 1: non-target statistics
    const float inv_temp = p.inv_temp;
    const float inv_temp_t = p.inv_temp_t;  // the teacher's 1/τ_t
    const float w = p.w;
    const bool sep_x = p.tempered && (NKD || p.hard);
    const bool sep_u = NKD && inv_temp_t != 1.0f;
    DecStats st = DecStats::identity();
    for_each_col<T, true>(src_s, src_t, n, vec, [&](int i, float xs, float xt) {
        const int j = c0 + i;
        st.nf += nonfinite(xs) + nonfinite(xt);
        if (j == yc) return;
        const float a = xs * inv_temp;
        const float b = xt * inv_temp_t;
        if constexpr (NKD) {
            const float m_old = st.a.m;
            st.a.update(a, j);
            shift_to(st.b, m_old, st.a.m);
            st.b.update(b, a == KDK_NEG_INF ? KDK_INF : st.a.m - a);
        } else {
            st.a.update(a, j);
            st.b.update(b, b - a);
        }
        if (sep_x) st.x.update(xs, 0.0f);
        if (sep_u) st.u.update(xt, 0.0f);
    });
    st = block_reduce(st, DecStats::identity(), MergeDecStats<DIV>{}, red_stats);
    if (csize > 1) st = cluster_combine(st, MergeDecStats<DIV>{}, &part1, &total1, csize);

    const float a_y = x_y * inv_temp;
    const float b_y = t_y * inv_temp_t;
    const bool bad = st.nf > 0 || !y_ok || (st.a.m == KDK_NEG_INF && a_y == KDK_NEG_INF) ||
                     (st.b.m == KDK_NEG_INF && b_y == KDK_NEG_INF);
    const bool has_a = st.a.m > KDK_NEG_INF;
    const float ma = safe_max(st.a.m), mb = safe_max(st.b.m);
    const float l_a = has_a ? log1pf(st.a.z) : KDK_NEG_INF;
    const float l_b = log_or_ninf(st.b.z);
    const float la = has_a ? l_a : 0.0f, lb = st.b.z > 0.0f ? l_b : 0.0f;
    const float za = (a_y - ma) - l_a;
    const float zb = (b_y - mb) - l_b;
    float mx = ma, lx = la, zx = za, zu = zb;
    if (sep_x) {
        mx = safe_max(st.x.m);
        lx = st.x.z > 0.0f ? logf(st.x.z) : 0.0f;
        zx = (x_y - mx) - log_or_ninf(st.x.z);
    }
    if (sep_u) zu = (t_y - safe_max(st.u.m)) - log_or_ninf(st.u.z);
    const float z_b = st.b.z > 0.0f ? st.b.z : 1.0f;
    float nt = NKD ? st.b.a / z_b + la : (st.b.a / z_b - mb - lb) + (ma + la);
    nt = st.b.z > 0.0f ? (has_a ? nt : KDK_INF) : 0.0f;
    const float p1_y = sigmoidf_(zu);

    if (rank == 0 && threadIdx.x == 0) {
        float d;
        if constexpr (NKD) {
            d = (p1_y > 0.0f ? p1_y * softplusf_(-zx) : 0.0f) + w * nt;
        } else {  // binary KL([σ(zb), σ(−zb)] ‖ [σ(za), σ(−za)])
            const float p1 = sigmoidf_(zb), p0 = sigmoidf_(-zb);
            const float tckd = (p1 > 0.0f ? p1 * (softplusf_(-za) - softplusf_(-zb)) : 0.0f) +
                               (p0 > 0.0f ? p0 * (softplusf_(za) - softplusf_(zb)) : 0.0f);
            d = w * tckd + (1.0f - w) * nt;
        }
        const float soft = p.soft_w * (d < 0.0f ? 0.0f : d);
        const float hard = p.hard ? p.hard_w * softplusf_(-zx) : 0.0f;  // −log softmax(s)_y
        float* out = p.loss + row;
        out[0] = bad ? nan : soft + hard;
        if (p.parts_stride > 0) {  // the two addends (return_components)
            out[p.parts_stride] = bad ? nan : soft;
            out[2 * p.parts_stride] = bad ? nan : hard;
        }
    }

    // ---- stage 3: the gradient
    if (p.compute_grad) {
        const float sc = *p.scale;
        const float c_soft = p.soft_w * inv_temp * sc;
        float c_h = p.hard_w * sc;
        float delta = 0.0f, at_y = 0.0f;
        if constexpr (NKD) {
            c_h += p.soft_w * sc * p1_y;  // the target term: p1_y·CE(s, y)
        } else {  // Δ = q_y − p_y, from the smaller tails where both are near 1
            delta = za + zb > 0.0f ? sigmoidf_(-zb) - sigmoidf_(-za) : sigmoidf_(za) - sigmoidf_(zb);
            at_y = c_soft * w * delta;
        }
        const float rest_x = sigmoidf_(-zx);  // 1 − softmax(s)_y
        at_y -= c_h * rest_x;
        const int piv = has_a ? st.a.p : -1;
        float rest = 0.0f;
        T* out = g_row + c0;
        map_cols<T, true>(src_s, src_t, out, n, vec && aligned16(out),
                          [&](int i, float xs, float xt) -> float {
            const int j = c0 + i;
            float g;
            if (j == yc) {
                g = at_y;
            } else {
                const float q = expf((xs * inv_temp - ma) - la);
                const float pb = expf((xt * inv_temp_t - mb) - lb);
                g = NKD ? c_soft * w * (q - pb) : c_soft * ((1.0f - w) * (q - pb) - (w * delta) * q);
                g += (c_h * rest_x) * (sep_x ? expf((xs - mx) - lx) : q);
            }
            if (j != piv) rest += g;
            return bad ? nan : g;
        });
        rest = block_reduce(rest, 0.0f, AddFloat{}, red_rest);
        if (csize > 1) rest = cluster_combine(rest, AddFloat{}, &part3, &total3, csize);
        if (threadIdx.x == 0 && piv >= c0 && piv < c0 + n) g_row[piv] = from_float<T>(bad ? nan : -rest);
        zero_cols(g_row, p.v, p.v_g, rank, csize);
    }
    if (csize > 1) cluster_barrier();
}

// A row norm as (m, z): m = max |entry|, z = Σ (entry/m)², r = 1/m (0 while m = 0).
struct ScaledSq {
    float m, r, z;

    __device__ __forceinline__ static ScaledSq identity() { return {0.0f, 0.0f, 0.0f}; }

    __device__ __forceinline__ void update(float x) {
        const float ax = fabsf(x);
        if (ax > m) {
            const float r_new = 1.0f / ax;
            const float k = m * r_new;
            z = z * (k * k) + 1.0f;
            m = ax;
            r = r_new;
        } else {
            const float e = x * r;
            z += e * e;
        }
    }
};
__device__ __forceinline__ ScaledSq shfl_xor(const ScaledSq& s, int o) {
    return {shfl_xor(s.m, o), shfl_xor(s.r, o), shfl_xor(s.z, o)};
}
__device__ __forceinline__ ScaledSq merge(const ScaledSq& x, const ScaledSq& y) {
    const bool xw = x.m >= y.m;  // field-wise selects: the states stay in registers
    const float bm = xw ? x.m : y.m, br = xw ? x.r : y.r, bz = xw ? x.z : y.z;
    const float sm = xw ? y.m : x.m, sz = xw ? y.z : x.z;
    const float k = sm * br;
    return {bm, br, bz + sz * (k * k)};
}

struct CosStats {
    ScaledSq a, b;  // a = s/τ and b = t/τ, entries −inf in both left out
    PivotMax x;     // the untempered student (hard label; else only its max)
    int nf;         // NaN / +inf logits, and entries −inf in one row only

    __device__ __forceinline__ static CosStats identity() {
        return {ScaledSq::identity(), ScaledSq::identity(), PivotMax::identity(), 0};
    }
};
__device__ __forceinline__ CosStats shfl_xor(const CosStats& s, int o) {
    return {shfl_xor(s.a, o), shfl_xor(s.b, o), shfl_xor(s.x, o), shfl_xor(s.nf, o)};
}
struct MergeCosStats {
    __device__ __forceinline__ CosStats operator()(const CosStats& x, const CosStats& y) const {
        return {merge(x.a, y.a), merge(x.b, y.b), merge(x.x, y.x), x.nf + y.nf};
    }
};

// grid and arguments as kd_fwd_kernel (kd.cuh). DIV is kCosine (one signature for with_kernel).
template <int DIV, typename T>
__global__ void __launch_bounds__(kKdThreads, kKdMinBlocks)
    kd_fwd_kernel_cosine(KdFwdArgs p, int64_t row0, int csize, int cpc, int use_smem) {
    static_assert(DIV == kCosine, "cosine");
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ CosStats red_stats[kWarp];
    __shared__ float red_f[kWarp];
    __shared__ CosStats part1, total1;
    __shared__ float part2, total2;

    const int64_t row = row0 + blockIdx.x / csize;
    const int rank = static_cast<int>(blockIdx.x % csize);
    const int v = static_cast<int>(p.v);
    const int c0 = static_cast<int>(min(static_cast<int64_t>(rank) * cpc, p.v));
    const int n = min(cpc, v - c0);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = static_cast<const T*>(p.t) + row * p.stride_t;
    T* g_row = p.compute_grad ? static_cast<T*>(p.grad) + row * p.stride_g : nullptr;

    int64_t y = -1;
    if (p.has_labels) {
        y = p.labels_i64 ? static_cast<const int64_t*>(p.labels)[row * p.stride_l]
                         : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[row * p.stride_l]);
        if (y == p.ignore_index) {
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
    const float nan = __int_as_float(0x7fffffff);
    float x_y = 0.0f;  // read before any block writes the gradient (it may alias s)
    if (p.hard && rank == 0 && threadIdx.x == 0) x_y = (y >= 0 && y < p.v) ? to_float(s_row[y]) : nan;

    const T* src_s = s_row + c0;
    const T* src_t = t_row + c0;
    bool vec = aligned16(src_s) && aligned16(src_t);
    if (use_smem) {
        T* sm_s = reinterpret_cast<T*>(smem);
        T* sm_t = sm_s + cpc;
        copy_to_smem(sm_s, src_s, n);
        copy_to_smem(sm_t, src_t, n);
        __pipeline_commit();
        __pipeline_wait_prior(0);
        __syncthreads();
        src_s = sm_s;
        src_t = sm_t;
        vec = true;
    }

    // ---- stage 1: the norms, the row checks, the hard label's log-sum-exp
    const float inv_temp = p.inv_temp;
    const float inv_temp_t = p.inv_temp_t;
    const bool hard = p.hard;
    CosStats st = CosStats::identity();
    for_each_col<T, true>(src_s, src_t, n, vec, [&](int i, float xs, float xt) {
        const bool ns = xs == KDK_NEG_INF, nt = xt == KDK_NEG_INF;
        st.nf += nonfinite(xs) + nonfinite(xt) + (ns != nt);
        st.a.update(ns ? 0.0f : xs * inv_temp);
        st.b.update(nt ? 0.0f : xt * inv_temp_t);
        if (hard) {
            st.x.update(xs, c0 + i);
        } else if (xs > st.x.m) {
            st.x.m = xs;  // only whether the student has a finite entry
        }
    });
    st = block_reduce(st, CosStats::identity(), MergeCosStats{}, red_stats);
    if (csize > 1) st = cluster_combine(st, MergeCosStats{}, &part1, &total1, csize);
    const bool bad = st.nf > 0 || st.x.m == KDK_NEG_INF;
    const bool zero = st.a.m == 0.0f || st.b.m == 0.0f;
    // â = (a·ra)·sa, b̂ = (b·rb)·sb; 1/‖a‖ = ra·sa (0 for a zero row)
    const float ra = st.a.r, rb = st.b.r;
    const float sa = st.a.z > 0.0f ? rsqrtf(st.a.z) : 0.0f;
    const float sb = st.b.z > 0.0f ? rsqrtf(st.b.z) : 0.0f;

    // ---- stage 2: D = ½‖b̂ − â‖²
    float sq = 0.0f;
    for_each_col<T, true>(src_s, src_t, n, vec, [&](int, float xs, float xt) {
        const float ha = xs == KDK_NEG_INF ? 0.0f : ((xs * inv_temp) * ra) * sa;
        const float hb = xt == KDK_NEG_INF ? 0.0f : ((xt * inv_temp_t) * rb) * sb;
        sq += (hb - ha) * (hb - ha);
    });
    sq = block_reduce(sq, 0.0f, AddFloat{}, red_f);
    if (csize > 1) sq = cluster_combine(sq, AddFloat{}, &part2, &total2, csize);
    const float d = zero ? 1.0f : 0.5f * sq;
    const float mx = safe_max(st.x.m);
    const float cx = log1pf(st.x.z);
    if (rank == 0 && threadIdx.x == 0) {
        const float soft = p.soft_w * d;
        const float hl = hard ? p.hard_w * (cx - (x_y - mx)) : 0.0f;
        float* out = p.loss + row;
        out[0] = bad ? nan : soft + hl;
        if (p.parts_stride > 0) {
            out[p.parts_stride] = bad ? nan : soft;
            out[2 * p.parts_stride] = bad ? nan : hl;
        }
    }

    // ---- stage 3: the gradient
    if (p.compute_grad) {
        const float sc = *p.scale;
        const float c_soft = -p.soft_w * inv_temp * sc * (ra * sa);  // −(δ + D·â)/‖a‖
        const float c_hard = p.hard_w * sc;
        const float rest_piv = st.x.z / (1.0f + st.x.z);  // 1 − softmax(s)_{j*}
        const int piv = st.x.p;
        T* out = g_row + c0;
        map_cols<T, true>(src_s, src_t, out, n, vec && aligned16(out),
                          [&](int i, float xs, float xt) -> float {
            const int j = c0 + i;
            const float ha = xs == KDK_NEG_INF ? 0.0f : ((xs * inv_temp) * ra) * sa;
            const float hb = xt == KDK_NEG_INF ? 0.0f : ((xt * inv_temp_t) * rb) * sb;
            float g = c_soft * ((hb - ha) + d * ha);
            if (hard) {
                const float sm = expf((xs - mx) - cx);
                g += c_hard * (j == y ? (j == piv ? -rest_piv : sm - 1.0f) : sm);
            }
            return bad ? nan : g;
        });
        zero_cols(g_row, p.v, p.v_g, rank, csize);
    }
    if (csize > 1) cluster_barrier();
}

}  // namespace kdk
