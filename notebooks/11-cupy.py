# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 11 · Making it fast on the GPU
#
# [Chapter 10](10-numba.ipynb) found that decoding one token is a race through memory: every weight is read once
# and used for a single multiply-add. A CPU streams some tens of GB/s. A data-centre GPU streams *thousands*: an
# NVIDIA H100 reads its 80 GB of HBM3 memory at 3.35 TB/s. That is why the bigger Qwen3 models — 8B, 30B-A3B —
# are run on GPUs.
#
# This chapter builds tinyqwen's third backend, `cupy`, on [CuPy](https://cupy.dev/) (NumPy's API on NVIDIA GPUs)
# and a handful of kernels we write ourselves in CUDA C. The plan:
#
# 1. the GPU's memory hierarchy, in one picture;
# 2. the roofline: why decode is bandwidth-bound and prefill is not;
# 3. CUDA in five ideas: grids, blocks, threads, warps, shared memory;
# 4. an RMSNorm kernel: a block of threads per row and a reduction;
# 5. a RoPE kernel: one thread per rotated pair, and the index arithmetic that gets it right;
# 6. cuBLAS for the matrix products, and the one product we still write (decode's bf16 GEMV);
# 7. sampling on the device, so that only a token id crosses back to the CPU;
# 8. the whole backend running *without* a GPU, which is how CI checks it;
# 9. what to expect on an H100 — computed from published specs, **not measured here**;
# 10. the checkpoint against transformers.
#
# **About "without a GPU".** Neither the machines this course was written on nor its CI have a GPU. Everything
# below still runs: each CUDA kernel is compiled by NVRTC (NVIDIA's runtime compiler, which needs no GPU), and
# each kernel has a *NumPy twin* that computes the same thing, so the backend's orchestration runs with NumPy
# standing in for CuPy. Only the final on-GPU run needs the hardware; where a number depends on it, it is labelled.

# %%
import json
import re
import sys
import time

import matplotlib.pyplot as plt
import numpy as np

from course_setup import REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
from tinyqwen.backends import cupy as cupy_backend  # noqa: E402
from tinyqwen import norm, rope  # noqa: E402

# %% [markdown]
# First, is there a GPU here? `gpu_unavailable_reason()` answers in one line (None means CuPy can use one).

# %%
reason = cupy_backend.gpu_unavailable_reason()
print("GPU: available" if reason is None else f"GPU: none usable here — {reason}")
# Compiling CUDA C needs NVRTC, which the `gpu` extra brings (pip install -e ".[gpu]", ~230 MB; no GPU needed).
# Without it, the compile cells below say so and the chapter goes on: every kernel still runs on the CPU (section 9).
NVRTC = cupy_backend.nvrtc_unavailable_reason()
print("NVRTC: installed" if NVRTC is None else f"NVRTC: {NVRTC}")

# %% [markdown]
# ## 1. The GPU memory hierarchy in one picture
#
# A GPU is many small processors, *streaming multiprocessors* (SMs; the H100 SXM has 132), sharing one large,
# fast memory. Between them sit caches. The closer a level is to the arithmetic, the faster and the smaller:
#
# * **registers**: each thread's private variables; 256 KB per SM;
# * **shared memory / L1**: up to 228 KB per SM, shared by the threads of one *block* — the scratchpad we use for
#   reductions;
# * **L2 cache**: 50 MB for the whole chip;
# * **HBM3**: the 80 GB "device memory" where the weights and the KV cache live, 3.35 TB/s;
# * and far away, over **PCIe Gen5** (64 GB/s each way), the CPU's memory.
#
# The numbers are NVIDIA's published specifications of the H100 SXM5, not measurements.

# %%
levels = [  # (name, size, bandwidth or note) — H100 SXM5 published specs
    ("registers", "256 KB per SM", "private to a thread"),
    ("shared memory / L1", "228 KB per SM", "per block"),
    ("L2 cache", "50 MB", "whole chip"),
    ("HBM3 (device memory)", "80 GB", "3.35 TB/s"),
    ("host RAM over PCIe Gen5", "CPU side", "64 GB/s each way"),
]
fig, ax = plt.subplots(figsize=(8, 4.2))
for i, (name, size, speed) in enumerate(levels):
    width = 0.5 + 0.12 * i  # wider = bigger and slower
    ax.add_patch(plt.Rectangle((0.5 - width / 2, 4 - i), width, 0.8, color=plt.cm.viridis(i / 5), alpha=0.85))
    ax.text(0.5, 4.4 - i, f"{name}\n{size} · {speed}", ha="center", va="center", color="white", fontsize=9)
ax.annotate("", xy=(0.02, 4.8), xytext=(0.02, 0.0), arrowprops={"arrowstyle": "<->"})
ax.text(0.04, 2.4, "faster, smaller ↑\nslower, larger ↓", fontsize=8, va="center")
ax.set(xlim=(0, 1), ylim=(-0.1, 5), title="The H100's memory hierarchy (published specs, not measured here)")
ax.axis("off")
plt.show()

# %% [markdown]
# For decode the picture says one thing: the weights live in HBM, and each token must stream all of them through
# the chip. No cache can hold 1.2 GB (Qwen3-0.6B in bf16), let alone 16 GB (8B).

# %% [markdown]
# ## 2. Why decode is bandwidth-bound: the roofline
#
# A kernel's **arithmetic intensity** is the flops it does per byte it reads. The GPU can deliver at most
#
# $$\text{attainable flop/s} = \min(\text{peak flop/s},\ \text{intensity} \times \text{bandwidth}).$$
#
# Plotted on log–log axes, that is a slanted *roof* (bandwidth-bound) meeting a flat one (compute-bound) at the
# *ridge point*, peak ÷ bandwidth. For the H100 in bf16: 989 TFLOPS ÷ 3.35 TB/s ≈ 295 flops per byte.
#
# A decode step multiplies each weight by one vector: 2 flops per weight, 2 bytes per bf16 weight — intensity 1.
# A batch of $B$ sequences reuses each weight $B$ times (intensity $B$); a prefill of 2,048 tokens, 2,048 times.

# %%
BW, PEAK_BF16, PEAK_FP32 = (
    3.35e12,
    989e12,
    67e12,
)  # H100 SXM5: bytes/s, bf16 tensor-core and fp32 flop/s (specs)
intensity = np.logspace(-1, 4, 200)
fig, ax = plt.subplots(figsize=(7, 4))
ax.loglog(intensity, np.minimum(PEAK_BF16, intensity * BW) / 1e12, label="bf16 tensor cores (989 TFLOPS)")
ax.loglog(intensity, np.minimum(PEAK_FP32, intensity * BW) / 1e12, "--", label="fp32 CUDA cores (67 TFLOPS)")
for name, ai in (("decode, batch 1", 1), ("decode, batch 64", 64), ("prefill, 2k tokens", 2048)):
    ax.plot(ai, min(PEAK_BF16, ai * BW) / 1e12, "o")
    ax.annotate(
        name, (ai, min(PEAK_BF16, ai * BW) / 1e12), textcoords="offset points", xytext=(5, -12), fontsize=8
    )
ax.set(
    xlabel="arithmetic intensity (flops per byte read)",
    ylabel="attainable TFLOPS",
    title="H100 roofline (published specs, not measured here)",
)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Decode at batch 1 sits at the far left: it can use at most $3.35 / 989 ≈ 0.3\%$ of the tensor cores. Its speed is
# set by bytes, so the roofline bound on tokens per second is simply bandwidth ÷ bytes per token. We compute the
# bytes per token from the real config.json files, with `decode_params` (chapter 10: every weight, the lm_head,
# and only the routed experts of a MoE layer).

# %%
from tinyqwen.bench import decode_params  # noqa: E402
from tinyqwen.config import config_from_dict  # noqa: E402
from tinyqwen.config import count_parameters  # noqa: E402


def decode_ceiling(weights, bytes_per_weight, bandwidth, peak, batch=1):  # -> tokens/s
    step = max(
        weights * bytes_per_weight / bandwidth, 2 * weights * batch / peak
    )  # read vs compute, overlapped
    return batch / step


configs = {n: config_from_dict(json.loads((REPO / f"tinyqwen/data/configs/{n}.json").read_text()))
           for n in ("Qwen3-0.6B", "Qwen3-8B", "Qwen3-30B-A3B")}  # fmt: skip
for name, c in configs.items():
    w = decode_params(c)
    print(
        f"{name:14s} {count_parameters(c) / 1e9:5.1f} B parameters, {w / 1e9:5.2f} B read per token → "
        f"ceiling {decode_ceiling(w, 2, BW, PEAK_BF16):6.0f} tok/s at batch 1 (bf16)"
    )

# %% [markdown]
# Qwen3-30B-A3B is a mixture of experts: 30.5 B parameters, but a token reads only its 8 routed experts of 128 per
# layer, 3.0 B weights — so it can decode like a 3B dense model, and 2.5 times faster than the dense 8B, if its
# 61 GB of bf16 weights fit on the GPU (they do, on one 80 GB H100). The ceiling for 0.6B, 2,800 tok/s, is far above
# the target of 200 tok/s. At that size the bytes take 0.36 ms per token, while a step launches some 15
# kernels per layer, about 400 in all; at a few microseconds per launch (a typical figure, not measured here) the
# launches, not the bytes, are likely to set the pace.

# %% [markdown]
# ## 3. CUDA in five ideas
#
# A CUDA kernel is one C function that many threads run at once, each on its own piece of the data.
#
# 1. **Grid, block, thread.** A launch starts a *grid* of *blocks*; each block has up to 1,024 threads. A thread
#    knows where it is from `blockIdx.x`, `blockDim.x` and `threadIdx.x`.
# 2. **Warps.** The hardware runs threads in groups of 32 that execute the same instruction. Neighbouring threads
#    should read neighbouring addresses: the 32 reads then *coalesce* into one wide memory transaction.
# 3. **Shared memory** (`__shared__`) is visible to the threads of one block, and `__syncthreads()` makes them wait
#    for each other. It is how a block adds up numbers its threads computed separately.
# 4. **One block per row, or one thread per element.** Row-wise work (a norm, a softmax) gives a block a row;
#    element-wise work (RoPE, SiLU·mul) gives each thread an element.
# 5. **`extern "C"`** keeps a kernel's name as written, so the host can find it in the compiled module.
#
# CuPy compiles CUDA C at run time with NVRTC. We can call NVRTC ourselves, without a GPU, and look at the PTX it
# produces (NVIDIA's portable assembly, which the driver turns into machine code for the exact GPU). `compile_ptx`
# wraps the three NVRTC calls: `createProgram`, `compileProgram`, `getPTX`.

# %%
hello = 'extern "C" __global__ void scale(float* x, float a, int n) {\n' \
        "    int i = blockIdx.x * blockDim.x + threadIdx.x;  // this thread's element\n" \
        "    if (i < n) x[i] *= a;  // the last block may have spare threads\n}\n"  # fmt: skip
print(hello)
if NVRTC is None:
    ptx = cupy_backend.compile_ptx(hello, "compute_90", name="scale.cu")
    print(
        "\n".join(
            line for line in ptx.splitlines() if ".entry" in line or "mul.f32" in line or ".target" in line
        )
    )
else:
    print(f"(not compiled: {NVRTC})")

# %% [markdown]
# `.target sm_90` is the H100; the `.entry` line is our kernel, with its parameters; `mul.f32` is the multiply.
# Compilation errors come back with the line and column, as from any compiler:

# %%
try:
    cupy_backend.compile_ptx(hello.replace("x[i] *= a;", "x[i] *= a"), "compute_80", name="scale.cu")
except Exception as error:
    print(str(error).splitlines()[0])
    print("\n".join(str(error).splitlines()[1:3]))

# %% [markdown]
# ## 4. Writing an RMSNorm kernel
#
# RMSNorm ([chapter 3](03-embeddings-rmsnorm.ipynb)) scales each row by $1/\sqrt{\text{mean}(x^2) + \epsilon}$.
# Every output needs the sum over the whole row, so a block of threads takes one row:
#
# 1. thread $t$ adds the squares of elements $t, t + 128, t + 256, \dots$ (consecutive threads read consecutive
#    elements: coalesced);
# 2. the block adds its 128 partial sums in shared memory as a **tree**: threads $0..63$ add in the sums of
#    $64..127$, then $0..31$ add $32..63$, … 7 steps for 128 threads, with a `__syncthreads()` after each;
# 3. every thread scales its own elements.

# %%
RMS_NORM = r"""
#define THREADS 128
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int d, float eps) {
    __shared__ float partial[THREADS];
    const float* row = x + (long long)blockIdx.x * d;      // one block per row
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += row[j] * row[j];
    partial[threadIdx.x] = ss;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {  // the tree: 128 -> 64 -> ... -> 1 sums
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    const float scale = 1.0f / sqrtf(partial[0] / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = row[j] * scale * weight[j];
}
"""
for arch in cupy_backend.ARCHITECTURES if NVRTC is None else ():
    ptx = cupy_backend.compile_ptx(RMS_NORM, arch, name="rms_norm.cu")
    print(arch, "→", len(ptx.splitlines()), "lines of PTX;", re.search(r"\.entry \w+", ptx).group())
print("" if NVRTC is None else f"(not compiled: {NVRTC})")

# %% [markdown]
# It compiles for every architecture from the T4 (compute_75) to the H100 (compute_90). Whether it *computes* the
# right thing needs a GPU — or a twin (or, section 9, a CPU that runs the kernel). The NumPy twin below does exactly
# what the block does, thread by thread, including the order of the additions. First a loop version, one row at a time, so the tree is visible:


# %%
def rms_norm_block(row, weight, eps, threads=128):  # [d], [d] -> [d], as one block computes it
    partial = [float(np.sum(row[t::threads].astype(np.float32) ** 2)) for t in range(threads)]
    half = threads // 2
    while half > 0:
        partial = [partial[t] + partial[t + half] for t in range(half)]  # one tree step
        half //= 2
    return row / np.sqrt(np.float32(partial[0] / row.size + eps)) * weight


x = np.array([3.0, 4.0], np.float32)
print(rms_norm_block(x, np.ones(2, np.float32), 0.0, threads=4), "(3 and 4 over sqrt(12.5) = 3.5355)")

# %% [markdown]
# Vectorised over rows (each tree step is one NumPy addition of two halves), and checked against transformers'
# Qwen3RMSNorm, stored in `exercises/references/ch11_cupy.npz` by `make_ch11_cupy.py`:


# %%
def rms_norm_tree(x, weight, eps, threads=128):  # [R, d], [d] -> [R, d]
    R, d = x.shape
    padded = np.zeros((R, -(-d // threads) * threads), np.float32)
    padded[:, :d] = x * x
    partial = padded.reshape(R, -1, threads).sum(1)  # [R, threads]: thread t's strided sum
    while partial.shape[1] > 1:
        partial = partial[:, : partial.shape[1] // 2] + partial[:, partial.shape[1] // 2 :]
    return x / np.sqrt(partial / np.float32(d) + np.float32(eps)) * weight


REF = np.load(REPO / "exercises/references/ch11_cupy.npz")
for case in ("odd", "head", "wide"):
    x, w, want = REF[f"rmsnorm.{case}.x"], REF[f"rmsnorm.{case}.weight"], REF[f"rmsnorm.{case}.y"]
    got = rms_norm_tree(x, w, 1e-6)
    print(
        f"{case:4s} x {list(x.shape)}: max |Δ| vs transformers {np.abs(got - want).max():.1e} "
        f"(values up to {np.abs(want).max():.1f}); vs tinyqwen.norm {np.abs(got - norm.rms_norm(x, w, 1e-6)).max():.1e}"
    )

# %% [markdown]
# The production kernel, `backends/cuda/norm.cu`, is the same idea with a faster reduction: the 32 threads of a
# warp add their values through registers (`__shfl_xor_sync`, no shared memory), and only one value per warp goes
# through shared memory. It is also the QK-Norm kernel: a "row" is then one head of `head_dim` = 128 values.

# %% [markdown]
# ## 5. Writing a RoPE kernel
#
# RoPE ([chapter 4](04-rope-yarn.ipynb)) rotates channel pairs $(j, j + d/2)$ of every query and key:
#
# $$\begin{aligned} y_j &= x_j \cos_j - x_{j+d/2} \sin_j \\ y_{j+d/2} &= x_{j+d/2} \cos_{j+d/2} + x_j \sin_{j+d/2} \end{aligned}$$
#
# Pairs are independent, so each thread takes one. The whole difficulty is index arithmetic: thread $i$ must find
# its pair $j$, its row $r$ of the $[B, H, T, d]$ tensor, and that row's position $t$ and batch entry $b$ — whose
# angles are in `cos[b, t]`. With $r$ running over $(b, h, t)$: $j = i \bmod (d/2)$, $r = i \div (d/2)$,
# $t = r \bmod T$, $b = r \div (T H)$. The picture shows which thread writes which value for $B = 2, H = 2, T = 3,
# d = 8$:

# %%
B, H, T, d = 2, 2, 3, 8
owner = np.zeros((B * H * T, d), int)
i = np.arange(B * H * T * d // 2)
owner[i // (d // 2), i % (d // 2)] = i
owner[i // (d // 2), i % (d // 2) + d // 2] = i  # the same thread writes both halves of its pair
fig, ax = plt.subplots(figsize=(6, 4))
ax.imshow(owner, cmap="tab20")
for (r, c), v in np.ndenumerate(owner):
    ax.text(c, r, v, ha="center", va="center", fontsize=7)
ax.set(
    xlabel="channel j (pairs j and j + d/2 share a thread)",
    ylabel="row r = (b, h, t)",
    title="RoPE: the thread that writes each value",
    yticks=range(B * H * T),
    yticklabels=[f"b{r // (T * H)} h{r // T % H} t{r % T}" for r in range(B * H * T)],
)
plt.show()

# %% [markdown]
# The kernel is those four lines of index arithmetic plus the two formulas:

# %%
ROPE = r"""
extern "C" __global__ void rope_f32(const float* x, const float* cos, const float* sin, float* out,
                                    int B, int H, int T, int d) {
    const int half = d / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * H * T * half) return;           // spare threads of the last block
    const int j = i % half;
    const long long r = i / half;                            // row (b, h, t)
    const int t = r % T, b = r / ((long long)T * H);
    const float* c = cos + ((long long)b * T + t) * d;
    const float* s = sin + ((long long)b * T + t) * d;
    const float a = x[r * d + j], e = x[r * d + j + half];
    out[r * d + j] = a * c[j] - e * s[j];
    out[r * d + j + half] = e * c[j + half] + a * s[j + half];
}
"""
print(
    [
        f"{a}: {len(cupy_backend.compile_ptx(ROPE, a, name='rope.cu'))} bytes of PTX"
        for a in cupy_backend.ARCHITECTURES
    ]
    if NVRTC is None
    else f"(not compiled: {NVRTC})"
)

# %% [markdown]
# Its twin runs "all threads at once": the same index arithmetic on `np.arange` of every thread index.


# %%
def rope_threads(x, cos, sin):  # [B, H, T, d], [B, T, d] x2 -> [B, H, T, d]
    B, H, T, d = x.shape
    half = d // 2
    i = np.arange(B * H * T * half)
    j, r = i % half, i // half
    t, b = r % T, r // (T * H)
    xs, cs, ss = x.reshape(-1, d), cos.reshape(-1, d), sin.reshape(-1, d)
    a, e = xs[r, j], xs[r, j + half]
    out = np.empty_like(xs)
    out[r, j] = a * cs[b * T + t, j] - e * ss[b * T + t, j]
    out[r, j + half] = e * cs[b * T + t, j + half] + a * ss[b * T + t, j + half]
    return out.reshape(x.shape)


got = rope_threads(REF["rope.x"], REF["rope.cos"], REF["rope.sin"])
print(
    f"x {list(REF['rope.x'].shape)}: max |Δ| vs transformers {np.abs(got - REF['rope.y']).max():.1e}, "
    f"vs tinyqwen.rope {np.abs(got - rope.apply_rope(REF['rope.x'], REF['rope.cos'], REF['rope.sin'])).max():.1e}"
)

# %% [markdown]
# The reference rows sit at positions 0–4 and 7–11, so a kernel that reads the wrong batch entry's angles
# (forgetting to divide by $H$ in $b$) gets a different answer — one of the exercises' planted mistakes.

# %% [markdown]
# ## 6. cuBLAS for the matrix products
#
# Matrix products are where the flops are, and NVIDIA's cuBLAS library does them near the roofline with tiling,
# tensor cores and years of tuning; we do not write our own GEMM. `cupy.matmul` calls it. tinyqwen keeps float32
# activations and accumulates in float32 (CuPy uses plain fp32, not TF32, unless `CUPY_TF32=1` is set), so the
# logits agree with transformers to ~1e-5.
#
# The one product we *do* write is decode's: with one token, a product is a GEMV, bandwidth-bound, and the weights
# are bf16. cuBLAS's fp32 GEMV would need a float32 copy of every weight — twice the bytes. Our `gemv_bf16` kernel
# gives one warp per output row, reads the bf16 weights directly (2 bytes each, consecutive lanes on consecutive
# weights) and widens them in registers. So `linear` picks by the number of token rows $M$:


# %%
def plan(M, weight_bf16=True, gemv_max_rows=cupy_backend.GEMV_MAX_ROWS):  # what linear() runs
    if not weight_bf16:
        return "cuBLAS SGEMM on the float32 weight"
    if M <= gemv_max_rows:
        return "gemv_bf16 kernel: streams the bf16 weight once for all M rows"
    return "widen_bf16 a block of the weight to float32, then cuBLAS SGEMM (compute-bound: the copy is cheap)"


for M in (1, 8, 2048):
    print(f"M = {M:5d}: {plan(M)}")

# %% [markdown]
# The flops per byte explain the split: for a $[N, K]$ bf16 weight and $M$ rows, a product does $2MNK$ flops on
# $2NK$ bytes of weight — intensity $M$. Below the ridge point (~300) bandwidth rules and reading bf16 matters;
# far above it (prefill) widening costs one extra pass over the weight and the GEMM is the work.

# %% [markdown]
# ## 7. Sampling on the device
#
# After the last layer, the logits are a $[\text{vocab}]$ vector on the GPU: 151,936 floats, 608 KB for Qwen3. Copying
# them to the CPU to pick a token costs a PCIe transfer *and* a synchronisation every step. Picking the token on the
# GPU sends back 8 bytes. Greedy decoding is an arg-max (a block-wide reduction, lowest id on ties, as `np.argmax`).
# Temperature sampling is the inverse CDF of [chapter 8](08-kv-cache-generation.ipynb): with weights
# $p_i \propto e^{(l_i - \max l)/T}$, the first id whose cumulative weight exceeds $u \cdot \sum p$, for one uniform $u$.
#
# A GPU cannot scan 151,936 values with one thread quickly, so `sample_rows` splits the vocabulary into 256
# contiguous chunks, one per thread: each thread sums its chunk, one thread scans the 256 chunk sums to find the
# chunk holding the target, then walks that chunk alone.


# %%
def sample_chunked(logits, temperature, u, threads=256):  # [V] -> id, as sample_rows does it
    V = logits.size
    weights = np.exp((logits - logits.max()) / np.float32(temperature))
    chunk = -(-V // threads)
    sums = [weights[c * chunk : (c + 1) * chunk].sum() for c in range(threads)]
    target, cumulative, c = u * sum(sums), 0.0, 0
    while c < threads - 1 and cumulative + sums[c] <= target:  # find the chunk
        cumulative, c = cumulative + sums[c], c + 1
    for i in range(c * chunk, min(V, (c + 1) * chunk)):  # walk inside it
        cumulative += weights[i]
        if cumulative > target:
            return i
    return min(V, (c + 1) * chunk) - 1


logits = np.log(np.array([0.1, 0.2, 0.7], np.float32))
print([sample_chunked(logits, 1.0, u, threads=2) for u in (0.05, 0.25, 0.5)], "(probabilities 0.1, 0.2, 0.7)")

# %% [markdown]
# Does it draw the right distribution? 20,000 draws on made-up logits, against $\text{softmax}(l / T)$ — here with
# the backend's twin of the kernel, `NumpyTwins.sample`, which takes a row of $u$'s at once:

# %%
twins = cupy_backend.NumpyTwins()
logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5], np.float32)
ids = twins.sample(
    np.tile(logits, (20_000, 1)), 0.8, np.random.default_rng(0).random(20_000).astype(np.float32)
)
p = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(np.arange(6) - 0.2, p, 0.4, label="softmax(logits / 0.8)")
ax.bar(np.arange(6) + 0.2, np.bincount(ids, minlength=6) / ids.size, 0.4, label="20,000 inverse-CDF draws")
ax.set(xlabel="token id", ylabel="probability", title="Device sampling (its NumPy twin) draws the softmax")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ### Every sampling option on the device
#
# Temperature alone is rarely what a Qwen3 model is run with: its model card recommends top-k 20, top-p 0.95
# (thinking mode), and a server adds repetition, presence and frequency penalties. [Chapter 8](08-kv-cache-generation.ipynb)
# applies them on the CPU in a fixed order (transformers'): penalties → temperature → top-k → top-p → min-p →
# inverse CDF. To keep only 8 bytes crossing per step, all of it must run on the GPU — and give *the same token*
# as the CPU for the same random number $u$, ties and all.
#
# The penalties are easy: the GPU keeps, per vocabulary id, a "seen" flag (prompt + output) and an output count,
# and the sampling kernel updates them with the id it picks. The filters are the interesting part. The obvious
# top-p is "sort the 151,936 probabilities, cumsum, cut" — a full sort per token. But look at what the filters
# keep: in the order *value descending, id ascending*, every filter keeps a **prefix**. So we never need the
# order, only where the prefix ends — one value $t$ (and, when the cut falls among equal values, how many of them).
#
# **Radix select** finds $t$ without sorting. Map each float64 value to a 64-bit unsigned key that sorts like
# the value (flip the bits of negatives; set the sign bit of positives). Then fix the key one byte at a time,
# most significant first: histogram the next byte of the candidates into 256 bins, walk the bins from the top
# until the count (top-k) or the probability mass (top-p) is reached, and keep only that bin's candidates.
# Eight passes pin the exact key. A loop version for top-k:


# %%
def radix_select_kth(keys, k):  # [n] uint64, k -> the k-th largest key, and the candidates before each pass
    prefix, fixed, candidates = 0, 0, []
    for shift in range(56, -1, -8):
        live = keys[(keys & np.uint64(fixed)) == np.uint64(prefix)]
        candidates.append(live.size)
        bins = np.bincount(((live >> np.uint64(shift)) & np.uint64(255)).astype(int), minlength=256)
        d = 255
        while bins[d] < k:  # from the largest byte down, until k keys are above or in bin d
            k, d = k - bins[d], d - 1
        prefix, fixed = prefix | d << shift, fixed | 255 << shift
    return prefix, candidates


# %% [markdown]
# On a Qwen-sized row of logits, against NumPy's sort:

# %%
x = np.random.default_rng(0).standard_normal(151_936) * 2.5  # made-up logits / T, float64
keys = cupy_backend.order_keys(x)
for k in (1, 20, 1000):
    key, candidates = radix_select_kth(keys, k)
    assert cupy_backend.key_value(key) == np.sort(x)[-k]
    print(
        f"top-{k:<4}: the cut {cupy_backend.key_value(key):.4f} = np.sort(x)[-{k}]; candidates per pass {candidates}"
    )

# %% [markdown]
# The first byte (the sign and the top of the exponent) leaves a fifth of the row, the second a few dozen, the third
# one: the remaining passes only finish spelling out that one key. The picture, for top-k 20:

# %%
_, candidates = radix_select_kth(keys, 20)
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(range(1, 9), candidates, color="tab:blue")
for i, n in enumerate(candidates, 1):
    ax.text(i, n, f"{n:,}", ha="center", va="bottom", fontsize=8)
ax.set(yscale="log", ylim=(0.5, 1e6), xlabel="pass (byte of the key, most significant first)",
       ylabel="candidates histogrammed", title="Radix select: the top-20 cut of 151,936 logits, no sort")  # fmt: skip
plt.show()

# %% [markdown]
# On the GPU one block of 1,024 threads handles a row: each pass, every thread histograms its share of the row
# into 256 shared-memory bins with `atomicAdd`, and one thread walks the bins. For top-p the bins add up
# probability mass instead of counts, and the walk keeps the last bin whose first token has less than $p$ before
# it. The masses are **fixed-point integers**, $	ext{round}(p_i \cdot 2^{60})$: atomic float additions happen in
# a different order every run (and float addition is not associative), integer ones give the same sum whatever
# the order, so a seeded run picks the same token every time. Min-p needs no search — a threshold on each
# probability. The draw is the chunked inverse CDF above, over the kept tokens only, with $u$ from the CPU's
# seeded generator (one float per step, CPU → GPU) so that the token equals the CPU sampler's.
#
# All of it is in `backends/cuda/filter.cu`; its twin, `cupy_backend.filter_sample_row`, runs the same passes in
# NumPy. (The kernel reads the whole row in each of its passes: simple, and the row sits in the GPU's L2 cache.
# Copying the few survivors of the second pass into shared memory would save most of that reading; that is the
# next step once a GPU can measure it — none has yet.) Against chapter 8's sampler on random rows with random knobs
# (ties included), given the same $u$:

# %%
from tinyqwen import sampling  # noqa: E402


def on_device(logits, params, prompt, output, u):  # one step of DeviceSampler, as generation runs it
    sampler = cupy_backend.DeviceSampler(twins, params, [prompt], vocab=logits.size)
    for t in output:  # earlier output: taken as "forced" ids, which records them for the penalties
        sampler.choose(logits[None], [0.0], [t])
    return int(sampler.choose(logits[None], [u], [cupy_backend.CHOOSE])[0])


r = np.random.default_rng(1)
same = 0
for _ in range(300):
    logits = (r.integers(-3, 4, 50) if r.random() < 0.5 else r.standard_normal(50)).astype(
        np.float32
    )  # ties, or not
    params = sampling.SamplingParams(
        temperature=float(r.choice([0.0, 0.6, 1.0])), top_k=int(r.choice([0, 1, 20])),
        top_p=float(r.choice([1.0, 0.95, 0.3])), min_p=float(r.choice([0.0, 0.1])),
        repetition_penalty=float(r.choice([1.0, 1.3])), frequency_penalty=float(r.choice([0.0, 0.5])),
    )  # fmt: skip
    seed, prompt, output = int(r.integers(1 << 30)), [0, 1], r.integers(0, 50, 3).tolist()
    want = sampling.sample(
        logits, np.random.default_rng(seed), params, prompt, output
    )  # chapter 8, on the CPU
    same += on_device(logits, params, prompt, output, np.random.default_rng(seed).random()) == want
print(f"{same} of 300 random rows: the device pipeline's twin picks chapter 8's token")

# %% [markdown]
# `tinyqwen.generate` uses this sampler by itself on the cupy backend (and on its stand-in), so
# `tinyqwen generate --backend cupy` samples on the GPU with whatever options it is given.

# %% [markdown]
# ## 8. The whole backend, without a GPU
#
# `backends/cupy/` writes the orchestration once, against an *ops* object: which kernel runs on which
# shapes, the KV cache in device memory, bf16 weights kept as bits, MoE tokens routed and gathered, the token
# sampled. `CudaKernels` launches the `.cu` kernels on CuPy arrays; `NumpyTwins` computes each kernel's result in
# NumPy. `make_backend(NumpyTwins())` — the *stand-in* — runs everything but the kernels themselves, on any machine.
#
# Every kernel compiles for every target (CI checks this on every commit):

# %%
start = time.perf_counter()
compiled = {(f, a): cupy_backend.compile_ptx(cupy_backend.KERNEL_DIR / f, a)
            for f in cupy_backend.KERNELS for a in cupy_backend.ARCHITECTURES if NVRTC is None}  # fmt: skip
entries = sum(len(names) for names in cupy_backend.KERNELS.values())
print(
    f"{len(cupy_backend.KERNELS)} sources, {entries} kernels, compiled for {', '.join(cupy_backend.ARCHITECTURES)} "
    f"in {time.perf_counter() - start:.1f} s"
    if NVRTC is None
    else f"{len(cupy_backend.KERNELS)} sources, {entries} kernels (not compiled: {NVRTC})"
)

# %% [markdown]
# Now a real fixture checkpoint (a tiny random Qwen3-MoE with bf16 weights, from transformers) on the stand-in. To
# see the orchestration, we wrap the ops and count the kernel launches of one decode step:

# %%
import tinyqwen  # noqa: E402
from tinyqwen.config import load_config  # noqa: E402
from tinyqwen.model import Qwen3, load_weights  # noqa: E402
from tinyqwen.checkpoint import Checkpoint  # noqa: E402


class Counting(cupy_backend.NumpyTwins):
    def __init__(self):
        self.launches = {}

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if callable(value) and name not in ("to_numpy", "rng", "uniform") and not name.startswith("_"):
            counts = object.__getattribute__(self, "launches")
            counts[name] = counts.get(name, 0) + 1
        return value


def standin_model(fixture, ops):
    path = REPO / "tests/fixtures" / fixture
    backend, config = cupy_backend.make_backend(ops), load_config(path)
    with Checkpoint(path) as checkpoint:
        weights = load_weights(checkpoint, config, backend.prepare, progress=False, keep_bf16=True)
    return Qwen3(config, weights, backend, path=path)


ops = Counting()
model = standin_model("moe-sparse-step", ops)
cache = model.new_cache(1, 16)
model.forward(np.array([[1, 2, 3, 4]]), cache=cache)  # prefill
ops.launches.clear()
model.forward(np.array([[5]]), cache=cache, last_only=True)  # one decode step
print(
    f"{model.config.num_hidden_layers} layers (MoE every {model.config.decoder_sparse_step}nd); one decode step:"
)
print(dict(sorted(ops.launches.items(), key=lambda kv: -kv[1])))

# %% [markdown]
# Per layer: RMSNorm before attention, QK-Norm on q and k, RoPE on both, decode attention over the cache; another
# RMSNorm; then SwiGLU (two GEMVs, SiLU·mul, a GEMV) or, in MoE layers, the router GEMV, routing, a gather, three
# expert GEMVs and the combine. (On the GPU, the float32 router and F32-checkpoint products are cuBLAS calls,
# not counted here.) Nothing in a decode step waits for the CPU.
#
# And the stand-in's logits against transformers', on this fixture, prefill and then token by token through the
# device KV cache:

# %%
from tinyqwen.verify import tolerance  # noqa: E402

ref = np.load(REPO / "tests/fixtures/moe-sparse-step/reference.npz")
ids = ref["input_ids"]
cache = model.new_cache(*ids.shape)
steps = [model.forward(ids[:, :5], cache=cache).logits]
steps += [model.forward(ids[:, t : t + 1], cache=cache).logits for t in range(5, ids.shape[1])]
delta = np.abs(np.concatenate(steps, 1) - ref["logits"]).max()
print(
    f"logits {list(ref['logits'].shape)}: max |Δ| = {delta:.1e} ≤ {tolerance(ref['logits']):.1e} (tinyqwen's bar)"
)

# %% [markdown]
# ## 9. Testing a GPU kernel without a GPU
#
# A twin checks the *math* a kernel should do; it cannot check the kernel. A block reduction that forgets a
# `__syncthreads`, a stride computed for 4-byte items and handed a 2-byte cache, a launch that covers only the first 8
# rows: the twin, written again in NumPy, has none of these bugs, so a test against it passes. To check the kernel
# itself we need to *run its C source* — and C source runs on a CPU too, once something provides what CUDA provides.
#
# That something is `tests/cuda_executor`, a testing tool of this project (it lives with the tests, not in tinyqwen):
#
# * **a header** (`cuda_cpu.h`, force-included by g++) defines `threadIdx`, `blockIdx`, `blockDim`, `gridDim`,
#   `__syncthreads`, the warp shuffles, atomics, bf16 and fp16 conversions, math intrinsics, and shared memory
#   (`__shared__` variables become statics shared by a block's threads; `extern __shared__` arrays point to a buffer
#   of the launch's size).
# * **threads as fibers.** Each CUDA thread of a block gets its own small stack and runs as a *fiber*: a function
#   that can pause and be resumed later. The fibers take turns on one CPU core; a thread runs until it reaches a
#   synchronisation point, then the next one runs. That is what makes a barrier *real*: `__syncthreads` parks the
#   thread until every thread of its block has parked at the same barrier. A warp shuffle parks the lane until every
#   lane named in its mask has posted its value — only its own warp waits, as on the GPU.
# * **misuse is an error, not a silent wrong answer**: a barrier that some thread never reaches (it returned early),
#   a shuffle that reads a lane outside its mask or one that has exited, a deadlock — each stops the launch with a
#   message. A build with AddressSanitizer catches reads and writes outside an array.
# * **launches go through the backend's own code.** `CudaKernels(xp, module)` takes its array namespace and its
#   module loader: on a GPU `cupy` and `cupy.RawModule`; here the executor's device arrays (NumPy arrays that refuse
#   to mix with host arrays, as CuPy's do) and its `RawModule`, which compiles a `.cu` with g++ (once per source: the
#   library is cached by a hash of the source) and launches a kernel with the same `(grid, block, args, shared_mem)`.
#
# So the whole backend runs its real kernels on this CPU:

# %%
sys.path.insert(0, str(REPO / "tests"))  # the executor is a testing tool: it lives with the tests
from cuda_executor import KernelMisuse, RawModule, device, executor_kernels  # noqa: E402

start = time.perf_counter()
real = executor_kernels()  # CudaKernels(xp=device arrays, module=the CPU RawModule)
executed = standin_model("moe-sparse-step", real)
ref = np.load(executed.path / "reference.npz")
delta = np.abs(executed(ref["input_ids"]) - ref["logits"]).max()
print(
    f"moe-sparse-step through the real CUDA kernels, run on the CPU: max |Δ| vs transformers = {delta:.1e} "
    f"(tolerance {tolerance(ref['logits']):.1e}), in {time.perf_counter() - start:.1f} s "
    "(g++ builds are cached by a hash of the source)"
)

# %% [markdown]
# ### A bug the executor catches and a twin cannot
#
# Here is section 4's tree reduction with one line missing: the `__syncthreads()` between two halving steps. A
# NumPy twin of it is still right — NumPy has no threads to race — but the kernel reads `partial[t + half]` before
# the thread that owns it has written it. On the executor the result depends on the order the threads run in, and is
# wrong in both:

# %%
TREE = r"""
extern "C" __global__ void rms_norm_f32(const float* x, const float* weight, float* out, int d, float eps) {
    __shared__ float partial[128];
    const float* row = x + (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) ss += row[j] * row[j];
    partial[threadIdx.x] = ss;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        BARRIER
    }
    const float scale = 1.0f / sqrtf(partial[0] / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[(long long)blockIdx.x * d + j] = row[j] * scale * weight[j];
}
"""
xs = np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32)
ones = np.ones(300, np.float32)
want = norm.rms_norm(xs, ones, 1e-6)
for barrier in ("__syncthreads();", "/* no barrier */"):
    for order in ("forward", "reverse"):
        out = device.empty(xs.shape, np.float32)
        kernel = RawModule(TREE.replace("BARRIER", barrier), order=order).get_function("rms_norm_f32")
        kernel((3,), (128,), (device.asarray(xs), device.asarray(ones), out, np.int32(300), np.float32(1e-6)))
        print(
            f"{barrier:18} {order:8} threads first: max |Δ| vs the reference = {np.abs(out.get() - want).max():.1e}"
        )

# %% [markdown]
# Misuse stops the launch with a message instead of a wrong answer. Here thread 0 leaves before a barrier the others
# wait at (on a GPU: undefined behaviour — a hang, or a barrier that lets the others through early):

# %%
EARLY = r"""
extern "C" __global__ void early(float* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}
"""
try:
    RawModule(EARLY).get_function("early")((1,), (64,), (device.zeros(64, np.float32),))
except KernelMisuse as error:
    print(f"KernelMisuse: {error}")

# %% [markdown]
# The tests run every kernel this way in CI — the kernels against their twins, the whole model against
# transformers on every fixture, every KV cache dtype, a long prompt, NaN inputs, edge shapes — in forward, reverse
# and seeded random thread orders. Running it found seven bugs that a twin could not show (wrong tokens with a bf16
# or fp16 KV cache; long prompts crashing; NaN router logits reading before the expert weights; `gemv_bf16`
# computing only 8 rows; ...), each now with a test.
#
# **Its limits**, worth knowing before trusting a green run:
#
# * arithmetic is the CPU's: `expf` and `exp` come from the C library (within 1 ulp), where CUDA's `expf` is
#   within 2 ulp, so results agree to ~1e-7 relative, not bit for bit; the build turns off FMA contraction
#   (`-ffp-contract=off`), which the GPU's compiler does by default outside the `_rn` intrinsics;
# * `__shared__` variables persist from one block to the next (a GPU gives each block fresh memory): a kernel that
#   reads shared memory before writing it may pass here (dynamic shared memory is refilled with NaN bytes per block,
#   which does catch that);
# * threads switch only at barriers and shuffles, and orders are tried, not all interleavings: a race *between*
#   synchronisation points, or a thread spinning on a flag another thread sets, is not found (the latter hangs);
# * nothing about speed, occupancy, memory coalescing or the real hardware's scheduling: that still needs a GPU.

# %% [markdown]
# ## 10. What to expect on an H100 (not measured here)
#
# No GPU was available to this chapter, so there are **no measured GPU figures** in it. What we can say comes from
# the published specs above, and it is a ceiling, not a prediction. The targets for an H100 are:
# Qwen3-0.6B-shaped decode ≥ 200 tok/s at batch 1, a 2k-token prefill under 100 ms, and Qwen3-30B-A3B's bf16
# weights fitting on one 80 GB GPU. On a machine with a GPU, measure with
#
# ```bash
# pytest -m gpu tests/test_cupy_backend.py       # the kernels against their twins, the model against transformers
# tinyqwen bench --model Qwen/Qwen3-0.6B --backend cupy --prompt-tokens 2048
# ```
#
# (`bench` reports prefill and decode tok/s and the achieved HBM bandwidth as a share of the GPU's own peak.)

# %%
names = list(configs)
ceiling = [decode_ceiling(decode_params(c), 2, BW, PEAK_BF16) for c in configs.values()]
weights_gb = [count_parameters(c) * 2 / 1e9 for c in configs.values()]
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
a1.bar(names, ceiling, color="tab:blue")
a1.axhline(200, color="tab:red", ls="--", label="issue's target for 0.6B: 200 tok/s")
a1.set(ylabel="tokens/s", title="decode ceiling, batch 1, bf16\n(from published specs, NOT measured)")
a1.legend(fontsize=7)
a2.bar(names, weights_gb, color="tab:green")
a2.axhline(80, color="tab:red", ls="--", label="one H100: 80 GB")
a2.set(ylabel="GB", title="bf16 weights on the GPU\n(computed from config.json)")
a2.legend(fontsize=7)
for a in (a1, a2):
    a.tick_params(axis="x", labelsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 11. Checkpoint: the backend against transformers
#
# The last cell checks the chapter on every fixture: each kernel compiled for every architecture; the cupy
# backend's orchestration (with the kernels' NumPy twins) gives transformers' logits, one call and token by token
# through the KV cache; greedy generation with the token picked "on the device" gives transformers' tokens; and
# sampling on the device with Qwen's thinking preset and penalties gives the CPU sampler's tokens for the same seed.

# %%
assert all(".entry" in p for p in compiled.values())
assert len(compiled) == len(cupy_backend.ARCHITECTURES) * len(cupy_backend.KERNELS)
worst = 0.0
for fixture in ("dense-tied", "dense-untied-bf16-sharded", "dense-yarn", "moe-norm-topk", "moe-sparse-step"):
    model = standin_model(fixture, cupy_backend.NumpyTwins())
    ref = np.load(model.path / "reference.npz")
    delta = np.abs(model(ref["input_ids"]) - ref["logits"]).max()
    assert delta <= tolerance(ref["logits"]), (fixture, delta)
    worst = max(worst, delta / tolerance(ref["logits"]))
    gen = json.loads((model.path / "generate.json").read_text())
    for prompt, expected in zip(gen["prompts"], gen["single"], strict=True):
        assert cupy_backend.generate_on_device(model, prompt, gen["max_new_tokens"]) == expected
    knobs = {"top_k": 20, "top_p": 0.95, "min_p": 0.0, "repetition_penalty": 1.1, "presence_penalty": 0.5}
    host = tinyqwen.generate(model, prompt, 8, 0.6, eos_token_ids=(), seed=0, device_sampling=False, **knobs)
    assert (
        cupy_backend.generate_on_device(model, prompt, 8, 0.6, 0, **knobs) == host
    )  # Qwen's thinking preset
print(
    f"{len(compiled)} compilations ({len(cupy_backend.KERNELS)} sources × {len(cupy_backend.ARCHITECTURES)} "
    "architectures) OK; on all 5 "
    f"fixtures the stand-in's logits are within {worst:.0%} of the tolerance (1e-5 × max|logit|) of transformers', "
    "device-side greedy generation equals transformers' tokens, and device-side sampling (top-k, top-p, "
    "penalties) equals the CPU sampler's"
)

# %% [markdown]
# ## Summary
#
# * On a GPU the weights live in HBM (3.35 TB/s on an H100); decode streams all of them per token, at intensity
#   ~1 flop/byte, far below the ridge point (~295): **bandwidth-bound**. Prefill and big batches are compute-bound.
# * A CUDA kernel is one function run by a grid of blocks of threads. Row-wise work gets a block per row and a
#   shared-memory (or warp-shuffle) reduction (RMSNorm); element-wise work gets a thread per element (RoPE), and
#   the index arithmetic is the part to get right.
# * cuBLAS does the GEMMs; we write only decode's bf16 GEMV, which reads 2 bytes per weight.
# * Sampling on the device returns 8 bytes per step instead of the 608 KB of logits — with every option: the
#   filters keep a prefix of the sorted order, so radix select finds the cut in 8 passes without sorting, and
#   fixed-point masses make the result the same on every run, and the same as the CPU's for the same $u$.
# * Every kernel compiles with NVRTC without a GPU, and every kernel has a NumPy twin, so the backend's whole
#   orchestration is checked against transformers on a CPU. Only the kernels' own arithmetic on a GPU — and every
#   speed figure — needs the hardware; none was measured here.
#
# ## Exercises
#
# Fill in `exercises/ch11_cupy.py` (`decode_ceiling`, `rms_norm_kernel`, `rms_norm_blocked`, `rope_kernel`,
# `rope_by_thread`, `sample_inverse_cdf`, `order_key`, `top_k_cut`; each docstring has a worked example). Then run
#
# ```bash
# pytest exercises/test_ch11_cupy.py
# ```
#
# Your CUDA sources are compiled by NVRTC for every architecture and run on the CPU executor of section 9 (and on
# the GPU where there is one); your twins are graded against transformers, and the last checkpoint runs the dense-yarn fixture on
# the cupy backend's orchestration with your twins as its RMSNorm and RoPE. Your radix select is graded against
# `torch.topk` on ties, on values of both signs from 1e-300 to 1e300, and on a row of logits.
