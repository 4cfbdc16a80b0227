// Launchers of the vocabulary-parallel kd_loss kernels (kd_parallel.cuh): argument checks,
// dtype and divergence dispatch, and the launch on the caller's stream.
#include <climits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kdkernels/api.h"
#include "kdkernels/kd_parallel.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

void check(const KdVpArgs& p, const char* what, bool needs_norm) {
    const std::string name = what;
    if (p.n_rows < 0) throw std::invalid_argument(name + ": n_rows must be >= 0");
    if (p.width < 1 || p.width > INT_MAX - 64)
        throw std::invalid_argument(name + ": width must be in [1, 2^31 - 64)");
    if (p.div < 0 || p.div >= kNumDivs)
        throw std::invalid_argument(name + ": unknown divergence code " + std::to_string(p.div));
    if (p.div > kTaid)  // dkd, nkd, cosine: the Python launcher refuses them first
        throw std::invalid_argument(name + ": divergence code " + std::to_string(p.div) +
                                    " has no vocabulary-parallel CUDA kernel");
    if (!p.is_double && p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16)
        throw std::invalid_argument(name + ": unsupported dtype code " + std::to_string(p.dtype));
    if (p.hard && !p.has_labels) throw std::invalid_argument(name + ": hard_w != 0 needs labels");
    if (p.use_x && !p.hard) throw std::invalid_argument(name + ": use_x needs hard_w != 0");
    if (p.s == nullptr || p.piv == nullptr || (p.div != kZero && p.t == nullptr) ||
        (p.has_labels && p.labels == nullptr) ||
        (needs_norm && (p.norm == nullptr || p.flags == nullptr)))
        throw std::invalid_argument(name + ": null pointer");
}

int threads_for(int64_t width) { return width >= 4096 ? kVpThreads : 128; }

// f(T{}) for the row type.
template <typename F> void with_type(const KdVpArgs& p, F&& f) {
    if (p.is_double) return f(double{});
    switch (p.dtype) {
        case kFloat32: return f(float{});
        case kFloat16: return f(__half{});
        default: return f(__nv_bfloat16{});
    }
}

// f(std::integral_constant<int, DIV>{}) for the divergence code.
template <typename F> void with_div(int div, F&& f) {
    switch (div) {
        case kZero: return f(std::integral_constant<int, kZero>{});
        case kFwdKL: return f(std::integral_constant<int, kFwdKL>{});
        case kRevKL: return f(std::integral_constant<int, kRevKL>{});
        case kJsd: return f(std::integral_constant<int, kJsd>{});
        case kSkewFwd: return f(std::integral_constant<int, kSkewFwd>{});
        case kSkewRev: return f(std::integral_constant<int, kSkewRev>{});
        case kTvd: return f(std::integral_constant<int, kTvd>{});
        default: return f(std::integral_constant<int, kTaid>{});
    }
}

// One block per row, in launches of at most 2^30 rows.
void launch_rows(void (*kernel)(KdVpArgs, int64_t), const KdVpArgs& p, cudaStream_t stream,
                 const char* what) {
    constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;
    const int threads = threads_for(p.width);
    for (int64_t r0 = 0; r0 < p.n_rows; r0 += kRowsPerLaunch) {
        const int64_t rows = p.n_rows - r0 < kRowsPerLaunch ? p.n_rows - r0 : kRowsPerLaunch;
        kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(p, r0);
        check_cuda(cudaGetLastError(), what);
    }
}

}  // namespace

void kd_vp_stats(const KdVpArgs& p, cudaStream_t stream) {
    check(p, "kd_vp_stats", false);
    if (p.stats == nullptr) throw std::invalid_argument("kd_vp_stats: null pointer");
    if (p.n_rows == 0) return;
    with_type(p, [&](auto tag) {
        using T = decltype(tag);
        const char* what = "kd_vp_stats launch";
        switch (kd_vp_stats_mode(p.div)) {
            case kZero: return launch_rows(&kd_vp_stats_kernel<kZero, T>, p, stream, what);
            case kRevKL: return launch_rows(&kd_vp_stats_kernel<kRevKL, T>, p, stream, what);
            case kTaid: return launch_rows(&kd_vp_stats_kernel<kTaid, T>, p, stream, what);
            default: return launch_rows(&kd_vp_stats_kernel<kFwdKL, T>, p, stream, what);
        }
    });
}

void kd_vp_partials(const KdVpArgs& p, cudaStream_t stream) {
    check(p, "kd_vp_partials", true);
    if (p.part == nullptr) throw std::invalid_argument("kd_vp_partials: null pointer");
    if (p.n_rows == 0) return;
    with_type(p, [&](auto tag) {
        using T = decltype(tag);
        with_div(p.div, [&](auto div) {
            launch_rows(&kd_vp_partials_kernel<decltype(div)::value, T>, p, stream,
                        "kd_vp_partials launch");
        });
    });
}

void kd_vp_grad(const KdVpArgs& p, cudaStream_t stream) {
    check(p, "kd_vp_grad", true);
    if (p.grad == nullptr || p.scale == nullptr)
        throw std::invalid_argument("kd_vp_grad: null pointer");
    if (p.n_rows == 0) return;
    with_type(p, [&](auto tag) {
        using T = decltype(tag);
        with_div(p.div, [&](auto div) {
            launch_rows(&kd_vp_grad_kernel<decltype(div)::value, T>, p, stream,
                        "kd_vp_grad launch");
        });
    });
}

}  // namespace kdk
