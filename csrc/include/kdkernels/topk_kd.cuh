// The topk_kd_loss kernel (docs/spec.md §5): per-row loss and, in the same launch, the
// gradient w.r.t. the student logits. Same contract and math as
// kdkernels/topk/pytorch.py (topk_kd_fwd_torch), in float32.
//
// Entries (one row): e = 0..k−1 with class idx_e (−1 = padding) and value u_e
// (values/τ for logits, the log-probability itself for logprobs); a = s/τ.
//   renormalize  log q_e = a_e − LSE_sel a,             log p_e = u_e − LSE u
//   bucket       log q_e = a_e − LSE_all a,             log p_e = u_e,
//                log q_tail = LSE_{v∉idx} a_v − LSE_all, log p_tail = log(−expm1(LSE u))
//                (−inf when all V classes are selected)
// Divergence terms (d_e, h_e = q_e ∂D/∂q_e up to a multiple of q_e) as in pytorch.py;
// loss = max(Σ d_e, 0); r_e = h_e − q_e Σh; gradient r_e·scale/τ at a selected class,
// r_tail·scale/τ·exp(a_v − LSE_tail) at an unselected one (bucket), 0 (renormalize).
// The normalisers keep the largest entry apart (online_softmax.cuh's PivotMax: the
// "pivot", the tail counting as one entry in bucket mode): log q = (a − M) − log1p(Z'),
// and the pivot's r is written as minus the sum of the others (Σ_e r_e = 0), so no 1 − 1
// cancels when q and p are one-hot to float32 precision.
//
// One block per row:
//   mark    a bitmap of the selected classes in shared memory (one bit per class, windows
//           of 32·bitmap_words classes); atomicOr also finds repeated classes, and
//           indices outside [−1, V) are found here: both make the row bad.
//   stats   (bucket) every column: the policy's max / NaN count of a and the exact
//           log-sum-exp of a over the unselected classes (bitmap test: never total minus
//           selected); the row is copied to shared memory first when the plan says so
//           (path kSmem), so each student logit is read from global memory once.
//   E1      entries (tiles of `entries` in shared memory; all k stay resident when they
//           fit, else the tiles are re-read in E2/E3): gather a_e, u_e; PivotMax of a,
//           log-sum-exp of u, counts.
//   E2      Σ d_e, Σ h_e (+ the tail entry) → the loss.
//   E3      (gradient) r_e at every selected class but the pivot; Σ r → the pivot.
//   write   (gradient) every unselected class: the tail term or 0 (bitmap test; 16-byte
//           stores where a vector holds no selected class).
// Every gradient address is written once: selected classes in E3, the others in `write`.
// With grad aliasing s, every logit is read (stats, E1–E3, or by the same thread just
// before it writes that address) before it is overwritten.
// Ignored rows: loss 0, gradient 0, nothing else read. Bad rows: loss NaN, gradient row NaN.
#pragma once

#include <cuda_pipeline.h>

#include <climits>
#include <cmath>

#include "api.h"
#include "common.cuh"
#include "logscan.cuh"
#include "online_softmax.cuh"
#include "reduce.cuh"

namespace kdk {

constexpr int kTkThreads = 256;
constexpr int kTkEntries = 1024;        // entry tile: 12 bytes each in shared memory
constexpr int kTkBitmapWords = 8192;    // 32 KiB: windows of 262144 classes
constexpr int kTkTailId = INT_MAX - 1;  // the tail's "position" in the pivot search

// Statistics of the columns and entries one thread (then the block) has seen.
struct TkStats {
    PivotMax a;     // a over the entries (position = entry index)
    PivotMax64 u;   // teacher values over the entries (float64: in bucket mode the tail's
                    // mass 1 − Σ p = −expm1(M + log1p(Z')) cancels down to what the k
                    // entries leave, which float32 would keep only to ~1e-11 absolute)
    LseState tail;  // bucket: a over the unselected classes
    float smax;     // bucket: max a over the row
    int nf;         // NaN / +inf among the values read
    int cnt;        // non-padded entries
    int flags;      // an index out of range or a repeated class

    __device__ __forceinline__ static TkStats identity() {
        return {PivotMax::identity(), PivotMax64::identity(), LseState::identity(), KDK_NEG_INF,
                0, 0, 0};
    }
};
__device__ __forceinline__ TkStats shfl_xor(const TkStats& s, int o) {
    return {shfl_xor(s.a, o),    shfl_xor(s.u, o),   shfl_xor(s.tail, o),  shfl_xor(s.smax, o),
            shfl_xor(s.nf, o),   shfl_xor(s.cnt, o), shfl_xor(s.flags, o)};
}
struct MergeTkStats {
    __device__ __forceinline__ TkStats operator()(const TkStats& x, const TkStats& y) const {
        return {merge(x.a, y.a), merge(x.u, y.u), merge(x.tail, y.tail), fmaxf(x.smax, y.smax),
                x.nf + y.nf,     x.cnt + y.cnt,   x.flags | y.flags};
    }
};
struct TkAdd {
    __device__ __forceinline__ float operator()(float x, float y) const { return x + y; }
};

// log((1 − w) + w·e^x) for 0 < w < 1 (x = -inf: log(1 − w)): log1p(w·expm1(x)) keeps every
// digit near x = 0, where the two distributions agree.
__device__ __forceinline__ float tk_log_mix(float x, float w, float log_w) {
    if (x < 40.0f) return log1pf(w * expm1f(x));
    return log_w + x + log1pf((1.0f - w) / w * expf(-x));
}

// Divergence terms of one entry: d (sums to D) and h = q ∂D/∂q up to a multiple of q
// (pytorch.py _div_terms; the multiple cancels in r = h − q Σh). 0·log 0 = 0.
// jsd, m = βp + (1−β)q: log p − log m = −log(β + (1−β) q/p) and log q − log m =
// −log((1−β) + β p/q) (tk_log_mix: no cancellation where p ≈ q), and
// q ∂D/∂q = (1−β) q log(q/m) = −(1−β) q [log(1−β) + softplus(log(β/(1−β)) + log p − log q)];
// h drops the constant log(1−β) part, so that r_e does not come out of a difference of two
// numbers near −(1−β) log(1−β).
template <int DIV>
__device__ __forceinline__ void tk_terms(float lp, float lq, float beta, float log_b,
                                         float log_1mb, float& d, float& h) {
    static_assert(DIV == kFwdKL || DIV == kRevKL || DIV == kJsd, "forward KL, reverse KL, jsd");
    const float p = expf(lp);
    const float q = expf(lq);
    if constexpr (DIV == kFwdKL) {
        d = p > 0.0f ? p * (lp - lq) : 0.0f;
        h = -p;
    } else if constexpr (DIV == kRevKL) {
        d = q > 0.0f ? q * (lq - lp) : 0.0f;
        h = d;
    } else {
        const float dp = p > 0.0f ? -beta * p * tk_log_mix(lq - lp, 1.0f - beta, log_1mb) : 0.0f;
        const float dq = q > 0.0f ? -(1.0f - beta) * q * tk_log_mix(lp - lq, beta, log_b) : 0.0f;
        d = dp + dq;
        h = q > 0.0f ? -(1.0f - beta) * q * softplus((log_b - log_1mb) + (lp - lq)) : 0.0f;
    }
}

__host__ __device__ __forceinline__ int64_t tk_round16(int64_t x) { return (x + 15) / 16 * 16; }

// Is bit i of the window's bitmap set?
__device__ __forceinline__ bool tk_selected(const uint32_t* bm, int i) {
    return (bm[i >> 5] >> (i & 31)) & 1u;
}

// grid.x = rows (from row0), block = kTkThreads. Dynamic shared memory, in order: the
// student row (smem_row: tk_round16(v·sizeof(T)) bytes), the bitmap (bm_words words,
// padded to 16 bytes), the entry tile (ent_cap × (int, float, float)).
template <int DIV, typename T>
__global__ void __launch_bounds__(kTkThreads, 2)
    topk_kd_kernel(TopkKdArgs p, int64_t row0, int smem_row, int bm_words, int ent_cap) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ TkStats red_stats[kWarp];
    __shared__ Sum3 red_sum[kWarp];
    __shared__ float red_rest[kWarp];

    const int64_t row = row0 + blockIdx.x;
    const int v = static_cast<int>(p.v);
    const int64_t k = p.k;
    const int tid = static_cast<int>(threadIdx.x);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const int64_t* i_row = p.idx + row * p.stride_i;
    const float* u_row = p.vals + row * p.stride_u;
    T* g_row = p.compute_grad ? static_cast<T*>(p.grad) + row * p.stride_g : nullptr;
    const bool bucket = p.bucket;
    const float inv_temp = p.inv_temp;
    const float nan = __int_as_float(0x7fffffff);

    if (p.has_labels) {
        const int64_t y =
            p.labels_i64 ? static_cast<const int64_t*>(p.labels)[row * p.stride_l]
                         : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[row * p.stride_l]);
        if (y == p.ignore_index) {
            if (tid == 0) p.loss[row] = 0.0f;
            if (p.compute_grad) fill_row(g_row, v, 0.0f);
            return;
        }
    }

    // ---- shared memory layout
    unsigned char* cursor = smem;
    const T* src = s_row;  // where the student logits are read from
    if (smem_row) {
        constexpr int VN = Vec<T>::N;
        T* dst = reinterpret_cast<T*>(cursor);
        const int nvec = aligned16(s_row) ? v / VN : 0;
        for (int q = tid; q < nvec; q += blockDim.x) {
            __pipeline_memcpy_async(dst + static_cast<int64_t>(q) * VN,
                                    s_row + static_cast<int64_t>(q) * VN, 16);
        }
        for (int i = nvec * VN + tid; i < v; i += blockDim.x) dst[i] = s_row[i];
        __pipeline_commit();
        src = dst;
        cursor += tk_round16(static_cast<int64_t>(v) * static_cast<int64_t>(sizeof(T)));
    }
    uint32_t* bm = reinterpret_cast<uint32_t*>(cursor);
    cursor += tk_round16(static_cast<int64_t>(bm_words) * 4);
    int* ent_j = reinterpret_cast<int*>(cursor);
    float* ent_a = reinterpret_cast<float*>(ent_j + ent_cap);
    float* ent_u = ent_a + ent_cap;

    const int64_t window = int64_t{32} * bm_words;
    const int nwin = static_cast<int>((p.v + window - 1) / window);

    // Clear the bitmap and mark the selected classes in [c0, c0 + window); returns 1 when
    // this thread saw an index out of [−1, V) or a class already marked. Barriers on both
    // sides; callers separate it from the previous window's readers.
    auto mark = [&](int64_t c0) -> int {
        for (int w = tid; w < bm_words; w += blockDim.x) bm[w] = 0u;
        __syncthreads();
        int fl = 0;
        for (int64_t e = tid; e < k; e += blockDim.x) {
            const int64_t j = i_row[e];
            if (j < -1 || j >= p.v) {
                fl = 1;
                continue;
            }
            if (j < c0 || j >= c0 + window) continue;  // padding (−1) too
            const int off = static_cast<int>(j - c0);
            const uint32_t bit = 1u << (off & 31);
            if (atomicOr(&bm[off >> 5], bit) & bit) fl = 1;
        }
        __syncthreads();
        return fl;
    };

    // ---- mark (+ bucket: the statistics of every column)
    if (smem_row) {
        __pipeline_wait_prior(0);
        __syncthreads();
    }
    TkStats st = TkStats::identity();
    for (int w = 0; w < nwin; ++w) {
        const int64_t c0 = static_cast<int64_t>(w) * window;
        const int n = static_cast<int>(min(window, p.v - c0));
        if (w > 0) __syncthreads();  // the previous window's bitmap is no longer read
        st.flags |= mark(c0);
        if (bucket) {
            const T* base = src + c0;
            for_each_col<T, false>(base, nullptr, n, aligned16(base), [&](int i, float xs, float) {
                const float a = xs * inv_temp;
                st.nf += nan_or_pinf(xs);
                st.smax = fmaxf(st.smax, a);
                if (!tk_selected(bm, i)) st.tail.update(a);
            });
        }
    }

    // ---- E1: the entries. Thread tid owns slots tid, tid + blockDim.x, ... of every tile
    // in every pass, so the tile needs no barrier.
    const bool logprobs = p.logprobs;
    auto load = [&](int64_t t0, int n) {
        for (int e = tid; e < n; e += blockDim.x) {
            const int64_t j = i_row[t0 + e];
            int jj = -1;
            float a = KDK_NEG_INF;
            float u = KDK_NEG_INF;
            if (j >= 0 && j < p.v) {  // out of range: flagged by mark(), the row is bad
                jj = static_cast<int>(j);
                a = to_float(src[jj]) * inv_temp;
                const float uv = u_row[t0 + e];
                u = logprobs ? uv : uv * inv_temp;
            }
            ent_j[e] = jj;
            ent_a[e] = a;
            ent_u[e] = u;
        }
    };
    const bool resident = k <= ent_cap;
    for (int64_t t0 = 0; t0 < k; t0 += ent_cap) {
        const int n = static_cast<int>(min(static_cast<int64_t>(ent_cap), k - t0));
        load(t0, n);
        for (int e = tid; e < n; e += blockDim.x) {
            if (ent_j[e] < 0) continue;  // padding
            const float a = ent_a[e];
            const float u = ent_u[e];
            st.nf += nan_or_pinf(a) + nan_or_pinf(u);
            st.cnt += 1;
            st.a.update(a, static_cast<int>(t0 + e));
            st.u.update(static_cast<double>(u), static_cast<int>(t0 + e));
        }
    }
    st = block_reduce(st, TkStats::identity(), MergeTkStats{}, red_stats);

    // ---- the row's normalisers and the policy
    bool bad = st.flags != 0 || st.nf > 0;
    if (bucket) {
        bad = bad || st.smax == KDK_NEG_INF;  // no finite student logit in the row
    } else {
        bad = bad || (st.cnt > 0 && (st.a.m == KDK_NEG_INF || st.u.m == -HUGE_VAL));
    }
    // LSE u = M_u + log1p(Z'_u) (the largest value kept apart, as for a)
    const float m_u = st.u.m == -HUGE_VAL ? 0.0f : static_cast<float>(st.u.m);
    const float c_u = static_cast<float>(log1p(st.u.z));
    PivotMax qs = st.a;
    float lse_tail = KDK_NEG_INF;
    float lp_tail = KDK_NEG_INF;
    if (bucket) {
        lse_tail = st.tail.lse();
        qs = merge(qs, PivotMax{lse_tail, 0.0f, kTkTailId});
        // log(1 − Σ p_e) = log(−expm1(LSE u)) in float64; the empty tail (all V classes)
        // has p = 0 whatever rounding left
        const double lu = st.u.m == -HUGE_VAL ? -HUGE_VAL : fmin(st.u.m + log1p(st.u.z), 0.0);
        lp_tail = st.cnt == v ? KDK_NEG_INF : static_cast<float>(log(-expm1(lu)));
    }
    const float m_q = safe_max(qs.m);
    const float c_q = log1pf(qs.z);
    const int piv = qs.p;  // entry position, kTkTailId, or INT_MAX (no entry)
    const float beta = p.beta;
    const float log_b = p.log_beta;
    const float log_1mb = p.log_1mbeta;
    auto lq_of = [&](float a) { return a == KDK_NEG_INF ? a : (a - m_q) - c_q; };
    auto lp_of = [&](float u) {
        if (bucket || u == KDK_NEG_INF) return u;
        return (u - m_u) - c_u;
    };
    const float lq_tail = lq_of(lse_tail);

    // ---- E2: the divergence and Σ h
    Sum3 sums = {0.0f, 0.0f, 0.0f};
    if (!bad) {  // uniform over the block
        for (int64_t t0 = 0; t0 < k; t0 += ent_cap) {
            const int n = static_cast<int>(min(static_cast<int64_t>(ent_cap), k - t0));
            if (!resident) load(t0, n);
            for (int e = tid; e < n; e += blockDim.x) {
                if (ent_j[e] < 0) continue;
                float d, h;
                tk_terms<DIV>(lp_of(ent_u[e]), lq_of(ent_a[e]), beta, log_b, log_1mb, d, h);
                sums.x += d;
                sums.y += h;
            }
        }
        if (bucket && tid == 0) {
            float d, h;
            tk_terms<DIV>(lp_tail, lq_tail, beta, log_b, log_1mb, d, h);
            sums.x += d;
            sums.y += h;
        }
    }
    sums = block_reduce(sums, Sum3{0.0f, 0.0f, 0.0f}, AddSum3{}, red_sum);
    if (tid == 0) {
        // every divergence is >= 0: rounding may not make it negative (NaN stays NaN)
        p.loss[row] = bad ? nan : (sums.x < 0.0f ? 0.0f : sums.x);
    }
    if (!p.compute_grad) return;
    if (bad) {
        fill_row(g_row, v, nan);
        return;
    }

    // ---- E3: r_e = h_e − q_e Σh at the selected classes (the pivot last, as −Σ others)
    const float cg = *p.scale * inv_temp;
    const float hsum = sums.y;
    float rest = 0.0f;
    for (int64_t t0 = 0; t0 < k; t0 += ent_cap) {
        const int n = static_cast<int>(min(static_cast<int64_t>(ent_cap), k - t0));
        if (!resident) load(t0, n);
        for (int e = tid; e < n; e += blockDim.x) {
            const int j = ent_j[e];
            if (j < 0 || t0 + e == piv) continue;
            const float lq = lq_of(ent_a[e]);
            float d, h;
            tk_terms<DIV>(lp_of(ent_u[e]), lq, beta, log_b, log_1mb, d, h);
            const float r = h - expf(lq) * hsum;
            rest += r;
            g_row[j] = from_float<T>(r * cg);
        }
    }
    float r_tail = 0.0f;
    if (bucket) {
        float d, h;
        tk_terms<DIV>(lp_tail, lq_tail, beta, log_b, log_1mb, d, h);
        r_tail = h - expf(lq_tail) * hsum;
        if (piv != kTkTailId && tid == 0) rest += r_tail;
    }
    rest = block_reduce(rest, 0.0f, TkAdd{}, red_rest);
    if (piv == kTkTailId) r_tail = -rest;
    if (tid == 0 && piv >= 0 && piv < k) g_row[i_row[piv]] = from_float<T>(-rest * cg);

    // ---- write: every unselected class (bucket: r_tail·exp(a − LSE_tail); else 0)
    const float tail_scale = r_tail * cg;
    const bool tail_empty = lse_tail == KDK_NEG_INF;
    auto tail_grad = [&](float xs) {
        return (!bucket || tail_empty) ? 0.0f : tail_scale * expf(xs * inv_temp - lse_tail);
    };
    constexpr int VN = Vec<T>::N;
    constexpr uint32_t kFull = (1u << VN) - 1u;
    for (int w = 0; w < nwin; ++w) {
        const int64_t c0 = static_cast<int64_t>(w) * window;
        const int n = static_cast<int>(min(window, p.v - c0));
        if (nwin > 1) {
            __syncthreads();  // the previous window's bitmap is no longer read
            (void)mark(c0);
        }
        T* out = g_row + c0;
        const T* in = src + c0;
        const int nvec = (aligned16(out) && (!bucket || aligned16(in))) ? n / VN : 0;
        for (int q = tid; q < nvec; q += blockDim.x) {
            const int i0 = q * VN;
            const uint32_t bits = (bm[i0 >> 5] >> (i0 & 31)) & kFull;
            if (bits == kFull) continue;  // all selected: written in E3
            float g[VN];
            if (bucket) {
                // (with grad aliasing s, selected columns may already hold gradients: unused)
                float xs[VN];
                load_vec(in + i0, xs);
#pragma unroll
                for (int u = 0; u < VN; ++u) g[u] = tail_grad(xs[u]);
            } else {
#pragma unroll
                for (int u = 0; u < VN; ++u) g[u] = 0.0f;
            }
            if (bits == 0u) {
                store_vec(out + i0, g);
            } else {
#pragma unroll
                for (int u = 0; u < VN; ++u) {
                    if (!((bits >> u) & 1u)) out[i0 + u] = from_float<T>(g[u]);
                }
            }
        }
        for (int i = nvec * VN + tid; i < n; i += blockDim.x) {
            if (tk_selected(bm, i)) continue;
            out[i] = from_float<T>(bucket ? tail_grad(to_float(in[i])) : 0.0f);
        }
    }
}

}  // namespace kdk
