// cuda_cpu.h: the CUDA built-ins tinyqwen's kernels use, for running them on a CPU (force-included by g++).
//
// Each CUDA thread of a block is a cooperative fiber (ucontext) with its own stack; a block's fibers run one at a
// time and switch only at synchronisation points, so a barrier or a warp shuffle really waits for the threads it
// names and nothing else:
//   __syncthreads      the fiber parks; when every live thread of the block is parked at the same barrier they all
//                      go on. A thread that has exited while others wait, or threads at different barriers: error.
//   __shfl_*_sync      the lane posts its value and parks until every lane of `mask` has posted; then each reads
//                      its source lane's value. Only its own warp waits. A lane outside the mask, a source lane
//                      outside it, a lane of the mask that exited or does not exist (partial warp): error.
//   deadlock           no fiber can run and they are not all at one barrier: error, naming who waits where.
// Atomics are plain read-modify-writes (fibers never switch inside one). __shared__ variables are function-local
// statics: they persist from one block to the next (CUDA gives each block fresh, uninitialised memory); dynamic
// shared memory (`extern __shared__ T x[]`, rewritten by the launcher) is refilled with NaN bytes for every block.
// Fibers run in a chosen order (forward, reverse, or a seeded shuffle each round) to expose order dependence.
// Arithmetic is the host's: float/double operations are IEEE (compile with -ffp-contract=off, as the _rn
// intrinsics ask); expf/exp are libm's, within 1 ulp, where CUDA's expf is within 2 ulp.
#pragma once
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define TQ_ASAN 1
#else
#define TQ_ASAN 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define warpSize 32

struct dim3 {
    unsigned x, y, z;
};
typedef dim3 uint3;

static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

namespace tq {

enum State { RUNNABLE, AT_BARRIER, AT_SHUFFLE, EXITED };

struct Fiber {
    ucontext_t ctx;  // how the fiber starts (makecontext); after that it switches with _setjmp / _longjmp
    jmp_buf resume;
    bool started;
    State state;
    int barrier_line;
    uint3 idx;
    unsigned shfl_mask;
    int shfl_src;
    bool shfl_done;
    uint64_t shfl_value, shfl_result;
    void* fake_stack;
};

struct Launch {
    std::vector<Fiber> fibers;
    std::vector<unsigned> posted;  // per warp: lanes that posted a value to a shuffle not yet complete
    char* stacks = nullptr;
    size_t stack_size = 0, stacks_bytes = 0;
    jmp_buf scheduler;
    ucontext_t blank;  // one getcontext per launch, copied for every fiber
    const void* scheduler_bottom = nullptr;
    size_t scheduler_size = 0;
    int current = -1, threads = 0;
    void (*body)(void**) = nullptr;
    void** args = nullptr;
    char* error = nullptr;
    size_t error_size = 0;
    bool failed = false;
};

static Launch* L = nullptr;
static char* dynamic_shared = nullptr;

static inline Fiber& me() { return L->fibers[L->current]; }

// switching: the ASan annotations tell AddressSanitizer which stack is live (no false reports across switches)
// (_setjmp/_longjmp: no signal-mask system call per switch, which swapcontext makes; setcontext starts a fiber)
static inline void to_scheduler(bool dying) {
    Fiber& f = me();
#if TQ_ASAN
    __sanitizer_start_switch_fiber(dying ? nullptr : &f.fake_stack, L->scheduler_bottom, L->scheduler_size);
#endif
    if (!_setjmp(f.resume)) _longjmp(L->scheduler, 1);
#if TQ_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
    (void)dying;
}

static inline void to_fiber(int i) {
    L->current = i;
    Fiber& f = L->fibers[i];
    threadIdx = f.idx;
#if TQ_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, L->stacks + (size_t)i * L->stack_size, L->stack_size);
#endif
    if (!_setjmp(L->scheduler)) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.ctx);
        }
        _longjmp(f.resume, 1);
    }
#if TQ_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// misuse: record the first error and leave this fiber for good (the launch is abandoned)
__attribute__((format(printf, 1, 2))) static void fail(const char* format, ...) {
    if (!L->failed) {
        va_list ap;
        va_start(ap, format);
        vsnprintf(L->error, L->error_size, format, ap);
        va_end(ap);
        L->failed = true;
    }
    if (L->current >= 0) to_scheduler(true);
}

static void fiber_main() {
#if TQ_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L->scheduler_bottom, &L->scheduler_size);
#endif
    L->body(L->args);
    me().state = EXITED;
    to_scheduler(true);
}

static inline int lane_of(int t) { return t & 31; }

static inline int exists(int warp, int lane) { return warp * 32 + lane < L->threads; }

// ------------------------------------------------------------------------------------------------- barriers

static inline void syncthreads(int line) {
    Fiber& f = me();
    f.state = AT_BARRIER;
    f.barrier_line = line;
    to_scheduler(false);
}

// ------------------------------------------------------------------------------------------------- shuffles

static uint64_t exchange(unsigned mask, uint64_t value, int src, const char* what) {
    const int t = L->current, warp = t / 32, lane = lane_of(t);
    if (!((mask >> lane) & 1u))
        fail("thread %d (warp %d, lane %d) calls %s with mask 0x%08x, which leaves out its own lane", t, warp, lane,
             what, mask);
    if (!((mask >> src) & 1u))
        fail("thread %d (warp %d, lane %d): %s reads lane %d, which is not in the mask 0x%08x (inactive)", t, warp,
             lane, what, src, mask);
    Fiber& f = me();
    f.shfl_mask = mask;
    f.shfl_src = src;
    f.shfl_value = value;
    f.shfl_done = false;
    f.state = AT_SHUFFLE;
    L->posted[warp] |= 1u << lane;
    if ((L->posted[warp] & mask) == mask) {  // the last lane of the mask: hand every lane its source's value
        for (int l = 0; l < 32; ++l) {
            if (!((mask >> l) & 1u)) continue;
            Fiber& g = L->fibers[warp * 32 + l];
            if (g.shfl_mask != mask)
                fail("warp %d: lanes %d and %d meet in a shuffle with different masks 0x%08x and 0x%08x", warp, lane,
                     l, mask, g.shfl_mask);
            g.shfl_result = L->fibers[warp * 32 + g.shfl_src].shfl_value;
            g.shfl_done = true;
        }
        L->posted[warp] &= ~mask;
    } else {
        for (int l = 0; l < 32; ++l)
            if (((mask >> l) & 1u) && (!exists(warp, l) || L->fibers[warp * 32 + l].state == EXITED))
                fail("thread %d (warp %d, lane %d): %s waits for lane %d, which %s", t, warp, lane, what, l,
                     exists(warp, l) ? "has exited" : "does not exist (a partial warp)");
        to_scheduler(false);
    }
    f.state = RUNNABLE;
    return f.shfl_result;
}

template <typename T>
static inline T shuffle(unsigned mask, T v, int src, const char* what) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = exchange(mask, bits, src, what);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

// ------------------------------------------------------------------------------------------------- the launch

static unsigned long long next_random(unsigned long long& s) {  // splitmix64
    unsigned long long z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void permute(std::vector<int>& order, int how, unsigned long long& seed) {
    for (size_t i = 0; i < order.size(); ++i) order[i] = how == 1 ? (int)(order.size() - 1 - i) : (int)i;
    if (how == 2)
        for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[next_random(seed) % i]);
}

static void run_block(int how, unsigned long long& seed, size_t shared) {
    const int n = L->threads;
    if (shared) memset(dynamic_shared, 0xff, shared);  // NaN bytes: a read before any write shows
    for (auto& w : L->posted) w = 0;
    for (int t = 0; t < n; ++t) {
        Fiber& f = L->fibers[t];
        f.ctx = L->blank;
        f.started = false;
        f.ctx.uc_stack.ss_sp = L->stacks + (size_t)t * L->stack_size;
        f.ctx.uc_stack.ss_size = L->stack_size;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
        f.state = RUNNABLE;
        f.idx = {(unsigned)(t % blockDim.x), (unsigned)(t / blockDim.x % blockDim.y),
                 (unsigned)(t / (blockDim.x * blockDim.y))};
        f.fake_stack = nullptr;
    }
    std::vector<int> order(n);
    for (;;) {
        permute(order, how, seed);
        bool ran = false;
        for (int t : order) {
            Fiber& f = L->fibers[t];
            if (f.state == AT_SHUFFLE && f.shfl_done) f.state = RUNNABLE;
            if (f.state != RUNNABLE) continue;
            to_fiber(t);
            ran = true;
            if (L->failed) return;
        }
        if (ran) continue;
        int exited = 0, at_barrier = 0, first_exited = -1, first_barrier = -1, waiting = -1;
        for (int t = 0; t < n; ++t) {
            const Fiber& f = L->fibers[t];
            if (f.state == EXITED && !exited++) first_exited = t;
            if (f.state == AT_BARRIER && !at_barrier++) first_barrier = t;
            if (f.state == AT_SHUFFLE && waiting < 0) waiting = t;
        }
        L->current = -1;
        if (exited == n) return;
        if (waiting >= 0) {
            const Fiber& f = L->fibers[waiting];
            fail("deadlock in block (%u, %u, %u): thread %d waits in a shuffle (mask 0x%08x) for lanes that never "
                 "come (%d threads at a barrier, %d exited)", blockIdx.x, blockIdx.y, blockIdx.z, waiting,
                 f.shfl_mask, at_barrier, exited);
            return;
        }
        if (exited) {
            fail("__syncthreads at line %d of block (%u, %u, %u) is not reached by every thread: thread %d has "
                 "exited (%d exited, %d wait)", L->fibers[first_barrier].barrier_line, blockIdx.x, blockIdx.y,
                 blockIdx.z, first_exited, exited, at_barrier);
            return;
        }
        for (int t = 0; t < n; ++t)
            if (L->fibers[t].barrier_line != L->fibers[first_barrier].barrier_line) {
                fail("threads of block (%u, %u, %u) wait at different barriers: thread %d at line %d, thread %d at "
                     "line %d", blockIdx.x, blockIdx.y, blockIdx.z, first_barrier,
                     L->fibers[first_barrier].barrier_line, t, L->fibers[t].barrier_line);
                return;
            }
        for (auto& f : L->fibers) f.state = RUNNABLE;
    }
}

// how: 0 forward, 1 reverse, 2 seeded shuffle (blocks and threads alike); returns 0, or 1 with `error` filled
static int launch(const unsigned* grid, const unsigned* block, size_t shared, int how, unsigned long long seed,
                  size_t stack_size, void (*body)(void**), void** args, char* error, size_t error_size) {
    Launch launch;
    launch.body = body;
    launch.args = args;
    launch.error = error;
    launch.error_size = error_size;
    launch.threads = (int)(block[0] * block[1] * block[2]);
    launch.stack_size = stack_size;
    launch.stacks_bytes = stack_size * (size_t)launch.threads;
    // the fibers' stacks stay mapped from one launch to the next: their pages are touched once, not per launch
    static void* stacks = nullptr;
    static size_t mapped = 0;
    if (launch.stacks_bytes > mapped) {
        if (stacks) munmap(stacks, mapped);
        stacks = mmap(nullptr, launch.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
        mapped = stacks == MAP_FAILED ? 0 : launch.stacks_bytes;
        if (stacks == MAP_FAILED) {
            stacks = nullptr;
            snprintf(error, error_size, "cannot map %zu bytes of fiber stacks", launch.stacks_bytes);
            return 1;
        }
    }
    launch.stacks = (char*)stacks;
    launch.fibers.resize(launch.threads);
    launch.posted.resize((launch.threads + 31) / 32);
    L = &launch;
    getcontext(&launch.blank);
    dynamic_shared = shared ? (char*)malloc(shared) : nullptr;
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    const long long blocks = (long long)grid[0] * grid[1] * grid[2];
    std::vector<int> order(blocks);
    permute(order, how, seed);
    for (long long i = 0; i < blocks && !launch.failed; ++i) {
        const long long b = order[i];
        blockIdx = {(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]), (unsigned)(b / (grid[0] * grid[1]))};
        run_block(how, seed, shared);
    }
    free(dynamic_shared);
    dynamic_shared = nullptr;
    L = nullptr;
    return launch.failed ? 1 : 0;
}

}  // namespace tq

// ------------------------------------------------------------------------------------------------- built-ins

#define __syncthreads() tq::syncthreads(__LINE__)

template <typename T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    const int lane = tq::lane_of(tq::L->current);
    return tq::shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)), "__shfl_sync");
}
template <typename T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    const int lane = tq::lane_of(tq::L->current), src = lane ^ lane_mask;
    return tq::shuffle(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane, "__shfl_xor_sync");
}
template <typename T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = tq::lane_of(tq::L->current), src = lane + (int)delta;
    return tq::shuffle(mask, v, (src & ~(width - 1)) == (lane & ~(width - 1)) ? src : lane, "__shfl_down_sync");
}
template <typename T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    const int lane = tq::lane_of(tq::L->current), src = lane - (int)delta;
    return tq::shuffle(mask, v, src >= (lane & ~(width - 1)) ? src : lane, "__shfl_up_sync");
}
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
    tq::shuffle(mask, 0, tq::lane_of(tq::L->current), "__syncwarp");
}

template <typename T, typename U>
static inline T atomicAdd(T* a, U v) { const T old = *a; *a = (T)(old + v); return old; }
template <typename T, typename U>
static inline T atomicSub(T* a, U v) { const T old = *a; *a = (T)(old - v); return old; }
template <typename T, typename U>
static inline T atomicMax(T* a, U v) { const T old = *a; if ((T)v > old) *a = (T)v; return old; }
template <typename T, typename U>
static inline T atomicMin(T* a, U v) { const T old = *a; if ((T)v < old) *a = (T)v; return old; }
template <typename T, typename U>
static inline T atomicExch(T* a, U v) { const T old = *a; *a = (T)v; return old; }
template <typename T, typename U, typename V>
static inline T atomicCAS(T* a, U compare, V v) { const T old = *a; if (old == (T)compare) *a = (T)v; return old; }
template <typename T, typename U>
static inline T atomicOr(T* a, U v) { const T old = *a; *a = old | (T)v; return old; }
template <typename T, typename U>
static inline T atomicAnd(T* a, U v) { const T old = *a; *a = old & (T)v; return old; }

template <typename A, typename B>
static inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type T;
    return (T)a < (T)b ? (T)a : (T)b;
}
template <typename A, typename B>
static inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type T;
    return (T)a > (T)b ? (T)a : (T)b;
}

template <typename To, typename From>
static inline To tq_bits(From v) { To out; memcpy(&out, &v, sizeof(To)); return out; }
static inline float __int_as_float(int v) { return tq_bits<float>(v); }
static inline int __float_as_int(float v) { return tq_bits<int>(v); }
static inline float __uint_as_float(unsigned v) { return tq_bits<float>(v); }
static inline unsigned __float_as_uint(float v) { return tq_bits<unsigned>(v); }
static inline double __longlong_as_double(long long v) { return tq_bits<double>(v); }
static inline long long __double_as_longlong(double v) { return tq_bits<long long>(v); }
// correctly rounded operations, never contracted into an FMA (the file is compiled with -ffp-contract=off)
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fdividef(float a, float b) { return a / b; }
// __expf: glibc declares its own (expf under another name), which stands in for CUDA's fast exponential
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline unsigned long long __double2ull_rn(double x) { return (unsigned long long)nearbyint(x); }
static inline long long __double2ll_rn(double x) { return (long long)nearbyint(x); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }

// bf16 and fp16 as storage: conversions only, no arithmetic operators (sm_75 has no native bf16 arithmetic, and a
// kernel that relies on them does not compile here)
struct __nv_bfloat16 {
    unsigned short __x;
};
struct __half {
    unsigned short __x;
};
static inline float __bfloat162float(__nv_bfloat16 b) { return tq_bits<float>((uint32_t)b.__x << 16); }
static inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u = tq_bits<uint32_t>(f);
    if (isnan(f)) return {(unsigned short)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}
static inline float __half2float(__half h) { return (float)tq_bits<_Float16>(h.__x); }
static inline __half __float2half(float f) { return {tq_bits<unsigned short>((_Float16)f)}; }
