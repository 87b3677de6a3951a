// Mixture of experts on the device, with no trip to the host during decode:
//
//   moe_route            per token: softmax over the E router logits, the k most probable experts (ties to the
//                        lower index, as the reference's stable sort), optionally renormalised to sum to 1
//   gather_rows          x rows of the (token, slot) pairs: xs[p] = x[token[p]]
//   gemv_expert_bf16/f32 out[p, n] = Σ_k xs[p, k] · w[expert[p], n, k]: each pair through its own expert's weight
//   moe_combine          out[t] = Σ_slot weight[t, slot] · y[t·k + slot], summed in slot order (deterministic:
//                        no atomics, so a run repeats bit for bit)
#include <cuda_bf16.h>
#include "common.cuh"

extern "C" __global__ void moe_route(
    const float* __restrict__ logits,  // [N, E]
    int N, int E, int k, int renormalise,
    int* __restrict__ experts,         // [N, k]
    float* __restrict__ weights) {     // [N, k]
    const int t = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per token: E is at most a few hundred
    if (t >= N) return;
    const float* l = logits + (long long)t * E;
    float top = -INFINITY;
    for (int e = 0; e < E; ++e) top = fmaxf(top, l[e]);
    float total = 0.0f;
    for (int e = 0; e < E; ++e) total += expf(l[e] - top);
    float chosen = 0.0f;
    for (int slot = 0; slot < k; ++slot) {
        int best = -1;
        float best_p = -1.0f;
        for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int s = 0; s < slot; ++s) taken |= experts[(long long)t * k + s] == e;
            const float p = expf(l[e] - top) / total;
            // strictly greater: on a tie the lower index stays; a NaN probability (NaN router logits) is never
            // greater, so without `best < 0` no expert would be chosen (-1, an index before the weights)
            if (!taken && (p > best_p || best < 0)) {
                best = e;
                best_p = p;
            }
        }
        experts[(long long)t * k + slot] = best;
        weights[(long long)t * k + slot] = best_p;
        chosen += best_p;
    }
    if (renormalise)
        for (int slot = 0; slot < k; ++slot) weights[(long long)t * k + slot] /= chosen;
}

extern "C" __global__ void gather_rows(
    const float* __restrict__ x, const int* __restrict__ rows, float* __restrict__ out, int d) {
    const float* src = x + (long long)rows[blockIdx.x] * d;  // one block per gathered row
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = src[j];
}

__device__ __forceinline__ float load_weight(const float* w, long long i) { return w[i]; }
__device__ __forceinline__ float load_weight(const __nv_bfloat16* w, long long i) { return __bfloat162float(w[i]); }

template <typename W>
__device__ __forceinline__ void expert_gemv(
    const float* __restrict__ xs, const int* __restrict__ expert, const W* __restrict__ w, float* __restrict__ out,
    int P, int N, int K) {
    // one warp per (pair p, output n)
    const long long job = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (job >= (long long)P * N) return;
    const int p = (int)(job / N), n = (int)(job % N);
    const W* row = w + ((long long)expert[p] * N + n) * K;
    const float* x = xs + (long long)p * K;
    float acc = 0.0f;
    for (int k = lane; k < K; k += 32) acc += x[k] * load_weight(row, k);
    acc = warp_sum(acc);
    if (lane == 0) out[job] = acc;
}

extern "C" __global__ void gemv_expert_bf16(
    const float* xs, const int* expert, const __nv_bfloat16* w, float* out, int P, int N, int K) {
    expert_gemv(xs, expert, w, out, P, N, K);
}

extern "C" __global__ void gemv_expert_f32(
    const float* xs, const int* expert, const float* w, float* out, int P, int N, int K) {
    expert_gemv(xs, expert, w, out, P, N, K);
}

extern "C" __global__ void moe_combine(
    const float* __restrict__ y,        // [N·k, d], pair t·k + slot
    const float* __restrict__ weights,  // [N, k]
    float* __restrict__ out,            // [N, d]
    int N, int k, int d) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)N * d) return;
    const long long t = i / d, j = i % d;
    float total = 0.0f;
    for (int slot = 0; slot < k; ++slot) total += weights[t * k + slot] * y[(t * k + slot) * d + j];
    out[i] = total;
}
