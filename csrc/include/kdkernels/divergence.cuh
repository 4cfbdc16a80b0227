// Element terms of the softmax-KL family (docs/spec.md §1), shared by every kd kernel.
//
// With a = s/τ, b = t/τ, q = softmax(a), p = softmax(b), each divergence that needs
// normalised distributions is a sum of per-column terms d_v, and its derivative is
// ∂D/∂a_j = q_j (g_j − ḡ), ḡ = Σ_v q_v g_v, where g = ∂D/∂q up to a row constant:
//   reverse KL  d = q (log q − log p)                      g = log q − log p
//   jsd         d = β p (log p − log m) + q g              g = (1−β)(log q − log m),
//               m = βp + (1−β)q
//   skew fwd    d = p (log p − log m), m = αp + (1−α)q     g = −(1−α) p/m
//   skew rev    d = q (log q − log m), m = (1−α)p + αq     g = log q − log m − α q/m
//   tvd         d = ½|p − q|                               g = ½ sign(q − p)
// 0·log 0 = 0: a term whose weight (p or q) is 0 contributes 0 to d and g.
// Forward KL and TAID never come here: their loss and gradient (q − p, q − r) follow
// from the log-sum-exp statistics alone. This mirrors kdkernels/kd/triton.py exactly.
#pragma once

#include "api.h"
#include "common.cuh"

namespace kdk {

struct Terms {
    float d;
    float g;
};

__device__ __forceinline__ float logaddexp(float x, float y) {
    const float m = safe_max(fmaxf(x, y));
    return m + logf(expf(x - m) + expf(y - m));
}

// logq, logp: normalised log-probabilities of one column; la_lb = (a − M_a) − (b − M_b),
// log q − log p up to a row constant without the rounding of either log-normaliser.
template <int DIV>
__device__ __forceinline__ Terms pair_terms(float logq, float logp, float la_lb, float w,
                                            float log_w, float log_1mw) {
    static_assert(DIV == kRevKL || DIV == kJsd || DIV == kSkewFwd || DIV == kSkewRev ||
                      DIV == kTvd,
                  "forward KL, TAID and the zero divergence use the online statistics");
    const float q = expf(logq);
    const float p = expf(logp);
    Terms r;
    if constexpr (DIV == kRevKL) {
        r.g = q > 0.0f ? la_lb : 0.0f;
        r.d = q > 0.0f ? q * (logq - logp) : 0.0f;
    } else if constexpr (DIV == kJsd) {
        const float logm = logaddexp(logp + log_w, logq + log_1mw);
        r.g = q > 0.0f ? (1.0f - w) * (logq - logm) : 0.0f;
        r.d = (p > 0.0f ? w * p * (logp - logm) : 0.0f) + q * r.g;
    } else if constexpr (DIV == kSkewFwd) {
        const float logm = logaddexp(logp + log_w, logq + log_1mw);
        r.d = p > 0.0f ? p * (logp - logm) : 0.0f;
        r.g = p > 0.0f ? -(1.0f - w) * expf(logp - logm) : 0.0f;
    } else if constexpr (DIV == kSkewRev) {
        const float logm = logaddexp(logp + log_1mw, logq + log_w);
        r.d = q > 0.0f ? q * (logq - logm) : 0.0f;
        r.g = q > 0.0f ? logq - logm - w * expf(logq - logm) : 0.0f;
    } else {  // tvd
        r.d = 0.5f * fabsf(p - q);
        r.g = q > p ? 0.5f : (q < p ? -0.5f : 0.0f);
    }
    return r;
}

}  // namespace kdk
