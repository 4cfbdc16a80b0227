// Top-k selection per row (k <= 256) over a large vocabulary: values and indices sorted
// descending, ties broken by the lower index.
//
// Order. Each value maps to a 32-bit key whose unsigned order is the value order:
// key(x) = bits(x) with the sign bit set for x >= 0 and all bits flipped for x < 0
// (IEEE order); -0 is mapped to +0 (equal values tie and go by index) and every NaN to
// the largest key (torch.topk / torch.sort put NaN first in descending order).
//
// Selection (radix select, one block per row). The k-th largest key K is found digit by
// digit, 8 bits per pass from the top: a histogram of the current digit over the entries
// whose higher digits equal K's, then the digit d at which the count of entries above
// reaches k. fp16 and bf16 values carry only their top 19 / 16 key bits (the rest is a
// function of those), so they need 3 / 2 passes instead of 4; keys are compared masked
// to the decided bits. The row is then read once more in index order, tile by tile: every
// entry with key > K is taken (there are k − e of them) and the e entries with key == K
// of lowest index, found with a block-wide prefix count. The k candidates are sorted in
// shared memory by a bitonic network on (key desc, index asc), and each value is copied
// from the input (bit-exact, NaN payloads and the sign of zero included).
#pragma once

#include <climits>
#include <type_traits>

#include "common.cuh"
#include "reduce.cuh"

namespace kdk {

constexpr int kTopkThreads = 512;
constexpr int kTopkMax = 256;  // largest k (the candidate buffer)
constexpr int kRadixBins = 256;

__device__ __forceinline__ uint32_t order_key(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;  // NaN
    if ((u << 1) == 0u) u = 0u;                                // -0 -> +0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T> struct RadixPasses {
    static constexpr int value = std::is_same<T, float>::value ? 4
                                 : std::is_same<T, __half>::value ? 3
                                                                  : 2;
};

// "a comes before b" in the output order.
__device__ __forceinline__ bool ranks_before(uint32_t ka, int ia, uint32_t kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

// grid.x = rows (from row0), block = kTopkThreads. kp = the smallest power of two >= k.
template <typename T>
__global__ void __launch_bounds__(kTopkThreads)
    topk_kernel(const T* x, int64_t stride_x, int v, int k, int kp, T* out_v, int64_t* out_i,
                int64_t row0) {
    constexpr int PASSES = RadixPasses<T>::value;
    constexpr int V = Vec<T>::N;
    constexpr int kWarps = kTopkThreads / kWarp;
    __shared__ uint32_t warp_hist[kWarps][kRadixBins];
    __shared__ uint32_t hist[kRadixBins];
    __shared__ int scan_scratch[kWarp + 1];
    __shared__ uint32_t cand_key[kTopkMax];
    __shared__ int cand_idx[kTopkMax];
    __shared__ uint32_t sel_digit;
    __shared__ uint32_t sel_above;

    const int64_t row = row0 + blockIdx.x;
    const T* xr = x + row * stride_x;
    const bool vec = aligned16(xr);
    const int tid = threadIdx.x;
    const int lane = tid % kWarp;
    const int warp = tid / kWarp;

    uint32_t prefix = 0;  // decided digits of K
    uint32_t mask = 0;    // which bits are decided
    uint32_t kk = static_cast<uint32_t>(k);  // rank of K among the entries matching prefix
    for (int pass = 0; pass < PASSES; ++pass) {
        const int shift = 24 - 8 * pass;
        for (int i = tid; i < kWarps * kRadixBins; i += blockDim.x) (&warp_hist[0][0])[i] = 0u;
        __syncthreads();
        // Histogram into this warp's copy; a thread's consecutive hits on one bin are added
        // at once (early digits of real logits fall into few bins).
        uint32_t* wh = warp_hist[warp];
        uint32_t run_bin = 0u;
        uint32_t run_cnt = 0u;
        for_each_col<T, false>(xr, nullptr, v, vec, [&](int, float xs, float) {
            const uint32_t key = order_key(xs);
            if ((key & mask) != prefix) return;
            const uint32_t bin = (key >> shift) & 0xffu;
            if (run_cnt != 0u && bin == run_bin) {
                ++run_cnt;
            } else {
                if (run_cnt != 0u) atomicAdd(&wh[run_bin], run_cnt);
                run_bin = bin;
                run_cnt = 1u;
            }
        });
        if (run_cnt != 0u) atomicAdd(&wh[run_bin], run_cnt);
        __syncthreads();
        for (int d = tid; d < kRadixBins; d += blockDim.x) {
            uint32_t c = 0u;
            for (int w = 0; w < kWarps; ++w) c += warp_hist[w][d];
            hist[d] = c;
        }
        __syncthreads();
        // Warp 0 finds the digit: lane l owns digits 255-8l down to 248-8l; a prefix sum
        // over lanes (highest digits first) finds the lane where the count reaches kk.
        if (warp == 0) {
            const int hi = kRadixBins - 1 - 8 * lane;
            uint32_t cnt[8];
            uint32_t lsum = 0u;
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                cnt[u] = hist[hi - u];
                lsum += cnt[u];
            }
            uint32_t incl = lsum;
#pragma unroll
            for (int o = 1; o < kWarp; o <<= 1) {
                const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += y;
            }
            const uint32_t excl = incl - lsum;
            if (excl < kk && kk <= incl) {  // exactly one lane
                uint32_t above = excl;
#pragma unroll
                for (int u = 0; u < 8; ++u) {
                    if (above + cnt[u] >= kk) {
                        sel_digit = static_cast<uint32_t>(hi - u);
                        sel_above = above;
                        break;
                    }
                    above += cnt[u];
                }
            }
        }
        __syncthreads();
        prefix |= sel_digit << shift;
        mask |= 0xffu << shift;
        kk -= sel_above;
    }
    // K = prefix (masked). n_gt entries lie strictly above K; take the first kk ties.
    const uint32_t kth = prefix;
    const int need_eq = static_cast<int>(kk);
    const int n_gt = k - need_eq;
    for (int i = k + tid; i < kp; i += blockDim.x) {  // padding sorts last
        cand_key[i] = 0u;
        cand_idx[i] = INT_MAX;
    }
    int gt_base = 0;
    int eq_base = 0;
    for (int base = 0; base < v; base += kTopkThreads * V) {
        const int i0 = base + tid * V;
        uint32_t keys[V];
        int ngt = 0;
        int neq = 0;
        if (vec && i0 + V <= v) {
            float xs[V];
            load_vec(xr + i0, xs);
#pragma unroll
            for (int u = 0; u < V; ++u) keys[u] = order_key(xs[u]) & mask;
        } else {
#pragma unroll
            for (int u = 0; u < V; ++u) {
                // Past the end: key 0 is below every real key (the least is key(-inf) > 0).
                keys[u] = i0 + u < v ? order_key(to_float(xr[i0 + u])) & mask : 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
            ngt += (i0 + u < v && keys[u] > kth) ? 1 : 0;
            neq += (i0 + u < v && keys[u] == kth) ? 1 : 0;
        }
        // Per-thread counts are <= 8 and block sums <= 4096: two 16-bit halves of one int.
        int total = 0;
        const int off = block_exclusive_scan(ngt | (neq << 16), &total, scan_scratch);
        int gi = gt_base + (off & 0xffff);
        int ei = eq_base + (off >> 16);
#pragma unroll
        for (int u = 0; u < V; ++u) {
            if (i0 + u >= v) break;
            if (keys[u] > kth) {
                cand_key[gi] = keys[u];
                cand_idx[gi] = i0 + u;
                ++gi;
            } else if (keys[u] == kth) {
                if (ei < need_eq) {
                    cand_key[n_gt + ei] = keys[u];
                    cand_idx[n_gt + ei] = i0 + u;
                }
                ++ei;
            }
        }
        gt_base += total & 0xffff;
        eq_base += total >> 16;
        if (gt_base == n_gt && eq_base >= need_eq) break;  // the same in every thread
    }
    __syncthreads();
    // Bitonic sort of kp candidates into (key desc, index asc).
    for (int size = 2; size <= kp; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < kp; i += blockDim.x) {
                const int j = i ^ stride;
                if (j > i) {
                    const bool up = (i & size) == 0;  // this run ends in output order
                    const bool swap = up ? ranks_before(cand_key[j], cand_idx[j], cand_key[i], cand_idx[i])
                                         : ranks_before(cand_key[i], cand_idx[i], cand_key[j], cand_idx[j]);
                    if (swap) {
                        const uint32_t tk = cand_key[i];
                        const int ti = cand_idx[i];
                        cand_key[i] = cand_key[j];
                        cand_idx[i] = cand_idx[j];
                        cand_key[j] = tk;
                        cand_idx[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (int r = tid; r < k; r += blockDim.x) {
        const int idx = cand_idx[r];
        out_i[row * k + r] = idx;
        out_v[row * k + r] = xr[idx];
    }
}

}  // namespace kdk
