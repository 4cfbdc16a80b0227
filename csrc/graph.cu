// Launchers of the graph-on-logits kernels (graph.cuh): checks, dtype dispatch, launches
// on the caller's stream (never synchronising).
#include <climits>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/graph.cuh"
#include "launch_utils.h"

namespace kdk {

static_assert(kTopkMax <= kGraphThreads, "one top-k entry per thread in the row kernels");

namespace {

constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;

void check_rows(const char* who, int64_t n_rows, int64_t v, int k) {
    const std::string w(who);
    if (n_rows < 0) throw std::invalid_argument(w + ": n_rows must be >= 0");
    if (v < 1 || v > INT_MAX - 64) throw std::invalid_argument(w + ": v must be in [1, 2^31 - 64)");
    if (k < 1 || k > kTopkMax || k > v)
        throw std::invalid_argument(w + ": k must be in [1, min(256, v)], got " + std::to_string(k));
}

template <typename F> void with_dtype(const char* who, int dtype, F&& f) {
    switch (dtype) {
        case kFloat32: f(float{}); return;
        case kFloat16: f(__half{}); return;
        case kBFloat16: f(__nv_bfloat16{}); return;
        default:
            throw std::invalid_argument(std::string(who) + ": unsupported dtype code " +
                                        std::to_string(dtype));
    }
}

}  // namespace

void graph_rows(const void* z, int64_t stride_z, const bool* valid, const int64_t* top_idx,
                int64_t n_rows, int64_t v, int k, float inv_temp, int dtype, float* a, int* idx,
                float* m, float* lse, cudaStream_t stream) {
    check_rows("graph_rows", n_rows, v, k);
    if (n_rows == 0) return;
    if (z == nullptr || top_idx == nullptr || a == nullptr || idx == nullptr || m == nullptr ||
        lse == nullptr)
        throw std::invalid_argument("graph_rows: null pointer");
    with_dtype("graph_rows", dtype, [&](auto tag) {
        using T = decltype(tag);
        for (int64_t r0 = 0; r0 < n_rows; r0 += kRowsPerLaunch) {
            const int64_t rows = n_rows - r0 < kRowsPerLaunch ? n_rows - r0 : kRowsPerLaunch;
            graph_rows_kernel<T><<<static_cast<unsigned>(rows), kGraphThreads, 0, stream>>>(
                static_cast<const T*>(z), stride_z, valid, top_idx, static_cast<int>(v), k,
                inv_temp, a, idx, m, lse, r0);
            check_cuda(cudaGetLastError(), "graph rows launch");
        }
    });
}

void graph_runs(const int* key, const int64_t* perm, const float* a, const float* m,
                int64_t* du, int* nu, int* bad, int* uent, int64_t groups, int64_t t_len,
                int k, double fix_scale, cudaStream_t stream) {
    if (groups < 0 || t_len < 1 || k < 1 || k > kTopkMax)
        throw std::invalid_argument("graph_runs: bad sizes");
    const int64_t p = t_len * k;
    if (p > INT_MAX) throw std::invalid_argument("graph_runs: t_len·k must be < 2^31");
    if (groups == 0) return;
    if (key == nullptr || perm == nullptr || a == nullptr || m == nullptr || du == nullptr ||
        nu == nullptr || bad == nullptr)
        throw std::invalid_argument("graph_runs: null pointer");
    const int64_t tiles = (p + kGraphThreads - 1) / kGraphThreads;
    if (2 * groups * tiles > INT_MAX) throw std::invalid_argument("graph_runs: too many entries");
    graph_runs_kernel<<<static_cast<unsigned>(2 * groups * tiles), kGraphThreads, 0, stream>>>(
        key, perm, a, m, reinterpret_cast<long long*>(du), nu, bad, uent, static_cast<int>(p),
        static_cast<int>(t_len), k, static_cast<int>(groups), static_cast<int>(tiles), fix_scale);
    check_cuda(cudaGetLastError(), "graph runs launch");
}

void graph_gw(const int64_t* sorted, const int64_t* order, const int* nu, const int* bad,
              double* cost, float* gu, int64_t groups, int64_t p, double unfix,
              cudaStream_t stream) {
    if (groups < 0 || groups > INT_MAX || p < 1 || p > INT_MAX)
        throw std::invalid_argument("graph_gw: bad sizes");
    if (groups == 0) return;
    if (sorted == nullptr || order == nullptr || nu == nullptr || bad == nullptr || cost == nullptr)
        throw std::invalid_argument("graph_gw: null pointer");
    graph_gw_kernel<<<static_cast<unsigned>(groups), kGraphThreads, 0, stream>>>(
        reinterpret_cast<const long long*>(sorted), order, nu, bad, cost, gu, static_cast<int>(p),
        static_cast<int>(groups), unfix);
    check_cuda(cudaGetLastError(), "graph gw launch");
}

void graph_finish(const double* cost, const int* nu, float* loss, float* inv, int64_t groups,
                  cudaStream_t stream) {
    if (groups < 0 || groups > INT_MAX) throw std::invalid_argument("graph_finish: bad sizes");
    if (cost == nullptr || nu == nullptr || loss == nullptr || inv == nullptr)
        throw std::invalid_argument("graph_finish: null pointer");
    graph_finish_kernel<<<1, kGraphThreads, 0, stream>>>(cost, nu, loss, inv,
                                                         static_cast<int>(groups));
    check_cuda(cudaGetLastError(), "graph finish launch");
}

void graph_rows_bwd(const void* z, int64_t stride_z, const bool* valid, const float* a,
                    const int* idx, const float* m, const float* lse, const float* abar,
                    const int* uent, const float* gu, const float* scale, const float* inv,
                    void* grad, int64_t stride_g, int64_t n_rows, int64_t v, int k, int64_t t_len,
                    float inv_temp, int dtype, cudaStream_t stream) {
    check_rows("graph_rows_bwd", n_rows, v, k);
    if (t_len < 1 || t_len * k > INT_MAX) throw std::invalid_argument("graph_rows_bwd: bad t_len");
    if (n_rows == 0) return;
    if (z == nullptr || a == nullptr || idx == nullptr || m == nullptr || lse == nullptr ||
        grad == nullptr || (abar == nullptr && (uent == nullptr || gu == nullptr)) ||
        (scale != nullptr && inv == nullptr))
        throw std::invalid_argument("graph_rows_bwd: null pointer");
    with_dtype("graph_rows_bwd", dtype, [&](auto tag) {
        using T = decltype(tag);
        for (int64_t r0 = 0; r0 < n_rows; r0 += kRowsPerLaunch) {
            const int64_t rows = n_rows - r0 < kRowsPerLaunch ? n_rows - r0 : kRowsPerLaunch;
            graph_rows_bwd_kernel<T><<<static_cast<unsigned>(rows), kGraphThreads, 0, stream>>>(
                static_cast<const T*>(z), stride_z, valid, a, idx, m, lse, abar, uent, gu, scale,
                inv, static_cast<T*>(grad), stride_g, static_cast<int>(v), k,
                static_cast<int>(t_len), static_cast<int>(t_len * k), inv_temp, r0);
            check_cuda(cudaGetLastError(), "graph rows backward launch");
        }
    });
}

}  // namespace kdk
