// Log-space sums for the PLD and top-k KD kernels: a running log-sum-exp state, the
// pairwise log(e^x + e^y), and a block-wide inclusive scan under it (with a carry from
// the previous tile), deterministic in order like reduce.cuh.
#pragma once

#include "common.cuh"

namespace kdk {

// log(e^x + e^y); -inf when both are -inf (no -inf - (-inf)). One exp and one log1p.
__device__ __forceinline__ float lse2(float x, float y) {
    const float m = fmaxf(x, y);
    if (m == KDK_NEG_INF) return m;
    return m + log1pf(expf(fminf(x, y) - m));
}

// Running log-sum-exp of the values seen so far: m = max, z = Σ e^{x − m}. A state that
// saw only -inf (or nothing) has m = -inf, z = 0 and is the identity of the merge.
struct LseState {
    float m;
    float z;

    __device__ __forceinline__ static LseState identity() { return {KDK_NEG_INF, 0.0f}; }

    __device__ __forceinline__ void update(float x) {
        if (x > m) {
            z = (m == KDK_NEG_INF ? 0.0f : z * expf(m - x)) + 1.0f;
            m = x;
        } else if (x > KDK_NEG_INF) {
            z += expf(x - m);  // x <= m, and m is finite here (or +inf: a bad row)
        }
    }

    // log Σ e^x (-inf for the identity)
    __device__ __forceinline__ float lse() const { return m == KDK_NEG_INF ? m : m + logf(z); }
};

__device__ __forceinline__ LseState shfl_xor(const LseState& s, int o) {
    return {shfl_xor(s.m, o), shfl_xor(s.z, o)};
}

__device__ __forceinline__ LseState merge(const LseState& x, const LseState& y) {
    const float m = fmaxf(x.m, y.m);
    if (m == KDK_NEG_INF) return LseState::identity();
    const float zx = x.m == KDK_NEG_INF ? 0.0f : x.z * expf(x.m - m);
    const float zy = y.m == KDK_NEG_INF ? 0.0f : y.z * expf(y.m - m);
    return {m, zx + zy};
}

// log(1 + e^z), accurate for every z (a tiny result keeps its relative precision).
__device__ __forceinline__ float softplus(float z) {
    return z > 0.0f ? z + log1pf(expf(-z)) : log1pf(expf(z));
}

// Inclusive and exclusive scans under lse2 over the block: v holds this thread's ITEMS
// consecutive values; the block's values are in thread order (thread 0's first). On return
// v[i] = lse2(carry, every value up to and including v[i]) and ex[i] = lse2(carry, every
// value before v[i]). Returns the next carry, lse2(carry, all values of the block), in
// every thread. blockDim.x: a multiple of 32, at most 1024. `scratch`: at least 33 floats
// of shared memory, free again on return.
template <int ITEMS>
__device__ __forceinline__ float block_scan_lse(float (&v)[ITEMS], float (&ex)[ITEMS], float carry,
                                                float* scratch) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    ex[0] = KDK_NEG_INF;
#pragma unroll
    for (int i = 1; i < ITEMS; ++i) {
        ex[i] = v[i - 1];
        v[i] = lse2(v[i - 1], v[i]);
    }
    float incl = v[ITEMS - 1];  // this thread's total, then the warp-inclusive prefix
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl = lse2(y, incl);
    }
    float excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = KDK_NEG_INF;
    if (lane == kWarp - 1) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const float w = lane < nwarps ? scratch[lane] : KDK_NEG_INF;
        float wi = w;
#pragma unroll
        for (int o = 1; o < kWarp; o <<= 1) {
            const float y = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi = lse2(y, wi);
        }
        float we = __shfl_up_sync(0xffffffffu, wi, 1);
        if (lane == 0) we = KDK_NEG_INF;
        scratch[lane] = we;  // exclusive prefix of the warp totals
        if (lane == kWarp - 1) scratch[kWarp] = wi;
    }
    __syncthreads();
    const float pre = lse2(carry, lse2(scratch[warp], excl));
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        v[i] = lse2(pre, v[i]);
        ex[i] = lse2(pre, ex[i]);
    }
    const float next = lse2(carry, scratch[kWarp]);
    __syncthreads();
    return next;
}

// out[i] = value for i in [0, n): 16-byte stores when out is aligned, by the block.
template <typename T>
__device__ __forceinline__ void fill_row(T* out, int n, float value) {
    constexpr int V = Vec<T>::N;
    const int nvec = aligned16(out) ? n / V : 0;
    float vals[V];
#pragma unroll
    for (int u = 0; u < V; ++u) vals[u] = value;
    for (int k = threadIdx.x; k < nvec; k += blockDim.x) store_vec(out + static_cast<int64_t>(k) * V, vals);
    const T x = from_float<T>(value);
    for (int i = nvec * V + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) out[i] = x;
}

// NaN or +inf (a -inf logit is a mask, not an error).
__device__ __forceinline__ int nan_or_pinf(float x) { return (x != x) || (x == KDK_INF); }

}  // namespace kdk
