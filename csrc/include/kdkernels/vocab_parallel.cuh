// Device code shared by the vocabulary-parallel kernels (kd_parallel.cuh,
// topk_kd_parallel.cuh; docs/vocab_parallel.md): the compute type of a row type, the math
// they need in both compute types, reading a row's columns in the compute type, filling
// and storing a row, and reading a label.
//
// Compute type C: float for float32 / float16 / bfloat16 rows, double for float64 rows
// (the Triton kernels' CDT). The helpers of common.cuh, online_softmax.cuh (PivotMax and
// PivotMax64), logscan.cuh (softplus) and divergence.cuh (logaddexp) are used as they
// are; the double overloads below complete them.
#pragma once

#include <climits>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "divergence.cuh"
#include "logscan.cuh"
#include "online_softmax.cuh"
#include "reduce.cuh"

namespace kdk {

// Threads per block of the vocabulary-parallel kernels (128 for shards under 4096 columns),
// and the blocks per SM their register budget is sized for (65536 / (256·2) = 128
// registers per thread: the float64 instances need more than 64).
constexpr int kVpThreads = 256;
constexpr int kVpMinBlocks = 2;

template <typename T> struct Compute {
    using type = float;
};
template <> struct Compute<double> {
    using type = double;
};

// PivotMax in the compute type: the max, its lowest column, and Σ e^{d − m} over every
// other column (online_softmax.cuh).
template <typename C> struct Pivot;
template <> struct Pivot<float> {
    using type = PivotMax;
};
template <> struct Pivot<double> {
    using type = PivotMax64;
};

template <typename C> __device__ __forceinline__ C neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return KDK_NEG_INF; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -HUGE_VAL; }

// NaN or +inf (a −inf logit is a mask, not an error).
template <typename C> __device__ __forceinline__ bool nan_or_inf(C x) {
    return (x != x) || (x == -neg_inf<C>());
}

__device__ __forceinline__ float vp_exp(float x) { return expf(x); }
__device__ __forceinline__ double vp_exp(double x) { return exp(x); }
__device__ __forceinline__ float vp_log(float x) { return logf(x); }
__device__ __forceinline__ double vp_log(double x) { return log(x); }
__device__ __forceinline__ float vp_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double vp_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float vp_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double vp_abs(double x) { return fabs(x); }

// The double versions of logscan.cuh's softplus, divergence.cuh's logaddexp and
// common.cuh's safe_max.
__device__ __forceinline__ double softplus(double z) {
    return z > 0.0 ? z + log1p(exp(-z)) : log1p(exp(z));
}
__device__ __forceinline__ double safe_max(double m) { return m == -HUGE_VAL ? 0.0 : m; }
__device__ __forceinline__ double logaddexp(double x, double y) {
    const double m = safe_max(fmax(x, y));
    return m + log(exp(x - m) + exp(y - m));
}

template <typename C> __device__ __forceinline__ C sigmoid(C x) {
    const C e = vp_exp(-vp_abs(x));
    return x >= C(0) ? C(1) / (C(1) + e) : e / (C(1) + e);
}

// sigmoid(x) − softplus(x) = w + log(1 − w), w = sigmoid(x); below w = 1/4 the two cancel
// (the value is ≈ −w²/2): there the series −Σ_{k≥2} wᵏ/k to k = 14.
template <typename C> __device__ __forceinline__ C sigmoid_minus_softplus(C x) {
    const C w = sigmoid(x);
    if (w >= C(0.25)) return w - softplus(x);
    C series = C(1) / C(14);
#pragma unroll
    for (int k = 13; k >= 2; --k) series = series * w + C(1) / C(k);
    return -series * w * w;
}

// Element in the compute type, and back.
template <typename C, typename T> __device__ __forceinline__ C to_c(T x) {
    if constexpr (std::is_same<T, double>::value) {
        return x;
    } else {
        return static_cast<C>(to_float(x));
    }
}
template <typename T, typename C> __device__ __forceinline__ T from_c(C x) {
    if constexpr (std::is_same<T, double>::value) {
        return x;
    } else {
        return from_float<T>(static_cast<float>(x));
    }
}

// Visit columns [0, n) of one or two rows (for_each_col: 16-byte vectors when both rows
// are aligned, columns in increasing order within a thread); f(i, s_i, t_i) in the compute
// type. float64 rows are read an element per thread (coalesced).
template <typename T, bool NEED_T, typename F>
__device__ __forceinline__ void vp_cols(const T* s, const T* t, int n, F&& f) {
    if constexpr (std::is_same<T, double>::value) {
        for (int i = static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
            f(i, s[i], NEED_T ? t[i] : 0.0);
        }
    } else {
        const bool vec = aligned16(s) && (!NEED_T || aligned16(t));
        for_each_col<T, NEED_T>(s, t, n, vec, f);
    }
}

// out[i] = f(i, s_i, t_i) rounded to T, for i in [0, n) (map_cols for 16/32-bit rows).
template <typename T, bool NEED_T, typename F>
__device__ __forceinline__ void vp_map(const T* s, const T* t, T* out, int n, F&& f) {
    if constexpr (std::is_same<T, double>::value) {
        for (int i = static_cast<int>(threadIdx.x); i < n; i += blockDim.x) {
            out[i] = f(i, s[i], NEED_T ? t[i] : 0.0);
        }
    } else {
        const bool vec = aligned16(s) && (!NEED_T || aligned16(t)) && aligned16(out);
        map_cols<T, NEED_T>(s, t, out, n, vec, [&](int i, float xs, float xt) -> float {
            return static_cast<float>(f(i, xs, xt));
        });
    }
}

// out[i] = value for i in [0, n), by the block.
template <typename T> __device__ __forceinline__ void vp_fill(T* out, int n, float value) {
    if constexpr (std::is_same<T, double>::value) {
        for (int i = static_cast<int>(threadIdx.x); i < n; i += blockDim.x) out[i] = value;
    } else {
        fill_row(out, n, value);
    }
}

__device__ __forceinline__ int64_t read_label(const void* labels, bool i64, int64_t row,
                                              int64_t stride) {
    return i64 ? static_cast<const int64_t*>(labels)[row * stride]
               : static_cast<int64_t>(static_cast<const int32_t*>(labels)[row * stride]);
}

// Sums of three compute-type values (reduce.cuh's Sum3 for C).
template <typename C> struct Sum3C {
    C x, y, z;
};
template <typename C> __device__ __forceinline__ Sum3C<C> shfl_xor(const Sum3C<C>& s, int o) {
    return {shfl_xor(s.x, o), shfl_xor(s.y, o), shfl_xor(s.z, o)};
}
struct AddSum3C {
    template <typename C>
    __device__ __forceinline__ Sum3C<C> operator()(const Sum3C<C>& a, const Sum3C<C>& b) const {
        return {a.x + b.x, a.y + b.y, a.z + b.z};
    }
};

}  // namespace kdk
