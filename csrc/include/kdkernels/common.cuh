// Shared device utilities: element types, conversions, 16-byte vector access.
// Framework-free: raw pointers and sizes only (no torch headers anywhere in csrc/).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "api.h"

namespace kdk {


constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;  // block reductions keep one partial per warp in one warp
static_assert(kMaxThreads / kWarp <= kWarp, "at most 32 warps per block");

#define KDK_INF __int_as_float(0x7f800000)
#define KDK_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Elements per 16-byte vector.
template <typename T> struct Vec {
    static_assert(sizeof(T) == 2 || sizeof(T) == 4, "fp32, fp16 and bf16 only");
    static constexpr int N = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Load Vec<T>::N elements from a 16-byte aligned address (global or shared) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::N]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[Vec<T>::N];
    memcpy(e, &raw, sizeof(raw));
#pragma unroll
    for (int u = 0; u < Vec<T>::N; ++u) out[u] = to_float(e[u]);
}

// Store Vec<T>::N floats, rounded to T, to a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::N]) {
    T e[Vec<T>::N];
#pragma unroll
    for (int u = 0; u < Vec<T>::N; ++u) e[u] = from_float<T>(in[u]);
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(p) = raw;
}

// Lane exchange for the reductions (reduce.cuh); states of several fields overload it.
__device__ __forceinline__ float shfl_xor(float x, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, x, lane_mask);
}
__device__ __forceinline__ int shfl_xor(int x, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, x, lane_mask);
}
__device__ __forceinline__ double shfl_xor(double x, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, x, lane_mask);
}

// A running maximum of -inf (nothing but masked entries so far) is replaced by 0 before
// subtracting it, so that -inf - (-inf) never makes a NaN.
__device__ __forceinline__ float safe_max(float m) { return m == KDK_NEG_INF ? 0.0f : m; }

// Visit columns [0, n) of one or two rows held at s (and t), each thread taking every
// blockDim.x-th 16-byte vector, then the scalar tail; f(i, s_i, t_i) in float32.
// Within a thread the columns come in increasing order (the pivot tie rule relies on it).
// `vec` says both rows start 16-byte aligned. With NEED_T false, t is never read.
template <typename T, bool NEED_T, typename F>
__device__ __forceinline__ void for_each_col(const T* s, const T* t, int n, bool vec, F&& f) {
    constexpr int V = Vec<T>::N;
    const int nvec = vec ? n / V : 0;
    for (int k = threadIdx.x; k < nvec; k += blockDim.x) {
        float xs[V], xt[V];
        load_vec(s + static_cast<int64_t>(k) * V, xs);
        if constexpr (NEED_T) {
            load_vec(t + static_cast<int64_t>(k) * V, xt);
        } else {
#pragma unroll
            for (int u = 0; u < V; ++u) xt[u] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < V; ++u) f(k * V + u, xs[u], xt[u]);
    }
    for (int i = nvec * V + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
        f(i, to_float(s[i]), NEED_T ? to_float(t[i]) : 0.0f);
    }
}

// Like for_each_col, and out[i] = f(i, s_i, t_i) rounded to T. `vec` must also cover out.
// out may alias s: every element is read before the same thread writes it.
template <typename T, bool NEED_T, typename F>
__device__ __forceinline__ void map_cols(const T* s, const T* t, T* out, int n, bool vec, F&& f) {
    constexpr int V = Vec<T>::N;
    const int nvec = vec ? n / V : 0;
    for (int k = threadIdx.x; k < nvec; k += blockDim.x) {
        float xs[V], xt[V], g[V];
        load_vec(s + static_cast<int64_t>(k) * V, xs);
        if constexpr (NEED_T) {
            load_vec(t + static_cast<int64_t>(k) * V, xt);
        } else {
#pragma unroll
            for (int u = 0; u < V; ++u) xt[u] = 0.0f;
        }
#pragma unroll
        for (int u = 0; u < V; ++u) g[u] = f(k * V + u, xs[u], xt[u]);
        store_vec(out + static_cast<int64_t>(k) * V, g);
    }
    for (int i = nvec * V + static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
        out[i] = from_float<T>(f(i, to_float(s[i]), NEED_T ? to_float(t[i]) : 0.0f));
    }
}

// out[i] = 0 for i in [lo, hi), threads of `parts` cooperating blocks (this is part `part`).
template <typename T>
__device__ __forceinline__ void zero_cols(T* out, int64_t lo, int64_t hi, int part, int parts) {
    const int64_t step = static_cast<int64_t>(parts) * blockDim.x;
    for (int64_t i = lo + static_cast<int64_t>(part) * blockDim.x + threadIdx.x; i < hi;
         i += step) {
        out[i] = from_float<T>(0.0f);
    }
}

}  // namespace kdk
