// The vocabulary-parallel kd_loss kernels (docs/vocab_parallel.md): the local work of the
// three phases of kdkernels/kd/parallel.py on this rank's columns [0, width) (global
// start + j), one block per row. The buffers, their columns and the arithmetic are those of
// the Triton kernels (kdkernels/kd/parallel_triton.py); the all-reduces and the O(N) glue
// between the phases stay in Python (kdkernels/kd/parallel_cuda.py).
//
//   stats     per distribution d ∈ {a = s/τ, b = t/τ or TAID's mix (1−λ)a + λb, x = s}:
//             the local max m over the entries that are finite or −inf (NaN and +inf
//             count as −inf and raise the flag), Z' = Σ e^{d − m} over every column but
//             one argmax (PivotMax), a's argmax (the lowest column holding the max: the
//             pivot candidate) and, for reverse KL, b there.
//             → stats[n, 8] = (m_a, m_b, m_x, flag, Z'_a, Z'_b, Z'_x, b_at), piv[n]
//   partials  with norm[n, 9] = (M_a, c_a, M_b, c_b, M_x, c_x, b_ref, ·, ·) (c = log1p of
//             the global Z') and flags[n] (bit 0: no softmax anywhere; bit 1: this rank
//             holds the global pivot j*): Σ d, G' = Σ_{v≠j*} q g, P = q_{j*} g_{j*} (on
//             the pivot's rank), and the hard label's x_y on the rank owning the label.
//             → part[n, 4]
//   grad      with norm[:, 7:9] = (G', P) all-reduced: q − p (forward KL, TAID) or
//             q(g − ḡ), ḡ = G' + P, times soft/τ·scale, plus
//             hard·scale·(softmax(x) − [j = y]), written in the input dtype; then, after a
//             barrier, the pivot's entry from the closed forms that keep their digits
//             where q_{j*} rounds to 1:
//             (q − p)_{j*} = expm1(log q_{j*}) − expm1(log p_{j*}),
//             q_{j*}(g_{j*} − ḡ) = q_{j*}(Σ'q·g_{j*} − G') with Σ'q = −expm1(log q_{j*}),
//             softmax_y − 1 = expm1(log softmax_y) at the label. Ignored rows 0; bad rows
//             NaN.
//
// g is pytorch._pair_terms' form, shifted to vanish where p/q → 0 (reverse KL: (a − M_a)
// − (b − b_ref), b_ref = b at the pivot), not divergence.cuh's: the pivot's closed form
// needs G' without cancellation there. Ignored rows read nothing but their label.
#pragma once

#include "vocab_parallel.cuh"

namespace kdk {

// Which distributions the stats kernel reads: the divergence code, with every code that
// needs b alone (and not TAID's mix or reverse KL's b at the pivot) mapped to kFwdKL.
__host__ __device__ constexpr int kd_vp_stats_mode(int div) {
    return (div == kZero || div == kRevKL || div == kTaid) ? div : kFwdKL;
}

template <typename C> struct KdVpStat {
    typename Pivot<C>::type a;  // a = s/τ, with the pivot candidate
    C b_at;                     // b at a's pivot (reverse KL)
    typename Pivot<C>::type b;  // b = t/τ (TAID: the mix)
    typename Pivot<C>::type x;  // the untempered s (hard label with τ != 1)
    int nf;                     // NaN / +inf entries seen

    __device__ __forceinline__ static KdVpStat identity() {
        using P = typename Pivot<C>::type;
        return {P::identity(), C(0), P::identity(), P::identity(), 0};
    }
};
template <typename C>
__device__ __forceinline__ KdVpStat<C> shfl_xor(const KdVpStat<C>& s, int o) {
    return {shfl_xor(s.a, o), shfl_xor(s.b_at, o), shfl_xor(s.b, o), shfl_xor(s.x, o),
            shfl_xor(s.nf, o)};
}
struct MergeKdVpStat {
    template <typename C>
    __device__ __forceinline__ KdVpStat<C> operator()(const KdVpStat<C>& x,
                                                      const KdVpStat<C>& y) const {
        // the same winner as merge(x.a, y.a): b_at follows a's pivot
        const bool x_wins = (x.a.m > y.a.m) || (x.a.m == y.a.m && x.a.p <= y.a.p);
        return {merge(x.a, y.a), x_wins ? x.b_at : y.b_at, merge(x.b, y.b), merge(x.x, y.x),
                x.nf + y.nf};
    }
};

// Per-element (d, g) of the divergences that need normalised p and q (kd/triton.py's
// _pair_terms): la_lb = (a − M_a) − (b − b_ref), dc = c_a − c_b, so that
// log r = log p − log q = dc − la_lb without the normalisers' rounding.
template <int DIV, typename C>
__device__ __forceinline__ void vp_pair_terms(C logq, C logp, C la_lb, C dc, C w, C log_w,
                                              C log_1mw, C& d, C& g) {
    static_assert(DIV == kRevKL || DIV == kJsd || DIV == kSkewFwd || DIV == kSkewRev,
                  "reverse KL, jsd and skew KL (tvd is written out by the kernels)");
    const C q = vp_exp(logq);
    const C p = vp_exp(logp);
    const C log_r = dc - la_lb;
    if constexpr (DIV == kRevKL) {
        g = q > C(0) ? la_lb : C(0);
        d = q > C(0) ? q * (logq - logp) : C(0);
    } else if constexpr (DIV == kJsd) {  // m = βp + (1−β)q
        const C logm = logaddexp(logp + log_w, logq + log_1mw);
        g = q > C(0) ? -(C(1) - w) * softplus(log_w - log_1mw + log_r) : C(0);
        d = (p > C(0) ? w * p * (logp - logm) : C(0)) +
            (q > C(0) ? (C(1) - w) * q * (logq - logm) : C(0));
    } else if constexpr (DIV == kSkewFwd) {  // m = αp + (1−α)q, D = KL(p‖m)
        const C logm = logaddexp(logp + log_w, logq + log_1mw);
        d = p > C(0) ? p * (logp - logm) : C(0);
        g = p > C(0) ? -((C(1) - w) / w) * sigmoid(log_w - log_1mw + log_r) : C(0);
    } else {  // skew reverse: m = (1−α)p + αq, D = KL(q‖m)
        const C logm = logaddexp(logp + log_1mw, logq + log_w);
        d = q > C(0) ? q * (logq - logm) : C(0);
        g = q > C(0) ? sigmoid_minus_softplus(log_1mw - log_w + log_r) : C(0);
    }
}

// tvd's g = −½(sign(p − q) + 1) from diff = p − q.
template <typename C> __device__ __forceinline__ C tvd_g(C diff) {
    return diff > C(0) ? C(-1) : (diff < C(0) ? C(0) : C(-0.5));
}

// b = t/τ_t, or TAID's mix (1−λ)a + λ·t/τ_t (a = x/τ; it: the teacher's 1/τ_t).
template <int DIV, typename C> __device__ __forceinline__ C vp_b(C a, C xt, C it, C w) {
    const C b = xt * it;
    if constexpr (DIV == kTaid) return (C(1) - w) * a + w * b;
    return b;
}

// grid.x = rows (from row0), block = 128 or kVpThreads.
template <int MODE, typename T>
__global__ void __launch_bounds__(kVpThreads, kVpMinBlocks)
    kd_vp_stats_kernel(KdVpArgs p, int64_t row0) {
    using C = typename Compute<T>::type;
    constexpr bool NEED_T = MODE != kZero;
    __shared__ KdVpStat<C> red[kWarp];
    const int64_t row = row0 + blockIdx.x;
    const int width = static_cast<int>(p.width);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = NEED_T ? static_cast<const T*>(p.t) + row * p.stride_t : nullptr;
    const bool valid =
        !p.has_labels || read_label(p.labels, p.labels_i64, row, p.stride_l) != p.ignore_index;
    const C it = static_cast<C>(p.inv_temp);
    const C itt = static_cast<C>(p.inv_temp_t);  // the teacher's 1/τ_t
    const C w = static_cast<C>(p.w);
    const bool use_x = p.use_x;
    const C ninf = neg_inf<C>();
    KdVpStat<C> st = KdVpStat<C>::identity();
    if (valid) {  // ignored rows: M = −inf, Z' = 0 (every rank skips them alike)
        vp_cols<T, NEED_T>(s_row, t_row, width, [&](int j, C xs, C xt) {
            const bool bx = nan_or_inf(xs);
            st.nf += bx;
            const C a = bx ? ninf : xs * it;
            const bool took = a > st.a.m;  // PivotMax takes column j as its new pivot
            st.a.update(a, j);
            if constexpr (NEED_T) {
                C b = vp_b<MODE, C>(xs * it, xt, itt, w);
                const bool bb = nan_or_inf(b);
                st.nf += bb;
                b = bb ? ninf : b;
                if constexpr (MODE == kRevKL) {
                    if (took) st.b_at = b;
                }
                st.b.update(b, j);
            }
            if (use_x) st.x.update(bx ? ninf : xs, j);
        });
    }
    st = block_reduce(st, KdVpStat<C>::identity(), MergeKdVpStat{}, red);
    if (threadIdx.x == 0) {
        C* out = static_cast<C*>(p.stats) + row * 8;
        out[0] = st.a.m;
        out[1] = NEED_T ? st.b.m : ninf;
        out[2] = use_x ? st.x.m : ninf;
        out[3] = st.nf > 0 ? C(1) : C(0);
        out[4] = st.a.z;
        out[5] = NEED_T ? st.b.z : C(0);
        out[6] = use_x ? st.x.z : C(0);
        out[7] = st.b_at;
        p.piv[row] = st.a.m == ninf ? 0 : st.a.p;
    }
}

// The norm row of one row, in the compute type.
template <typename C> struct KdVpNorm {
    C m_a, c_a, m_b, c_b, m_x, c_x, b_ref, g_rest, g_piv;

    __device__ __forceinline__ static KdVpNorm load(const void* norm, int64_t row) {
        const C* r = static_cast<const C*>(norm) + row * 9;
        return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]};
    }
};

template <int DIV, typename T>
__global__ void __launch_bounds__(kVpThreads, kVpMinBlocks)
    kd_vp_partials_kernel(KdVpArgs p, int64_t row0) {
    using C = typename Compute<T>::type;
    constexpr bool NEED_T = DIV != kZero;
    __shared__ Sum3C<C> red[kWarp];
    const int64_t row = row0 + blockIdx.x;
    const int width = static_cast<int>(p.width);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = NEED_T ? static_cast<const T*>(p.t) + row * p.stride_t : nullptr;
    const int flags = p.flags[row];
    const bool own = (flags & 2) != 0;  // this rank holds the global pivot j*
    bool ok = (flags & 1) == 0;         // the row has a softmax
    int64_t y = 0;
    if (p.has_labels) {
        y = read_label(p.labels, p.labels_i64, row, p.stride_l);
        ok = ok && y != p.ignore_index;
    }
    Sum3C<C> acc = {C(0), C(0), C(0)};  // Σ d, G', P
    if constexpr (NEED_T) {
        if (ok) {
            const C it = static_cast<C>(p.inv_temp);
            const C itt = static_cast<C>(p.inv_temp_t);  // the teacher's 1/τ_t
            const C w = static_cast<C>(p.w);
            const C log_w = static_cast<C>(p.log_w);
            const C log_1mw = static_cast<C>(p.log_1mw);
            const KdVpNorm<C> nm = KdVpNorm<C>::load(p.norm, row);
            const int piv = p.piv[row];
            C diff_piv = C(0);
            if constexpr (DIV == kTvd) {  // the pivot's p − q as Σ'q − Σ'p (both peak: 1 − 1)
                const C a_j = to_c<C>(s_row[piv]) * it;
                const C b_j = vp_b<DIV, C>(a_j, to_c<C>(t_row[piv]), itt, w);
                diff_piv =
                    vp_expm1((b_j - nm.m_b) - nm.c_b) - vp_expm1((a_j - nm.m_a) - nm.c_a);
            }
            vp_cols<T, true>(s_row, t_row, width, [&](int j, C xs, C xt) {
                const C a = xs * it;
                const C b = vp_b<DIV, C>(a, xt, itt, w);
                const C la = a - nm.m_a;
                const C logq = la - nm.c_a;
                const C logp = (b - nm.m_b) - nm.c_b;
                if constexpr (DIV == kFwdKL || DIV == kTaid) {
                    const C pr = vp_exp(logp);
                    acc.x += pr > C(0) ? pr * (logp - logq) : C(0);
                } else {
                    const bool is_p = own && j == piv;
                    C d, g;
                    if constexpr (DIV == kTvd) {
                        const C diff = is_p ? diff_piv : vp_exp(logp) - vp_exp(logq);
                        d = C(0.5) * vp_abs(diff);
                        g = tvd_g(diff);
                    } else {
                        vp_pair_terms<DIV, C>(logq, logp, la - (b - nm.b_ref),
                                              nm.c_a - nm.c_b, w, log_w, log_1mw, d, g);
                    }
                    acc.x += d;
                    const C qg = vp_exp(logq) * g;
                    if (is_p) {
                        acc.z += qg;
                    } else {
                        acc.y += qg;
                    }
                }
            });
        }
    }
    acc = block_reduce(acc, Sum3C<C>{C(0), C(0), C(0)}, AddSum3C{}, red);
    if (threadIdx.x == 0) {
        C* out = static_cast<C*>(p.part) + row * 4;
        out[0] = acc.x;
        out[1] = acc.y;
        out[2] = acc.z;
        C x_y = C(0);  // the hard label's logit, on the rank that owns the label
        if (p.hard && ok) {
            const int64_t y_loc = y - p.start;
            if (y_loc >= 0 && y_loc < p.width) x_y = to_c<C>(s_row[y_loc]);
        }
        out[3] = x_y;
    }
}

template <int DIV, typename T>
__global__ void __launch_bounds__(kVpThreads, kVpMinBlocks)
    kd_vp_grad_kernel(KdVpArgs p, int64_t row0) {
    using C = typename Compute<T>::type;
    constexpr bool NEED_T = DIV != kZero;
    const int64_t row = row0 + blockIdx.x;
    const int width = static_cast<int>(p.width);
    const T* s_row = static_cast<const T*>(p.s) + row * p.stride_s;
    const T* t_row = NEED_T ? static_cast<const T*>(p.t) + row * p.stride_t : nullptr;
    T* g_row = static_cast<T*>(p.grad) + row * p.stride_g;
    const int flags = p.flags[row];
    const bool own = (flags & 2) != 0;
    bool ok = (flags & 1) == 0;
    float fill = __int_as_float(0x7fffffff);  // rows without a softmax: NaN
    int64_t y = 0;
    if (p.has_labels) {
        y = read_label(p.labels, p.labels_i64, row, p.stride_l);
        if (y == p.ignore_index) {  // ignored rows: 0, whatever they hold
            ok = false;
            fill = 0.0f;
        }
    }
    if (!ok) {
        vp_fill(g_row, width, fill);
        return;
    }
    const C it = static_cast<C>(p.inv_temp);
    const C itt = static_cast<C>(p.inv_temp_t);  // the teacher's 1/τ_t
    const C w = static_cast<C>(p.w);
    const C log_w = static_cast<C>(p.log_w);
    const C log_1mw = static_cast<C>(p.log_1mw);
    const KdVpNorm<C> nm = KdVpNorm<C>::load(p.norm, row);
    const C g_bar = nm.g_rest + nm.g_piv;
    const C sc = *static_cast<const C*>(p.scale);
    const C c_soft = static_cast<C>(p.soft_w) * it * sc;
    const C c_hard = static_cast<C>(p.hard_w) * sc;
    const bool hard = p.hard;
    const bool use_x = p.use_x;
    const int64_t y_loc = y - p.start;
    const int piv = p.piv[row];
    // the pivot's inputs, read before any gradient is written
    const C x_j = to_c<C>(s_row[piv]);
    const C a_j = x_j * it;
    const C b_j = NEED_T ? vp_b<DIV, C>(a_j, to_c<C>(t_row[piv]), itt, w) : a_j;
    const C logq_j = (a_j - nm.m_a) - nm.c_a;
    const C logp_j = (b_j - nm.m_b) - nm.c_b;
    const C diff_piv = vp_expm1(logp_j) - vp_expm1(logq_j);
    // every thread has read the pivot's logit before any thread writes: the gradient may
    // overwrite the logits in place (the fused losses' chunk buffer)
    __syncthreads();
    vp_map<T, NEED_T>(s_row, t_row, g_row, width, [&](int j, C xs, C xt) -> C {
        const C a = xs * it;
        const C la = a - nm.m_a;
        const C logq = la - nm.c_a;
        const C q = vp_exp(logq);
        C out = C(0);
        if constexpr (DIV == kFwdKL || DIV == kTaid) {
            out = q - vp_exp((vp_b<DIV, C>(a, xt, itt, w) - nm.m_b) - nm.c_b);
        } else if constexpr (DIV == kTvd) {
            const C logp = (xt * itt - nm.m_b) - nm.c_b;
            out = q * (tvd_g((own && j == piv) ? diff_piv : vp_exp(logp) - q) - g_bar);
        } else if constexpr (DIV != kZero) {
            const C b = xt * itt;
            C d, g;
            vp_pair_terms<DIV, C>(logq, (b - nm.m_b) - nm.c_b, la - (b - nm.b_ref),
                                  nm.c_a - nm.c_b, w, log_w, log_1mw, d, g);
            out = q * (g - g_bar);
        }
        out *= c_soft;
        if (hard) {
            const C ls = use_x ? (xs - nm.m_x) - nm.c_x : logq;
            out += c_hard * (vp_exp(ls) - (j == y_loc ? C(1) : C(0)));
        }
        return out;
    });
    if (own) {
        __syncthreads();  // the pivot's entry above is overwritten once every store is done
        if (threadIdx.x == 0) {
            C pv = C(0);
            if constexpr (DIV == kFwdKL || DIV == kTaid) {
                pv = vp_expm1(logq_j) - vp_expm1(logp_j);
            } else if constexpr (DIV != kZero) {
                C g_j;
                if constexpr (DIV == kTvd) {
                    g_j = tvd_g(diff_piv);
                } else {
                    C d_j;
                    vp_pair_terms<DIV, C>(logq_j, logp_j, (a_j - nm.m_a) - (b_j - nm.b_ref),
                                          nm.c_a - nm.c_b, w, log_w, log_1mw, d_j, g_j);
                }
                pv = (-vp_expm1(logq_j) * g_j - nm.g_rest) * vp_exp(logq_j);
            }
            pv *= c_soft;
            if (hard) {
                const C ls_j = use_x ? (x_j - nm.m_x) - nm.c_x : logq_j;
                pv += c_hard * (piv == y_loc ? vp_expm1(ls_j) : vp_exp(ls_j));
            }
            g_row[piv] = from_c<T>(pv);
        }
    }
}

}  // namespace kdk
