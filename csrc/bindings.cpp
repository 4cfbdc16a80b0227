// The one Python module of the CUDA backend: kdkernels_cuda.
//
// Python validates tensors and passes raw device pointers, sizes, strides (elements) and
// the stream as integers, so this module needs only pybind11 and the CUDA runtime
// (linked statically): not torch's C++ ABI. Importing it touches no GPU; every launch
// first checks that a CUDA device is usable and raises RuntimeError with the reason.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <limits>
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

py::dict topk_kd_plan_dict(const kdk::TopkKdPlan& plan) {
    py::dict d;
    d["path"] = plan.path == kdk::kSmem ? "smem" : "stream";
    d["threads"] = plan.threads;
    d["bitmap_words"] = plan.bitmap_words;
    d["entries"] = plan.entries;
    d["smem_bytes"] = plan.smem_bytes;
    return d;
}

kdk::SinkhornArgs sinkhorn_args(std::uintptr_t cost, std::uintptr_t log_a, std::uintptr_t log_b,
                                std::uintptr_t rh, std::uintptr_t lh, int64_t m, int64_t b1,
                                int64_t b2, int64_t n_iters, int64_t n_slots, double epsilon,
                                std::uintptr_t iters, bool is_double, bool fused) {
    kdk::SinkhornArgs a{};
    a.cost = ptr<const void*>(cost);
    a.log_a = ptr<const void*>(log_a);
    a.log_b = ptr<const void*>(log_b);
    a.rh = ptr<void*>(rh);
    a.lh = ptr<void*>(lh);
    a.iters = ptr<int*>(iters);
    a.m = m;
    a.b1 = b1;
    a.b2 = b2;
    a.n_iters = n_iters;
    a.n_slots = n_slots;
    a.epsilon = epsilon;
    a.is_double = is_double;
    a.fused = fused;
    return a;
}

// The vocabulary-parallel kd_loss phases share one argument list (each reads its part).
template <void (*Launch)(const kdk::KdVpArgs&, cudaStream_t)>
void kd_vp_call(std::uintptr_t s, std::uintptr_t t, std::uintptr_t labels, bool labels_i64,
                int64_t stride_l, std::uintptr_t stats, std::uintptr_t piv, std::uintptr_t norm,
                std::uintptr_t flags, std::uintptr_t part, std::uintptr_t scale,
                std::uintptr_t grad, int64_t n_rows, int64_t width, int64_t start,
                int64_t stride_s, int64_t stride_t, int64_t stride_g, int dtype, bool is_double,
                int div, double inv_temp, double w, double log_w, double log_1mw, double soft_w,
                double hard_w, int64_t ignore_index, bool use_x, int device,
                std::uintptr_t stream, double inv_temp_t) {
    DeviceScope scope(device);
    kdk::KdVpArgs a{};
    a.s = ptr<const void*>(s);
    a.t = ptr<const void*>(t);
    a.labels = ptr<const void*>(labels);
    a.stats = ptr<void*>(stats);
    a.piv = ptr<int*>(piv);
    a.norm = ptr<const void*>(norm);
    a.flags = ptr<const int*>(flags);
    a.part = ptr<void*>(part);
    a.scale = ptr<const void*>(scale);
    a.grad = ptr<void*>(grad);
    a.n_rows = n_rows;
    a.width = width;
    a.start = start;
    a.stride_s = stride_s;
    a.stride_t = stride_t;
    a.stride_g = stride_g;
    a.stride_l = stride_l;
    a.ignore_index = ignore_index;
    a.inv_temp = inv_temp;
    a.inv_temp_t = std::isnan(inv_temp_t) ? inv_temp : inv_temp_t;  // NaN: the student's
    a.w = w;
    a.log_w = log_w;
    a.log_1mw = log_1mw;
    a.soft_w = soft_w;
    a.hard_w = hard_w;
    a.dtype = dtype;
    a.div = div;
    a.is_double = is_double;
    a.has_labels = labels != 0;
    a.labels_i64 = labels_i64;
    a.hard = hard_w != 0.0;
    a.use_x = use_x;
    Launch(a, stream_of(stream));
}

template <void (*Launch)(const kdk::KdVpArgs&, cudaStream_t)>
void def_kd_vp(py::module_& m, const char* name, const char* doc) {
    m.def(name, &kd_vp_call<Launch>, py::arg("s"), py::arg("t"), py::arg("labels"),
          py::arg("labels_i64"), py::arg("stride_l"), py::arg("stats"), py::arg("piv"),
          py::arg("norm"), py::arg("flags"), py::arg("part"), py::arg("scale"), py::arg("grad"),
          py::arg("n_rows"), py::arg("width"), py::arg("start"), py::arg("stride_s"),
          py::arg("stride_t"), py::arg("stride_g"), py::arg("dtype"), py::arg("is_double"),
          py::arg("div"), py::arg("inv_temp"), py::arg("w"), py::arg("log_w"),
          py::arg("log_1mw"), py::arg("soft_w"), py::arg("hard_w"), py::arg("ignore_index"),
          py::arg("use_x"), py::arg("device"), py::arg("stream"),
          py::arg("inv_temp_t") = std::numeric_limits<double>::quiet_NaN(), doc);
}

// The vocabulary-parallel topk_kd_loss kernels share one argument list too.
template <void (*Launch)(const kdk::TopkVpArgs&, cudaStream_t)>
void topk_vp_call(std::uintptr_t s, std::uintptr_t idx, std::uintptr_t labels, bool labels_i64,
                  int64_t stride_l, std::uintptr_t sel, std::uintptr_t tstat, std::uintptr_t r,
                  std::uintptr_t tail, std::uintptr_t mode, std::uintptr_t grad, int64_t n_rows,
                  int64_t width, int64_t k, int64_t start, int64_t stride_s, int64_t stride_i,
                  int64_t stride_o, int64_t stride_r, int64_t stride_g, int dtype,
                  bool is_double, double inv_temp, bool bucket, int64_t ignore_index,
                  int device, std::uintptr_t stream) {
    DeviceScope scope(device);
    kdk::TopkVpArgs a{};
    a.s = ptr<const void*>(s);
    a.idx = ptr<const int64_t*>(idx);
    a.labels = ptr<const void*>(labels);
    a.sel = ptr<double*>(sel);
    a.tstat = ptr<void*>(tstat);
    a.r = ptr<const void*>(r);
    a.tail = ptr<const void*>(tail);
    a.mode = ptr<const int*>(mode);
    a.grad = ptr<void*>(grad);
    a.n_rows = n_rows;
    a.width = width;
    a.k = k;
    a.start = start;
    a.stride_s = stride_s;
    a.stride_i = stride_i;
    a.stride_o = stride_o;
    a.stride_r = stride_r;
    a.stride_g = stride_g;
    a.stride_l = stride_l;
    a.ignore_index = ignore_index;
    a.inv_temp = inv_temp;
    a.dtype = dtype;
    a.is_double = is_double;
    a.has_labels = labels != 0;
    a.labels_i64 = labels_i64;
    a.bucket = bucket;
    Launch(a, stream_of(stream));
}

template <void (*Launch)(const kdk::TopkVpArgs&, cudaStream_t)>
void def_topk_vp(py::module_& m, const char* name, const char* doc) {
    m.def(name, &topk_vp_call<Launch>, py::arg("s"), py::arg("idx"), py::arg("labels"),
          py::arg("labels_i64"), py::arg("stride_l"), py::arg("sel"), py::arg("tstat"),
          py::arg("r"), py::arg("tail"), py::arg("mode"), py::arg("grad"), py::arg("n_rows"),
          py::arg("width"), py::arg("k"), py::arg("start"), py::arg("stride_s"),
          py::arg("stride_i"), py::arg("stride_o"), py::arg("stride_r"), py::arg("stride_g"),
          py::arg("dtype"), py::arg("is_double"), py::arg("inv_temp"), py::arg("bucket"),
          py::arg("ignore_index"), py::arg("device"), py::arg("stream"), doc);
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
        d["pld_smem_k"] = kdk::kPldSmemK;
        d["sinkhorn_segment"] = kdk::kSinkhornSegment;
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
           int device, std::uintptr_t stream, int force_path, int force_cluster,
           float inv_temp_t, int64_t parts_stride) {
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
            a.inv_temp_t = std::isnan(inv_temp_t) ? inv_temp : inv_temp_t;  // NaN: the same
            a.parts_stride = parts_stride;
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
        py::arg("inv_temp_t") = std::numeric_limits<float>::quiet_NaN(),
        py::arg("parts_stride") = 0,
        "kd_loss rows: loss[n], (compute_grad) grad[n, :v_g] and (parts_stride > 0) the "
        "addends loss[n + parts_stride], loss[n + 2 parts_stride]; inv_temp_t: the teacher's "
        "1/τ (NaN: inv_temp); returns the plan used.");

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

    m.def(
        "pld_fwd",
        [](std::uintptr_t s, std::uintptr_t t, std::uintptr_t rank, int64_t stride_r,
           std::uintptr_t thr, std::uintptr_t labels, bool labels_i64, int64_t stride_l,
           std::uintptr_t scale, std::uintptr_t loss, std::uintptr_t grad, std::uintptr_t scratch,
           int64_t stride_x, int64_t n_rows, int64_t v, int64_t k, int64_t stride_s,
           int64_t stride_t, int64_t stride_g, int dtype, float inv_temp, int64_t ignore_index,
           bool compute_grad, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::PldFwdArgs a{};
            a.s = ptr<const void*>(s);
            a.t = ptr<const void*>(t);
            a.rank = ptr<const int64_t*>(rank);
            a.thr = ptr<const int64_t*>(thr);
            a.labels = ptr<const void*>(labels);
            a.scale = ptr<const float*>(scale);
            a.loss = ptr<float*>(loss);
            a.grad = ptr<void*>(grad);
            a.scratch = ptr<float*>(scratch);
            a.n_rows = n_rows;
            a.v = v;
            a.k = k;
            a.stride_s = stride_s;
            a.stride_t = stride_t;
            a.stride_g = stride_g;
            a.stride_r = stride_r;
            a.stride_l = stride_l;
            a.stride_x = stride_x;
            a.ignore_index = ignore_index;
            a.inv_temp = inv_temp;
            a.dtype = dtype;
            a.has_labels = labels != 0;
            a.labels_i64 = labels_i64;
            a.compute_grad = compute_grad;
            kdk::pld_fwd(a, device, stream_of(stream));
        },
        py::arg("s"), py::arg("t"), py::arg("rank"), py::arg("stride_r"), py::arg("thr"),
        py::arg("labels"), py::arg("labels_i64"), py::arg("stride_l"), py::arg("scale"),
        py::arg("loss"), py::arg("grad"), py::arg("scratch"), py::arg("stride_x"),
        py::arg("n_rows"), py::arg("v"), py::arg("k"), py::arg("stride_s"), py::arg("stride_t"),
        py::arg("stride_g"), py::arg("dtype"), py::arg("inv_temp"), py::arg("ignore_index"),
        py::arg("compute_grad"), py::arg("device"), py::arg("stream"),
        "plackett_luce_loss rows given their ranking: loss[n] and (compute_grad) grad[n, :v].");

    m.def(
        "topk_kd_plan",
        [](int64_t v, int64_t k, int dtype, bool bucket, int device, int force_path) {
            DeviceScope scope(device);
            return topk_kd_plan_dict(kdk::topk_kd_plan(v, k, dtype, bucket, device, force_path));
        },
        py::arg("v"), py::arg("k"), py::arg("dtype"), py::arg("bucket"), py::arg("device"),
        py::arg("force_path") = -1,
        "How topk_kd rows would be processed: dict(path, threads, bitmap_words, entries, "
        "smem_bytes).");

    m.def(
        "topk_kd_fwd",
        [](std::uintptr_t s, int64_t stride_s, std::uintptr_t idx, int64_t stride_i,
           std::uintptr_t vals, int64_t stride_u, std::uintptr_t labels, bool labels_i64,
           int64_t stride_l, std::uintptr_t scale, std::uintptr_t loss, std::uintptr_t grad,
           int64_t stride_g, int64_t n_rows, int64_t v, int64_t k, int dtype, int div, float beta,
           float inv_temp, bool logprobs, bool bucket, int64_t ignore_index, bool compute_grad,
           int device, std::uintptr_t stream, int force_path) {
            DeviceScope scope(device);
            kdk::TopkKdArgs a{};
            a.s = ptr<const void*>(s);
            a.idx = ptr<const int64_t*>(idx);
            a.vals = ptr<const float*>(vals);
            a.labels = ptr<const void*>(labels);
            a.scale = ptr<const float*>(scale);
            a.loss = ptr<float*>(loss);
            a.grad = ptr<void*>(grad);
            a.n_rows = n_rows;
            a.v = v;
            a.k = k;
            a.stride_s = stride_s;
            a.stride_i = stride_i;
            a.stride_u = stride_u;
            a.stride_g = stride_g;
            a.stride_l = stride_l;
            a.ignore_index = ignore_index;
            a.inv_temp = inv_temp;
            a.beta = beta;
            const bool jsd = div == kdk::kJsd;
            a.log_beta = jsd ? static_cast<float>(std::log(static_cast<double>(beta))) : 0.0f;
            a.log_1mbeta = jsd ? static_cast<float>(std::log1p(-static_cast<double>(beta))) : 0.0f;
            a.dtype = dtype;
            a.div = div;
            a.has_labels = labels != 0;
            a.labels_i64 = labels_i64;
            a.logprobs = logprobs;
            a.bucket = bucket;
            a.compute_grad = compute_grad;
            const kdk::TopkKdPlan plan = kdk::topk_kd_plan(v, k, dtype, bucket, device, force_path);
            kdk::topk_kd_fwd(a, plan, stream_of(stream));
            return topk_kd_plan_dict(plan);
        },
        py::arg("s"), py::arg("stride_s"), py::arg("idx"), py::arg("stride_i"), py::arg("vals"),
        py::arg("stride_u"), py::arg("labels"), py::arg("labels_i64"), py::arg("stride_l"),
        py::arg("scale"), py::arg("loss"), py::arg("grad"), py::arg("stride_g"),
        py::arg("n_rows"), py::arg("v"), py::arg("k"), py::arg("dtype"), py::arg("div"),
        py::arg("beta"), py::arg("inv_temp"), py::arg("logprobs"), py::arg("bucket"),
        py::arg("ignore_index"), py::arg("compute_grad"), py::arg("device"), py::arg("stream"),
        py::arg("force_path") = -1,
        "topk_kd_loss rows: loss[n] and (compute_grad) grad[n, :v]; returns the plan used.");
    def_kd_vp<kdk::kd_vp_stats>(
        m, "kd_vp_stats",
        "Vocabulary-parallel kd_loss, phase 1: local maxima, sums and pivots -> stats, piv.");
    def_kd_vp<kdk::kd_vp_partials>(
        m, "kd_vp_partials",
        "Vocabulary-parallel kd_loss, phase 2: partial sums with the global normalisers -> part.");
    def_kd_vp<kdk::kd_vp_grad>(
        m, "kd_vp_grad", "Vocabulary-parallel kd_loss, phase 3: the local gradient -> grad.");
    def_topk_vp<kdk::topk_vp_gather>(
        m, "topk_vp_gather",
        "Vocabulary-parallel topk_kd_loss: owned logits at the indices -> sel; bucket: tstat.");
    def_topk_vp<kdk::topk_vp_grad>(
        m, "topk_vp_grad", "Vocabulary-parallel topk_kd_loss: the local gradient -> grad.");
    m.def(
        "sinkhorn_plan",
        [](int64_t b1, int64_t b2, bool is_double, int device) {
            DeviceScope scope(device);
            const kdk::SinkhornPlan plan = kdk::sinkhorn_plan(b1, b2, is_double, device);
            py::dict d;
            d["fused"] = plan.fused;
            d["smem_bytes"] = plan.smem_bytes;
            return d;
        },
        py::arg("b1"), py::arg("b2"), py::arg("is_double"), py::arg("device"),
        "How the Sinkhorn solver runs problems of b1 x b2: dict(fused, smem_bytes).");

    m.def("sinkhorn_slots", &kdk::sinkhorn_slots, py::arg("n_iters"), py::arg("use_tol"),
          py::arg("history"), py::arg("fused"),
          "History slots the Sinkhorn forward keeps (0: none; buffers hold at least 1).");

    m.def(
        "sinkhorn_fwd",
        [](std::uintptr_t cost, std::uintptr_t log_a, std::uintptr_t log_b, std::uintptr_t rh,
           std::uintptr_t lh, std::uintptr_t f, std::uintptr_t g, std::uintptr_t part,
           std::uintptr_t iters, int64_t m, int64_t b1, int64_t b2, int64_t n_iters,
           int64_t n_slots, double epsilon, bool use_tol, double tol, bool history,
           bool is_double, bool fused, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::SinkhornArgs a = sinkhorn_args(cost, log_a, log_b, rh, lh, m, b1, b2, n_iters,
                                                n_slots, epsilon, iters, is_double, fused);
            a.f = ptr<void*>(f);
            a.g = ptr<void*>(g);
            a.part = ptr<void*>(part);
            a.use_tol = use_tol;
            a.tol = tol;
            a.history = history;
            kdk::sinkhorn_fwd(a, device, stream_of(stream));
        },
        py::arg("cost"), py::arg("log_a"), py::arg("log_b"), py::arg("rh"), py::arg("lh"),
        py::arg("f"), py::arg("g"), py::arg("part"), py::arg("iters"), py::arg("m"),
        py::arg("b1"), py::arg("b2"), py::arg("n_iters"), py::arg("n_slots"),
        py::arg("epsilon"), py::arg("use_tol"), py::arg("tol"), py::arg("history"),
        py::arg("is_double"), py::arg("fused"), py::arg("device"), py::arg("stream"),
        "Sinkhorn forward: f, g, the (shift, log-sum) history and the iteration count.");

    m.def(
        "sinkhorn_bwd",
        [](std::uintptr_t cost, std::uintptr_t log_a, std::uintptr_t log_b, std::uintptr_t rh,
           std::uintptr_t lh, std::uintptr_t iters, std::uintptr_t grad_f, std::uintptr_t grad_g,
           std::uintptr_t fb, std::uintptr_t gb, std::uintptr_t cbar, std::uintptr_t labar,
           std::uintptr_t lbbar, int64_t m, int64_t b1, int64_t b2, int64_t n_iters,
           double epsilon, bool is_double, bool fused, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::SinkhornArgs a = sinkhorn_args(cost, log_a, log_b, rh, lh, m, b1, b2, n_iters,
                                                n_iters, epsilon, iters, is_double, fused);
            a.grad_f = ptr<const void*>(grad_f);
            a.grad_g = ptr<const void*>(grad_g);
            a.fb = ptr<void*>(fb);
            a.gb = ptr<void*>(gb);
            a.cbar = ptr<void*>(cbar);
            a.labar = ptr<void*>(labar);
            a.lbbar = ptr<void*>(lbbar);
            a.history = true;
            kdk::sinkhorn_bwd(a, device, stream_of(stream));
        },
        py::arg("cost"), py::arg("log_a"), py::arg("log_b"), py::arg("rh"), py::arg("lh"),
        py::arg("iters"), py::arg("grad_f"), py::arg("grad_g"), py::arg("fb"), py::arg("gb"),
        py::arg("cbar"), py::arg("labar"), py::arg("lbbar"), py::arg("m"), py::arg("b1"),
        py::arg("b2"), py::arg("n_iters"), py::arg("epsilon"), py::arg("is_double"),
        py::arg("fused"), py::arg("device"), py::arg("stream"),
        "Sinkhorn reverse pass of the iterations the forward ran: C-bar, log a-bar, log b-bar.");
    m.def(
        "graph_rows",
        [](std::uintptr_t z, int64_t stride_z, std::uintptr_t valid, std::uintptr_t top_idx,
           int64_t n_rows, int64_t v, int k, float inv_temp, int dtype, std::uintptr_t a,
           std::uintptr_t idx, std::uintptr_t mass, std::uintptr_t lse, int device,
           std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::graph_rows(ptr<const void*>(z), stride_z, ptr<const bool*>(valid),
                            ptr<const int64_t*>(top_idx), n_rows, v, k, inv_temp, dtype,
                            ptr<float*>(a), ptr<int*>(idx), ptr<float*>(mass), ptr<float*>(lse),
                            stream_of(stream));
        },
        py::arg("z"), py::arg("stride_z"), py::arg("valid"), py::arg("top_idx"),
        py::arg("n_rows"), py::arg("v"), py::arg("k"), py::arg("inv_temp"), py::arg("dtype"),
        py::arg("a"), py::arg("idx"), py::arg("m"), py::arg("lse"), py::arg("device"),
        py::arg("stream"), "Graph row stage: top-k softmax entries, classes, mass, LSE.");

    m.def(
        "graph_runs",
        [](std::uintptr_t key, std::uintptr_t perm, std::uintptr_t a, std::uintptr_t mass,
           std::uintptr_t du, std::uintptr_t nu, std::uintptr_t bad, std::uintptr_t uent,
           int64_t groups, int64_t t_len, int k, double fix_scale, int device,
           std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::graph_runs(ptr<const int*>(key), ptr<const int64_t*>(perm), ptr<const float*>(a),
                            ptr<const float*>(mass), ptr<int64_t*>(du), ptr<int*>(nu),
                            ptr<int*>(bad), ptr<int*>(uent), groups, t_len, k, fix_scale,
                            stream_of(stream));
        },
        py::arg("key"), py::arg("perm"), py::arg("a"), py::arg("m"), py::arg("du"),
        py::arg("nu"), py::arg("bad"), py::arg("uent"), py::arg("groups"), py::arg("t_len"),
        py::arg("k"), py::arg("fix_scale"), py::arg("device"), py::arg("stream"),
        "Graph strengths: fixed-point sums of each class run of the sorted entries.");

    m.def(
        "graph_gw",
        [](std::uintptr_t sorted, std::uintptr_t order, std::uintptr_t nu, std::uintptr_t bad,
           std::uintptr_t cost, std::uintptr_t gu, int64_t groups, int64_t p, double unfix,
           int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::graph_gw(ptr<const int64_t*>(sorted), ptr<const int64_t*>(order),
                          ptr<const int*>(nu), ptr<const int*>(bad), ptr<double*>(cost),
                          ptr<float*>(gu), groups, p, unfix, stream_of(stream));
        },
        py::arg("sorted"), py::arg("order"), py::arg("nu"), py::arg("bad"), py::arg("cost"),
        py::arg("gu"), py::arg("groups"), py::arg("p"), py::arg("unfix"), py::arg("device"),
        py::arg("stream"), "Graph 1-D GW cost per group (and its strength gradient).");

    m.def(
        "graph_finish",
        [](std::uintptr_t cost, std::uintptr_t nu, std::uintptr_t loss, std::uintptr_t inv,
           int64_t groups, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::graph_finish(ptr<const double*>(cost), ptr<const int*>(nu), ptr<float*>(loss),
                              ptr<float*>(inv), groups, stream_of(stream));
        },
        py::arg("cost"), py::arg("nu"), py::arg("loss"), py::arg("inv"), py::arg("groups"),
        py::arg("device"), py::arg("stream"), "Graph loss: mean over groups with a position.");

    m.def(
        "graph_rows_bwd",
        [](std::uintptr_t z, int64_t stride_z, std::uintptr_t valid, std::uintptr_t a,
           std::uintptr_t idx, std::uintptr_t mass, std::uintptr_t lse, std::uintptr_t abar,
           std::uintptr_t uent, std::uintptr_t gu, std::uintptr_t scale, std::uintptr_t inv,
           std::uintptr_t grad, int64_t stride_g, int64_t n_rows, int64_t v, int k,
           int64_t t_len, float inv_temp, int dtype, int device, std::uintptr_t stream) {
            DeviceScope scope(device);
            kdk::graph_rows_bwd(ptr<const void*>(z), stride_z, ptr<const bool*>(valid),
                                ptr<const float*>(a), ptr<const int*>(idx),
                                ptr<const float*>(mass), ptr<const float*>(lse),
                                ptr<const float*>(abar), ptr<const int*>(uent),
                                ptr<const float*>(gu), ptr<const float*>(scale),
                                ptr<const float*>(inv), ptr<void*>(grad), stride_g, n_rows, v, k,
                                t_len, inv_temp, dtype, stream_of(stream));
        },
        py::arg("z"), py::arg("stride_z"), py::arg("valid"), py::arg("a"), py::arg("idx"),
        py::arg("m"), py::arg("lse"), py::arg("abar"), py::arg("uent"), py::arg("gu"),
        py::arg("scale"), py::arg("inv"), py::arg("grad"), py::arg("stride_g"),
        py::arg("n_rows"), py::arg("v"), py::arg("k"), py::arg("t_len"), py::arg("inv_temp"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        "Graph backward rows: the dense top-k softmax gradient, written once.");
}
