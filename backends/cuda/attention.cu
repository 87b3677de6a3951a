// Decode attention: one new query position per row, over every key and value in the device KV cache.
//
// One block per (row b, query head h); query head h reads kv head h / (Hq / Hkv) (grouped-query attention).
// The cache is [B, Hkv, max_len, d] and we read its first S positions, so k and v come with explicit element
// strides (a slice of the cache is not contiguous). Three passes over the S positions:
//   1. scores[s] = q·k[s] / sqrt(d)   (or TQ_MASKED where mask[s] is 0), written to a global scratch row
//   2. softmax: subtract the block-wide max, exponentiate, block-wide sum
//   3. out[j] = Σ_s p[s] v[s, j] / sum, the threads spread over j, so reads of a v row are coalesced
// The cache is stored as float32, bf16 or fp16 (kv_dtype): one kernel per storage type, each value widened to
// float32 as it is read (bf16 exactly; fp16 exactly too), the arithmetic float32 throughout, on every architecture.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "common.cuh"

__device__ __forceinline__ float load_kv(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_kv(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_kv(const __half* p, long long i) { return __half2float(p[i]); }

template <typename KV>
__device__ __forceinline__ void decode_attention(
    const float* __restrict__ q,              // [B, Hq, d] contiguous
    const KV* __restrict__ k,                 // [B, Hkv, >=S, d] with strides below
    const KV* __restrict__ v,                 // [B, Hkv, >=S, d]
    const unsigned char* __restrict__ mask,   // [B, S] (bool), row stride mask_b
    float* __restrict__ scores,               // [B, Hq, S] scratch
    float* __restrict__ out,                  // [B, Hq, d]
    int Hq, int Hkv, int S, int d,
    long long k_b, long long k_h, long long k_s,  // element strides of k (and of v: the cache's two halves
    long long v_b, long long v_h, long long v_s,  // share one layout, but we do not rely on it)
    long long mask_b, float scale) {
    extern __shared__ float qs[];  // the query, d floats: every thread reads all of it for its keys
    const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq, kvh = h / (Hq / Hkv);
    for (int j = threadIdx.x; j < d; j += blockDim.x) qs[j] = q[(long long)bh * d + j];
    __syncthreads();
    const KV* kb = k + b * k_b + kvh * k_h;
    const KV* vb = v + b * v_b + kvh * v_h;
    float* row = scores + (long long)bh * S;
    float top = -INFINITY;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const KV* key = kb + s * k_s;
        float acc = 0.0f;
        for (int j = 0; j < d; ++j) acc += qs[j] * load_kv(key, j);
        const float value = mask[b * mask_b + s] ? acc * scale : TQ_MASKED;
        row[s] = value;
        top = fmaxf(top, value);
    }
    top = block_max(top);  // its __syncthreads also makes every row[s] written above visible to the block
    float total = 0.0f;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const float e = expf(row[s] - top);
        row[s] = e;
        total += e;
    }
    total = block_sum(total);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < S; ++s) acc += row[s] * load_kv(vb, s * v_s + j);
        out[(long long)bh * d + j] = acc / total;
    }
}


extern "C" __global__ void decode_attention_f32(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const unsigned char* __restrict__ mask, float* __restrict__ scores, float* __restrict__ out, int Hq, int Hkv,
    int S, int d, long long k_b, long long k_h, long long k_s, long long v_b, long long v_h, long long v_s,
    long long mask_b, float scale) {
    decode_attention(q, k, v, mask, scores, out, Hq, Hkv, S, d, k_b, k_h, k_s, v_b, v_h, v_s, mask_b, scale);
}

extern "C" __global__ void decode_attention_bf16(
    const float* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const unsigned char* __restrict__ mask, float* __restrict__ scores, float* __restrict__ out, int Hq, int Hkv,
    int S, int d, long long k_b, long long k_h, long long k_s, long long v_b, long long v_h, long long v_s,
    long long mask_b, float scale) {
    decode_attention(q, k, v, mask, scores, out, Hq, Hkv, S, d, k_b, k_h, k_s, v_b, v_h, v_s, mask_b, scale);
}

extern "C" __global__ void decode_attention_f16(
    const float* __restrict__ q, const __half* __restrict__ k, const __half* __restrict__ v,
    const unsigned char* __restrict__ mask, float* __restrict__ scores, float* __restrict__ out, int Hq, int Hkv,
    int S, int d, long long k_b, long long k_h, long long k_s, long long v_b, long long v_h, long long v_s,
    long long mask_b, float scale) {
    decode_attention(q, k, v, mask, scores, out, Hq, Hkv, S, d, k_b, k_h, k_s, v_b, v_h, v_s, mask_b, scale);
}
