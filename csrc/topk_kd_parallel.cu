// Launchers of the vocabulary-parallel topk_kd_loss kernels (topk_kd_parallel.cuh): argument
// checks, dtype dispatch, the bitmap's shared memory, and the launch on the caller's stream.
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/topk_kd_parallel.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

void check(const TopkVpArgs& p, const char* what) {
    const std::string name = what;
    if (p.n_rows < 0) throw std::invalid_argument(name + ": n_rows must be >= 0");
    if (p.width < 1 || p.width > INT_MAX - 64)
        throw std::invalid_argument(name + ": width must be in [1, 2^31 - 64)");
    if (p.k < 1) throw std::invalid_argument(name + ": k must be >= 1");
    if (!p.is_double && p.dtype != kFloat32 && p.dtype != kFloat16 && p.dtype != kBFloat16)
        throw std::invalid_argument(name + ": unsupported dtype code " + std::to_string(p.dtype));
    if (p.s == nullptr || p.idx == nullptr || (p.has_labels && p.labels == nullptr))
        throw std::invalid_argument(name + ": null pointer");
}

template <typename F> void with_type(const TopkVpArgs& p, F&& f) {
    if (p.is_double) return f(double{});
    switch (p.dtype) {
        case kFloat32: return f(float{});
        case kFloat16: return f(__half{});
        default: return f(__nv_bfloat16{});
    }
}

// One block per row, in launches of at most 2^30 rows; `extra` follows (args, row0).
template <typename... Extra>
void launch_rows(void (*kernel)(TopkVpArgs, int64_t, Extra...), const TopkVpArgs& p, size_t smem,
                 cudaStream_t stream, const char* what, Extra... extra) {
    constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;
    const int threads = p.width >= 4096 ? kVpThreads : 128;
    for (int64_t r0 = 0; r0 < p.n_rows; r0 += kRowsPerLaunch) {
        const int64_t rows = p.n_rows - r0 < kRowsPerLaunch ? p.n_rows - r0 : kRowsPerLaunch;
        kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(p, r0, extra...);
        check_cuda(cudaGetLastError(), what);
    }
}

}  // namespace

void topk_vp_gather(const TopkVpArgs& p, cudaStream_t stream) {
    check(p, "topk_vp_gather");
    if (p.sel == nullptr || (p.bucket && p.tstat == nullptr))
        throw std::invalid_argument("topk_vp_gather: null pointer");
    if (p.n_rows == 0) return;
    // the bitmap of one window (bucket): at most kTkBitmapWords words, 32 KiB
    const int words = static_cast<int>(std::min<int64_t>((p.width + 31) / 32, kTkBitmapWords));
    with_type(p, [&](auto tag) {
        using T = decltype(tag);
        if (p.bucket) {
            launch_rows(&topk_vp_gather_kernel<true, T>, p, static_cast<size_t>(words) * 4, stream,
                        "topk_vp_gather launch", words);
        } else {
            launch_rows(&topk_vp_gather_kernel<false, T>, p, 0, stream, "topk_vp_gather launch", 0);
        }
    });
}

void topk_vp_grad(const TopkVpArgs& p, cudaStream_t stream) {
    check(p, "topk_vp_grad");
    if (p.r == nullptr || p.mode == nullptr || p.grad == nullptr || (p.bucket && p.tail == nullptr))
        throw std::invalid_argument("topk_vp_grad: null pointer");
    if (p.n_rows == 0) return;
    with_type(p, [&](auto tag) {
        using T = decltype(tag);
        if (p.bucket) {
            launch_rows(&topk_vp_grad_kernel<true, T>, p, 0, stream, "topk_vp_grad launch");
        } else {
            launch_rows(&topk_vp_grad_kernel<false, T>, p, 0, stream, "topk_vp_grad launch");
        }
    });
}

}  // namespace kdk
