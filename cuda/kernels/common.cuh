// Shared definitions of the emma-rs kernels. NVRTC gets this file as an in-memory header, so the
// kernels need no toolkit headers: bf16 and f16 are 16-bit structs converted with PTX `cvt`.
// Every kernel computes in f32 and rounds its result once to the output type, like the CPU
// reference (tensor crate), whose 16-bit dtypes compute in f32 as well.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define EMMA_INF __int_as_float(0x7f800000)
#define EMMA_NAN __int_as_float(0x7fffffff)

// Most dimensions a strided operand may have.
#define MAX_DIMS 6

struct __align__(2) bf16 {
    u16 bits;
};
struct __align__(2) f16 {
    u16 bits;
};

// ---- conversions -------------------------------------------------------------------------
// The PTX conversions; the emulator (cuda/emulator/emulate.h) defines the same functions bit for
// bit.
#ifndef EMMA_EMULATE
__device__ __forceinline__ float cvt_f32_f16(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 cvt_rn_bf16_f32(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
__device__ __forceinline__ u16 cvt_rn_f16_f32(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
#endif // EMMA_EMULATE

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }
__device__ __forceinline__ float to_float(f16 v) { return cvt_f32_f16(v.bits); }

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float f) { return bf16{cvt_rn_bf16_f32(f)}; }
template <> __device__ __forceinline__ f16 from_float<f16>(float f) { return f16{cvt_rn_f16_f32(f)}; }

// `f` rounded to T and widened again: the value a T tensor would hold.
template <typename T> __device__ __forceinline__ float round_to(float f) {
    return to_float(from_float<T>(f));
}

// ---- dynamic shared memory -------------------------------------------------------------------
// `name` as a T pointer to the block's dynamic shared memory (the launch's `Grid::shared_bytes`,
// 16-byte aligned); at most one per kernel. The emulator's runtime supplies its own.
#ifdef EMMA_EMULATE
#define DYNAMIC_SHARED(T, name) T *name = reinterpret_cast<T *>(emu_dynamic_shared())
#else
#define DYNAMIC_SHARED(T, name)                                                                         \
    extern __shared__ __align__(16) unsigned char emma_dynamic_shared[];                                 \
    T *name = reinterpret_cast<T *>(emma_dynamic_shared)
#endif

// ---- indexing ----------------------------------------------------------------------------
// A strided view: element i of the row-major logical shape lives at sum(index_d * stride[d])
// (strides in elements, relative to the pointer passed with it).
struct Strided {
    int ndim;
    int pad;
    i64 shape[MAX_DIMS];
    i64 stride[MAX_DIMS];
};

__device__ __forceinline__ i64 strided_offset(const Strided &l, u64 i) {
    i64 off = 0;
    for (int d = l.ndim - 1; d >= 0; --d) {
        const u64 s = (u64)l.shape[d];
        off += (i64)(i % s) * l.stride[d];
        i /= s;
    }
    return off;
}

// Up to three operands broadcast to one output shape (stride 0 along broadcast axes).
struct Broadcast {
    int ndim;
    int pad;
    i64 shape[MAX_DIMS];
    i64 stride[3][MAX_DIMS];
};

__device__ __forceinline__ void broadcast_offsets(const Broadcast &l, u64 i, int n, i64 *off) {
    for (int k = 0; k < n; ++k) off[k] = 0;
    for (int d = l.ndim - 1; d >= 0; --d) {
        const u64 s = (u64)l.shape[d];
        const i64 idx = (i64)(i % s);
        i /= s;
        for (int k = 0; k < n; ++k) off[k] += idx * l.stride[k][d];
    }
}

__device__ __forceinline__ u64 global_thread() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_threads() { return (u64)gridDim.x * blockDim.x; }
// The same for whole warps (blockDim.x a multiple of 32): this warp's index and the grid's warps.
__device__ __forceinline__ u64 global_warp() { return (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); }
__device__ __forceinline__ u64 grid_warps() { return (u64)gridDim.x * (blockDim.x >> 5); }

// p[i] widened to f32, or 0 for an absent (null) operand.
template <typename T> __device__ __forceinline__ float value_or_zero(const T *p, u64 i) {
    return p != nullptr ? to_float(p[i]) : 0.f;
}

// ---- 16-byte vectors ---------------------------------------------------------------------
template <typename T> struct __align__(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

__device__ __forceinline__ bool aligned16(const void *p) { return ((u64)p & 15) == 0; }

// y[i] = f(x[i]) over n contiguous elements, 16 bytes at a time when both pointers allow.
template <typename T, typename O, typename F>
__device__ __forceinline__ void map_contiguous(const T *x, O *y, u64 n, F f) {
    constexpr int N = Pack<T>::N;
    const u64 tid = global_thread(), step = grid_threads();
    u64 done = 0;
    if constexpr (sizeof(T) == sizeof(O)) {
        if (aligned16(x) && aligned16(y)) {
            const u64 packs = n / N;
            const Pack<T> *xv = reinterpret_cast<const Pack<T> *>(x);
            Pack<O> *yv = reinterpret_cast<Pack<O> *>(y);
            for (u64 i = tid; i < packs; i += step) {
                const Pack<T> a = xv[i];
                Pack<O> b;
#pragma unroll
                for (int k = 0; k < N; ++k) b.v[k] = f(a.v[k]);
                yv[i] = b;
            }
            done = packs * N;
        }
    }
    for (u64 i = done + tid; i < n; i += step) y[i] = f(x[i]);
}

// out[i] = f(a[i], b[i]) over n contiguous elements, vectorised like map_contiguous.
template <typename T, typename O, typename F>
__device__ __forceinline__ void zip_contiguous(const T *a, const T *b, O *out, u64 n, F f) {
    constexpr int N = Pack<T>::N;
    const u64 tid = global_thread(), step = grid_threads();
    u64 done = 0;
    if constexpr (sizeof(T) == sizeof(O)) {
        if (aligned16(a) && aligned16(b) && aligned16(out)) {
            const u64 packs = n / N;
            const Pack<T> *av = reinterpret_cast<const Pack<T> *>(a);
            const Pack<T> *bv = reinterpret_cast<const Pack<T> *>(b);
            Pack<O> *ov = reinterpret_cast<Pack<O> *>(out);
            for (u64 i = tid; i < packs; i += step) {
                const Pack<T> x = av[i], y = bv[i];
                Pack<O> r;
#pragma unroll
                for (int k = 0; k < N; ++k) r.v[k] = f(x.v[k], y.v[k]);
                ov[i] = r;
            }
            done = packs * N;
        }
    }
    for (u64 i = done + tid; i < n; i += step) out[i] = f(a[i], b[i]);
}

// ---- reductions --------------------------------------------------------------------------
struct SumOp {
    template <typename V> __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};

template <typename V, typename Op> __device__ __forceinline__ V warp_reduce(V v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduces one value per thread over the block (blockDim.x a multiple of 32, at most 1024) and
// returns the result to every thread. Every thread of the block must call it.
template <typename V, typename Op> __device__ V block_reduce(V v, V identity, Op op) {
    __shared__ V partial[33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads(); // the previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        V w = lane < warps ? partial[lane] : identity;
        w = warp_reduce(w, op);
        if (lane == 0) partial[32] = w;
    }
    __syncthreads();
    return partial[32];
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, 0.f, SumOp()); }

// out[m] = sum over p of part[p * M + m], in order of p, rounded to T: the fixed-order sum of
// per-part partial results (one thread per m).
template <typename T> __device__ void sum_parts(const float *part, T *out, u64 parts, u64 M) {
    for (u64 m = global_thread(); m < M; m += grid_threads()) {
        float s = 0.f;
        for (u64 p = 0; p < parts; ++p) s += part[p * M + m];
        out[m] = from_float<T>(s);
    }
}

// A running maximum and the sum of exp(x - maximum): the state of an online softmax.
struct MaxSum {
    float m;
    float s;
};

__device__ __forceinline__ MaxSum max_sum_combine(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -EMMA_INF) return MaxSum{m, 0.f};
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

// Adds one element to an online-softmax state; NaN propagates into the sum, -inf adds nothing.
__device__ __forceinline__ MaxSum max_sum_push(MaxSum a, float x) {
    if (x > a.m) return MaxSum{x, a.s * expf(a.m - x) + 1.f};
    if (x == -EMMA_INF) return a;
    return MaxSum{a.m, a.s + expf(x - a.m)};
}

// Combines the online-softmax states of the whole block; every thread gets the result.
__device__ MaxSum block_max_sum(MaxSum v) {
    __shared__ MaxSum partial[33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = max_sum_combine(v, other);
    }
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        MaxSum w = lane < warps ? partial[lane] : MaxSum{-EMMA_INF, 0.f};
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            MaxSum other{__shfl_xor_sync(0xffffffffu, w.m, o), __shfl_xor_sync(0xffffffffu, w.s, o)};
            w = max_sum_combine(w, other);
        }
        if (lane == 0) partial[32] = w;
    }
    __syncthreads();
    return partial[32];
}

// ---- activations shared by several files ----------------------------------------------------
// Two branches so that exp never overflows (as the CPU reference).
__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    const float e = expf(x);
    return e / (1.f + e);
}
__device__ __forceinline__ float silu_f(float x) { return x * sigmoid_f(x); }
__device__ __forceinline__ float silu_grad_f(float x) {
    const float s = sigmoid_f(x);
    return s * (1.f + x * (1.f - s));
}
// softplus(x) = max(x, 0) + log1p(exp(-|x|)), as the CPU reference.
__device__ __forceinline__ float softplus_f(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

// ---- Mamba scans ----------------------------------------------------------------------------
// The step dt of a scan from its raw value (dt or delta, plus the bias): through softplus when
// asked.
__device__ __forceinline__ float scan_dt(float raw, int softplus) { return softplus ? softplus_f(raw) : raw; }

// One decoding step of a row of N diagonal states, one warp (lanes over the states): writes
//   h[n] = exp(dt A[n]) state[n] + dt B[n] x
// to `state_out` (which may alias `state`) and returns sum_n C[n] h[n] to every lane. `a_stride`
// steps A over n (0: one A for the whole row). Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ float warp_state_step(const T *state, const T *A, u64 a_stride, const T *Bv, const T *Cv,
                                                 float dt, float x, u64 N, T *state_out) {
    float acc = 0.f;
    for (u64 n = threadIdx.x & 31; n < N; n += 32) {
        const float h = expf(dt * to_float(A[n * a_stride])) * to_float(state[n]) + dt * to_float(Bv[n]) * x;
        state_out[n] = from_float<T>(h);
        acc += to_float(Cv[n]) * h;
    }
    return warp_reduce(acc, SumOp());
}

// Records the first bad index as (position << 32 | value) with atomicMin; the host reads it
// back after the kernel (initialised to all ones).
__device__ __forceinline__ void record_bad_index(u64 *bad, u64 position, u32 value) {
    atomicMin(bad, (position << 32) | (u64)value);
}

// ---- tensor cores (sm_80 and later) -----------------------------------------------------------
// Two bf16 values as one 32-bit register of an mma fragment: `lo` (the lower k index) in the low
// half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    return (u32)from_float<bf16>(lo).bits | ((u32)from_float<bf16>(hi).bits << 16);
}

// d += A B on the tensor cores for one warp: `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`
// (A 16 x 16 and B 16 x 8 in bf16, d 16 x 8 in f32). The fragments, as the PTX ISA lays them out,
// with g = lane / 4 and t = lane % 4 (each register holds two bf16, the lower k in its low half):
//   a[0]: A[g][2t, 2t+1]   a[1]: A[g+8][2t, 2t+1]   a[2]: A[g][2t+8, 2t+9]   a[3]: A[g+8][2t+8, 2t+9]
//   b[0]: B[2t, 2t+1][g]   b[1]: B[2t+8, 2t+9][g]
//   d[0], d[1]: D[g][2t, 2t+1]   d[2], d[3]: D[g+8][2t, 2t+1]
// Every lane of the warp must call it. The emulator (cuda/emulator/emulate.h) supplies its own.
#ifndef EMMA_EMULATE
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The same product with f16 operands (`...f32.f16.f16.f32`), fragments laid out alike.
__device__ __forceinline__ void mma_f16_16816(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif // EMMA_EMULATE

// The A fragment of rows r0 .. r0 + 15, k words kw0 .. kw0 + 7 of a row-major tile of packed bf16
// pairs (`ld` words per row: tile[r][w] holds k = 2w, 2w + 1).
__device__ __forceinline__ void load_frag_a(u32 (&a)[4], const u32 *tile, int ld, int r0, int kw0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 *p = tile + (r0 + g) * ld + kw0 + t;
    a[0] = p[0];
    a[1] = p[8 * ld];
    a[2] = p[4];
    a[3] = p[8 * ld + 4];
}

// The B fragment of columns c0 .. c0 + 7, k words kw0 .. kw0 + 7 of a tile stored by column
// (`ld` words per column: tile[c][w] holds B[2w][c], B[2w + 1][c]).
__device__ __forceinline__ void load_frag_b(u32 (&b)[2], const u32 *tile, int ld, int c0, int kw0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 *p = tile + (c0 + g) * ld + kw0 + t;
    b[0] = p[0];
    b[1] = p[4];
}
