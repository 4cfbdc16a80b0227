// Launchers of the kd_loss kernels: argument checks, the path plan, dtype and divergence
// dispatch, and the launch on the caller's stream.
#include <array>
#include <climits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"
#include "kdkernels/kd.cuh"
#include "kdkernels/kd_target.cuh"
#include "launch_utils.h"

namespace kdk {
namespace {

// Shared memory a block aims to stay under on the smem path, so that kKdMinBlocks blocks
// fit on an SM (228 KiB on sm_90): while one block computes, the others load.
constexpr size_t kSmemTarget = 64 * 1024;
constexpr int kMaxCluster = 8;  // the portable cluster size limit

int elem_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

int pick_threads(int64_t v) { return v >= 4096 ? kKdThreads : 128; }

// Calls f(kernel pointer) for the (div, dtype) instance.
template <typename F> void with_kernel(int div, int dtype, F&& f) {
    auto by_type = [&](auto tag) {
        using T = decltype(tag);
        switch (div) {
            case kZero: f(&kd_fwd_kernel<kZero, T>); return;
            case kFwdKL: f(&kd_fwd_kernel<kFwdKL, T>); return;
            case kRevKL: f(&kd_fwd_kernel<kRevKL, T>); return;
            case kJsd: f(&kd_fwd_kernel<kJsd, T>); return;
            case kSkewFwd: f(&kd_fwd_kernel<kSkewFwd, T>); return;
            case kSkewRev: f(&kd_fwd_kernel<kSkewRev, T>); return;
            case kTvd: f(&kd_fwd_kernel<kTvd, T>); return;
            case kTaid: f(&kd_fwd_kernel<kTaid, T>); return;
            case kDkd: f(&kd_fwd_kernel_decoupled<kDkd, T>); return;
            case kNkd: f(&kd_fwd_kernel_decoupled<kNkd, T>); return;
            case kCosine: f(&kd_fwd_kernel_cosine<kCosine, T>); return;
            default: throw std::invalid_argument("kd_fwd: unknown divergence code " + std::to_string(div));
        }
    };
    switch (dtype) {
        case kFloat32: by_type(float{}); return;
        case kFloat16: by_type(__half{}); return;
        case kBFloat16: by_type(__nv_bfloat16{}); return;
        default: throw std::invalid_argument("kd_fwd: unsupported dtype code " + std::to_string(dtype));
    }
}

using RawKernel = void (*)(KdFwdArgs, int64_t, int, int, int);

// Can `csize` blocks with `smem` bytes each be co-scheduled as a cluster?
bool cluster_fits(RawKernel kernel, int csize, int threads, size_t smem) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(csize), 1, 1);
    cfg.blockDim = dim3(static_cast<unsigned>(threads), 1, 1);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return clusters > 0;
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

KdPlan make_plan(int64_t v, int dtype, int div, int device, int force_path, int force_cluster) {
    if (v < 1 || v > INT_MAX - 64) throw std::invalid_argument("kd_fwd: v must be in [1, 2^31 - 64)");
    if (force_path < kAuto || force_path > kSmem)
        throw std::invalid_argument("kd_fwd: force_path must be -1 (auto), 0 (stream) or 1 (smem)");
    if (force_cluster != 0 && force_cluster != 1 && force_cluster != 2 && force_cluster != 4 &&
        force_cluster != 8)
        throw std::invalid_argument("kd_fwd: force_cluster must be 0 (choose), 1, 2, 4 or 8");
    const DeviceInfo& dev = device_info(device);
    KdPlan plan{kStream, 1, pick_threads(v), v, 0};
    if (force_path == kStream) return plan;

    RawKernel kernel = nullptr;
    with_kernel(div, dtype, [&](auto k) { kernel = k; });
    cudaFuncAttributes fa;
    check_cuda(cudaFuncGetAttributes(&fa, kernel), "cudaFuncGetAttributes(kd_fwd_kernel)");
    const size_t max_dyn =
        dev.smem_optin > fa.sharedSizeBytes ? dev.smem_optin - fa.sharedSizeBytes : 0;
    // Cluster code is compiled only for sm_90+ (ptxVersion is the compute capability the
    // loaded code was compiled for), and clusters need an sm_90+ device.
    const bool clusters = dev.major >= 9 && fa.ptxVersion >= 90;
    const int per_col = elem_size(dtype) * (div == kZero ? 1 : 2);
    const int threads = kKdThreads;

    auto try_cluster = [&](int c, KdPlan* out) {
        if (c > 1 && !clusters) return false;
        const int64_t cpc = round_up((v + c - 1) / c, 8);
        const size_t bytes = static_cast<size_t>(cpc) * static_cast<size_t>(per_col);
        if (bytes > max_dyn) return false;
        check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)),
                   "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
        if (c > 1 && !cluster_fits(kernel, c, threads, bytes)) return false;
        *out = KdPlan{kSmem, c, threads, cpc, bytes};
        return true;
    };

    KdPlan smem_plan;
    if (force_cluster != 0) {
        if (!try_cluster(force_cluster, &smem_plan)) {
            if (force_path == kSmem) {
                throw std::invalid_argument(
                    "kd_fwd: the requested shared-memory plan (cluster " +
                    std::to_string(force_cluster) + ") does not fit this device for v=" +
                    std::to_string(v) + (clusters ? "" : " (no cluster support: needs sm_90 code and device)"));
            }
            return plan;
        }
        return smem_plan;
    }
    // Smallest cluster whose blocks stay under kSmemTarget; else the smallest that fits.
    for (int c = 1; c <= kMaxCluster; c *= 2) {
        const int64_t cpc = round_up((v + c - 1) / c, 8);
        if (static_cast<size_t>(cpc) * per_col <= kSmemTarget && try_cluster(c, &smem_plan))
            return smem_plan;
    }
    // Otherwise the largest cluster that fits (the smallest slice per block).
    for (int c = kMaxCluster; c >= 1; c /= 2) {
        if (try_cluster(c, &smem_plan)) return smem_plan;
    }
    if (force_path == kSmem) {
        throw std::invalid_argument("kd_fwd: a row of v=" + std::to_string(v) +
                                    " does not fit in shared memory on this device");
    }
    return plan;
}

}  // namespace

// Plans depend only on their arguments: computed once (attribute and occupancy queries
// cost microseconds) and reused.
KdPlan kd_fwd_plan(int64_t v, int dtype, int div, int device, int force_path, int force_cluster) {
    using Key = std::array<int64_t, 6>;
    static std::mutex mu;
    static std::map<Key, KdPlan> cache;
    const Key key{v, dtype, div, device, force_path, force_cluster};
    {
        std::lock_guard<std::mutex> lock(mu);
        const auto it = cache.find(key);
        if (it != cache.end()) return it->second;
    }
    const KdPlan plan = make_plan(v, dtype, div, device, force_path, force_cluster);
    std::lock_guard<std::mutex> lock(mu);
    if (cache.size() > 4096) cache.clear();  // bounded: shapes seen by one process are few
    cache.emplace(key, plan);
    return plan;
}

void kd_fwd(const KdFwdArgs& p, const KdPlan& plan, cudaStream_t stream) {
    if (p.n_rows < 0) throw std::invalid_argument("kd_fwd: n_rows must be >= 0");
    if (p.parts_stride != 0 && p.parts_stride < p.n_rows)
        throw std::invalid_argument("kd_fwd: parts_stride must be 0 or >= n_rows");
    if (p.v < 1 || p.v > INT_MAX - 64) throw std::invalid_argument("kd_fwd: v must be in [1, 2^31 - 64)");
    if (p.compute_grad && (p.v_g < p.v || p.grad == nullptr))
        throw std::invalid_argument("kd_fwd: grad needs v_g >= v columns");
    if (p.hard && !p.has_labels) throw std::invalid_argument("kd_fwd: hard_w != 0 needs labels");
    if ((p.div == kDkd || p.div == kNkd) && !p.has_labels)
        throw std::invalid_argument("kd_fwd: dkd and nkd need labels");
    if (p.s == nullptr || p.loss == nullptr || (p.div != kZero && p.t == nullptr) ||
        (p.compute_grad && p.scale == nullptr))
        throw std::invalid_argument("kd_fwd: null pointer");
    if (plan.threads % kWarp != 0 || plan.threads < kWarp || plan.threads > kKdThreads)
        throw std::invalid_argument("kd_fwd: plan.threads must be a multiple of 32 in [32, 256]");
    const bool smem = plan.path == kSmem;
    const int csize = smem ? plan.cluster : 1;
    const int64_t cpc = smem ? plan.cols_per_cta : p.v;
    if (smem && (cpc % 8 != 0 || cpc * csize < p.v))
        throw std::invalid_argument("kd_fwd: inconsistent shared-memory plan");
    if (p.n_rows == 0) return;

    with_kernel(p.div, p.dtype, [&](auto kernel) {
        if (smem) {
            check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(plan.smem_bytes)),
                       "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
        }
        // Rows per launch so that the grid's x dimension stays below 2^31.
        const int64_t rows_per_launch = (int64_t{1} << 30) / csize;
        for (int64_t r0 = 0; r0 < p.n_rows; r0 += rows_per_launch) {
            const int64_t rows = p.n_rows - r0 < rows_per_launch ? p.n_rows - r0 : rows_per_launch;
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3(static_cast<unsigned>(rows * csize), 1, 1);
            cfg.blockDim = dim3(static_cast<unsigned>(plan.threads), 1, 1);
            cfg.dynamicSmemBytes = smem ? plan.smem_bytes : 0;
            cfg.stream = stream;
            cudaLaunchAttribute attr[1];
            if (csize > 1) {
                attr[0].id = cudaLaunchAttributeClusterDimension;
                attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
                attr[0].val.clusterDim.y = 1;
                attr[0].val.clusterDim.z = 1;
                cfg.attrs = attr;
                cfg.numAttrs = 1;
            }
            check_cuda(cudaLaunchKernelEx(&cfg, kernel, p, r0, csize, static_cast<int>(cpc),
                                          smem ? 1 : 0),
                       "kd_fwd kernel launch");
        }
    });
}

namespace {

template <typename T>
void launch_scale_rows(void* grad, const float* scale, bool per_row, int64_t n_rows, int64_t v,
                       int64_t stride_g, cudaStream_t stream) {
    constexpr int threads = 256;
    const int64_t vecs = (v + Vec<T>::N - 1) / Vec<T>::N;
    const int64_t col_blocks = (vecs + threads - 1) / threads;
    const unsigned grid_y = static_cast<unsigned>(col_blocks < 1024 ? col_blocks : 1024);
    constexpr int64_t kRowsPerLaunch = int64_t{1} << 30;
    for (int64_t r0 = 0; r0 < n_rows; r0 += kRowsPerLaunch) {
        const int64_t rows = n_rows - r0 < kRowsPerLaunch ? n_rows - r0 : kRowsPerLaunch;
        scale_rows_kernel<T><<<dim3(static_cast<unsigned>(rows), grid_y, 1), threads, 0, stream>>>(
            static_cast<T*>(grad), scale, per_row ? 1 : 0, r0, stride_g, static_cast<int>(v));
        check_cuda(cudaGetLastError(), "scale_rows kernel launch");
    }
}

}  // namespace

void scale_rows(void* grad, const float* scale, bool per_row, int64_t n_rows, int64_t v,
                int64_t stride_g, int dtype, cudaStream_t stream) {
    if (n_rows < 0 || v < 0 || v > INT_MAX - 64)
        throw std::invalid_argument("scale_rows: bad shape");
    if (n_rows == 0 || v == 0) return;
    if (grad == nullptr || scale == nullptr) throw std::invalid_argument("scale_rows: null pointer");
    switch (dtype) {
        case kFloat32:
            return launch_scale_rows<float>(grad, scale, per_row, n_rows, v, stride_g, stream);
        case kFloat16:
            return launch_scale_rows<__half>(grad, scale, per_row, n_rows, v, stride_g, stream);
        case kBFloat16:
            return launch_scale_rows<__nv_bfloat16>(grad, scale, per_row, n_rows, v, stride_g,
                                                    stream);
        default:
            throw std::invalid_argument("scale_rows: unsupported dtype code " +
                                        std::to_string(dtype));
    }
}

}  // namespace kdk
