// Choosing the next token on the device, so only its id (8 bytes) crosses to the host per step, not the
// [vocab] logits (600 KB for Qwen3). One block per row; blockDim.x must be TQ_SAMPLE_THREADS.
//
//   argmax_rows   greedy: the largest logit, the lowest id on ties, the first NaN if any (as np.argmax)
//   sample_rows   temperature sampling by the inverse CDF, as tinyqwen.sampling.sample: with p ∝ exp(l / T),
//                 the first id whose cumulative probability exceeds u·total, u ~ U[0, 1) given per row
#include "common.cuh"

#define TQ_SAMPLE_THREADS 256

// np.argmax's order: NaN first (the first NaN wins: NumPy propagates it), then the largest value, then the lowest id
__device__ __forceinline__ bool comes_first(float v, int i, float w, int j) {
    const bool nan_v = isnan(v), nan_w = isnan(w);
    if (nan_v != nan_w) return nan_v;
    if (nan_v || v == w) return i < j;
    return v > w;
}

extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int V, long long* __restrict__ out) {
    __shared__ float best_v[TQ_SAMPLE_THREADS];
    __shared__ int best_i[TQ_SAMPLE_THREADS];
    const float* l = logits + (long long)blockIdx.x * V;
    float bv = -INFINITY;
    int bi = V;  // "none yet": larger than any index
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (bi == V || comes_first(l[i], i, bv, bi)) {
            bv = l[i];
            bi = i;
        }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float ov = best_v[threadIdx.x + stride];
            const int oi = best_i[threadIdx.x + stride];
            if (oi < V && (best_i[threadIdx.x] == V || comes_first(ov, oi, best_v[threadIdx.x], best_i[threadIdx.x]))) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] < V ? best_i[0] : 0;
}

extern "C" __global__ void sample_rows(
    const float* __restrict__ logits, int V, float inv_temperature, const float* __restrict__ u,
    long long* __restrict__ out) {
    __shared__ float chunk_total[TQ_SAMPLE_THREADS];
    const float* l = logits + (long long)blockIdx.x * V;
    // each thread owns one contiguous chunk of ids, so the chunks' totals are in id order for the scan below
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int start = threadIdx.x * chunk, stop = min(V, start + chunk);
    float top = -INFINITY;
    for (int i = start; i < stop; ++i) top = fmaxf(top, l[i]);
    top = block_max(top);
    float mine = 0.0f;
    for (int i = start; i < stop; ++i) mine += expf((l[i] - top) * inv_temperature);
    chunk_total[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x != 0) return;
    float total = 0.0f;
    for (int c = 0; c < blockDim.x; ++c) total += chunk_total[c];
    const float target = u[blockIdx.x] * total;
    float cumulative = 0.0f;
    int c = 0;
    while (c < (int)blockDim.x - 1 && cumulative + chunk_total[c] <= target) cumulative += chunk_total[c++];
    long long chosen = min(V - 1, c * chunk);
    for (int i = c * chunk; i < min(V, (c + 1) * chunk); ++i) {
        chosen = i;
        cumulative += expf((l[i] - top) * inv_temperature);
        if (cumulative > target) break;  // the first id whose cumulative probability exceeds the target
    }
    out[blockIdx.x] = chosen;
}
