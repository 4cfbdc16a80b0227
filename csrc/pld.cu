// Launcher of the plackett_luce_loss kernel: argument checks, the scratch placement,
// dtype dispatch and the launch on the caller's stream.
#include <climits>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/pld.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

template <typename F> void with_pld_kernel(int dtype, F&& f) {
    switch (dtype) {
        case kFloat32: f(&pld_fwd_kernel<float>); return;
        case kFloat16: f(&pld_fwd_kernel<__half>); return;
        case kBFloat16: f(&pld_fwd_kernel<__nv_bfloat16>); return;
        default:
            throw std::invalid_argument("pld_fwd: unsupported dtype code " + std::to_string(dtype));
    }
}

}  // namespace

void pld_fwd(const PldFwdArgs& p, int device, cudaStream_t stream) {
    if (p.n_rows < 0) throw std::invalid_argument("pld_fwd: n_rows must be >= 0");
    if (p.v < 1 || p.v > INT_MAX - 64) throw std::invalid_argument("pld_fwd: v must be in [1, 2^31 - 64)");
    if (p.k < 1 || p.k > p.v)
        throw std::invalid_argument("pld_fwd: k must be in [1, v], got " + std::to_string(p.k));
    if (p.s == nullptr || p.t == nullptr || p.rank == nullptr || p.thr == nullptr ||
        p.loss == nullptr || (p.has_labels && p.labels == nullptr) ||
        (p.compute_grad && (p.grad == nullptr || p.scale == nullptr)))
        throw std::invalid_argument("pld_fwd: null pointer");
    const bool smem_scratch = p.k <= kPldSmemK;
    if (!smem_scratch && (p.scratch == nullptr || p.stride_x < 3 * p.k))
        throw std::invalid_argument("pld_fwd: k > " + std::to_string(kPldSmemK) +
                                    " needs a float32 scratch of 3·k entries per row");
    if (p.n_rows == 0) return;
    const size_t dyn = smem_scratch ? static_cast<size_t>(p.k) * 3 * sizeof(float) : 0;

    with_pld_kernel(p.dtype, [&](auto kernel) {
        if (dyn > 0) {
            const DeviceInfo& dev = device_info(device);
            cudaFuncAttributes fa;
            check_cuda(cudaFuncGetAttributes(&fa, kernel), "cudaFuncGetAttributes(pld_fwd_kernel)");
            const size_t max_dyn =
                dev.smem_optin > fa.sharedSizeBytes ? dev.smem_optin - fa.sharedSizeBytes : 0;
            if (dyn > max_dyn) {
                throw std::runtime_error(
                    "pld_fwd: the scratch of k=" + std::to_string(p.k) + " ranked positions (" +
                    std::to_string(dyn) + " bytes of shared memory) exceeds this device's limit of " +
                    std::to_string(max_dyn) + " bytes per block");
            }
            // always the device's maximum: concurrent launches never lower it for each other
            check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(max_dyn)),
                       "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
        }
        constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;
        for (int64_t r0 = 0; r0 < p.n_rows; r0 += kRowsPerLaunch) {
            const int64_t rows = p.n_rows - r0 < kRowsPerLaunch ? p.n_rows - r0 : kRowsPerLaunch;
            kernel<<<static_cast<unsigned>(rows), kPldThreads, dyn, stream>>>(p, r0,
                                                                             smem_scratch ? 1 : 0);
            check_cuda(cudaGetLastError(), "pld_fwd kernel launch");
        }
    });
}

}  // namespace kdk
