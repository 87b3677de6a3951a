// SiLU·mul, the middle of SwiGLU: out = silu(g) · u with silu(z) = z / (1 + e^-z). One thread per value.
// (The two products around it are GEMMs: cuBLAS for prefill, the bf16 GEMV of bf16.cu for decode.)
extern "C" __global__ void silu_mul_f32(
    const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float z = g[i];
        out[i] = z / (1.0f + expf(-z)) * u[i];
    }
}
