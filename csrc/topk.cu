// Launcher of the top-k selection kernel: checks, dtype dispatch, launch on the stream.
#include <climits>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/topk.cuh"
#include "launch_utils.h"

namespace kdk {

static_assert(kTopkMax == kTopkMaxK, "api.h and topk.cuh agree on the largest k");

namespace {

template <typename T>
void launch_topk(const void* x, int64_t stride_x, int64_t n_rows, int v, int k, void* values,
                 int64_t* indices, cudaStream_t stream) {
    int kp = 1;
    while (kp < k) kp <<= 1;
    constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowsPerLaunch) {
        const int64_t rows = n_rows - r0 < kRowsPerLaunch ? n_rows - r0 : kRowsPerLaunch;
        topk_kernel<T><<<static_cast<unsigned>(rows), kTopkThreads, 0, stream>>>(
            static_cast<const T*>(x), stride_x, v, k, kp, static_cast<T*>(values), indices, r0);
        check_cuda(cudaGetLastError(), "topk kernel launch");
    }
}

}  // namespace

void topk_select(const void* x, int64_t stride_x, int64_t n_rows, int64_t v, int k, int dtype,
                 void* values, int64_t* indices, cudaStream_t stream) {
    if (n_rows < 0) throw std::invalid_argument("topk_select: n_rows must be >= 0");
    if (v < 1 || v > INT_MAX - 64) throw std::invalid_argument("topk_select: v must be in [1, 2^31 - 64)");
    if (k < 1 || k > kTopkMaxK || k > v)
        throw std::invalid_argument("topk_select: k must be in [1, min(256, v)], got " +
                                    std::to_string(k));
    if (n_rows == 0) return;
    if (x == nullptr || values == nullptr || indices == nullptr)
        throw std::invalid_argument("topk_select: null pointer");
    const int vi = static_cast<int>(v);
    switch (dtype) {
        case kFloat32:
            return launch_topk<float>(x, stride_x, n_rows, vi, k, values, indices, stream);
        case kFloat16:
            return launch_topk<__half>(x, stride_x, n_rows, vi, k, values, indices, stream);
        case kBFloat16:
            return launch_topk<__nv_bfloat16>(x, stride_x, n_rows, vi, k, values, indices, stream);
        default:
            throw std::invalid_argument("topk_select: unsupported dtype code " +
                                        std::to_string(dtype));
    }
}

}  // namespace kdk
