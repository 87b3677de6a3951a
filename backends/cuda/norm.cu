// RMSNorm, also used as QK-Norm (the same kernel over head_dim): out = x / sqrt(mean(x²) + eps) * weight.
// One block per row; the threads stride over the row, so any d works. Float32 throughout, as the reference.
#include "common.cuh"

extern "C" __global__ void rms_norm_f32(
    const float* __restrict__ x,       // [rows, d]
    const float* __restrict__ weight,  // [d]
    float* __restrict__ out,           // [rows, d]
    int d, float eps) {
    const float* row = x + (long long)blockIdx.x * d;
    float* dst = out + (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += row[j] * row[j];
    ss = block_sum(ss);
    // a true division by the square root (not rsqrtf, which is 2 ulp off) keeps us next to the reference
    const float scale = 1.0f / sqrtf(ss / (float)d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = row[j] * scale * weight[j];
}
