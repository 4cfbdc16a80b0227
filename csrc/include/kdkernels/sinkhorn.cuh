// The log-domain Sinkhorn solver of `sinkhorn` (docs/spec.md §4; the math:
// kdkernels/sinkhorn/pytorch.py, the same design as kdkernels/sinkhorn/triton.py).
//
// Scaled potentials φ = f/ε, ψ = g/ε, Ce = C/ε (a correctly rounded division, as torch's).
// Iteration k keeps the two log-sum-exps that made it, each as a pair (shift, log-sum):
//     Rᵏ_i = LSE_j(ψᵏ⁻¹_j − Ce_ij)   φᵏ = log a − Rᵏ
//     Lᵏ_j = LSE_i(φᵏ_i − Ce_ij)     ψᵏ = log b − Lᵏ
// shift = the max of the terms (0 where it is ±inf), log-sum = log Σ exp(term − shift).
// History slot (k − 1) % n_slots of RH [n_slots, 2, M, B1] / LH [n_slots, 2, M, B2].
// The backward's weights α^k_ij = exp(((ψᵏ⁻¹_j − Ce_ij) − Rshift_i) − Rlogsum_i) and
// β^k_ij = exp(((φᵏ_i − Ce_ij) − Lshift_j) − Llogsum_j) are elementwise from the pairs.
//
// Thread layout, everywhere: kSkWarps warps of 32 lanes; entry (i, j) belongs to warp
// i mod kSkWarps (of a tile) and lane j mod 32. Row reductions (over j) run warp per row
// (lanes stride over j, a butterfly merge); column reductions (over i) run in strips of
// 32 columns, each warp folding its rows, the warps' states merged in warp order through
// shared memory. Both orders are fixed: results are deterministic. In the fused backward
// both steps of an iteration touch C̄_ij from the same thread, so its read-modify-write
// in global memory needs no barrier.
//
// Online log-sum-exp (SkLse): m = the running max (never NaN), s = Σ exp(x − safe(m)),
// rescaled by exp(m_old − safe(m_new)) when the max grows (an old max of −inf gives a
// factor 0, never 0·inf). ±inf as torch.logsumexp (all −inf → −inf, a +inf → +inf); a NaN
// term never wins the max but makes s NaN, so NaN propagates.
//
// Kernels (T = float or double; arithmetic in T):
//   sk_fused_fwd_kernel   one block per problem, Ce, φ, ψ and R in shared memory,
//                         iterations k0..k1−1 in one launch (all of them without tol).
//   sk_row_kernel / sk_col_kernel
//                         the tiled path: one launch per half-iteration, Ce streamed
//                         from global memory (the potentials staged in shared memory).
//   sk_check_kernel       tol: the first iteration whose max over problems of the row
//                         marginal error is below tol becomes *iters (NaN counts as +inf).
//   sk_final_kernel       tol: f, g from the history slot of iteration *iters.
//   sk_fused_bwd_kernel   the whole reverse pass of one problem, one block.
//   sk_bwd_col_kernel / sk_bwd_row_kernel
//                         the tiled reverse pass, two launches per iteration.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace kdk {

constexpr int kSkWarps = 8;
constexpr int kSkThreads = kSkWarps * kWarp;  // 256

template <typename T> __device__ __forceinline__ T sk_exp(T x);
template <> __device__ __forceinline__ float sk_exp<float>(float x) { return expf(x); }
template <> __device__ __forceinline__ double sk_exp<double>(double x) { return exp(x); }
template <typename T> __device__ __forceinline__ T sk_log(T x);
template <> __device__ __forceinline__ float sk_log<float>(float x) { return logf(x); }
template <> __device__ __forceinline__ double sk_log<double>(double x) { return log(x); }
template <typename T> __device__ __forceinline__ T sk_div(T x, T y);
template <> __device__ __forceinline__ float sk_div<float>(float x, float y) {
    return __fdiv_rn(x, y);
}
template <> __device__ __forceinline__ double sk_div<double>(double x, double y) {
    return __ddiv_rn(x, y);
}
template <typename T> __device__ __forceinline__ T sk_neg_inf() {
    return -static_cast<T>(INFINITY);
}
// The shift of a log-sum-exp: 0 where the max is ±inf (torch.logsumexp's rule).
template <typename T> __device__ __forceinline__ T sk_safe(T m) { return isinf(m) ? T(0) : m; }
template <typename T> __device__ __forceinline__ T sk_shfl(T x, int o) {
    return __shfl_xor_sync(0xffffffffu, x, o);
}

template <typename T> struct SkLse {
    T m;
    T s;
    __device__ __forceinline__ static SkLse identity() { return {sk_neg_inf<T>(), T(0)}; }
    __device__ __forceinline__ void add(T x) {
        if (x > m) {
            s *= sk_exp(m - sk_safe(x));  // m = −inf: factor 0 (s is 0 or NaN then)
            m = x;
        }
        s += sk_exp(x - sk_safe(m));
    }
    __device__ __forceinline__ T shift() const { return sk_safe(m); }
    __device__ __forceinline__ T logsum() const { return sk_log(s); }
};

template <typename T> __device__ __forceinline__ SkLse<T> sk_merge(SkLse<T> a, SkLse<T> b) {
    const T m = a.m > b.m ? a.m : b.m;
    const T ms = sk_safe(m);
    return {m, a.s * sk_exp(a.m - ms) + b.s * sk_exp(b.m - ms)};
}

template <typename T> __device__ __forceinline__ SkLse<T> sk_warp_merge(SkLse<T> v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        const SkLse<T> w = {sk_shfl(v.m, o), sk_shfl(v.s, o)};
        v = sk_merge(v, w);
    }
    return v;
}

template <typename T> __device__ __forceinline__ T sk_warp_sum(T v) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += sk_shfl(v, o);
    return v;
}

// Sum over the block (kSkThreads threads); every thread gets the total. `red` holds
// kSkWarps values of shared memory, free again on return.
template <typename T> __device__ __forceinline__ T sk_block_sum(T v, T* red) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    v = sk_warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T total = T(0);
#pragma unroll
    for (int w = 0; w < kSkWarps; ++w) total += red[w];
    __syncthreads();
    return total;
}

// Merge the per-warp column states of a 32-column strip (thread (w, l) holds column l's
// state over its rows) in warp order; every thread gets its lane's column total.
// `scratch` holds 2·kSkThreads values of shared memory, free again on return.
template <typename T> __device__ __forceinline__ SkLse<T> sk_col_merge(SkLse<T> st, T* scratch) {
    const int lane = threadIdx.x % kWarp;
    scratch[threadIdx.x] = st.m;
    scratch[kSkThreads + threadIdx.x] = st.s;
    __syncthreads();
    SkLse<T> tot = {scratch[lane], scratch[kSkThreads + lane]};
#pragma unroll
    for (int w = 1; w < kSkWarps; ++w) {
        tot = sk_merge(tot, SkLse<T>{scratch[w * kWarp + lane], scratch[kSkThreads + w * kWarp + lane]});
    }
    __syncthreads();
    return tot;
}

// Column sums of a strip, the same way (deterministic order).
template <typename T> __device__ __forceinline__ T sk_col_sum(T v, T* scratch) {
    const int lane = threadIdx.x % kWarp;
    scratch[threadIdx.x] = v;
    __syncthreads();
    T tot = scratch[lane];
#pragma unroll
    for (int w = 1; w < kSkWarps; ++w) tot += scratch[w * kWarp + lane];
    __syncthreads();
    return tot;
}

// Device-side arguments of every solver kernel.
template <typename T> struct SkParams {
    const T* cost;  // [M, B1, B2] contiguous
    const T* la;    // [M, B1]
    const T* lb;    // [M, B2]
    T* rh;          // [n_slots, 2, M, B1]
    T* lh;          // [n_slots, 2, M, B2]
    T* f;           // [M, B1]
    T* g;           // [M, B2]
    T* part;        // tol: the error partials
    int* iters;     // [1] iterations run (device-side)
    // backward
    const T* gf;    // upstream ∂/∂f or null
    const T* gg;    // upstream ∂/∂g or null
    T* fb;          // tiled: f̄ [M, B1] (initialised with gf or 0)
    T* gb;          // tiled: ḡ [M, B2]
    T* cbar;        // [M, B1, B2], zero-initialised
    T* labar;       // [M, B1], zero-initialised
    T* lbbar;       // [M, B2], zero-initialised
    int64_t m;
    int b1;
    int b2;
    int n_slots;
    T eps;
    T tol;
};

template <typename T>
__device__ __forceinline__ T* sk_hist(T* h, int slot, int part, int64_t m_all, int64_t m, int b) {
    return h + ((static_cast<int64_t>(slot) * 2 + part) * m_all + m) * b;
}

// ------------------------------------------------------------------------- fused forward

// Shared-memory layout of the fused kernels (elements of T); the launcher sizes it with
// the same formula (sk_fused_elems in sinkhorn.cu).
//   ce [B1·B2] | 6 row arrays [B1] | 6 column arrays [B2] | scratch [2·kSkThreads] | red [kSkWarps]

// Row pass: R = LSE_j(ψ_j − Ce_ij) into rsh, rlz; with `err`, also the row-marginal error
// of the previous potentials φ (the iteration whose ψ fed this pass), summed over the
// block (every thread returns it).
template <typename T>
__device__ __forceinline__ T sk_fused_rows(const T* ce, const T* psi, const T* phi, const T* la,
                                           T* rsh, T* rlz, int b1, int b2, bool err, T* red) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    T acc = T(0);
    for (int i = warp; i < b1; i += kSkWarps) {
        const T* row = ce + static_cast<int64_t>(i) * b2;
        SkLse<T> st = SkLse<T>::identity();
        for (int j = lane; j < b2; j += kWarp) st.add(psi[j] - row[j]);
        st = sk_warp_merge(st);
        if (lane == 0) {
            const T sh = st.shift(), lz = st.logsum();
            rsh[i] = sh;
            rlz[i] = lz;
            if (err) acc += fabs(sk_exp(phi[i] + (sh + lz)) - sk_exp(la[i]));
        }
    }
    if (!err) return T(0);
    return sk_block_sum(acc, red);
}

template <typename T>
__global__ void __launch_bounds__(kSkThreads)
    sk_fused_fwd_kernel(SkParams<T> p, int k0, int k1, bool use_tol, bool hist, bool out) {
    if (use_tol && *p.iters < k0) return;  // the solve stopped in an earlier segment
    extern __shared__ __align__(16) unsigned char sk_smem_raw[];
    T* sm = reinterpret_cast<T*>(sk_smem_raw);
    const int b1 = p.b1, b2 = p.b2;
    const int64_t n_ce = static_cast<int64_t>(b1) * b2;
    T* ce = sm;
    T* phi = ce + n_ce;
    T* rsh = phi + b1;
    T* rlz = rsh + b1;
    T* la = rlz + b1;
    T* psi = phi + 6 * static_cast<int64_t>(b1);
    T* lb = psi + b2;
    T* scratch = psi + 6 * static_cast<int64_t>(b2);
    T* red = scratch + 2 * kSkThreads;

    const int64_t m = blockIdx.x;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const T eps = p.eps;
    const T* c = p.cost + m * n_ce;
    for (int64_t e = threadIdx.x; e < n_ce; e += kSkThreads) ce[e] = sk_div(c[e], eps);
    const int pslot = (k0 > 1 ? k0 - 2 : 0) % p.n_slots;
    for (int i = threadIdx.x; i < b1; i += kSkThreads) {
        la[i] = p.la[m * b1 + i];
        phi[i] = T(0);
    }
    for (int j = threadIdx.x; j < b2; j += kSkThreads) {
        lb[j] = p.lb[m * b2 + j];
        psi[j] = k0 > 1 ? lb[j] - (sk_hist(p.lh, pslot, 0, p.m, m, b2)[j] +
                                   sk_hist(p.lh, pslot, 1, p.m, m, b2)[j])
                        : T(0);
    }
    __syncthreads();
    sk_fused_rows(ce, psi, phi, la, rsh, rlz, b1, b2, false, red);
    for (int k = k0; k < k1; ++k) {
        __syncthreads();  // rsh, rlz complete
        const int slot = (k - 1) % p.n_slots;
        for (int i = threadIdx.x; i < b1; i += kSkThreads) {
            phi[i] = la[i] - (rsh[i] + rlz[i]);
            if (hist) {
                sk_hist(p.rh, slot, 0, p.m, m, b1)[i] = rsh[i];
                sk_hist(p.rh, slot, 1, p.m, m, b1)[i] = rlz[i];
            }
        }
        __syncthreads();  // φᵏ complete
        for (int c0 = 0; c0 < b2; c0 += kWarp) {
            const int j = c0 + lane;
            SkLse<T> st = SkLse<T>::identity();
            if (j < b2) {
                for (int i = warp; i < b1; i += kSkWarps) st.add(phi[i] - ce[static_cast<int64_t>(i) * b2 + j]);
            }
            st = sk_col_merge(st, scratch);
            if (warp == 0 && j < b2) {
                const T sh = st.shift(), lz = st.logsum();
                psi[j] = lb[j] - (sh + lz);
                if (hist) {
                    sk_hist(p.lh, slot, 0, p.m, m, b2)[j] = sh;
                    sk_hist(p.lh, slot, 1, p.m, m, b2)[j] = lz;
                }
            }
        }
        __syncthreads();  // ψᵏ complete
        if (use_tol || k + 1 < k1) {
            // Rᵏ⁺¹ (the next row update) and, with tol, the error of iteration k
            const T e = sk_fused_rows(ce, psi, phi, la, rsh, rlz, b1, b2, use_tol, red);
            if (use_tol && threadIdx.x == 0) p.part[static_cast<int64_t>(k - k0) * p.m + m] = e;
        }
    }
    if (out) {
        __syncthreads();
        for (int i = threadIdx.x; i < b1; i += kSkThreads) p.f[m * b1 + i] = phi[i] * eps;
        for (int j = threadIdx.x; j < b2; j += kSkThreads) p.g[m * b2 + j] = psi[j] * eps;
    }
}

// ------------------------------------------------------------------------- tiled forward

// Row update k for rows blockIdx.y·kSkWarps + warp: Rᵏ into slot (k − 1) % n_slots; with
// use_tol the error of iteration k − 1 over these rows into part[m, tile] (k > 1); `out`
// writes f = ε(log a − Rᵏ). grid (M, ceil(B1 / kSkWarps)).
template <typename T>
__global__ void __launch_bounds__(kSkThreads)
    sk_row_kernel(SkParams<T> p, int k, bool use_tol, bool out) {
    if (use_tol && *p.iters < k) return;
    __shared__ T psi_s[kSkThreads];
    __shared__ T red[kSkWarps];
    const int64_t m = blockIdx.x;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int b1 = p.b1, b2 = p.b2;
    const int i = blockIdx.y * kSkWarps + warp;
    const bool live = i < b1;
    const T eps = p.eps;
    const int slot = (k - 1) % p.n_slots;
    const int pslot = (k > 1 ? k - 2 : 0) % p.n_slots;
    const T* lsh = sk_hist(p.lh, pslot, 0, p.m, m, b2);
    const T* llz = sk_hist(p.lh, pslot, 1, p.m, m, b2);
    const T* row = p.cost + (m * b1 + (live ? i : 0)) * b2;
    SkLse<T> st = SkLse<T>::identity();
    for (int c0 = 0; c0 < b2; c0 += kSkThreads) {
        const int jj = c0 + threadIdx.x;
        if (jj < b2) psi_s[threadIdx.x] = k > 1 ? p.lb[m * b2 + jj] - (lsh[jj] + llz[jj]) : T(0);
        __syncthreads();
        if (live) {
            const int n = b2 - c0 < kSkThreads ? b2 - c0 : kSkThreads;
            for (int u = lane; u < n; u += kWarp) st.add(psi_s[u] - sk_div(row[c0 + u], eps));
        }
        __syncthreads();
    }
    st = sk_warp_merge(st);
    T err = T(0);
    if (live && lane == 0) {
        const T sh = st.shift(), lz = st.logsum();
        const T la = p.la[m * b1 + i];
        sk_hist(p.rh, slot, 0, p.m, m, b1)[i] = sh;
        sk_hist(p.rh, slot, 1, p.m, m, b1)[i] = lz;
        if (out) p.f[m * b1 + i] = (la - (sh + lz)) * eps;
        if (use_tol && k > 1) {
            const T qs = sk_hist(p.rh, pslot, 0, p.m, m, b1)[i];
            const T ql = sk_hist(p.rh, pslot, 1, p.m, m, b1)[i];
            err = fabs(sk_exp((la - (qs + ql)) + (sh + lz)) - sk_exp(la));
        }
    }
    if (use_tol && k > 1) {
        err = sk_block_sum(err, red);
        if (threadIdx.x == 0) p.part[m * gridDim.y + blockIdx.y] = err;
    }
}

// Column update k for columns blockIdx.y·32 + lane: Lᵏ into slot (k − 1) % n_slots (φᵏ
// from Rᵏ of the same slot); `out` writes g = ε(log b − Lᵏ). grid (M, ceil(B2 / 32)).
template <typename T>
__global__ void __launch_bounds__(kSkThreads)
    sk_col_kernel(SkParams<T> p, int k, bool use_tol, bool out) {
    if (use_tol && *p.iters < k) return;
    __shared__ T phi_s[kSkThreads];
    __shared__ T scratch[2 * kSkThreads];
    const int64_t m = blockIdx.x;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int b1 = p.b1, b2 = p.b2;
    const int j = blockIdx.y * kWarp + lane;
    const bool live = j < b2;
    const T eps = p.eps;
    const int slot = (k - 1) % p.n_slots;
    const T* rsh = sk_hist(p.rh, slot, 0, p.m, m, b1);
    const T* rlz = sk_hist(p.rh, slot, 1, p.m, m, b1);
    const T* col = p.cost + m * b1 * b2 + (live ? j : 0);
    SkLse<T> st = SkLse<T>::identity();
    for (int r0 = 0; r0 < b1; r0 += kSkThreads) {
        const int ii = r0 + threadIdx.x;
        if (ii < b1) phi_s[threadIdx.x] = p.la[m * b1 + ii] - (rsh[ii] + rlz[ii]);
        __syncthreads();
        if (live) {
            const int n = b1 - r0 < kSkThreads ? b1 - r0 : kSkThreads;
            for (int u = warp; u < n; u += kSkWarps) {
                st.add(phi_s[u] - sk_div(col[static_cast<int64_t>(r0 + u) * b2], eps));
            }
        }
        __syncthreads();
    }
    st = sk_col_merge(st, scratch);
    if (warp == 0 && live) {
        const T sh = st.shift(), lz = st.logsum();
        sk_hist(p.lh, slot, 0, p.m, m, b2)[j] = sh;
        sk_hist(p.lh, slot, 1, p.m, m, b2)[j] = lz;
        if (out) p.g[m * b2 + j] = (p.lb[m * b2 + j] - (sh + lz)) * eps;
    }
}

// One block: for k = k_first .. k_first + count − 1, the error of iteration k is
// max_m Σ_t part[(k − k_first)·M + m, t] (NaN counts as +inf); *iters = the first k whose
// error is below tol, if before *iters (torch's global rule).
template <typename T>
__global__ void __launch_bounds__(kSkThreads)
    sk_check_kernel(const T* part, int* iters, int64_t n_problems, int n_tiles, int k_first,
                    int count, T tol) {
    __shared__ T red[kSkWarps];
    int it = *iters;
    for (int s = 0; s < count; ++s) {
        T worst = T(0);
        for (int64_t mm = threadIdx.x; mm < n_problems; mm += kSkThreads) {
            const T* q = part + (static_cast<int64_t>(s) * n_problems + mm) * n_tiles;
            T e = T(0);
            for (int t = 0; t < n_tiles; ++t) e += q[t];
            if (!(e <= worst)) worst = (e != e) ? static_cast<T>(INFINITY) : e;
        }
        // block max (order-free)
#pragma unroll
        for (int o = kWarp / 2; o > 0; o >>= 1) {
            const T w = sk_shfl(worst, o);
            worst = w > worst ? w : worst;
        }
        __syncthreads();
        if (threadIdx.x % kWarp == 0) red[threadIdx.x / kWarp] = worst;
        __syncthreads();
        T all = red[0];
#pragma unroll
        for (int w = 1; w < kSkWarps; ++w) all = red[w] > all ? red[w] : all;
        const int k = k_first + s;
        if (all < tol && k < it) it = k;
    }
    if (threadIdx.x == 0) *iters = it;
}

// f = ε(log a − Rᵏ), g = ε(log b − Lᵏ) at k = *iters. grid (M, ceil(max(B1, B2) / 256)).
template <typename T>
__global__ void __launch_bounds__(kSkThreads) sk_final_kernel(SkParams<T> p) {
    const int64_t m = blockIdx.x;
    const int x = blockIdx.y * kSkThreads + threadIdx.x;
    const int slot = (*p.iters - 1) % p.n_slots;
    if (x < p.b1) {
        const T sh = sk_hist(p.rh, slot, 0, p.m, m, p.b1)[x];
        const T lz = sk_hist(p.rh, slot, 1, p.m, m, p.b1)[x];
        p.f[m * p.b1 + x] = (p.la[m * p.b1 + x] - (sh + lz)) * p.eps;
    }
    if (x < p.b2) {
        const T sh = sk_hist(p.lh, slot, 0, p.m, m, p.b2)[x];
        const T lz = sk_hist(p.lh, slot, 1, p.m, m, p.b2)[x];
        p.g[m * p.b2 + x] = (p.lb[m * p.b2 + x] - (sh + lz)) * p.eps;
    }
}

// ------------------------------------------------------------------------ fused backward

// The whole reverse pass of problem blockIdx.x (pytorch.py's SinkhornFunction.backward):
// k = *iters .. 1, history slot k − 1. C̄ is read-modified-written in global memory by
// the one thread that owns each entry (see the header).
template <typename T>
__global__ void __launch_bounds__(kSkThreads) sk_fused_bwd_kernel(SkParams<T> p) {
    extern __shared__ __align__(16) unsigned char sk_smem_raw[];
    T* sm = reinterpret_cast<T*>(sk_smem_raw);
    const int b1 = p.b1, b2 = p.b2;
    const int64_t n_ce = static_cast<int64_t>(b1) * b2;
    T* ce = sm;
    T* phi = ce + n_ce;
    T* rsh = phi + b1;
    T* rlz = rsh + b1;
    T* la = rlz + b1;
    T* fb = la + b1;
    T* lab = fb + b1;
    T* psp = phi + 6 * static_cast<int64_t>(b1);
    T* lsh = psp + b2;
    T* llz = lsh + b2;
    T* lb = llz + b2;
    T* gb = lb + b2;
    T* lbb = gb + b2;
    T* scratch = psp + 6 * static_cast<int64_t>(b2);

    const int64_t m = blockIdx.x;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const T eps = p.eps;
    const T* c = p.cost + m * n_ce;
    T* cb = p.cbar + m * n_ce;
    for (int64_t e = threadIdx.x; e < n_ce; e += kSkThreads) ce[e] = sk_div(c[e], eps);
    for (int i = threadIdx.x; i < b1; i += kSkThreads) {
        la[i] = p.la[m * b1 + i];
        fb[i] = p.gf != nullptr ? p.gf[m * b1 + i] : T(0);
        lab[i] = T(0);
    }
    for (int j = threadIdx.x; j < b2; j += kSkThreads) {
        lb[j] = p.lb[m * b2 + j];
        gb[j] = p.gg != nullptr ? p.gg[m * b2 + j] : T(0);
        lbb[j] = T(0);
    }
    const int n = *p.iters;
    for (int k = n; k >= 1; --k) {
        __syncthreads();  // the previous iteration's f̄, ḡ (and the first loads) complete
        for (int i = threadIdx.x; i < b1; i += kSkThreads) {
            rsh[i] = sk_hist(p.rh, k - 1, 0, p.m, m, b1)[i];
            rlz[i] = sk_hist(p.rh, k - 1, 1, p.m, m, b1)[i];
            phi[i] = la[i] - (rsh[i] + rlz[i]);
        }
        for (int j = threadIdx.x; j < b2; j += kSkThreads) {
            lsh[j] = sk_hist(p.lh, k - 1, 0, p.m, m, b2)[j];
            llz[j] = sk_hist(p.lh, k - 1, 1, p.m, m, b2)[j];
            psp[j] = k > 1 ? lb[j] - (sk_hist(p.lh, k - 2, 0, p.m, m, b2)[j] +
                                      sk_hist(p.lh, k - 2, 1, p.m, m, b2)[j])
                           : T(0);
        }
        __syncthreads();
        // column update ψᵏ = log b − LSE_i(φᵏ − Ce): C̄ += β ⊙ ḡ, f̄ −= Σ_j β ḡ, log b̄ += ε ḡ
        for (int i = warp; i < b1; i += kSkWarps) {
            const int64_t r = static_cast<int64_t>(i) * b2;
            T acc = T(0);
            for (int j = lane; j < b2; j += kWarp) {
                const T w = sk_exp(((phi[i] - ce[r + j]) - lsh[j]) - llz[j]) * gb[j];
                cb[r + j] += w;
                acc += w;
            }
            acc = sk_warp_sum(acc);
            if (lane == 0) fb[i] -= acc;
        }
        for (int j = threadIdx.x; j < b2; j += kSkThreads) lbb[j] += eps * gb[j];
        __syncthreads();  // f̄ complete; ḡ read for the last time
        // row update φᵏ = log a − LSE_j(ψᵏ⁻¹ − Ce): C̄ += α ⊙ f̄, ḡ = −Σ_i α f̄
        for (int c0 = 0; c0 < b2; c0 += kWarp) {
            const int j = c0 + lane;
            T acc = T(0);
            if (j < b2) {
                for (int i = warp; i < b1; i += kSkWarps) {
                    const int64_t e = static_cast<int64_t>(i) * b2 + j;
                    const T w = sk_exp(((psp[j] - ce[e]) - rsh[i]) - rlz[i]) * fb[i];
                    cb[e] += w;
                    acc += w;
                }
            }
            acc = sk_col_sum(acc, scratch);
            if (warp == 0 && j < b2) gb[j] = -acc;
        }
        __syncthreads();  // every read of f̄ done
        for (int i = threadIdx.x; i < b1; i += kSkThreads) {
            lab[i] += eps * fb[i];
            fb[i] = T(0);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < b1; i += kSkThreads) p.labar[m * b1 + i] = lab[i];
    for (int j = threadIdx.x; j < b2; j += kSkThreads) p.lbbar[m * b2 + j] = lbb[j];
}

// ------------------------------------------------------------------------ tiled backward

// Reverse of the column update k over rows blockIdx.y·kSkWarps + warp: C̄ += β ⊙ ḡ,
// f̄ = f̄_in − Σ_j β ḡ (f̄_in = the upstream f̄ at k = *iters, else 0), log ā += ε f̄.
template <typename T>
__global__ void __launch_bounds__(kSkThreads) sk_bwd_col_kernel(SkParams<T> p, int k) {
    const int it = *p.iters;
    if (k > it) return;
    __shared__ T st_s[3][kSkThreads];
    const int64_t m = blockIdx.x;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int b1 = p.b1, b2 = p.b2;
    const int i = blockIdx.y * kSkWarps + warp;
    const bool live = i < b1;
    const T eps = p.eps;
    const T* lsh = sk_hist(p.lh, k - 1, 0, p.m, m, b2);
    const T* llz = sk_hist(p.lh, k - 1, 1, p.m, m, b2);
    T phi = T(0);
    if (live) {
        phi = p.la[m * b1 + i] - (sk_hist(p.rh, k - 1, 0, p.m, m, b1)[i] +
                                  sk_hist(p.rh, k - 1, 1, p.m, m, b1)[i]);
    }
    const int64_t r = (m * b1 + (live ? i : 0)) * b2;
    T acc = T(0);
    for (int c0 = 0; c0 < b2; c0 += kSkThreads) {
        const int jj = c0 + threadIdx.x;
        if (jj < b2) {
            st_s[0][threadIdx.x] = lsh[jj];
            st_s[1][threadIdx.x] = llz[jj];
            st_s[2][threadIdx.x] = p.gb[m * b2 + jj];
        }
        __syncthreads();
        if (live) {
            const int nn = b2 - c0 < kSkThreads ? b2 - c0 : kSkThreads;
            for (int u = lane; u < nn; u += kWarp) {
                const int64_t e = r + c0 + u;
                const T ce = sk_div(p.cost[e], eps);
                const T w = sk_exp(((phi - ce) - st_s[0][u]) - st_s[1][u]) * st_s[2][u];
                p.cbar[e] += w;
                acc += w;
            }
        }
        __syncthreads();
    }
    acc = sk_warp_sum(acc);
    if (live && lane == 0) {
        const T f_in = k == it ? p.fb[m * b1 + i] : T(0);
        const T fbv = f_in - acc;
        p.fb[m * b1 + i] = fbv;
        p.labar[m * b1 + i] += eps * fbv;
    }
}

// Reverse of the row update k over columns blockIdx.y·32 + lane: C̄ += α ⊙ f̄,
// log b̄ += ε ḡ (the column update's term), then ḡ = −Σ_i α f̄.
template <typename T>
__global__ void __launch_bounds__(kSkThreads) sk_bwd_row_kernel(SkParams<T> p, int k) {
    if (k > *p.iters) return;
    __shared__ T st_s[3][kSkThreads];
    __shared__ T scratch[kSkThreads];
    const int64_t m = blockIdx.x;
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int b1 = p.b1, b2 = p.b2;
    const int j = blockIdx.y * kWarp + lane;
    const bool live = j < b2;
    const T eps = p.eps;
    T psp = T(0);
    if (live && k > 1) {
        psp = p.lb[m * b2 + j] - (sk_hist(p.lh, k - 2, 0, p.m, m, b2)[j] +
                                  sk_hist(p.lh, k - 2, 1, p.m, m, b2)[j]);
    }
    const T* rsh = sk_hist(p.rh, k - 1, 0, p.m, m, b1);
    const T* rlz = sk_hist(p.rh, k - 1, 1, p.m, m, b1);
    const int64_t base = m * b1 * b2 + (live ? j : 0);
    T acc = T(0);
    for (int r0 = 0; r0 < b1; r0 += kSkThreads) {
        const int ii = r0 + threadIdx.x;
        if (ii < b1) {
            st_s[0][threadIdx.x] = rsh[ii];
            st_s[1][threadIdx.x] = rlz[ii];
            st_s[2][threadIdx.x] = p.fb[m * b1 + ii];
        }
        __syncthreads();
        if (live) {
            const int nn = b1 - r0 < kSkThreads ? b1 - r0 : kSkThreads;
            for (int u = warp; u < nn; u += kSkWarps) {
                const int64_t e = base + static_cast<int64_t>(r0 + u) * b2;
                const T ce = sk_div(p.cost[e], eps);
                const T w = sk_exp(((psp - ce) - st_s[0][u]) - st_s[1][u]) * st_s[2][u];
                p.cbar[e] += w;
                acc += w;
            }
        }
        __syncthreads();
    }
    acc = sk_col_sum(acc, scratch);
    if (warp == 0 && live) {
        p.lbbar[m * b2 + j] += eps * p.gb[m * b2 + j];
        p.gb[m * b2 + j] = -acc;
    }
}

}  // namespace kdk
