// Logit softcap of the fused linear loss and its chain rule (element-wise, one row per
// grid row). With u = scale·z/c folded into the GEMM, S = c·tanh(u) and
// dS/dz = scale·sech²(u); sech²(u) = 4e/(1 + e)², e = exp(−2|u|), so a saturated cap
// gives no 1 − tanh² cancellation. Arithmetic in float32, one rounding into T.
#pragma once

#include "common.cuh"

namespace kdk {

__device__ __forceinline__ float sech2f(float u) {
    const float e = expf(-2.0f * fabsf(u));
    return 4.0f * e / ((1.0f + e) * (1.0f + e));
}

// out[row, j] = cap·tanh(u[row, j]); out may alias u. grid = (rows, column blocks).
template <typename T>
__global__ void __launch_bounds__(256)
    softcap_fwd_kernel(const T* u, T* out, int64_t row0, int64_t stride_u, int64_t stride_o,
                       int v, float cap) {
    const int64_t row = row0 + blockIdx.x;
    const T* ur = u + row * stride_u;
    T* orow = out + row * stride_o;
    const int step = gridDim.y * blockDim.x;
    for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < v; j += step)
        orow[j] = from_float<T>(cap * tanhf(to_float(ur[j])));
}

// g[row, j] *= (k·sech²(u[row, j]) when u) · (rs[row] when rs), in place.
template <typename T>
__global__ void __launch_bounds__(256)
    softcap_bwd_kernel(T* g, const T* u, const float* rs, int64_t row0, int64_t stride_g,
                       int64_t stride_u, int v, float k) {
    const int64_t row = row0 + blockIdx.x;
    const float r = rs != nullptr ? rs[row] : 1.0f;
    T* gr = g + row * stride_g;
    const T* ur = u != nullptr ? u + row * stride_u : nullptr;
    const int step = gridDim.y * blockDim.x;
    for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < v; j += step) {
        float x = to_float(gr[j]) * r;
        if (ur != nullptr) x *= k * sech2f(to_float(ur[j]));
        gr[j] = from_float<T>(x);
    }
}

}  // namespace kdk
