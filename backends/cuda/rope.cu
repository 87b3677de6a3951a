// Rotary position embedding in the split-half layout: channel j turns with channel j + d/2.
//     out[j]       = x[j]·cos[j]       − x[j+d/2]·sin[j]
//     out[j + d/2] = x[j+d/2]·cos[j+d/2] + x[j]·sin[j+d/2]
// exactly the reference's x·cos + rotate_half(x)·sin. One thread per (row, pair): no thread reads what another
// writes, so x and out may not alias but need no synchronisation.
extern "C" __global__ void rope_f32(
    const float* __restrict__ x,    // [B, H, T, d] contiguous
    const float* __restrict__ cos,  // [B, T, d]
    const float* __restrict__ sin,  // [B, T, d]
    float* __restrict__ out,        // [B, H, T, d]
    int B, int H, int T, int d) {
    const int half = d / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * H * T * half) return;
    const int j = (int)(i % half);
    const long long row = i / half;  // (b, h, t) flattened
    const int t = (int)(row % T);
    const int b = (int)(row / ((long long)T * H));
    const float* c = cos + ((long long)b * T + t) * d;
    const float* s = sin + ((long long)b * T + t) * d;
    const float a = x[row * d + j], e = x[row * d + j + half];
    out[row * d + j] = a * c[j] - e * s[j];
    out[row * d + j + half] = e * c[j + half] + a * s[j + half];
}
