// bf16 weights, read as they are stored: bf16 is the top 16 bits of a float32, so widening is exact.
//
//   widen_bf16        [n] bf16 -> [n] f32 (prefill: widen a block of a weight, then cuBLAS's fp32 GEMM)
//   embed_bf16/_f32   the embedding lookup: rows `ids` of a [vocab, d] table, widened, as float32
//   gemv_bf16         decode: out[m, n] = Σ_k x[m, k] · w[n, k] for a few rows m (M ≤ TQ_GEMV_ROWS); one warp
//                     per output column n streams weight row n once for all m (2 bytes read per weight)
#include <cuda_bf16.h>
#include "common.cuh"

#define TQ_GEMV_ROWS 8

extern "C" __global__ void widen_bf16(const __nv_bfloat16* __restrict__ in, float* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __bfloat162float(in[i]);
}

extern "C" __global__ void embed_bf16(
    const __nv_bfloat16* __restrict__ table, const long long* __restrict__ ids, float* __restrict__ out, int d) {
    const __nv_bfloat16* row = table + ids[blockIdx.x] * d;  // one block per id
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = __bfloat162float(row[j]);
}

extern "C" __global__ void embed_f32(
    const float* __restrict__ table, const long long* __restrict__ ids, float* __restrict__ out, int d) {
    const float* row = table + ids[blockIdx.x] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = row[j];
}

extern "C" __global__ void gemv_bf16(
    const float* __restrict__ x,          // [M, K]
    const __nv_bfloat16* __restrict__ w,  // [N, K]
    float* __restrict__ out,              // [M, N]
    int M, int N, int K) {
    const int n = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (n >= N) return;  // a whole warp leaves together: n is the same for its 32 lanes
    const __nv_bfloat16* row = w + (long long)n * K;
    float acc[TQ_GEMV_ROWS];
#pragma unroll
    for (int m = 0; m < TQ_GEMV_ROWS; ++m) acc[m] = 0.0f;
    for (int k = lane; k < K; k += 32) {  // consecutive lanes read consecutive weights: coalesced
        const float wk = __bfloat162float(row[k]);
#pragma unroll
        for (int m = 0; m < TQ_GEMV_ROWS; ++m)
            if (m < M) acc[m] += x[(long long)m * K + k] * wk;
    }
#pragma unroll
    for (int m = 0; m < TQ_GEMV_ROWS; ++m) {
        if (m < M) {
            const float total = warp_sum(acc[m]);
            if (lane == 0) out[(long long)m * N + n] = total;
        }
    }
}
