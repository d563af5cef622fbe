// Causal depthwise conv1d over x [B, C, L] with weight [C, K] and an optional bias [C], as the CPU
// reference (tensor/src/ops/conv.rs):
//   y[b, c, t] = bias[c] + sum_k w[c, k] * x[b, c, t - (K - 1) + k]   (x = 0 before t = 0)
// optionally followed by SiLU (rounded to T in between, as the unfused conv + silu).
// Backward: dx[t] = sum_j w[j] * g[t + K - 1 - j], dw[c, j] = sum_{b,t} g[t] * x[t - (K-1) + j],
// dbias[c] = sum_{b,t} g; with SiLU, `conv1d_silu_grad` first turns the output gradient into
// the gradient of the pre-activation. `conv1d_update` is one decoding step on a state [B, C, K-1].
#include "common.cuh"

// Widest kernel the parameter backward handles (Mamba uses 4).
#define MAX_CONV_K 16

// The pre-activation at (row = b * C + c, t), rounded to T.
template <typename T>
__device__ __forceinline__ float conv_at(const T *x, const T *w, const T *bias, u64 row, u64 c, u64 L, u64 K,
                                         u64 t) {
    float acc = 0.f;
    const u64 j0 = t + 1 >= K ? 0 : K - 1 - t; // first tap with an input at or after t = 0
    for (u64 j = j0; j < K; ++j) acc += to_float(w[c * K + j]) * to_float(x[row * L + t + j + 1 - K]);
    const float b0 = bias != nullptr ? to_float(bias[c]) : 0.f;
    return round_to<T>(b0 + acc);
}

template <typename T>
__device__ void conv_forward(const T *x, const T *w, const T *bias, T *y, u64 B, u64 C, u64 L, u64 K, int silu) {
    for (u64 e = global_thread(); e < B * C * L; e += grid_threads()) {
        const u64 t = e % L, row = e / L, c = row % C;
        const float pre = conv_at(x, w, bias, row, c, L, K, t);
        y[e] = from_float<T>(silu ? silu_f(pre) : pre);
    }
}

// gpre = g * silu'(pre), rounded as the unfused silu backward rounds it.
template <typename T>
__device__ void conv_silu_grad(const T *x, const T *w, const T *bias, const T *g, T *gpre, u64 B, u64 C, u64 L,
                               u64 K) {
    for (u64 e = global_thread(); e < B * C * L; e += grid_threads()) {
        const u64 t = e % L, row = e / L, c = row % C;
        gpre[e] = from_float<T>(to_float(g[e]) * silu_grad_f(conv_at(x, w, bias, row, c, L, K, t)));
    }
}

template <typename T>
__device__ void conv_backward_dx(const T *w, const T *g, T *dx, u64 B, u64 C, u64 L, u64 K) {
    for (u64 e = global_thread(); e < B * C * L; e += grid_threads()) {
        const u64 t = e % L, row = e / L, c = row % C;
        float acc = 0.f;
        const u64 j0 = t + K > L ? t + K - L : 0; // taps whose output time t + K-1-j is < L
        for (u64 j = j0; j < K; ++j) acc += to_float(w[c * K + j]) * to_float(g[row * L + t + K - 1 - j]);
        dx[e] = from_float<T>(acc);
    }
}

// One block per channel: the K weight gradients and the bias gradient, summed over (b, t).
template <typename T>
__device__ void conv_backward_params(const T *x, const T *g, T *dw, T *db, u64 B, u64 C, u64 L, u64 K) {
    for (u64 c = blockIdx.x; c < C; c += gridDim.x) {
        float acc[MAX_CONV_K + 1];
#pragma unroll
        for (int j = 0; j <= MAX_CONV_K; ++j) acc[j] = 0.f;
        for (u64 e = threadIdx.x; e < B * L; e += blockDim.x) {
            const u64 b = e / L, t = e % L, row = b * C + c;
            const float gv = to_float(g[row * L + t]);
            acc[MAX_CONV_K] += gv;
#pragma unroll
            for (int j = 0; j < MAX_CONV_K; ++j)
                if ((u64)j < K && t + j + 1 >= K) acc[j] += gv * to_float(x[row * L + t + j + 1 - K]);
        }
        for (u64 j = 0; j < K; ++j) {
            const float total = block_sum(acc[j]);
            if (threadIdx.x == 0) dw[c * K + j] = from_float<T>(total);
        }
        const float total = block_sum(acc[MAX_CONV_K]);
        if (threadIdx.x == 0) db[c] = from_float<T>(total);
    }
}

// One decoding step per (b, c): window = [state (K-1 values), x]; y = bias + sum_k w[k] *
// window[k] (then SiLU if asked), computed in f32 and rounded once; the state becomes window[1..].
template <typename T>
__device__ void conv_update(T *state, const T *x, const T *w, const T *bias, T *y, u64 B, u64 C, u64 K, int silu) {
    for (u64 e = global_thread(); e < B * C; e += grid_threads()) {
        const u64 c = e % C;
        T *st = state + e * (K - 1);
        const T xv = x[e];
        float acc = 0.f;
        for (u64 j = 0; j + 1 < K; ++j) acc += to_float(w[c * K + j]) * to_float(st[j]);
        acc += to_float(w[c * K + K - 1]) * to_float(xv);
        const float pre = (bias != nullptr ? to_float(bias[c]) : 0.f) + acc;
        y[e] = from_float<T>(silu ? silu_f(pre) : pre);
        for (u64 j = 0; j + 2 < K; ++j) st[j] = st[j + 1];
        if (K > 1) st[K - 2] = xv;
    }
}

#define CONV_ENTRIES(T, S)                                                                        \
    extern "C" __global__ void conv1d_##S(const T *x, const T *w, const T *bias, T *y, u64 B,    \
                                          u64 C, u64 L, u64 K, int silu) {                        \
        conv_forward<T>(x, w, bias, y, B, C, L, K, silu);                                         \
    }                                                                                             \
    extern "C" __global__ void conv1d_silu_grad_##S(const T *x, const T *w, const T *bias,       \
                                                    const T *g, T *gpre, u64 B, u64 C, u64 L,     \
                                                    u64 K) {                                      \
        conv_silu_grad<T>(x, w, bias, g, gpre, B, C, L, K);                                       \
    }                                                                                             \
    extern "C" __global__ void conv1d_backward_dx_##S(const T *w, const T *g, T *dx, u64 B,      \
                                                      u64 C, u64 L, u64 K) {                      \
        conv_backward_dx<T>(w, g, dx, B, C, L, K);                                                \
    }                                                                                             \
    extern "C" __global__ void conv1d_backward_params_##S(const T *x, const T *g, T *dw, T *db,  \
                                                          u64 B, u64 C, u64 L, u64 K) {           \
        conv_backward_params<T>(x, g, dw, db, B, C, L, K);                                        \
    }                                                                                             \
    extern "C" __global__ void conv1d_update_##S(T *state, const T *x, const T *w,               \
                                                 const T *bias, T *y, u64 B, u64 C, u64 K,        \
                                                 int silu) {                                      \
        conv_update<T>(state, x, w, bias, y, B, C, K, silu);                                      \
    }

CONV_ENTRIES(float, f32)
CONV_ENTRIES(bf16, bf16)
CONV_ENTRIES(f16, f16)
