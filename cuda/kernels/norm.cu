// RMSNorm and LayerNorm over contiguous rows of d elements, as the CPU reference
// (tensor/src/ops/norm.rs):
//   rms:   y = x * r * w,                   r = 1 / sqrt(mean(x^2) + eps)
//   layer: y = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(var + eps), biased two-pass variance
// The forward kernels can first add a residual: h = x + residual is rounded to T, written to
// `residual_out` (the new residual stream) and normalised, exactly as the unfused add + norm.
//
// The backward kernels write dx per row and accumulate the parameter gradients of the rows a
// block handles into that block's f32 partial row; `column_sum` then adds the partials in block
// order (deterministic) and rounds once.
#include "common.cuh"

// The row's input: x, or x + residual rounded to T (and stored to residual_out).
template <typename T>
__device__ __forceinline__ float load_input(const T *x, const T *res, T *res_out, u64 i) {
    if (res == nullptr) return to_float(x[i]);
    const T h = from_float<T>(to_float(x[i]) + to_float(res[i]));
    res_out[i] = h;
    return to_float(h);
}

// The input after load_input ran for this element (same thread, same index).
template <typename T> __device__ __forceinline__ float reload_input(const T *x, const T *res_out, u64 i) {
    return to_float(res_out != nullptr ? res_out[i] : x[i]);
}

template <typename T>
__device__ void rms_forward(const T *x, const T *res, T *res_out, const T *w, T *y, u64 rows, u64 d, float eps) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u64 base = r * d;
        float ss = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float v = load_input(x, res, res_out, base + j);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(block_sum(ss) / (float)d + eps);
        const T *src_out = res != nullptr ? res_out : nullptr;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x)
            y[base + j] = from_float<T>(reload_input(x, src_out, base + j) * inv * to_float(w[j]));
    }
}

// dx = r * g * w - x * r^3 * mean(g * w * x); dweight += g * x * r.
template <typename T>
__device__ void rms_backward(const T *x, const T *w, const T *g, T *dx, float *dw_part, u64 rows, u64 d,
                             float eps) {
    float *dw = dw_part + (u64)blockIdx.x * d;
    for (u64 j = threadIdx.x; j < d; j += blockDim.x) dw[j] = 0.f;
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u64 base = r * d;
        float ss = 0.f, dot = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float xv = to_float(x[base + j]), gv = to_float(g[base + j]);
            ss += xv * xv;
            dot += gv * to_float(w[j]) * xv;
        }
        ss = block_sum(ss);
        dot = block_sum(dot);
        const float inv = 1.f / sqrtf(ss / (float)d + eps);
        const float c = inv * inv * inv * (dot / (float)d);
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float xv = to_float(x[base + j]), gv = to_float(g[base + j]);
            dx[base + j] = from_float<T>(inv * gv * to_float(w[j]) - xv * c);
            dw[j] += gv * xv * inv;
        }
    }
}

template <typename T>
__device__ void layer_forward(const T *x, const T *res, T *res_out, const T *w, const T *b, T *y, u64 rows, u64 d,
                              float eps) {
    const T *src_out = res != nullptr ? res_out : nullptr;
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u64 base = r * d;
        float sum = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) sum += load_input(x, res, res_out, base + j);
        const float mean = block_sum(sum) / (float)d;
        float var = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float c = reload_input(x, src_out, base + j) - mean;
            var += c * c;
        }
        const float rstd = 1.f / sqrtf(block_sum(var) / (float)d + eps);
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float shift = b != nullptr ? to_float(b[j]) : 0.f;
            y[base + j] = from_float<T>((reload_input(x, src_out, base + j) - mean) * rstd * to_float(w[j]) + shift);
        }
    }
}

// With xhat = (x - mean) * rstd: dx = rstd * (g * w - mean(g * w) - xhat * mean(g * w * xhat));
// dweight += g * xhat; dbias += g.
template <typename T>
__device__ void layer_backward(const T *x, const T *w, const T *g, T *dx, float *dw_part, float *db_part, u64 rows,
                               u64 d, float eps) {
    float *dw = dw_part + (u64)blockIdx.x * d, *db = db_part + (u64)blockIdx.x * d;
    for (u64 j = threadIdx.x; j < d; j += blockDim.x) dw[j] = db[j] = 0.f;
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u64 base = r * d;
        float sum = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) sum += to_float(x[base + j]);
        const float mean = block_sum(sum) / (float)d;
        float var = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float c = to_float(x[base + j]) - mean;
            var += c * c;
        }
        const float rstd = 1.f / sqrtf(block_sum(var) / (float)d + eps);
        float sum_gw = 0.f, sum_gw_xhat = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float gw = to_float(g[base + j]) * to_float(w[j]);
            sum_gw += gw;
            sum_gw_xhat += gw * (to_float(x[base + j]) - mean) * rstd;
        }
        const float mean_gw = block_sum(sum_gw) / (float)d;
        const float mean_gw_xhat = block_sum(sum_gw_xhat) / (float)d;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float gv = to_float(g[base + j]);
            const float xhat = (to_float(x[base + j]) - mean) * rstd;
            dx[base + j] = from_float<T>(rstd * (gv * to_float(w[j]) - mean_gw - xhat * mean_gw_xhat));
            dw[j] += gv * xhat;
            db[j] += gv;
        }
    }
}

#define NORM_ENTRIES(T, S)                                                                        \
    extern "C" __global__ void rms_norm_##S(const T *x, const T *residual, T *residual_out,      \
                                            const T *w, T *y, u64 rows, u64 d, float eps) {       \
        rms_forward<T>(x, residual, residual_out, w, y, rows, d, eps);                            \
    }                                                                                             \
    extern "C" __global__ void rms_norm_backward_##S(const T *x, const T *w, const T *g, T *dx,  \
                                                     float *dw_part, u64 rows, u64 d, float eps) { \
        rms_backward<T>(x, w, g, dx, dw_part, rows, d, eps);                                      \
    }                                                                                             \
    extern "C" __global__ void layer_norm_##S(const T *x, const T *residual, T *residual_out,    \
                                              const T *w, const T *b, T *y, u64 rows, u64 d,      \
                                              float eps) {                                        \
        layer_forward<T>(x, residual, residual_out, w, b, y, rows, d, eps);                       \
    }                                                                                             \
    extern "C" __global__ void layer_norm_backward_##S(const T *x, const T *w, const T *g,       \
                                                       T *dx, float *dw_part, float *db_part,     \
                                                       u64 rows, u64 d, float eps) {              \
        layer_backward<T>(x, w, g, dx, dw_part, db_part, rows, d, eps);                           \
    }                                                                                             \
    extern "C" __global__ void column_sum_##S(const float *part, T *out, u64 parts, u64 d) {     \
        for (u64 j = global_thread(); j < d; j += grid_threads()) {                               \
            float acc = 0.f;                                                                      \
            for (u64 p = 0; p < parts; ++p) acc += part[p * d + j];                               \
            out[j] = from_float<T>(acc);                                                          \
        }                                                                                         \
    }

NORM_ENTRIES(float, f32)
NORM_ENTRIES(bf16, bf16)
NORM_ENTRIES(f16, f16)
