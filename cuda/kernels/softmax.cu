// Softmax and log-softmax over contiguous rows (the last axis), forward and backward, as the
// CPU reference (tensor/src/ops/softmax.rs). One block per row; the maximum and the sum of
// exponentials come from one online pass, then a second pass writes the row.
#include "common.cuh"

// y = exp(x - max) / sum, or (log != 0) y = (x - max) - ln(sum).
template <typename T> __device__ void softmax_forward(const T *x, T *y, u64 rows, u64 len, int log) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * len;
        T *yr = y + r * len;
        MaxSum st{-EMMA_INF, 0.f};
        for (u64 j = threadIdx.x; j < len; j += blockDim.x) st = max_sum_push(st, to_float(xr[j]));
        st = block_max_sum(st);
        if (log) {
            const float ls = logf(st.s);
            for (u64 j = threadIdx.x; j < len; j += blockDim.x) yr[j] = from_float<T>((to_float(xr[j]) - st.m) - ls);
        } else {
            for (u64 j = threadIdx.x; j < len; j += blockDim.x) yr[j] = from_float<T>(expf(to_float(xr[j]) - st.m) / st.s);
        }
    }
}

// With y the forward output and g the output gradient: softmax dx = y * (g - sum(g * y)),
// log-softmax dx = g - exp(y) * sum(g).
template <typename T>
__device__ void softmax_backward(const T *y, const T *g, T *dx, u64 rows, u64 len, int log) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *yr = y + r * len, *gr = g + r * len;
        T *dr = dx + r * len;
        float acc = 0.f;
        for (u64 j = threadIdx.x; j < len; j += blockDim.x)
            acc += log ? to_float(gr[j]) : to_float(yr[j]) * to_float(gr[j]);
        acc = block_sum(acc);
        for (u64 j = threadIdx.x; j < len; j += blockDim.x) {
            const float yv = to_float(yr[j]), gv = to_float(gr[j]);
            dr[j] = from_float<T>(log ? gv - expf(yv) * acc : yv * (gv - acc));
        }
    }
}

#define SOFTMAX_ENTRIES(T, S)                                                                     \
    extern "C" __global__ void softmax_##S(const T *x, T *y, u64 rows, u64 len, int log) {       \
        softmax_forward<T>(x, y, rows, len, log);                                                 \
    }                                                                                             \
    extern "C" __global__ void softmax_backward_##S(const T *y, const T *g, T *dx, u64 rows,     \
                                                    u64 len, int log) {                           \
        softmax_backward<T>(y, g, dx, rows, len, log);                                            \
    }

SOFTMAX_ENTRIES(float, f32)
SOFTMAX_ENTRIES(bf16, bf16)
SOFTMAX_ENTRIES(f16, f16)
