// The vocabulary-parallel topk_kd_loss kernels (docs/vocab_parallel.md): the local O(N·W)
// work of kdkernels/topk/parallel.py on this rank's columns [0, width) (global start + j),
// one block per row. Buffers and arithmetic as the Triton kernels'
// (kdkernels/topk/parallel_triton.py); the all-reduces and the O(N·k) entry math (float64)
// stay in Python (kdkernels/topk/parallel_cuda.py).
//
//   gather  the student's raw logits at the indices this rank owns, 0 at the others (and
//           at padding), as float64 into sel[n, k (+1)], the buffer of the all-reduce SUM
//           (x + 0 = x: every rank then holds all k exactly, NaN and ±inf included).
//           tail="bucket" also streams the owned row for the local tail statistics over
//           the owned columns not among the indices (a bitmap of the selected columns in
//           shared memory, windows of 32·kTkBitmapWords columns): the tail max m,
//           Σ e^{a − m} and the NaN/+inf flag over the whole owned row, a = s/τ.
//           → tstat[n, 3] = (m, flag, Σ)
//   grad    mode[n] 0: the local gradient: every owned column gets 0 (renormalize) or
//           r_tail·e^{(a − M) − log Σ} (bucket: r_tail times the softmax within the tail),
//           then, after a barrier, the owned selected columns their r_i (r[n, k (+1)],
//           tail[n, 2] = (M, log Σ)); mode 1: NaN (no softmax); mode 2: 0 (ignored row).
// Ignored rows own nothing in the gather and skip the row pass.
#pragma once

#include "topk_kd.cuh"  // kTkBitmapWords: the bitmap window of the single-process kernel
#include "vocab_parallel.cuh"

namespace kdk {

// Clear the bitmap and mark the classes of row `i_row` (global ids) whose local column
// start + j falls in the window [c0, c0 + 32·words). Barriers on both sides.
__device__ __forceinline__ void vp_mark(uint32_t* bm, int words, const int64_t* i_row, int64_t k,
                                        int64_t start, int64_t c0) {
    for (int u = static_cast<int>(threadIdx.x); u < words; u += blockDim.x) bm[u] = 0u;
    __syncthreads();
    const int64_t window = int64_t{32} * words;
    for (int64_t e = threadIdx.x; e < k; e += blockDim.x) {
        const int64_t j = i_row[e] - start - c0;
        if (j >= 0 && j < window) atomicOr(&bm[j >> 5], 1u << (j & 31));
    }
    __syncthreads();
}

// grid.x = rows (from row0), block = 128 or kVpThreads; bucket: dynamic shared memory of
// bm_words words.
template <bool BUCKET, typename T>
__global__ void __launch_bounds__(kVpThreads, kVpMinBlocks)
    topk_vp_gather_kernel(TopkVpArgs p, int64_t row0, int bm_words) {
    using C = typename Compute<T>::type;
    const int64_t row = row0 + blockIdx.x;
    const int64_t width = p.width;
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const int64_t* i_row = p.idx + row * p.stride_i;
    double* o_row = p.sel + row * p.stride_o;
    const bool valid =
        !p.has_labels || read_label(p.labels, p.labels_i64, row, p.stride_l) != p.ignore_index;
    const int64_t w_own = valid ? width : 0;  // ignored rows: nothing owned, all 0
    for (int64_t e = threadIdx.x; e < p.k; e += blockDim.x) {
        const int64_t loc = i_row[e] - p.start;
        const bool own = loc >= 0 && loc < w_own;
        o_row[e] = own ? static_cast<double>(to_c<C>(s_row[loc])) : 0.0;
    }
    if constexpr (BUCKET) {
        using P = typename Pivot<C>::type;
        extern __shared__ __align__(16) uint32_t vp_bm[];
        __shared__ P red_tail[kWarp];
        __shared__ int red_nf[kWarp];
        const C it = static_cast<C>(p.inv_temp);
        const C ninf = neg_inf<C>();
        P tail = P::identity();  // Σ e^{a − m} over the unselected owned columns but one max
        int nf = 0;
        if (valid) {
            const int64_t window = int64_t{32} * bm_words;
            for (int64_t c0 = 0; c0 < width; c0 += window) {
                if (c0 > 0) __syncthreads();  // the previous window's bitmap is read out
                vp_mark(vp_bm, bm_words, i_row, p.k, p.start, c0);
                const int n = static_cast<int>(min(window, width - c0));
                vp_cols<T, false>(s_row + c0, nullptr, n, [&](int i, C xs, C) {
                    const C a = xs * it;
                    const bool bad = nan_or_inf(a);
                    nf += bad;
                    const bool sel = tk_selected(vp_bm, i);
                    tail.update((bad || sel) ? ninf : a, static_cast<int>(c0) + i);
                });
            }
        }
        tail = block_reduce(
            tail, P::identity(), [](const P& x, const P& y) { return merge(x, y); }, red_tail);
        nf = block_reduce(nf, 0, [](int x, int y) { return x + y; }, red_nf);
        if (threadIdx.x == 0) {
            C* st = static_cast<C*>(p.tstat) + row * 3;
            st[0] = tail.m;
            st[1] = nf > 0 ? C(1) : C(0);
            st[2] = tail.m == ninf ? C(0) : tail.z + C(1);  // the max's own e^0
        }
    }
}

template <bool BUCKET, typename T>
__global__ void __launch_bounds__(kVpThreads, kVpMinBlocks)
    topk_vp_grad_kernel(TopkVpArgs p, int64_t row0) {
    using C = typename Compute<T>::type;
    const int64_t row = row0 + blockIdx.x;
    const int width = static_cast<int>(p.width);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const int64_t* i_row = p.idx + row * p.stride_i;
    const C* r_row = static_cast<const C*>(p.r) + row * p.stride_r;
    T* g_row = static_cast<T*>(p.grad) + row * p.stride_g;
    const int mode = p.mode[row];  // 0: the gradient, 1: a bad row (NaN), 2: ignored (0)
    if (mode != 0) {
        vp_fill(g_row, width, mode == 1 ? __int_as_float(0x7fffffff) : 0.0f);
        return;
    }
    // the unselected owned columns: r_tail · softmax within the tail (bucket), else 0;
    // selected columns get a value here too, overwritten below
    if constexpr (BUCKET) {
        const C it = static_cast<C>(p.inv_temp);
        const C r_t = r_row[p.k];
        const C m_t = static_cast<const C*>(p.tail)[row * 2];
        const C c_t = static_cast<const C*>(p.tail)[row * 2 + 1];
        vp_map<T, false>(s_row, nullptr, g_row, width, [&](int, C xs, C) -> C {
            return r_t * vp_exp((xs * it - m_t) - c_t);
        });
    } else {
        vp_fill(g_row, width, 0.0f);
    }
    __syncthreads();
    // the owned selected columns: r_i (each class once per row)
    for (int64_t e = threadIdx.x; e < p.k; e += blockDim.x) {
        const int64_t loc = i_row[e] - p.start;
        if (loc >= 0 && loc < width) g_row[loc] = from_c<T>(r_row[e]);
    }
}

}  // namespace kdk
