// The one Python module of the CUDA backend: kdkernels_cuda.
//
// Python validates tensors and passes raw device pointers, sizes, strides (elements) and
// the stream as integers, so this module needs only pybind11 and the CUDA runtime
// (linked statically): not torch's C++ ABI. Importing it touches no GPU; every launch
// first checks that a CUDA device is usable and raises RuntimeError with the reason.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kdkernels/api.h"

namespace py = pybind11;

#define KDK_STR2(x) #x
#define KDK_STR(x) KDK_STR2(x)
#ifndef KDK_BUILD_ARCHS
#define KDK_BUILD_ARCHS unknown
#endif
#ifndef KDK_SOURCE_HASH
#define KDK_SOURCE_HASH unknown
#endif

namespace {

#ifndef KDK_VERSION
#define KDK_VERSION unknown
#endif
constexpr const char* kVersion = KDK_STR(KDK_VERSION);

// None when a CUDA device can run kernels, else why not.
std::string device_problem() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        (void)cudaGetLastError();
        std::string why = std::string("no usable CUDA device (cudaGetDeviceCount: ") +
                          cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")";
        if (err == cudaErrorInsufficientDriver) {
            why += "; the NVIDIA driver is missing or older than this build's CUDA runtime " +
                   std::to_string(CUDART_VERSION / 1000) + "." +
                   std::to_string(CUDART_VERSION % 1000 / 10);
        }
        return why;
    }
    if (count == 0) return "no CUDA device is visible (cudaGetDeviceCount returned 0)";
    return "";
}

// Make `device` current for the launch and restore the previous device afterwards.
class DeviceScope {
  public:
    explicit DeviceScope(int device) {
        const std::string problem = device_problem();
        if (!problem.empty()) {
            throw std::runtime_error(
                "kdkernels_cuda: cannot run a CUDA kernel: " + problem +
                ". The cuda backend needs an NVIDIA GPU and driver; use backend='torch' "
                "(or 'triton' on a GPU), or backend='auto' to choose automatically");
        }
        int count = 0;
        (void)cudaGetDeviceCount(&count);
        if (device < 0 || device >= count) {
            throw std::invalid_argument("kdkernels_cuda: device index " + std::to_string(device) +
                                        " out of range (" + std::to_string(count) + " devices)");
        }
        cudaError_t err = cudaGetDevice(&prev_);
        if (err == cudaSuccess && prev_ != device) err = cudaSetDevice(device);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            throw std::runtime_error(std::string("kdkernels_cuda: cannot select device: ") +
                                     cudaGetErrorString(err));
        }
        restore_ = prev_ != device;
    }
    ~DeviceScope() {
        if (restore_) (void)cudaSetDevice(prev_);
    }
    DeviceScope(const DeviceScope&) = delete;
    DeviceScope& operator=(const DeviceScope&) = delete;

  private:
    int prev_ = 0;
    bool restore_ = false;
};

template <typename P> P ptr(std::uintptr_t p) { return reinterpret_cast<P>(p); }

cudaStream_t stream_of(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

py::dict plan_dict(const kdk::KdPlan& plan) {
    py::dict d;
    d["path"] = plan.path == kdk::kSmem ? "smem" : "stream";
    d["cluster"] = plan.cluster;
    d["threads"] = plan.threads;
    d["cols_per_cta"] = plan.cols_per_cta;
    d["smem_bytes"] = plan.smem_bytes;
    return d;
}

}  // namespace

PYBIND11_MODULE(kdkernels_cuda, m) {
    m.doc() = "kdkernels CUDA kernels (raw pointers; see kdkernels/_ext.py and docs/cuda.md)";

    m.def("version", []() { return std::string(kVersion); });
    m.def("build_info", []() {
        py::dict d;
        d["version"] = kVersion;
        d["archs"] = std::string(KDK_STR(KDK_BUILD_ARCHS));
        d["source_hash"] = std::string(KDK_STR(KDK_SOURCE_HASH));
        d["cudart_version"] = CUDART_VERSION;
        d["max_topk"] = kdk::kTopkMaxK;
        return d;
    });
    m.def("device_available", []() { return device_problem().empty(); },
          "True when the CUDA runtime sees at least one usable device.");
    m.def(
        "device_unavailable_reason",
        []() -> py::object {
            const std::string p = device_problem();
            if (p.empty()) return py::none();
            return py::str(p);
        },
        "None when a CUDA device is usable, else the reason.");

    m.def(
        "kd_fwd_plan",
        [](int64_t v, int dtype, int div, int device, int force_path, int force_cluster) {
            DeviceScope scope(device);
            return plan_dict(kdk::kd_fwd_plan(v, dtype, div, device, force_path, force_cluster));
        },
        py::arg("v"), py::arg("dtype"), py::arg("div"), py::arg("device"),
        py::arg("force_path") = -1, py::arg("force_cluster") = 0,
        "How rows of v columns would be processed: dict(path, cluster, threads, cols_per_cta, "
        "smem_bytes).");

    m.def(
        "kd_fwd",
        [](std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, bool labels_i64,
           int64_t stride_l, std::uintptr_t scale, std::uintptr_t loss, std::uintptr_t grad,
           int64_t n_rows, int64_t v, int64_t v_g, int64_t stride_s, int64_t stride_t,
           int64_t stride_g, int dtype, int div, float inv_temp, float w, float log_w,
           float log_1mw, float soft_w, float hard_w, int64_t ignore_index, bool compute_grad,
           int device, std::uintptr_t stream, int force_path, int force_cluster) {
            DeviceScope scope(device);
            kdk::KdFwdArgs a{};
            a.s = ptr<const void*>(s);
            a.t = ptr<const void*>(t);
            a.labels = ptr<const void*>(labels);
            a.scale = ptr<const float*>(scale);
            a.loss = ptr<float*>(loss);
            a.grad = ptr<void*>(grad);
            a.n_rows = n_rows;
            a.v = v;
            a.v_g = v_g;
            a.stride_s = stride_s;
            a.stride_t = stride_t;
            a.stride_g = stride_g;
            a.stride_l = stride_l;
            a.ignore_index = ignore_index;
            a.inv_temp = inv_temp;
            a.w = w;
            a.log_w = log_w;
            a.log_1mw = log_1mw;
            a.soft_w = soft_w;
            a.hard_w = hard_w;
            a.dtype = dtype;
            a.div = div;
            a.has_labels = labels != 0;
            a.labels_i64 = labels_i64;
            a.hard = hard_w != 0.0f;
            a.tempered = inv_temp != 1.0f;
            a.compute_grad = compute_grad;
            const kdk::KdPlan plan =
                kdk::kd_fwd_plan(v, dtype, div, device, force_path, force_cluster);
            kdk::kd_fwd(a, plan, stream_of(stream));
            return plan_dict(plan);
        },
        py::arg("s"), py::arg("t"), py::arg("labels"), py::arg("labels_i64"), py::arg("stride_l"),
        py::arg("scale"), py::arg("loss"), py::arg("grad"), py::arg("n_rows"), py::arg("v"),
        py::arg("v_g"), py::arg("stride_s"), py::arg("stride_t"), py::arg("stride_g"),
        py::arg("dtype"), py::arg("div"), py::arg("inv_temp"), py::arg("w"), py::arg("log_w"),
        py::arg("log_1mw"), py::arg("soft_w"), py::arg("hard_w"), py::arg("ignore_index"),
        py::arg("compute_grad"), py::arg("device"), py::arg("stream"),
        py::arg("force_path") = -1, py::arg("force_cluster") = 0,
        "kd_loss rows: loss[n] and (compute_grad) grad[n, :v_g]; returns the plan used.");

    m.def(
        "scale_rows",
        [](std::uintptr_t grad, std::uintptr_t scale, bool per_row, int64_t n_rows, int64_t v,
           int64_t stride_g, int dtype, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::scale_rows(ptr<void*>(grad), ptr<const float*>(scale), per_row, n_rows, v,
                            stride_g, dtype, stream_of(stream));
        },
        py::arg("grad"), py::arg("scale"), py::arg("per_row"), py::arg("n_rows"), py::arg("v"),
        py::arg("stride_g"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "grad[n, :v] *= scale (per row or one value), rows with factor 1 untouched.");

    m.def(
        "softcap_fwd",
        [](std::uintptr_t u, std::uintptr_t out, int64_t n_rows, int64_t v, int64_t stride_u,
           int64_t stride_o, float cap, int dtype, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::softcap_fwd(ptr<const void*>(u), ptr<void*>(out), n_rows, v, stride_u, stride_o,
                             cap, dtype, stream_of(stream));
        },
        py::arg("u"), py::arg("out"), py::arg("n_rows"), py::arg("v"), py::arg("stride_u"),
        py::arg("stride_o"), py::arg("cap"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), "out[n, :v] = cap * tanh(u[n, :v]).");

    m.def(
        "softcap_bwd",
        [](std::uintptr_t g, std::uintptr_t u, std::uintptr_t row_scale, int64_t n_rows,
           int64_t v, int64_t stride_g, int64_t stride_u, float k, int dtype, int device,
           std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::softcap_bwd(ptr<void*>(g), ptr<const void*>(u), ptr<const float*>(row_scale),
                             n_rows, v, stride_g, stride_u, k, dtype, stream_of(stream));
        },
        py::arg("g"), py::arg("u"), py::arg("row_scale"), py::arg("n_rows"), py::arg("v"),
        py::arg("stride_g"), py::arg("stride_u"), py::arg("k"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"),
        "g[n, :v] *= k * sech^2(u) (u != 0) * row_scale[n] (row_scale != 0), in place.");

    m.def(
        "topk",
        [](std::uintptr_t x, int64_t stride_x, int64_t n_rows, int64_t v, int k, int dtype,
           std::uintptr_t values, std::uintptr_t indices, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::topk_select(ptr<const void*>(x), stride_x, n_rows, v, k, dtype, ptr<void*>(values),
                             ptr<int64_t*>(indices), stream_of(stream));
        },
        py::arg("x"), py::arg("stride_x"), py::arg("n_rows"), py::arg("v"), py::arg("k"),
        py::arg("dtype"), py::arg("values"), py::arg("indices"), py::arg("device"),
        py::arg("stream"),
        "Per row: the k largest of x[n, :v], sorted descending, ties by lower index.");
}
