// The plackett_luce_loss kernel (docs/spec.md §3): per-row loss and, in the same launch,
// the gradient w.r.t. the student logits. Same math as kdkernels/pld/pytorch.py; the
// ranking (the first K classes of the PLD order) comes from the host side
// (kdkernels/pld/ranking.py: topk_select or a library sort), like the Triton kernel.
//
// Notation (one row, 0-indexed positions): π = rank[0..K), b = t/τ, w_k = softmax(b)[π_k],
// x_k = s[π_k] (the student is not tempered). A class v is ranked iff
//     v == label  or  (thr >= 0 and (t_v > t_thr or (t_v == t_thr and v <= thr)))
// (thr: the last teacher-ordered class of the ranking; −0.0 == +0.0 is a tie, as in
// topk_select), so the unranked tail needs no list.
// One block per row:
//   pass 1  (all V columns) online log-sum-exp of b → lse_b; the policy's maxima / NaN
//           counts of s and t; K < V: online log-sum-exp of s over the unranked classes
//           → lse_tail (-inf when empty).
//   pass 2  (ranked positions, last to first, tiles of kPldTile) a block-wide scan under
//           lse2 in reversed order, carried from tile to tile (the carry starts at
//           lse_tail), gives LSE_k (ranked positions >= k, and the tail) and E_k (the same
//           without k); logw_k = b[π_k] − lse_b; LSE_k − x_k = softplus(E_k − x_k) (no
//           cancellation when π_k dominates its suffix); loss += w_k (LSE_k − x_k) (w_k > 0
//           only); per position d_k = logw_k − LSE_k (-inf where w_k = 0), x_k and
//           pull_k = w_k·expm1(−(LSE_k − x_k)) go to scratch (shared memory for
//           K <= kPldSmemK, else a global [rows, 3K] buffer).
//   pass 3  (gradient; ranked positions, first to last) c_j = prefix log-sum-exp of d (a
//           scan plus carry); g[π_j] = scale·(exp(x_j + c_{j−1}) + pull_j), which is
//           exp(x_j + c_j) − w_j with the w_j·(softmax − 1) term taken apart.
//   pass 4  (gradient, K < V) every unranked class v: g[v] = scale·exp(s_v + c_{K−1}).
// Ranked and unranked addresses are disjoint: each gradient element is written once, by
// the thread that read that column's logit last (grad may alias s).
// Loss clamped at >= 0 (NaN kept). Ignored rows: loss 0, gradient row 0, nothing else read.
// Bad rows (a NaN or +inf logit in s or t, s or b all -inf, a label, thr or rank entry out
// of range): loss NaN and the whole gradient row NaN.
// Global traffic per row: s and t read in pass 1 and again in pass 4 (4·V·sizeof(T)), the
// K ranked logits gathered once (pass 2), rank read twice (16·K bytes), the gradient
// written once (V·sizeof(T)); scratch stays on chip for K <= kPldSmemK (12·K bytes written
// and read back otherwise).
#pragma once

#include "api.h"
#include "common.cuh"
#include "logscan.cuh"
#include "reduce.cuh"

namespace kdk {

constexpr int kPldThreads = 256;
constexpr int kPldItems = 4;  // consecutive positions per thread in a scan tile
constexpr int kPldTile = kPldThreads * kPldItems;

// Pass-1 state of the columns one thread (then the block) has seen.
struct PldStats {
    LseState b;     // teacher b = t/τ over all classes
    LseState tail;  // student s over the unranked classes
    float smax;     // max s (the policy: a row without a finite student logit is bad)
    int nf;         // NaN / +inf logits seen (student or teacher)

    __device__ __forceinline__ static PldStats identity() {
        return {LseState::identity(), LseState::identity(), KDK_NEG_INF, 0};
    }
};
__device__ __forceinline__ PldStats shfl_xor(const PldStats& s, int o) {
    return {shfl_xor(s.b, o), shfl_xor(s.tail, o), shfl_xor(s.smax, o), shfl_xor(s.nf, o)};
}
struct MergePldStats {
    __device__ __forceinline__ PldStats operator()(const PldStats& x, const PldStats& y) const {
        return {merge(x.b, y.b), merge(x.tail, y.tail), fmaxf(x.smax, y.smax), x.nf + y.nf};
    }
};

struct LossFlag {
    float loss;
    int bad;
};
__device__ __forceinline__ LossFlag shfl_xor(const LossFlag& s, int o) {
    return {shfl_xor(s.loss, o), shfl_xor(s.bad, o)};
}
struct AddLossFlag {
    __device__ __forceinline__ LossFlag operator()(const LossFlag& x, const LossFlag& y) const {
        return {x.loss + y.loss, x.bad | y.bad};
    }
};

// Is class c (teacher logit tv) among the ranked classes? (See the header comment.)
__device__ __forceinline__ bool pld_ranked(int c, float tv, int label, int thr, float t_thr) {
    return c == label || (thr >= 0 && (tv > t_thr || (tv == t_thr && c <= thr)));
}

// grid.x = rows (from row0), block = kPldThreads. smem_scratch: the 3·K scratch floats live
// in dynamic shared memory (12·K bytes), else in p.scratch.
template <typename T>
__global__ void __launch_bounds__(kPldThreads, 2)
    pld_fwd_kernel(PldFwdArgs p, int64_t row0, int smem_scratch) {
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ PldStats red_stats[kWarp];
    __shared__ LossFlag red_loss[kWarp];
    __shared__ float scan_scratch[kWarp + 1];

    const int64_t row = row0 + blockIdx.x;
    const int v = static_cast<int>(p.v);
    const int kk = static_cast<int>(p.k);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = static_cast<const T*>(p.t) + row * p.stride_t;
    T* g_row = p.compute_grad ? static_cast<T*>(p.grad) + row * p.stride_g : nullptr;
    const float nan = __int_as_float(0x7fffffff);

    // ---- the row's label: ignored rows read nothing else
    bool bad = false;
    int label = -1;  // none
    if (p.has_labels) {
        const int64_t y =
            p.labels_i64 ? static_cast<const int64_t*>(p.labels)[row * p.stride_l]
                         : static_cast<int64_t>(static_cast<const int32_t*>(p.labels)[row * p.stride_l]);
        if (y == p.ignore_index) {
            if (threadIdx.x == 0) p.loss[row] = 0.0f;
            if (p.compute_grad) fill_row(g_row, v, 0.0f);
            return;
        }
        if (y < 0 || y >= p.v) {
            bad = true;  // only CPU labels are range-checked: a GPU row gets NaN instead
        } else {
            label = static_cast<int>(y);
        }
    }
    const int64_t thr64 = p.thr[row];
    if (thr64 < -1 || thr64 >= p.v) bad = true;
    const int thr = bad ? -1 : static_cast<int>(thr64);
    const bool has_tail = kk < v;
    const float t_thr = (!bad && has_tail && thr >= 0) ? to_float(t_row[thr]) : 0.0f;
    const float inv_temp = p.inv_temp;

    // ---- pass 1: log-sum-exp of b, the unranked tail of s, the policy's statistics
    PldStats st = PldStats::identity();
    if (!bad) {  // uniform over the block
        const bool vec = aligned16(s_row) && aligned16(t_row);
        for_each_col<T, true>(s_row, t_row, v, vec, [&](int c, float xs, float xt) {
            st.nf += nan_or_pinf(xs) + nan_or_pinf(xt);
            st.smax = fmaxf(st.smax, xs);
            st.b.update(xt * inv_temp);
            if (has_tail && !pld_ranked(c, xt, label, thr, t_thr)) st.tail.update(xs);
        });
    }
    st = block_reduce(st, PldStats::identity(), MergePldStats{}, red_stats);
    bad = bad || st.nf > 0 || st.smax == KDK_NEG_INF || st.b.m == KDK_NEG_INF;
    if (bad) {
        if (threadIdx.x == 0) p.loss[row] = nan;
        if (p.compute_grad) fill_row(g_row, v, nan);
        return;
    }
    const float lse_b = st.b.lse();
    const float lse_tail = has_tail ? st.tail.lse() : KDK_NEG_INF;

    float* sd = smem_scratch ? reinterpret_cast<float*>(smem) : p.scratch + row * p.stride_x;
    float* sx = sd + kk;  // x_k
    float* sm = sx + kk;  // w_k·expm1(−(LSE_k − x_k))
    const int64_t* r_row = p.rank + row * p.stride_r;
    const int ntiles = (kk + kPldTile - 1) / kPldTile;

    // ---- pass 2: suffix log-sum-exps (last position first), loss, scratch
    LossFlag acc = {0.0f, 0};
    float carry = lse_tail;
    for (int ti = ntiles - 1; ti >= 0; --ti) {
        const int lo = ti * kPldTile;
        const int hi = min(kk, lo + kPldTile);
        float l[kPldItems], e[kPldItems], x[kPldItems], b[kPldItems];
#pragma unroll
        for (int i = 0; i < kPldItems; ++i) {
            const int pos = hi - 1 - (static_cast<int>(threadIdx.x) * kPldItems + i);
            x[i] = KDK_NEG_INF;
            b[i] = KDK_NEG_INF;
            if (pos >= lo) {
                const int64_t j = r_row[pos];
                if (j >= 0 && j < p.v) {
                    x[i] = to_float(s_row[j]);
                    b[i] = to_float(t_row[j]) * inv_temp;
                } else {
                    acc.bad = 1;
                }
            }
            l[i] = x[i];
        }
        // l: LSE_k (positions >= k, and the tail); e: the same without position k itself
        const float next = block_scan_lse(l, e, carry, scan_scratch);
#pragma unroll
        for (int i = 0; i < kPldItems; ++i) {
            const int pos = hi - 1 - (static_cast<int>(threadIdx.x) * kPldItems + i);
            if (pos < lo) continue;
            const float logw = b[i] - lse_b;  // -inf where the teacher logit is -inf
            float d = KDK_NEG_INF;
            float pull = 0.0f;
            if (logw > KDK_NEG_INF) {
                const float w = expf(logw);
                // LSE_k − x_k = log(1 + e^{E_k − x_k}): no cancellation when π_k dominates
                // its suffix (the difference then is tiny, and keeps its relative digits)
                const float diff = softplus(e[i] - x[i]);
                // 0·(LSE − x) = 0; a weight that underflows float32 keeps an infinite or
                // NaN difference (float64 would still see w > 0)
                acc.loss += w > 0.0f ? w * diff : ((diff == KDK_INF || diff != diff) ? diff : 0.0f);
                d = logw - l[i];
                pull = w * expm1f(-diff);  // −w_k (1 − softmax of π_k within suffix k)
            }
            sd[pos] = d;
            sx[pos] = x[i];
            sm[pos] = pull;
        }
        carry = next;
    }
    acc = block_reduce(acc, LossFlag{0.0f, 0}, AddLossFlag{}, red_loss);
    if (threadIdx.x == 0) {
        // PLD is >= 0 exactly: rounding may not make it negative (NaN stays NaN)
        p.loss[row] = acc.bad ? nan : (acc.loss < 0.0f ? 0.0f : acc.loss);
    }
    if (!p.compute_grad) return;
    if (acc.bad) {
        fill_row(g_row, v, nan);
        return;
    }

    // ---- pass 3: prefix log-sum-exps of d (first position first), ranked gradients
    // g_j = exp(x_j + c_{j−1}) + pull_j (= exp(x_j + c_j) − w_j without its 1 − 1).
    // (block_reduce's barriers made pass 2's scratch visible to every thread.)
    const float sc = *p.scale;
    float c = KDK_NEG_INF;
    for (int ti = 0; ti < ntiles; ++ti) {
        const int lo = ti * kPldTile;
        const int hi = min(kk, lo + kPldTile);
        float d[kPldItems], cx[kPldItems];
#pragma unroll
        for (int i = 0; i < kPldItems; ++i) {
            const int pos = lo + static_cast<int>(threadIdx.x) * kPldItems + i;
            d[i] = pos < hi ? sd[pos] : KDK_NEG_INF;
        }
        const float next = block_scan_lse(d, cx, c, scan_scratch);
#pragma unroll
        for (int i = 0; i < kPldItems; ++i) {
            const int pos = lo + static_cast<int>(threadIdx.x) * kPldItems + i;
            if (pos >= hi) continue;
            const float g = sc * (expf(sx[pos] + cx[i]) + sm[pos]);
            g_row[r_row[pos]] = from_float<T>(g);
        }
        c = next;
    }

    // ---- pass 4: the unranked classes, exp(s_v + c_{K−1}) (no ranking needed)
    if (has_tail) {
        constexpr int V = Vec<T>::N;
        const float c_last = c;
        const bool vec = aligned16(s_row) && aligned16(t_row) && aligned16(g_row);
        const int nvec = vec ? v / V : 0;
        for (int q = threadIdx.x; q < nvec; q += blockDim.x) {
            const int c0 = q * V;
            float xs[V], xt[V], g[V];
            // (with grad aliasing s, ranked columns of xs may already hold gradients:
            // they are not used)
            load_vec(s_row + c0, xs);
            load_vec(t_row + c0, xt);
            bool all = true;
            unsigned mask = 0u;
#pragma unroll
            for (int u = 0; u < V; ++u) {
                const bool un = !pld_ranked(c0 + u, xt[u], label, thr, t_thr);
                mask |= un ? (1u << u) : 0u;
                all = all && un;
                g[u] = sc * expf(xs[u] + c_last);
            }
            if (all) {
                store_vec(g_row + c0, g);
            } else {
#pragma unroll
                for (int u = 0; u < V; ++u) {
                    if (mask & (1u << u)) g_row[c0 + u] = from_float<T>(g[u]);
                }
            }
        }
        for (int i = nvec * V + static_cast<int>(threadIdx.x); i < v; i += blockDim.x) {
            if (!pld_ranked(i, to_float(t_row[i]), label, thr, t_thr)) {
                g_row[i] = from_float<T>(sc * expf(to_float(s_row[i]) + c_last));
            }
        }
    }
}

}  // namespace kdk
