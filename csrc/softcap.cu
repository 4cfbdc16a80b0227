// Launchers of the softcap kernels (include/kdkernels/softcap.cuh).
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/softcap.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;

dim3 grid_for(int64_t rows, int64_t v) {
    const int64_t col_blocks = (v + kThreads - 1) / kThreads;
    return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(col_blocks < 1024 ? col_blocks : 1024), 1);
}

void check_shape(const char* what, int64_t n_rows, int64_t v) {
    if (n_rows < 0 || v < 0 || v > INT_MAX - 64)
        throw std::invalid_argument(std::string(what) + ": bad shape");
}

template <typename T>
void launch_fwd(const void* u, void* out, int64_t n_rows, int64_t v, int64_t stride_u,
                int64_t stride_o, float cap, cudaStream_t stream) {
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowsPerLaunch) {
        const int64_t rows = n_rows - r0 < kRowsPerLaunch ? n_rows - r0 : kRowsPerLaunch;
        softcap_fwd_kernel<T><<<grid_for(rows, v), kThreads, 0, stream>>>(
            static_cast<const T*>(u), static_cast<T*>(out), r0, stride_u, stride_o,
            static_cast<int>(v), cap);
        check_cuda(cudaGetLastError(), "softcap_fwd kernel launch");
    }
}

template <typename T>
void launch_bwd(void* g, const void* u, const float* rs, int64_t n_rows, int64_t v,
                int64_t stride_g, int64_t stride_u, float k, cudaStream_t stream) {
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowsPerLaunch) {
        const int64_t rows = n_rows - r0 < kRowsPerLaunch ? n_rows - r0 : kRowsPerLaunch;
        softcap_bwd_kernel<T><<<grid_for(rows, v), kThreads, 0, stream>>>(
            static_cast<T*>(g), static_cast<const T*>(u), rs, r0, stride_g, stride_u,
            static_cast<int>(v), k);
        check_cuda(cudaGetLastError(), "softcap_bwd kernel launch");
    }
}

}  // namespace

void softcap_fwd(const void* u, void* out, int64_t n_rows, int64_t v, int64_t stride_u,
                 int64_t stride_o, float cap, int dtype, cudaStream_t stream) {
    check_shape("softcap_fwd", n_rows, v);
    if (n_rows == 0 || v == 0) return;
    if (u == nullptr || out == nullptr) throw std::invalid_argument("softcap_fwd: null pointer");
    switch (dtype) {
        case kFloat32: return launch_fwd<float>(u, out, n_rows, v, stride_u, stride_o, cap, stream);
        case kFloat16: return launch_fwd<__half>(u, out, n_rows, v, stride_u, stride_o, cap, stream);
        case kBFloat16:
            return launch_fwd<__nv_bfloat16>(u, out, n_rows, v, stride_u, stride_o, cap, stream);
        default:
            throw std::invalid_argument("softcap_fwd: unsupported dtype code " + std::to_string(dtype));
    }
}

void softcap_bwd(void* g, const void* u, const float* row_scale, int64_t n_rows, int64_t v,
                 int64_t stride_g, int64_t stride_u, float k, int dtype, cudaStream_t stream) {
    check_shape("softcap_bwd", n_rows, v);
    if (n_rows == 0 || v == 0 || (u == nullptr && row_scale == nullptr)) return;
    if (g == nullptr) throw std::invalid_argument("softcap_bwd: null pointer");
    switch (dtype) {
        case kFloat32:
            return launch_bwd<float>(g, u, row_scale, n_rows, v, stride_g, stride_u, k, stream);
        case kFloat16:
            return launch_bwd<__half>(g, u, row_scale, n_rows, v, stride_g, stride_u, k, stream);
        case kBFloat16:
            return launch_bwd<__nv_bfloat16>(g, u, row_scale, n_rows, v, stride_g, stride_u, k,
                                             stream);
        default:
            throw std::invalid_argument("softcap_bwd: unsupported dtype code " + std::to_string(dtype));
    }
}

}  // namespace kdk
