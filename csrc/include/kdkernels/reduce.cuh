// Warp and block reductions and a block-wide exclusive scan, deterministic in order.
// A reduction combines per-thread partial states with an associative `merge`; every
// block gets the same tree (lanes, then warps in order), so results are reproducible.
#pragma once

#include "common.cuh"

namespace kdk {

// Butterfly reduction over the 32 lanes of a warp (all lanes active); every lane ends
// with the total.
template <typename S, typename Merge>
__device__ __forceinline__ S warp_reduce(S v, Merge merge) {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));
    return v;
}

// Reduction over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the total. `scratch` holds at least 32 states in shared memory; it is free again
// when this returns.
template <typename S, typename Merge>
__device__ __forceinline__ S block_reduce(S v, const S& identity, Merge merge, S* scratch) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    v = warp_reduce(v, merge);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        S w = lane < nwarps ? scratch[lane] : identity;
        w = warp_reduce(w, merge);
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    const S total = scratch[0];
    __syncthreads();
    return total;
}

struct Sum3 {
    float x, y, z;
};
__device__ __forceinline__ Sum3 shfl_xor(const Sum3& s, int o) {
    return {shfl_xor(s.x, o), shfl_xor(s.y, o), shfl_xor(s.z, o)};
}
struct AddSum3 {
    __device__ __forceinline__ Sum3 operator()(const Sum3& a, const Sum3& b) const {
        return {a.x + b.x, a.y + b.y, a.z + b.z};
    }
};

// Exclusive prefix sum of x over the block in thread order; *total gets the block sum.
// `scratch` holds at least 33 ints in shared memory; it is free again when this returns.
__device__ __forceinline__ int block_exclusive_scan(int x, int* total, int* scratch) {
    const int lane = threadIdx.x % kWarp;
    const int warp = threadIdx.x / kWarp;
    const int nwarps = blockDim.x / kWarp;
    int incl = x;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == kWarp - 1) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const int w = lane < nwarps ? scratch[lane] : 0;
        int wi = w;
#pragma unroll
        for (int o = 1; o < kWarp; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += y;
        }
        scratch[lane] = wi - w;  // exclusive prefix of the warp sums
        if (lane == kWarp - 1) scratch[kWarp] = wi;
    }
    __syncthreads();
    const int excl = scratch[warp] + incl - x;
    *total = scratch[kWarp];
    __syncthreads();
    return excl;
}

}  // namespace kdk
