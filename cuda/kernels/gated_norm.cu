// Mamba-2's gated RMSNorm over contiguous rows of d = groups * group channels, as the unfused
// CPU path (nn/src/norm.rs, GatedRmsNorm):
//   s = silu(z), h = x * s, n = h * r (r = 1 / sqrt(mean over the group of h^2 + eps)), y = n * w,
// with s, h, n and y each rounded to T as the unfused ops round them. One block per (row, group).
//
// The backward computes, per group, dn = g * w, dh = r * dn - h * r^3 * mean(dn * h),
// dx = dh * s, dz = dh * x * silu'(z), and accumulates dweight += g * n into the block's f32
// partial row (summed afterwards by norm.cu's column_sum).
#include "common.cuh"

// s and h for element i, rounded as the unfused ops round them.
template <typename T> __device__ __forceinline__ float gated_input(const T *x, const T *z, u64 i, float *s) {
    *s = round_to<T>(silu_f(to_float(z[i])));
    return round_to<T>(to_float(x[i]) * *s);
}

template <typename T>
__device__ void gated_forward(const T *x, const T *z, const T *w, T *y, u64 rows, u64 d, u64 group, float eps) {
    const u64 groups = d / group;
    for (u64 item = blockIdx.x; item < rows * groups; item += gridDim.x) {
        const u64 base = (item / groups) * d + (item % groups) * group, col0 = (item % groups) * group;
        float ss = 0.f, s;
        for (u64 j = threadIdx.x; j < group; j += blockDim.x) {
            const float h = gated_input(x, z, base + j, &s);
            ss += h * h;
        }
        const float inv = 1.f / sqrtf(block_sum(ss) / (float)group + eps);
        for (u64 j = threadIdx.x; j < group; j += blockDim.x) {
            const float n = round_to<T>(gated_input(x, z, base + j, &s) * inv);
            y[base + j] = from_float<T>(n * to_float(w[col0 + j]));
        }
    }
}

template <typename T>
__device__ void gated_backward(const T *x, const T *z, const T *w, const T *g, T *dx, T *dz, float *dw_part,
                               u64 rows, u64 d, u64 group, float eps) {
    const u64 groups = d / group;
    float *dw = dw_part + (u64)blockIdx.x * d;
    for (u64 j = threadIdx.x; j < d; j += blockDim.x) dw[j] = 0.f;
    __syncthreads(); // a group's columns are not the ones this thread zeroed
    for (u64 item = blockIdx.x; item < rows * groups; item += gridDim.x) {
        const u64 base = (item / groups) * d + (item % groups) * group, col0 = (item % groups) * group;
        float ss = 0.f, dot = 0.f, s;
        for (u64 j = threadIdx.x; j < group; j += blockDim.x) {
            const float h = gated_input(x, z, base + j, &s);
            ss += h * h;
            dot += to_float(g[base + j]) * to_float(w[col0 + j]) * h;
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        const float inv = 1.f / sqrtf(ss / (float)group + eps);
        const float c = inv * inv * inv * (dot / (float)group);
        for (u64 j = threadIdx.x; j < group; j += blockDim.x) {
            const float h = gated_input(x, z, base + j, &s);
            const float gv = to_float(g[base + j]);
            const float dh = inv * gv * to_float(w[col0 + j]) - h * c;
            const float zv = to_float(z[base + j]);
            dx[base + j] = from_float<T>(dh * s);
            dz[base + j] = from_float<T>(dh * to_float(x[base + j]) * silu_grad_f(zv));
            dw[col0 + j] += gv * round_to<T>(h * inv);
        }
    }
}

#define GATED_ENTRIES(T, S)                                                                       \
    extern "C" __global__ void gated_rms_norm_##S(const T *x, const T *z, const T *w, T *y,      \
                                                  u64 rows, u64 d, u64 group, float eps) {        \
        gated_forward<T>(x, z, w, y, rows, d, group, eps);                                        \
    }                                                                                             \
    extern "C" __global__ void gated_rms_norm_backward_##S(                                       \
        const T *x, const T *z, const T *w, const T *g, T *dx, T *dz, float *dw_part, u64 rows,  \
        u64 d, u64 group, float eps) {                                                            \
        gated_backward<T>(x, z, w, g, dx, dz, dw_part, rows, d, group, eps);                      \
    }

GATED_ENTRIES(float, f32)
GATED_ENTRIES(bf16, bf16)
GATED_ENTRIES(f16, f16)
