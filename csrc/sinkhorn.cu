// Launchers of the Sinkhorn solver (sinkhorn.cuh): argument checks, the fused / tiled
// plan, the launch sequence of the forward (with the device-side tol check) and of the
// exact reverse pass, on the caller's stream, without a host synchronisation.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/sinkhorn.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

constexpr int64_t kMaxGridY = 65535;

// Elements of T in the fused kernels' dynamic shared memory (the layout in sinkhorn.cuh).
int64_t fused_elems(int64_t b1, int64_t b2) {
    return b1 * b2 + 6 * (b1 + b2) + 2 * kSkThreads + kSkWarps;
}

template <typename K> size_t max_dynamic_smem(K kernel, int device) {
    const DeviceInfo& dev = device_info(device);
    cudaFuncAttributes fa;
    check_cuda(cudaFuncGetAttributes(&fa, kernel), "cudaFuncGetAttributes(sinkhorn kernel)");
    return dev.smem_optin > fa.sharedSizeBytes ? dev.smem_optin - fa.sharedSizeBytes : 0;
}

template <typename K> void allow_smem(K kernel, size_t max_dyn) {
    // always the device's maximum: concurrent launches never lower it for each other
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(max_dyn)),
               "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

void check_args(const SinkhornArgs& a, const char* who) {
    const std::string w(who);
    if (a.m < 0 || a.m > INT_MAX) throw std::invalid_argument(w + ": m must be in [0, 2^31)");
    if (a.b1 < 1 || a.b2 < 1) throw std::invalid_argument(w + ": b1 and b2 must be >= 1");
    if ((a.b1 + kSkWarps - 1) / kSkWarps > kMaxGridY || (a.b2 + kWarp - 1) / kWarp > kMaxGridY)
        throw std::invalid_argument(w + ": b1 must be <= " + std::to_string(kMaxGridY * kSkWarps) +
                                    " and b2 <= " + std::to_string(kMaxGridY * kWarp));
    if (a.b1 * a.b2 > (int64_t{1} << 40))
        throw std::invalid_argument(w + ": b1·b2 is too large");
    if (a.n_iters < 1 || a.n_iters > INT_MAX / 2)
        throw std::invalid_argument(w + ": n_iters must be in [1, 2^30)");
    if (!(a.epsilon > 0.0)) throw std::invalid_argument(w + ": epsilon must be > 0");
    if (a.m > 0 && (a.cost == nullptr || a.log_a == nullptr || a.log_b == nullptr ||
                    a.rh == nullptr || a.lh == nullptr || a.iters == nullptr))
        throw std::invalid_argument(w + ": null pointer");
}

template <typename T> SkParams<T> params(const SinkhornArgs& a) {
    SkParams<T> p{};
    p.cost = static_cast<const T*>(a.cost);
    p.la = static_cast<const T*>(a.log_a);
    p.lb = static_cast<const T*>(a.log_b);
    p.rh = static_cast<T*>(a.rh);
    p.lh = static_cast<T*>(a.lh);
    p.f = static_cast<T*>(a.f);
    p.g = static_cast<T*>(a.g);
    p.part = static_cast<T*>(a.part);
    p.iters = a.iters;
    p.gf = static_cast<const T*>(a.grad_f);
    p.gg = static_cast<const T*>(a.grad_g);
    p.fb = static_cast<T*>(a.fb);
    p.gb = static_cast<T*>(a.gb);
    p.cbar = static_cast<T*>(a.cbar);
    p.labar = static_cast<T*>(a.labar);
    p.lbbar = static_cast<T*>(a.lbbar);
    p.m = a.m;
    p.b1 = static_cast<int>(a.b1);
    p.b2 = static_cast<int>(a.b2);
    p.n_slots = static_cast<int>(std::max<int64_t>(a.n_slots, 1));
    p.eps = static_cast<T>(a.epsilon);
    p.tol = static_cast<T>(a.tol);
    return p;
}

template <typename T> void fwd(const SinkhornArgs& a, int device, cudaStream_t stream) {
    const SkParams<T> p = params<T>(a);
    const unsigned gm = static_cast<unsigned>(a.m);
    const int n = static_cast<int>(a.n_iters);
    const bool tol = a.use_tol;
    if (a.fused) {
        const size_t smem = static_cast<size_t>(fused_elems(a.b1, a.b2)) * sizeof(T);
        const size_t max_dyn = max_dynamic_smem(&sk_fused_fwd_kernel<T>, device);
        if (smem > max_dyn)
            throw std::runtime_error("sinkhorn_fwd: the fused path needs " + std::to_string(smem) +
                                     " bytes of shared memory per block; this device allows " +
                                     std::to_string(max_dyn) + " (use the tiled plan)");
        allow_smem(&sk_fused_fwd_kernel<T>, max_dyn);
        const int seg = tol ? std::min(n, kSinkhornSegment) : n;
        const bool hist = sinkhorn_slots(a.n_iters, tol, a.history, true) > 0;
        for (int k0 = 1; k0 <= n; k0 += seg) {
            const int k1 = std::min(n + 1, k0 + seg);
            sk_fused_fwd_kernel<T><<<gm, kSkThreads, smem, stream>>>(p, k0, k1, tol, hist, !tol);
            check_cuda(cudaGetLastError(), "sinkhorn fused forward launch");
            if (tol) {
                sk_check_kernel<T><<<1, kSkThreads, 0, stream>>>(p.part, p.iters, a.m, 1, k0,
                                                                 k1 - k0, p.tol);
                check_cuda(cudaGetLastError(), "sinkhorn check launch");
            }
        }
    } else {
        const dim3 grid_r(gm, static_cast<unsigned>((a.b1 + kSkWarps - 1) / kSkWarps));
        const dim3 grid_c(gm, static_cast<unsigned>((a.b2 + kWarp - 1) / kWarp));
        for (int k = 1; k <= n; ++k) {
            const bool last = k == n && !tol;
            sk_row_kernel<T><<<grid_r, kSkThreads, 0, stream>>>(p, k, tol, last);
            check_cuda(cudaGetLastError(), "sinkhorn row launch");
            if (tol && k > 1) {
                sk_check_kernel<T><<<1, kSkThreads, 0, stream>>>(
                    p.part, p.iters, a.m, static_cast<int>(grid_r.y), k - 1, 1, p.tol);
                check_cuda(cudaGetLastError(), "sinkhorn check launch");
            }
            sk_col_kernel<T><<<grid_c, kSkThreads, 0, stream>>>(p, k, tol, last);
            check_cuda(cudaGetLastError(), "sinkhorn column launch");
        }
    }
    if (tol) {
        const int64_t b = std::max(a.b1, a.b2);
        const dim3 grid(gm, static_cast<unsigned>((b + kSkThreads - 1) / kSkThreads));
        sk_final_kernel<T><<<grid, kSkThreads, 0, stream>>>(p);
        check_cuda(cudaGetLastError(), "sinkhorn final launch");
    }
}

template <typename T> void bwd(const SinkhornArgs& a, int device, cudaStream_t stream) {
    const SkParams<T> p = params<T>(a);
    const unsigned gm = static_cast<unsigned>(a.m);
    if (a.fused) {
        const size_t smem = static_cast<size_t>(fused_elems(a.b1, a.b2)) * sizeof(T);
        const size_t max_dyn = max_dynamic_smem(&sk_fused_bwd_kernel<T>, device);
        if (smem > max_dyn)
            throw std::runtime_error("sinkhorn_bwd: the fused path needs " + std::to_string(smem) +
                                     " bytes of shared memory per block; this device allows " +
                                     std::to_string(max_dyn) + " (use the tiled plan)");
        allow_smem(&sk_fused_bwd_kernel<T>, max_dyn);
        sk_fused_bwd_kernel<T><<<gm, kSkThreads, smem, stream>>>(p);
        check_cuda(cudaGetLastError(), "sinkhorn fused backward launch");
        return;
    }
    const dim3 grid_r(gm, static_cast<unsigned>((a.b1 + kSkWarps - 1) / kSkWarps));
    const dim3 grid_c(gm, static_cast<unsigned>((a.b2 + kWarp - 1) / kWarp));
    for (int k = static_cast<int>(a.n_iters); k >= 1; --k) {  // above *iters: return at once
        sk_bwd_col_kernel<T><<<grid_r, kSkThreads, 0, stream>>>(p, k);
        check_cuda(cudaGetLastError(), "sinkhorn backward column launch");
        sk_bwd_row_kernel<T><<<grid_c, kSkThreads, 0, stream>>>(p, k);
        check_cuda(cudaGetLastError(), "sinkhorn backward row launch");
    }
}

}  // namespace

int64_t sinkhorn_slots(int64_t n_iters, bool use_tol, bool history, bool fused) {
    if (history) return n_iters;
    if (use_tol) return fused ? std::min<int64_t>(n_iters, kSinkhornSegment) : 2;
    return fused ? 0 : 2;
}

SinkhornPlan sinkhorn_plan(int64_t b1, int64_t b2, bool is_double, int device) {
    if (b1 < 1 || b2 < 1) throw std::invalid_argument("sinkhorn_plan: b1 and b2 must be >= 1");
    SinkhornPlan plan{false, 0};
    if (b1 > (int64_t{1} << 20) || b2 > (int64_t{1} << 20)) return plan;
    const size_t bytes = static_cast<size_t>(fused_elems(b1, b2)) * (is_double ? 8 : 4);
    const size_t max_dyn = is_double ? std::min(max_dynamic_smem(&sk_fused_fwd_kernel<double>, device),
                                                max_dynamic_smem(&sk_fused_bwd_kernel<double>, device))
                                     : std::min(max_dynamic_smem(&sk_fused_fwd_kernel<float>, device),
                                                max_dynamic_smem(&sk_fused_bwd_kernel<float>, device));
    if (bytes <= max_dyn) plan = SinkhornPlan{true, bytes};
    return plan;
}

void sinkhorn_fwd(const SinkhornArgs& a, int device, cudaStream_t stream) {
    check_args(a, "sinkhorn_fwd");
    if (a.n_slots < std::max<int64_t>(sinkhorn_slots(a.n_iters, a.use_tol, a.history, a.fused), 1))
        throw std::invalid_argument("sinkhorn_fwd: the history buffers hold too few slots");
    if (a.m == 0) return;
    if (a.f == nullptr || a.g == nullptr || (a.use_tol && a.part == nullptr))
        throw std::invalid_argument("sinkhorn_fwd: null pointer");
    if (a.use_tol && !(a.tol > 0.0)) throw std::invalid_argument("sinkhorn_fwd: tol must be > 0");
    if (a.is_double) {
        fwd<double>(a, device, stream);
    } else {
        fwd<float>(a, device, stream);
    }
}

void sinkhorn_bwd(const SinkhornArgs& a, int device, cudaStream_t stream) {
    check_args(a, "sinkhorn_bwd");
    if (a.n_slots < a.n_iters)
        throw std::invalid_argument("sinkhorn_bwd: the history must hold n_iters slots");
    if (a.m == 0) return;
    if (a.cbar == nullptr || a.labar == nullptr || a.lbbar == nullptr ||
        (!a.fused && (a.fb == nullptr || a.gb == nullptr)))
        throw std::invalid_argument("sinkhorn_bwd: null pointer");
    if (a.is_double) {
        bwd<double>(a, device, stream);
    } else {
        bwd<float>(a, device, stream);
    }
}

}  // namespace kdk
