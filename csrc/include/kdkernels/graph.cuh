// The graph-on-logits kernels (`graph_on_logits_loss`, `topk_logit_graph`; docs/spec.md §5,
// the math: kdkernels/graph/pytorch.py; the same design as kdkernels/graph/triton.py).
//
// Row stage (per position of each model): the top-k classes come from topk_select
// (topk.cuh: values descending, ties by lower index, NaN first); graph_rows_kernel adds
// the row's log-sum-exp of z/τ (one pass) and writes the entries a_j = exp(z_j/τ − LSE),
// their classes (int32), the top-k mass m = Σ a_j and the LSE. A masked row writes a = 0,
// the class kNoClass (sorts last), m = 0, LSE = 0, and reads nothing. A row with a NaN or
// +inf logit, or without a finite one, gets LSE = NaN (so its entries and gradient are NaN).
//
// Group stage (per group g of T positions; both models side by side as g2 = side·G + g),
// on the P = T·k entries only:
//   graph_runs_kernel  entries sorted by class (a stable library sort; key[p], perm[p] =
//                      the entry t·k + j). The thread at the first entry of each class run
//                      sums the run's weights w = a·m in 64-bit fixed point (2^F per unit:
//                      exact, so strengths that are equal term by term tie exactly, and
//                      order-free), writes du[p] = sum + 1 (untouched slots stay −1: they
//                      sort after every strength), counts the run in nu[g2], flags a NaN
//                      weight in bad[g2], and (student) tells every entry its slot p.
//   graph_gw_kernel    strengths sorted descending (a stable library sort, so equal sums
//                      keep the class order: ties by lower class), x (student) and y
//                      (teacher) zero beyond their counts, n = max(ns, nt): in float64,
//                      the centred moments of e = x − y, s = x + y for the identity and
//                      the reversal pairing, the closed form
//                        Σ_{i,j}(e_i − e_j)²(s_i − s_j)² = 2nΣe²s² + 2Σe²Σs² + 4(Σes)²
//                                                          − 4Σe²sΣs − 4Σes²Σe,
//                      the better pairing (identity on ties), the cost /n², and, with a
//                      gradient, ∂cost/∂x_i = 4/n²·(de_i + ds_i) (pytorch.py's algebra,
//                      de_i = Σ_j (e_i − e_j)(s_i − s_j)², ds_i likewise) at the slot of x_i.
//   graph_finish_kernel  loss = the mean over groups with a valid position (fixed order).
// Backward (per student row), graph_rows_bwd_kernel: ā_j = g_{u_j}·m + Σ_j' g_{u_j'} a_j'
// (the scatter back through the sort and the strength sums; or ā from the caller for
// topk_logit_graph), then the top-k softmax backward relative to the mode r (the first
// entry): ā_w − c = (ā_w − ā_r) + ā_r·tail − Σ_K a (ā − ā_r). One pass over the row writes
// −p_w·c·sc for every class outside the top-k (the k-th entry's order key decides, no
// list) and sums their mass (tail, never 1 − Σ_K p); after a barrier the k entries are
// written. Each address is written once (a bad row, whose entries may fail the key test,
// is NaN throughout and its top-k entries are written last).
#pragma once

#include <climits>

#include "common.cuh"
#include "logscan.cuh"
#include "topk.cuh"

namespace kdk {

constexpr int kGraphThreads = 256;
constexpr int kGraphWarps = kGraphThreads / kWarp;
constexpr int kNoClass = INT_MAX;

// Deterministic block sum of `N` doubles per thread (kGraphThreads threads); every thread
// gets the totals. `red` holds kGraphWarps·N doubles of shared memory.
template <int N> __device__ __forceinline__ void graph_block_sums(double (&v)[N], double* red) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
    for (int q = 0; q < N; ++q) {
#pragma unroll
        for (int o = kWarp / 2; o > 0; o >>= 1) v[q] += __shfl_xor_sync(0xffffffffu, v[q], o);
    }
    __syncthreads();
    if (lane == 0) {
#pragma unroll
        for (int q = 0; q < N; ++q) red[warp * N + q] = v[q];
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < N; ++q) {
        double t = 0.0;
        for (int w = 0; w < kGraphWarps; ++w) t += red[w * N + q];
        v[q] = t;
    }
    __syncthreads();
}

__device__ __forceinline__ float graph_block_sum(float v, float* red) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.0f;
#pragma unroll
    for (int w = 0; w < kGraphWarps; ++w) t += red[w];
    __syncthreads();
    return t;
}

// Row `row0 + blockIdx.x` of z [n, v] (row stride stride_z): from its top-k classes
// top_idx [n, k] (int64, topk_select's order), the entries a [n, k] (float32), classes
// idx [n, k] (int32), mass m [n], lse [n]. valid: [n] bool or null.
template <typename T>
__global__ void __launch_bounds__(kGraphThreads)
    graph_rows_kernel(const T* z, int64_t stride_z, const bool* valid, const int64_t* top_idx,
                      int v, int k, float inv_temp, float* a, int* idx, float* m, float* lse,
                      int64_t row0) {
    __shared__ LseState red_s[kWarp];
    __shared__ int bad_s[kWarp];
    __shared__ float red_f[kGraphWarps];
    const int64_t row = row0 + blockIdx.x;
    const int j = threadIdx.x;  // k <= kTopkMax = kGraphThreads: one entry per thread
    if (valid != nullptr && !valid[row]) {
        if (j < k) {
            a[row * k + j] = 0.0f;
            idx[row * k + j] = kNoClass;
        }
        if (j == 0) {
            m[row] = 0.0f;
            lse[row] = 0.0f;
        }
        return;
    }
    const T* zr = z + row * stride_z;
    LseState st = LseState::identity();
    int nbad = 0;
    for (int c = threadIdx.x; c < v; c += kGraphThreads) {
        const float x = to_float(zr[c]) * inv_temp;
        nbad += (x != x || x == KDK_INF) ? 1 : 0;
        st.update(x);
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        st = merge(st, shfl_xor(st, o));
        nbad += __shfl_xor_sync(0xffffffffu, nbad, o);
    }
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    if (lane == 0) {
        red_s[warp] = st;
        bad_s[warp] = nbad;
    }
    __syncthreads();
    LseState tot = red_s[0];
    int bad = bad_s[0];
    for (int w = 1; w < kGraphWarps; ++w) {
        tot = merge(tot, red_s[w]);
        bad += bad_s[w];
    }
    const float l = (bad > 0 || tot.m == KDK_NEG_INF) ? __int_as_float(0x7fc00000) : tot.lse();
    float aj = 0.0f;
    if (j < k) {
        const int64_t c = top_idx[row * k + j];
        const bool in_range = c >= 0 && c < v;
        const float x = in_range ? to_float(zr[c]) * inv_temp : __int_as_float(0x7fc00000);
        aj = expf(x - l);
        a[row * k + j] = aj;
        idx[row * k + j] = in_range ? static_cast<int>(c) : kNoClass;
    }
    const float mass = graph_block_sum(aj, red_f);
    if (threadIdx.x == 0) {
        m[row] = mass;
        lse[row] = l;
    }
}

// Block b of the 2G·tiles grid: group-side g2 = b / tiles, entries [tile·256, +256) of
// key/perm [2G, p] (sorted by class). du [2G, p] int64 (−1 on entry), nu, bad [2G] int32
// (0 on entry), uent [G·p] int32 (or null). a [2G·p], m [2G·t_len].
__global__ void __launch_bounds__(kGraphThreads)
    graph_runs_kernel(const int* key, const int64_t* perm, const float* a, const float* m,
                      long long* du, int* nu, int* bad, int* uent, int p, int t_len, int k,
                      int groups, int tiles, double fix_scale) {
    const int64_t g2 = blockIdx.x / tiles;
    const int64_t q = static_cast<int64_t>(blockIdx.x % tiles) * kGraphThreads + threadIdx.x;
    if (q >= p) return;
    const int64_t base = g2 * p;
    const int c = key[base + q];
    if (c == kNoClass || (q > 0 && key[base + q - 1] == c)) return;
    long long sum = 1;  // the mark of a touched slot
    bool nan = false;
    for (int64_t r = q; r < p && key[base + r] == c; ++r) {
        const int64_t e = perm[base + r];
        const float w = a[base + e] * m[g2 * t_len + e / k];
        if (w != w) {
            nan = true;
        } else {
            sum += static_cast<long long>(static_cast<double>(w) * fix_scale + 0.5);
        }
        if (uent != nullptr && g2 < groups) uent[base + e] = static_cast<int>(q);
    }
    du[base + q] = sum;
    atomicAdd(nu + g2, 1);
    if (nan) atomicMax(bad + g2, 1);
}

// Group g = blockIdx.x: sorted [2G, p] strengths (fixed point, descending; −1 = none),
// order [2G, p] their slots; cost[g] (float64; NaN for a NaN weight, 0 without a valid
// position); gu [G·p] (or null): ∂cost[g]/∂x_i at slot order[g, i].
__global__ void __launch_bounds__(kGraphThreads)
    graph_gw_kernel(const long long* sorted, const int64_t* order, const int* nu,
                    const int* bad, double* cost, float* gu, int p, int groups, double unfix) {
    __shared__ double red[kGraphWarps * 16];
    const int64_t g = blockIdx.x;
    const int ns = nu[g], nt = nu[groups + g];
    const int n = ns > nt ? ns : nt;
    const bool is_bad = bad[g] + bad[groups + g] > 0;
    const long long* xs = sorted + g * p;
    const long long* ys = sorted + (groups + g) * p;
    if (ns == 0) {
        if (threadIdx.x == 0) cost[g] = 0.0;
        return;
    }
    const double nf = static_cast<double>(n);
    double s2[2] = {0.0, 0.0};
    for (int i = threadIdx.x; i < n; i += kGraphThreads) {
        s2[0] += i < ns ? static_cast<double>(xs[i]) * unfix : 0.0;
        s2[1] += i < nt ? static_cast<double>(ys[i]) * unfix : 0.0;
    }
    graph_block_sums(s2, red);
    const double mean_e = (s2[0] - s2[1]) / nf, mean_s = (s2[0] + s2[1]) / nf;
    // per pairing (identity 0..7, reversal 8..15): Σe, Σs, Σe², Σs², Σes, Σe²s, Σes², Σe²s²
    double mo[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) mo[q] = 0.0;
    for (int i = threadIdx.x; i < n; i += kGraphThreads) {
        const double x = i < ns ? static_cast<double>(xs[i]) * unfix : 0.0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int jj = r == 0 ? i : n - 1 - i;
            const double y = jj < nt ? static_cast<double>(ys[jj]) * unfix : 0.0;
            const double e = x - y - mean_e, s = x + y - mean_s;
            double* o = mo + 8 * r;
            o[0] += e;
            o[1] += s;
            o[2] += e * e;
            o[3] += s * s;
            o[4] += e * s;
            o[5] += e * e * s;
            o[6] += e * s * s;
            o[7] += e * e * s * s;
        }
    }
    graph_block_sums(mo, red);
    double c2[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const double* o = mo + 8 * r;
        c2[r] = 2.0 * nf * o[7] + 2.0 * o[2] * o[3] + 4.0 * o[4] * o[4] - 4.0 * o[5] * o[1] -
                4.0 * o[6] * o[0];
    }
    const bool rev = c2[1] < c2[0];
    const double inv_n2 = 1.0 / (nf * nf);
    const double nan = __longlong_as_double(0x7ff8000000000000LL);
    if (threadIdx.x == 0) cost[g] = is_bad ? nan : (rev ? c2[1] : c2[0]) * inv_n2;
    if (gu == nullptr) return;
    // selects, not a pointer into mo (a dynamic index would put mo in local memory)
    const double e1 = rev ? mo[8] : mo[0], s1 = rev ? mo[9] : mo[1];
    const double ee = rev ? mo[10] : mo[2], ss = rev ? mo[11] : mo[3];
    const double es = rev ? mo[12] : mo[4], ees = rev ? mo[13] : mo[5];
    const double ess = rev ? mo[14] : mo[6];
    const double scale = is_bad ? nan : 4.0 * inv_n2;
    for (int i = threadIdx.x; i < ns; i += kGraphThreads) {
        const int jj = rev ? n - 1 - i : i;
        const double x = static_cast<double>(xs[i]) * unfix;
        const double y = jj < nt ? static_cast<double>(ys[jj]) * unfix : 0.0;
        const double e = x - y - mean_e, s = x + y - mean_s;
        const double de = nf * e * s * s - 2.0 * e * s * s1 + e * ss - s * s * e1 + 2.0 * s * es - ess;
        const double ds = nf * s * e * e - 2.0 * s * e * e1 + s * ee - e * e * s1 + 2.0 * e * es - ees;
        gu[g * p + order[g * p + i]] = static_cast<float>((de + ds) * scale);
    }
}

// One block: loss = the mean of cost over the groups with nu > 0, inv = 1 / their number
// (at least 1).
__global__ void __launch_bounds__(kGraphThreads)
    graph_finish_kernel(const double* cost, const int* nu, float* loss, float* inv, int groups) {
    __shared__ double red[kGraphWarps * 2];
    double v[2] = {0.0, 0.0};
    for (int g = threadIdx.x; g < groups; g += kGraphThreads) {
        if (nu[g] > 0) {
            v[0] += cost[g];
            v[1] += 1.0;
        }
    }
    graph_block_sums(v, red);
    if (threadIdx.x == 0) {
        const double cnt = v[1] > 1.0 ? v[1] : 1.0;
        *loss = static_cast<float>(v[0] / cnt);
        *inv = static_cast<float>(1.0 / cnt);
    }
}

// Row `row0 + blockIdx.x` of z [n, v]: grad [n, v] (z's dtype) = ∂/∂z of Σ_j ā_j a_j.
// ā from abar [n, k] (float32), or (abar null) from gu at the entries' slots uent:
// ā_j = gu[(row / t_len)·p + uent_j]·m + Σ_j' gu_j' a_j'. The factor is inv_temp, times
// scale[0]·inv[0] when scale is given. Masked rows get zeros.
template <typename T>
__global__ void __launch_bounds__(kGraphThreads)
    graph_rows_bwd_kernel(const T* z, int64_t stride_z, const bool* valid, const float* a,
                          const int* idx, const float* m, const float* lse, const float* abar,
                          const int* uent, const float* gu, const float* scale, const float* inv,
                          T* grad, int64_t stride_g, int v, int k, int t_len, int p,
                          float inv_temp, int64_t row0) {
    __shared__ float red_f[kGraphWarps];
    __shared__ float s_ab[kTopkMax];
    const int64_t row = row0 + blockIdx.x;
    const T* zr = z + row * stride_z;
    T* gr = grad + row * stride_g;
    if (valid != nullptr && !valid[row]) {
        for (int c = threadIdx.x; c < v; c += kGraphThreads) gr[c] = from_float<T>(0.0f);
        return;
    }
    const int j = threadIdx.x;
    const float aj = j < k ? a[row * k + j] : 0.0f;
    float ab = 0.0f;
    if (abar == nullptr) {
        const float gd = j < k ? gu[(row / t_len) * p + uent[row * k + j]] : 0.0f;
        const float sga = graph_block_sum(gd * aj, red_f);
        ab = gd * m[row] + sga;
    } else {
        ab = j < k ? abar[row * k + j] : 0.0f;
    }
    if (j < k) s_ab[j] = ab;
    __syncthreads();
    const float a_r = s_ab[0];  // the mode: the first (largest) entry
    const float rel = j < k ? ab - a_r : 0.0f;
    const float c = graph_block_sum(aj * ab, red_f);
    const float p_rel = graph_block_sum(aj * rel, red_f);
    float sc = inv_temp;
    if (scale != nullptr) sc = sc * scale[0] * inv[0];
    const float l = lse[row];
    const int kidx = idx[row * k + k - 1];
    const bool kin = kidx >= 0 && kidx < v;
    const uint32_t kkey = kin ? order_key(to_float(zr[kin ? kidx : 0])) : 0u;
    float tail = 0.0f;
    for (int col = threadIdx.x; col < v; col += kGraphThreads) {
        const float zc = to_float(zr[col]);
        const uint32_t key = order_key(zc);
        const bool inside = kin && (key > kkey || (key == kkey && col <= kidx));
        if (!inside) {
            const float pc = expf(zc * inv_temp - l);
            tail += pc;
            gr[col] = from_float<T>(-(pc * c) * sc);
        }
    }
    tail = graph_block_sum(tail, red_f);  // its barriers order the writes above before the ones below
    if (j < k) {
        const int cls = idx[row * k + j];
        if (cls >= 0 && cls < v) gr[cls] = from_float<T>(aj * (rel + a_r * tail - p_rel) * sc);
    }
}

}  // namespace kdk
