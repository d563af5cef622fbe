// Reductions over one run of axes of a contiguous tensor seen as [outer, len, inner], as the CPU
// reference (tensor/src/ops/reduce.rs): sums accumulate in f32, max/min propagate NaN, a mean
// divides the f32 sum by the element count before the single rounding, and argmax returns the
// first index of the maximum with a NaN counting as the maximum. The result may be written as
// f32 (`_to_f32`) so that a reduction over several separate runs of axes rounds only once.
#include "common.cuh"

#define R_SUM 0
#define R_MAX 1
#define R_MIN 2

// max / min that propagate NaN.
struct NanMaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const {
        return (b > a || isnan(b)) ? b : a;
    }
};
struct NanMinOp {
    __device__ __forceinline__ float operator()(float a, float b) const {
        return (b < a || isnan(b)) ? b : a;
    }
};

// Rows (inner == 1): one block per row, blockDim.x a multiple of 32.
template <typename T, typename O, typename Op>
__device__ void reduce_rows(const T *x, O *out, u64 rows, u64 len, float identity, Op op, float divisor,
                            int has_divisor) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *row = x + r * len;
        float acc = identity;
        for (u64 j = threadIdx.x; j < len; j += blockDim.x) acc = op(acc, to_float(row[j]));
        acc = block_reduce(acc, identity, op);
        if (threadIdx.x == 0) out[r] = from_float<O>(has_divisor ? acc / divisor : acc);
    }
}

// Columns (inner > 1): a block of 32 x 8 threads per tile of 32 columns of one outer index;
// threadIdx.y splits the reduced axis, and the 8 partials are joined in order.
template <typename T, typename O, typename Op>
__device__ void reduce_cols(const T *x, O *out, u64 outer, u64 len, u64 inner, float identity, Op op,
                            float divisor, int has_divisor) {
    __shared__ float part[8][33];
    const u64 tiles = (inner + 31) / 32;
    for (u64 b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
        const u64 o = b / tiles, col = (b % tiles) * 32 + threadIdx.x;
        float acc = identity;
        if (col < inner)
            for (u64 j = threadIdx.y; j < len; j += blockDim.y) acc = op(acc, to_float(x[(o * len + j) * inner + col]));
        __syncthreads(); // the previous tile's readers are done with `part`
        part[threadIdx.y][threadIdx.x] = acc;
        __syncthreads();
        if (threadIdx.y == 0 && col < inner) {
            float total = part[0][threadIdx.x];
            for (int k = 1; k < (int)blockDim.y; ++k) total = op(total, part[k][threadIdx.x]);
            out[o * inner + col] = from_float<O>(has_divisor ? total / divisor : total);
        }
    }
}

template <typename T, typename O>
__device__ void reduce_rows_op(int op, const T *x, O *out, u64 rows, u64 len, float divisor, int has_divisor) {
    if (op == R_SUM) reduce_rows(x, out, rows, len, 0.f, SumOp(), divisor, has_divisor);
    else if (op == R_MAX) reduce_rows(x, out, rows, len, -EMMA_INF, NanMaxOp(), divisor, has_divisor);
    else reduce_rows(x, out, rows, len, EMMA_INF, NanMinOp(), divisor, has_divisor);
}

template <typename T, typename O>
__device__ void reduce_cols_op(int op, const T *x, O *out, u64 outer, u64 len, u64 inner, float divisor,
                               int has_divisor) {
    if (op == R_SUM) reduce_cols(x, out, outer, len, inner, 0.f, SumOp(), divisor, has_divisor);
    else if (op == R_MAX) reduce_cols(x, out, outer, len, inner, -EMMA_INF, NanMaxOp(), divisor, has_divisor);
    else reduce_cols(x, out, outer, len, inner, EMMA_INF, NanMinOp(), divisor, has_divisor);
}

// op: R_SUM, R_MAX, R_MIN; a mean is R_SUM with has_divisor = 1 and divisor = the count.
#define REDUCE_ENTRIES(T, O, S)                                                                   \
    extern "C" __global__ void reduce_rows_##S(int op, const T *x, O *out, u64 rows, u64 len,    \
                                               float divisor, int has_divisor) {                  \
        reduce_rows_op<T, O>(op, x, out, rows, len, divisor, has_divisor);                        \
    }                                                                                             \
    extern "C" __global__ void reduce_cols_##S(int op, const T *x, O *out, u64 outer, u64 len,   \
                                               u64 inner, float divisor, int has_divisor) {       \
        reduce_cols_op<T, O>(op, x, out, outer, len, inner, divisor, has_divisor);                \
    }

REDUCE_ENTRIES(float, float, f32)
REDUCE_ENTRIES(bf16, bf16, bf16)
REDUCE_ENTRIES(f16, f16, f16)
REDUCE_ENTRIES(bf16, float, bf16_to_f32)
REDUCE_ENTRIES(f16, float, f16_to_f32)

// ---- argmax ------------------------------------------------------------------------------
// Whether candidate (v2, i2) beats (v, i): the first NaN wins, else the larger value, ties to
// the lower index.
__device__ __forceinline__ bool argmax_better(float v, u32 i, float v2, u32 i2) {
    const bool n1 = isnan(v), n2 = isnan(v2);
    if (n1 || n2) return n2 && (!n1 || i2 < i);
    return v2 > v || (v2 == v && i2 < i);
}

template <typename T>
__device__ void argmax_rows(const T *x, u32 *out, u64 rows, u64 len) {
    __shared__ float pv[32];
    __shared__ u32 pi[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *row = x + r * len;
        float v = -EMMA_INF;
        u32 idx = 0xffffffffu;
        for (u64 j = threadIdx.x; j < len; j += blockDim.x) {
            const float c = to_float(row[j]);
            if (argmax_better(v, idx, c, (u32)j)) { v = c; idx = (u32)j; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
            const u32 i2 = __shfl_xor_sync(0xffffffffu, idx, o);
            if (argmax_better(v, idx, v2, i2)) { v = v2; idx = i2; }
        }
        __syncthreads();
        if (lane == 0) { pv[warp] = v; pi[warp] = idx; }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < warps; ++w)
                if (argmax_better(v, idx, pv[w], pi[w])) { v = pv[w]; idx = pi[w]; }
            out[r] = idx;
        }
    }
}

template <typename T>
__device__ void argmax_cols(const T *x, u32 *out, u64 outer, u64 len, u64 inner) {
    __shared__ float pv[8][33];
    __shared__ u32 pi[8][33];
    const u64 tiles = (inner + 31) / 32;
    for (u64 b = blockIdx.x; b < outer * tiles; b += gridDim.x) {
        const u64 o = b / tiles, col = (b % tiles) * 32 + threadIdx.x;
        float v = -EMMA_INF;
        u32 idx = 0xffffffffu;
        if (col < inner)
            for (u64 j = threadIdx.y; j < len; j += blockDim.y) {
                const float c = to_float(x[(o * len + j) * inner + col]);
                if (argmax_better(v, idx, c, (u32)j)) { v = c; idx = (u32)j; }
            }
        __syncthreads();
        pv[threadIdx.y][threadIdx.x] = v;
        pi[threadIdx.y][threadIdx.x] = idx;
        __syncthreads();
        if (threadIdx.y == 0 && col < inner) {
            for (int k = 1; k < (int)blockDim.y; ++k)
                if (argmax_better(v, idx, pv[k][threadIdx.x], pi[k][threadIdx.x])) {
                    v = pv[k][threadIdx.x];
                    idx = pi[k][threadIdx.x];
                }
            out[o * inner + col] = idx;
        }
    }
}

// First index (u32) of the maximum over len; rows: inner == 1, cols: inner > 1. len > 0.
#define ARGMAX_ENTRIES(T, S)                                                                      \
    extern "C" __global__ void argmax_rows_##S(const T *x, u32 *out, u64 rows, u64 len) {        \
        argmax_rows<T>(x, out, rows, len);                                                        \
    }                                                                                             \
    extern "C" __global__ void argmax_cols_##S(const T *x, u32 *out, u64 outer, u64 len,         \
                                               u64 inner) {                                       \
        argmax_cols<T>(x, out, outer, len, inner);                                                \
    }

ARGMAX_ENTRIES(float, f32)
ARGMAX_ENTRIES(bf16, bf16)
ARGMAX_ENTRIES(f16, f16)
