// Launcher of the topk_kd_loss kernel: argument checks, the shared-memory plan, divergence
// and dtype dispatch, and the launch on the caller's stream.
#include <algorithm>
#include <array>
#include <climits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/topk_kd.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

// Calls f(kernel pointer) for the (div, dtype) instance.
template <typename F> void with_tk_kernel(int div, int dtype, F&& f) {
    auto by_type = [&](auto tag) {
        using T = decltype(tag);
        switch (div) {
            case kFwdKL: f(&topk_kd_kernel<kFwdKL, T>); return;
            case kRevKL: f(&topk_kd_kernel<kRevKL, T>); return;
            case kJsd: f(&topk_kd_kernel<kJsd, T>); return;
            default:
                throw std::invalid_argument(
                    "topk_kd_fwd: the divergence code must be forward KL, reverse KL or jsd, got " +
                    std::to_string(div));
        }
    };
    switch (dtype) {
        case kFloat32: by_type(float{}); return;
        case kFloat16: by_type(__half{}); return;
        case kBFloat16: by_type(__nv_bfloat16{}); return;
        default:
            throw std::invalid_argument("topk_kd_fwd: unsupported dtype code " + std::to_string(dtype));
    }
}

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Static shared memory of the kernels (the same for every instance).
size_t static_smem(int dtype) {
    size_t bytes = 0;
    with_tk_kernel(kFwdKL, dtype, [&](auto kernel) {
        cudaFuncAttributes fa;
        check_cuda(cudaFuncGetAttributes(&fa, kernel), "cudaFuncGetAttributes(topk_kd_kernel)");
        bytes = fa.sharedSizeBytes;
    });
    return bytes;
}

// Dynamic shared memory a block may use on `device` (opt-in limit minus static).
size_t max_dynamic_smem(int dtype, int device) {
    const size_t optin = device_info(device).smem_optin;
    const size_t st = static_smem(dtype);
    return optin > st ? optin - st : 0;
}

TopkKdPlan make_plan(int64_t v, int64_t k, int dtype, bool bucket, int device, int force_path) {
    const int bm_words = static_cast<int>(std::min<int64_t>((v + 31) / 32, kTkBitmapWords));
    const int entries = static_cast<int>(std::min<int64_t>(k, kTkEntries));
    const size_t base = static_cast<size_t>(tk_round16(int64_t{4} * bm_words)) +
                        static_cast<size_t>(entries) * 12;
    const size_t max_dyn = max_dynamic_smem(dtype, device);
    if (base > max_dyn) {
        throw std::runtime_error("topk_kd_fwd: the bitmap and entry tile (" + std::to_string(base) +
                                 " bytes of shared memory) exceed this device's limit of " +
                                 std::to_string(max_dyn) + " bytes per block");
    }
    TopkKdPlan plan{kStream, kTkThreads, bm_words, entries, base};
    if (!bucket || force_path == kStream) return plan;  // renormalize never reads the row
    // The student row on chip: small enough for two blocks per SM (so one loads while the
    // other computes; an SM holds the opt-in limit plus 1 KiB, and reserves 1 KiB per
    // block), or anywhere under the limit when forced.
    const size_t row = static_cast<size_t>(tk_round16(v * elem_size(dtype)));
    const size_t half = (device_info(device).smem_optin + 1024) / 2;
    const size_t fixed = static_smem(dtype) + 1024;
    const size_t two_blocks = half > fixed ? half - fixed : 0;
    const size_t budget = force_path == kSmem ? max_dyn : std::min(max_dyn, two_blocks);
    if (row + base <= budget) return TopkKdPlan{kSmem, kTkThreads, bm_words, entries, row + base};
    if (force_path == kSmem) {
        throw std::invalid_argument("topk_kd_fwd: a student row of v=" + std::to_string(v) +
                                    " does not fit in shared memory on this device (" +
                                    std::to_string(row + base) + " > " + std::to_string(max_dyn) +
                                    " bytes)");
    }
    return plan;
}

}  // namespace

TopkKdPlan topk_kd_plan(int64_t v, int64_t k, int dtype, bool bucket, int device, int force_path) {
    if (v < 1 || v > INT_MAX - 64) throw std::invalid_argument("topk_kd_fwd: v must be in [1, 2^31 - 64)");
    if (k < 1 || k > v)
        throw std::invalid_argument("topk_kd_fwd: k must be in [1, v], got " + std::to_string(k));
    if (force_path < kAuto || force_path > kSmem)
        throw std::invalid_argument("topk_kd_fwd: force_path must be -1 (auto), 0 (stream) or 1 (smem)");
    // Plans depend only on these (k through the entry tile): computed once, reused.
    using Key = std::array<int64_t, 6>;
    static std::mutex mu;
    static std::map<Key, TopkKdPlan> cache;
    const Key key{v, std::min<int64_t>(k, kTkEntries), dtype, bucket ? 1 : 0, device, force_path};
    {
        std::lock_guard<std::mutex> lock(mu);
        const auto it = cache.find(key);
        if (it != cache.end()) return it->second;
    }
    const TopkKdPlan plan = make_plan(v, k, dtype, bucket, device, force_path);
    std::lock_guard<std::mutex> lock(mu);
    if (cache.size() > 4096) cache.clear();  // bounded: shapes seen by one process are few
    cache.emplace(key, plan);
    return plan;
}

void topk_kd_fwd(const TopkKdArgs& p, const TopkKdPlan& plan, cudaStream_t stream) {
    if (p.n_rows < 0) throw std::invalid_argument("topk_kd_fwd: n_rows must be >= 0");
    if (p.v < 1 || p.v > INT_MAX - 64) throw std::invalid_argument("topk_kd_fwd: v must be in [1, 2^31 - 64)");
    if (p.k < 1 || p.k > p.v)
        throw std::invalid_argument("topk_kd_fwd: k must be in [1, v], got " + std::to_string(p.k));
    if (p.div == kJsd && !(p.beta > 0.0f && p.beta < 1.0f))
        throw std::invalid_argument("topk_kd_fwd: jsd needs 0 < beta < 1 (its endpoints are the KLs)");
    if (p.s == nullptr || p.idx == nullptr || p.vals == nullptr || p.loss == nullptr ||
        (p.has_labels && p.labels == nullptr) ||
        (p.compute_grad && (p.grad == nullptr || p.scale == nullptr)))
        throw std::invalid_argument("topk_kd_fwd: null pointer");
    const bool smem_row = plan.path == kSmem;
    if (plan.threads != kTkThreads || plan.bitmap_words < 1 || plan.bitmap_words > kTkBitmapWords ||
        plan.entries < 1 || plan.entries > kTkEntries ||
        plan.bitmap_words < std::min<int64_t>((p.v + 31) / 32, kTkBitmapWords) ||
        plan.entries < std::min<int64_t>(p.k, kTkEntries) || (smem_row && !p.bucket))
        throw std::invalid_argument("topk_kd_fwd: inconsistent plan");
    const size_t need =
        static_cast<size_t>(tk_round16(int64_t{4} * plan.bitmap_words)) +
        static_cast<size_t>(plan.entries) * 12 +
        (smem_row ? static_cast<size_t>(tk_round16(p.v * elem_size(p.dtype))) : 0);
    if (plan.smem_bytes < need) throw std::invalid_argument("topk_kd_fwd: inconsistent plan");
    if (p.n_rows == 0) return;

    with_tk_kernel(p.div, p.dtype, [&](auto kernel) {
        if (plan.smem_bytes > 40 * 1024) {  // with the static part, above the default 48 KiB
            // always the device's maximum: concurrent launches never lower it for each other
            int device = 0;
            check_cuda(cudaGetDevice(&device), "cudaGetDevice");
            check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(max_dynamic_smem(p.dtype, device))),
                       "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
        }
        constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;
        for (int64_t r0 = 0; r0 < p.n_rows; r0 += kRowsPerLaunch) {
            const int64_t rows = p.n_rows - r0 < kRowsPerLaunch ? p.n_rows - r0 : kRowsPerLaunch;
            kernel<<<static_cast<unsigned>(rows), plan.threads, plan.smem_bytes, stream>>>(
                p, r0, smem_row ? 1 : 0, plan.bitmap_words, plan.entries);
            check_cuda(cudaGetLastError(), "topk_kd_fwd kernel launch");
        }
    });
}

}  // namespace kdk
