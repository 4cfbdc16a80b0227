// Running log-sum-exp states, merged exactly, with the student's argmax kept apart.
//
// PivotMax holds, over the columns seen so far, the maximum m of a, its column p (the
// lowest column among equal maxima: the "pivot" j*), and Z' = Σ_{v≠j*} e^{a_v − m}, the
// normaliser without the pivot's own 1. Then lse(a) = m + log1p(Z'), q_{j*} = 1/(1+Z')
// and 1 − q_{j*} = Z'/(1+Z') come out without cancellation even when q is one-hot to
// float32 precision (see kdkernels/kd/chunked.py for why the gradient needs this).
// Merging two states keeps the larger maximum; the loser's pivot joins Z' as
// (Z'_loser + 1)·e^{m_loser − m}. PivotMax64 is the same state in float64.
//
// SumExp holds m = max b, Z = Σ e^{b − m} and A = Σ e^{b − m}·u for a per-column weight u
// (forward KL uses u = b − a so that Σ_v p_v (b_v − a_v) = A/Z). Merging rescales both
// sums to the larger maximum.
//
// Entries equal to -inf contribute nothing; a state that saw only -inf has m = -inf,
// Z = 0 and is the identity of the merge.
#pragma once

#include <climits>
#include <cmath>

#include "common.cuh"

namespace kdk {

struct PivotMax {
    float m;  // running max
    float z;  // Σ over non-pivot columns of e^{a − m}
    int p;    // pivot column (INT_MAX while m == -inf)

    __device__ __forceinline__ static PivotMax identity() { return {KDK_NEG_INF, 0.0f, INT_MAX}; }

    // Add column j with value a; columns must arrive in increasing order per state.
    __device__ __forceinline__ void update(float a, int j) {
        if (a > m) {
            z = (m == KDK_NEG_INF) ? 0.0f : (z + 1.0f) * expf(m - a);
            m = a;
            p = j;
        } else if (a > KDK_NEG_INF) {
            z += expf(a - m);  // a <= m, and m is finite here
        }
    }
};

__device__ __forceinline__ PivotMax shfl_xor(const PivotMax& s, int o) {
    return {shfl_xor(s.m, o), shfl_xor(s.z, o), shfl_xor(s.p, o)};
}

__device__ __forceinline__ PivotMax merge(const PivotMax& x, const PivotMax& y) {
    const bool x_wins = (x.m > y.m) || (x.m == y.m && x.p <= y.p);
    // Field-wise selects (no references to either operand: keeps the states in registers).
    const float wm = x_wins ? x.m : y.m, wz = x_wins ? x.z : y.z;
    const float lm = x_wins ? y.m : x.m, lz = x_wins ? y.z : x.z;
    const int wp = x_wins ? x.p : y.p;
    if (lm == KDK_NEG_INF) return {wm, wz + lz, wp};
    return {wm, wz + (lz + 1.0f) * expf(lm - wm), wp};
}

// PivotMax in float64 (the same update and merge), where float32 would lose what matters:
// a few values per row (topk_kd.cuh's teacher entries), or the float64 rows of the
// vocabulary-parallel kernels (vocab_parallel.cuh's Pivot<double>).
struct PivotMax64 {
    double m;
    double z;
    int p;

    __device__ __forceinline__ static PivotMax64 identity() { return {-HUGE_VAL, 0.0, INT_MAX}; }

    __device__ __forceinline__ void update(double a, int j) {
        if (a > m) {
            z = (m == -HUGE_VAL) ? 0.0 : (z + 1.0) * exp(m - a);
            m = a;
            p = j;
        } else if (a > -HUGE_VAL) {
            z += exp(a - m);
        }
    }
};

__device__ __forceinline__ PivotMax64 shfl_xor(const PivotMax64& s, int o) {
    return {shfl_xor(s.m, o), shfl_xor(s.z, o), shfl_xor(s.p, o)};
}

__device__ __forceinline__ PivotMax64 merge(const PivotMax64& x, const PivotMax64& y) {
    const bool x_wins = (x.m > y.m) || (x.m == y.m && x.p <= y.p);
    const double wm = x_wins ? x.m : y.m, wz = x_wins ? x.z : y.z;
    const double lm = x_wins ? y.m : x.m, lz = x_wins ? y.z : x.z;
    const int wp = x_wins ? x.p : y.p;
    if (lm == -HUGE_VAL) return {wm, wz + lz, wp};
    return {wm, wz + (lz + 1.0) * exp(lm - wm), wp};
}

// acc·r where r = e^{m_old − m_new} ∈ [0, 1]; an underflowed r drops the old terms (0·inf
// would otherwise be NaN when an earlier column had p > 0 = q).
__device__ __forceinline__ float rescale(float acc, float r) { return r > 0.0f ? acc * r : 0.0f; }

struct SumExp {
    float m;  // running max
    float z;  // Σ e^{b − m}
    float a;  // Σ e^{b − m}·u

    __device__ __forceinline__ static SumExp identity() { return {KDK_NEG_INF, 0.0f, 0.0f}; }

    __device__ __forceinline__ void update(float b, float u) {
        if (b > m) {
            const float r = (m == KDK_NEG_INF) ? 0.0f : expf(m - b);
            z = z * r + 1.0f;
            a = rescale(a, r) + u;
            m = b;
        } else if (b > KDK_NEG_INF) {
            const float e = expf(b - m);
            z += e;
            if (e > 0.0f) a += e * u;
        }
    }
};

__device__ __forceinline__ SumExp shfl_xor(const SumExp& s, int o) {
    return {shfl_xor(s.m, o), shfl_xor(s.z, o), shfl_xor(s.a, o)};
}

__device__ __forceinline__ SumExp merge(const SumExp& x, const SumExp& y) {
    const float m = fmaxf(x.m, y.m);
    if (m == KDK_NEG_INF) return SumExp::identity();
    const float rx = (x.m == KDK_NEG_INF) ? 0.0f : expf(x.m - m);
    const float ry = (y.m == KDK_NEG_INF) ? 0.0f : expf(y.m - m);
    return {m, x.z * rx + y.z * ry, rescale(x.a, rx) + rescale(y.a, ry)};
}

}  // namespace kdk
