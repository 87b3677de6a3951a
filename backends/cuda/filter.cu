// Every sampling option on the device: penalties, temperature, top-k, top-p, min-p and the draw, so that per step
// only the chosen id crosses to the host. The rules are tinyqwen.sampling's (= transformers'), in its order:
//
//   penalize_rows        x = (repetition/presence/frequency-penalised logit) / T, in float64, from a device-side
//                        `seen` flag (prompt + output) and `counts` (output occurrences) per id
//   filter_sample_rows   one block per row: greedy arg-max, or top-k -> top-p -> min-p -> the inverse CDF with a
//                        host-given uniform u; then it records the chosen id in `seen` and `counts` itself
//
// Why float64, and why the explicit __d*_rn operations: the host pipeline is float64 NumPy. With the same operations,
// correctly rounded (and never fused into an FMA, which the _rn intrinsics forbid), x is bit for bit the host's, so
// top-k and ties are decided exactly as on the host. exp() and the order of long sums differ in the last bit, which
// can only move a top-p / min-p / CDF boundary that falls within ~1e-15 of u or p.
//
// Why radix select and not a sort. A sort of 151,936 values per token is the obvious way (sort descending, cumsum,
// cut) but costs O(V log V) work and a V-sized temporary. We never need the order, only the cut: the value t of the
// last kept token. The float64 values map to unsigned 64-bit keys that sort like the values (order_key); the cut's
// key is found one byte at a time, most significant first: a 256-bin histogram of the candidates' next byte (shared
// memory, integer atomics), a scan of the bins to pick the one holding the cut, and the candidates narrow to that
// bin. Eight passes over the row (one per byte) pin the exact key, whatever the ties; all tokens above the cut are
// kept, and of the tokens equal to it the first j by id (transformers' stable sort). top-k counts tokens; top-p sums
// probability mass in the bins instead of counts ("find the bin where the mass before it is still < p").
//
// The masses are fixed point, round(prob * 2^60) as 64-bit integers: integer atomics are exact and order-free, so
// the histogram's sums (and the chosen token) are the same on every run, which float atomics would not be. Rounding
// a probability to 2^-61 moves a cumulative mass by at most V·2^-61 < 1e-13, far inside the host's 1e-9 slack.
//
// Cost: each pass reads the row's 8-byte values once (1.2 MB for Qwen3, L2-resident). A block-per-row sampler is
// one SM's worth of bandwidth, so with every filter on (about 25 passes) it is tens of microseconds per token, next
// to milliseconds of decode; this has not been measured on a GPU yet. blockDim.x must be TQ_FILTER_THREADS
// (__launch_bounds__ holds ptxas to 64 registers a thread, so that 1,024 threads fit one SM's 65,536).
#include "common.cuh"

#define TQ_FILTER_THREADS 1024
#define TQ_ALL_TIES 0x7fffffff
#define TQ_MASS_ONE 1152921504606846976.0  // 2^60: a probability of 1 in fixed point
#define TQ_SLACK 1e-9                      // tinyqwen.sampling's rounding slack for top-p and min-p

// ------------------------------------------------------------------------------------------------- helpers

__device__ __forceinline__ unsigned long long order_key(double v) {
    // a key that sorts like v: flip all bits of a negative value, only the sign bit of a positive one;
    // v + 0.0 turns -0.0 into +0.0 (equal values, one key)
    const unsigned long long bits = (unsigned long long)__double_as_longlong(__dadd_rn(v, 0.0));
    return (bits >> 63) ? ~bits : bits | 0x8000000000000000ull;
}

__device__ __forceinline__ double key_value(unsigned long long key) {
    return __longlong_as_double((long long)((key >> 63) ? key & 0x7fffffffffffffffull : ~key));
}

__device__ __forceinline__ double block_sum_f64(double v) {
    __shared__ double partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(TQ_FULL_MASK, v, offset);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? partial[threadIdx.x] : 0.0;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(TQ_FULL_MASK, v, offset);
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}

__device__ __forceinline__ double block_max_f64(double v) {
    __shared__ double partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(TQ_FULL_MASK, v, offset));
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? partial[threadIdx.x] : -(double)INFINITY;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(TQ_FULL_MASK, v, offset));
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}

__device__ __forceinline__ int block_min_int(int v) {
    __shared__ int partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(TQ_FULL_MASK, v, offset));
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? partial[threadIdx.x] : 0x7fffffff;
    if (warp == 0)
        for (int offset = 16; offset > 0; offset >>= 1) v = min(v, __shfl_xor_sync(TQ_FULL_MASK, v, offset));
    if (threadIdx.x == 0) partial[0] = v;
    __syncthreads();
    return partial[0];
}

// ------------------------------------------------------------------------------------------------- penalties

extern "C" __global__ void penalize_rows(
    const float* __restrict__ logits,        // [B, V]
    const unsigned char* __restrict__ seen,  // [B, V] 1 where the id is in the prompt or the output
    const int* __restrict__ counts,          // [B, V] how often the id is in the output
    int V, double repetition, double presence, double frequency, double temperature,
    double* __restrict__ x,                  // [B, V] out
    int* __restrict__ bad) {                 // [B] set to 1 where a logit is NaN or infinite
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // grid (ceil(V / threads), B)
    if (i >= V) return;
    const long long at = (long long)blockIdx.y * V + i;
    const float l = logits[at];
    if (!isfinite(l)) bad[blockIdx.y] = 1;
    double v = (double)l;
    if (seen[at]) v = v > 0.0 ? __ddiv_rn(v, repetition) : __dmul_rn(v, repetition);  // CTRL: once per seen id
    const int c = counts[at];
    v = __dsub_rn(v, c > 0 ? presence : 0.0);               // presence: once per id in the output
    v = __dsub_rn(v, __dmul_rn(frequency, (double)c));      // frequency: once per occurrence
    x[at] = __ddiv_rn(v, temperature);                      // greedy passes temperature 1 (x / 1 == x)
}

// ------------------------------------------------------------------------------------------------- filter + draw

extern "C" __global__ void __launch_bounds__(TQ_FILTER_THREADS) filter_sample_rows(
    const double* __restrict__ xs,           // [B, V] penalised logits / T (penalize_rows)
    double* __restrict__ es,                 // [B, V] scratch: exp(x - max)
    unsigned long long* __restrict__ masses, // [B, V] scratch: fixed-point probabilities (top-p)
    int V, int top_k, double top_p, double min_p, int greedy,
    const double* __restrict__ u,            // [B] uniform numbers in [0, 1), drawn by the host's generator
    const long long* __restrict__ forced,    // [B] -1: choose; >= 0: take this id; -2: the row has finished
    const int* __restrict__ bad,             // [B] from penalize_rows
    unsigned char* __restrict__ seen,        // [B, V] updated with the chosen id
    int* __restrict__ counts,                // [B, V] updated with the chosen id
    long long* __restrict__ out) {           // [B] the id; -1: the row's logits are not finite; -2: finished
    __shared__ int bins[256];
    __shared__ unsigned long long bin_mass[256];
    __shared__ double chunk_total[TQ_FILTER_THREADS];
    __shared__ int chunk_rank[TQ_FILTER_THREADS];  // ties at the cut before this chunk (their rank by id)
    __shared__ int chunk_last[TQ_FILTER_THREADS];  // the chunk's last kept id, -1 if none
    __shared__ unsigned long long s_prefix, s_above, s_mass;
    __shared__ int s_count;
    const int b = blockIdx.x, tid = threadIdx.x, T = blockDim.x;
    const long long row = (long long)b * V;
    const double* x = xs + row;
    double* e = es + row;
    unsigned long long* mass = masses + row;
    const long long f = forced[b];
    if (f == -2 || bad[b]) {
        if (tid == 0) out[b] = f == -2 ? -2 : -1;
        return;
    }
    long long token = f;
    if (f < 0) {
        // 1. the largest value; greedy is the lowest id holding it (np.argmax)
        double m = -(double)INFINITY;
        for (int i = tid; i < V; i += T) m = fmax(m, x[i]);
        m = block_max_f64(m);
        if (greedy) {
            int first = 0x7fffffff;
            for (int i = tid; i < V; i += T)
                if (x[i] == m) first = min(first, i);
            token = block_min_int(first);
        } else {
            for (int i = tid; i < V; i += T) e[i] = exp(__dsub_rn(x[i], m));  // the softmax's numerators
            __syncthreads();

            // 2. top-k: the key of the k-th largest value; every value >= it is kept (ties included)
            unsigned long long key_k = 0, prefix = 0, fixed = 0;
            if (top_k > 0 && top_k < V) {
                int needed = top_k;
                for (int shift = 56; shift >= 0; shift -= 8) {
                    for (int d = tid; d < 256; d += T) bins[d] = 0;
                    __syncthreads();
                    for (int i = tid; i < V; i += T) {
                        const unsigned long long key = order_key(x[i]);
                        if ((key & fixed) == prefix) atomicAdd(&bins[(key >> shift) & 255], 1);
                    }
                    __syncthreads();
                    if (tid == 0) {  // from the largest byte down: the bin holding the needed-th largest
                        int d = 255;
                        while (bins[d] < needed) needed -= bins[d--];
                        s_prefix = prefix | ((unsigned long long)d << shift);
                        s_count = needed;
                    }
                    __syncthreads();
                    prefix = s_prefix;
                    needed = s_count;
                    fixed |= 255ull << shift;
                }
                key_k = prefix;
            }

            // 3. top-p over the top-k survivors: the cut is the last token (by value desc, id asc) whose mass
            //    before it is < p - slack; of the tokens equal to the cut, `keep_ties` (the first by id) stay
            unsigned long long key_p = key_k;
            int keep_ties = TQ_ALL_TIES;
            double e_cut = 0.0;
            if (top_p < 1.0) {
                double s = 0.0;
                for (int i = tid; i < V; i += T)
                    if (order_key(x[i]) >= key_k) s += e[i];
                const double total = block_sum_f64(s);
                for (int i = tid; i < V; i += T)
                    mass[i] = order_key(x[i]) >= key_k ? __double2ull_rn(__ddiv_rn(e[i], total) * TQ_MASS_ONE) : 0ull;
                __syncthreads();
                const double reach = __dsub_rn(top_p, TQ_SLACK);
                if (reach <= 0.0) {  // only the most likely token: the first in the order always stays
                    key_p = order_key(m);
                    keep_ties = 1;
                } else {
                    const unsigned long long P = (unsigned long long)ceil(reach * TQ_MASS_ONE);
                    unsigned long long above = 0;  // the mass of the candidates above the current bin's range
                    prefix = 0;
                    fixed = 0;
                    for (int shift = 56; shift >= 0; shift -= 8) {
                        for (int d = tid; d < 256; d += T) {
                            bins[d] = 0;
                            bin_mass[d] = 0;
                        }
                        __syncthreads();
                        for (int i = tid; i < V; i += T) {
                            const unsigned long long key = order_key(x[i]);
                            if (key >= key_k && (key & fixed) == prefix) {
                                const int d = (key >> shift) & 255;
                                atomicAdd(&bins[d], 1);
                                atomicAdd(&bin_mass[d], mass[i]);
                            }
                        }
                        __syncthreads();
                        if (tid == 0) {  // the last bin whose first token still has mass before it < P
                            unsigned long long before = above;
                            int chosen = -1;
                            for (int d = 255; d >= 0 && before < P; --d) {
                                if (bins[d] == 0) continue;
                                chosen = d;
                                s_above = before;
                                before += bin_mass[d];
                            }
                            s_prefix = prefix | ((unsigned long long)chosen << shift);
                            s_count = bins[chosen];
                            s_mass = bin_mass[chosen];
                        }
                        __syncthreads();
                        prefix = s_prefix;
                        above = s_above;
                        fixed |= 255ull << shift;
                    }
                    key_p = prefix;
                    // ties at the cut, each of mass q: the i-th (from 0) stays while above + i·q < P
                    const unsigned long long q = s_mass / (unsigned long long)s_count;
                    keep_ties = q == 0 ? s_count : (int)min((unsigned long long)s_count, (P - above + q - 1) / q);
                }
                e_cut = exp(__dsub_rn(key_value(key_p), m));
            }

            // 4. min-p over the top-p survivors: keep e / S >= min_p · (1 / S) · (1 - slack), S their sum
            double min_prob = 0.0, S = 1.0;
            if (min_p > 0.0) {
                double s = 0.0;
                const bool cut_inside = keep_ties != TQ_ALL_TIES;
                for (int i = tid; i < V; i += T) {
                    const unsigned long long key = order_key(x[i]);
                    if (cut_inside ? key > key_p : key >= key_p) s += e[i];
                }
                S = block_sum_f64(s);
                if (cut_inside) S = __dadd_rn(S, __dmul_rn((double)keep_ties, e_cut));
                min_prob = __dmul_rn(__dmul_rn(min_p, __ddiv_rn(1.0, S)), 1.0 - TQ_SLACK);
            }

            // 5. the inverse CDF in id order: each thread owns a contiguous chunk of ids, so the chunks' totals
            //    are in id order; a tie at the cut needs its rank by id, counted per chunk and scanned
            const int chunk = (V + T - 1) / T, start = min(V, tid * chunk), stop = min(V, start + chunk);
            int ties = 0;
            if (keep_ties != TQ_ALL_TIES)
                for (int i = start; i < stop; ++i) ties += order_key(x[i]) == key_p;
            chunk_rank[tid] = ties;
            __syncthreads();
            if (tid == 0) {
                int running = 0;
                for (int c = 0; c < T; ++c) {
                    const int n = chunk_rank[c];
                    chunk_rank[c] = running;
                    running += n;
                }
            }
            __syncthreads();
            double mine = 0.0;
            int last = -1, rank = chunk_rank[tid];
            for (int i = start; i < stop; ++i) {
                const unsigned long long key = order_key(x[i]);
                bool keep = key > key_p || (key == key_p && rank++ < keep_ties);
                if (keep && min_p > 0.0) keep = __ddiv_rn(e[i], S) >= min_prob;
                if (keep) {
                    mine += e[i];
                    last = i;
                }
            }
            chunk_total[tid] = mine;
            chunk_last[tid] = last;
            __syncthreads();
            if (tid == 0) {
                double total = 0.0;
                for (int c = 0; c < T; ++c) total += chunk_total[c];
                const double target = u[b] * total;
                double cumulative = 0.0;
                token = -1;
                for (int c = 0; c < T && token < 0; ++c) {
                    if (!(cumulative + chunk_total[c] > target)) {
                        cumulative += chunk_total[c];
                        continue;
                    }
                    int r = chunk_rank[c];  // walk this chunk: the first kept id whose cumulative exceeds target
                    const int lo = min(V, c * chunk), hi = min(V, lo + chunk);
                    for (int i = lo; i < hi; ++i) {
                        const unsigned long long key = order_key(x[i]);
                        bool keep = key > key_p || (key == key_p && r++ < keep_ties);
                        if (keep && min_p > 0.0) keep = __ddiv_rn(e[i], S) >= min_prob;
                        if (!keep) continue;
                        cumulative += e[i];
                        if (cumulative > target) {
                            token = i;
                            break;
                        }
                    }
                    if (token < 0) token = chunk_last[c];  // rounding: the chunk's last kept id
                }
                for (int c = T - 1; c >= 0 && token < 0; --c) token = chunk_last[c];  // u·total rounded up
            }
        }
    }
    if (tid == 0) {
        out[b] = token;
        if (token < V) {  // a forced id outside the vocabulary is the host's to reject, not ours to write
            counts[row + token] += 1;
            seen[row + token] = 1;
        }
    }
}
