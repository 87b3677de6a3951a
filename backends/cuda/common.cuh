// Shared helpers of tinyqwen's CUDA kernels: block-wide reductions.
//
// A block reduces in two steps: each warp of 32 threads combines its values with register shuffles (no memory),
// then the first warp combines the warps' partial results through 32 floats of shared memory. Every thread gets
// the result. blockDim.x must be a multiple of 32 and at most 1024 (the kernels launch 128 or 256 threads).
#pragma once

#define TQ_FULL_MASK 0xffffffffu
// NVRTC has no <math.h>: +inf as its bit pattern
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
// the NumPy reference's "masked" score: float32's most negative finite value, not -inf, so that a row whose keys
// are all masked averages uniformly instead of producing NaN (transformers does the same with finfo.min)
#define TQ_MASKED (-3.402823466e38f)

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(TQ_FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(TQ_FULL_MASK, v, offset));
    return v;
}

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? partial[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? partial[threadIdx.x] : -INFINITY;
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}
