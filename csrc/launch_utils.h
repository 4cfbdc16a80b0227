// Host helpers of the launchers: CUDA error checks and cached device attributes.
#pragma once

#include <cuda_runtime_api.h>

#include <mutex>
#include <stdexcept>
#include <string>

namespace kdk {

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        (void)cudaGetLastError();  // clear a non-sticky error so later calls can proceed
        throw std::runtime_error(std::string("kdkernels_cuda: ") + what + " failed: " +
                                 cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
    }
}

struct DeviceInfo {
    int major = 0;
    int minor = 0;
    int sm_count = 0;
    size_t smem_optin = 0;  // max shared memory per block (static + dynamic, opt-in)
    bool valid = false;
};

// Attributes of `device`, queried once per process.
inline const DeviceInfo& device_info(int device) {
    constexpr int kMaxDevices = 64;
    static DeviceInfo cache[kMaxDevices];
    static std::mutex mu;
    if (device < 0 || device >= kMaxDevices) {
        throw std::invalid_argument("kdkernels_cuda: device index out of range: " +
                                    std::to_string(device));
    }
    std::lock_guard<std::mutex> lock(mu);
    DeviceInfo& d = cache[device];
    if (!d.valid) {
        int smem = 0;
        check_cuda(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device),
                   "cudaDeviceGetAttribute(major)");
        check_cuda(cudaDeviceGetAttribute(&d.minor, cudaDevAttrComputeCapabilityMinor, device),
                   "cudaDeviceGetAttribute(minor)");
        check_cuda(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device),
                   "cudaDeviceGetAttribute(sm count)");
        check_cuda(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                   "cudaDeviceGetAttribute(smem opt-in)");
        d.smem_optin = static_cast<size_t>(smem);
        d.valid = true;
    }
    return d;
}

}  // namespace kdk
