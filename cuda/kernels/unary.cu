// Elementwise unary ops and their derivatives, with the CPU reference's exact formulas
// (tensor/src/ops/unary.rs). The op is a runtime code; each code gets its own specialised loop,
// chosen once per thread.
#include "common.cuh"

// Op codes; the Rust side (src/kernels/elementwise.rs) uses the same numbers.
#define U_NEG 0
#define U_EXP 1
#define U_LOG 2
#define U_SQRT 3
#define U_RSQRT 4
#define U_TANH 5
#define U_SIGMOID 6
#define U_SILU 7
#define U_GELU_TANH 8
#define U_GELU_ERF 9
#define U_SOFTPLUS 10
#define U_ABS 11
#define U_SQR 12
#define U_RECIP 13
#define U_POWF 14
#define U_CLAMP 15
#define U_AFFINE 16
#define U_RELU 17

#define UNARY_OPS(X)                                                                              \
    X(U_NEG) X(U_EXP) X(U_LOG) X(U_SQRT) X(U_RSQRT) X(U_TANH) X(U_SIGMOID) X(U_SILU) X(U_GELU_TANH) \
    X(U_GELU_ERF) X(U_SOFTPLUS) X(U_ABS) X(U_SQR) X(U_RECIP) X(U_POWF) X(U_CLAMP) X(U_AFFINE)     \
    X(U_RELU)

#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f
#define FRAC_1_SQRT_2 0.7071067811865476f
#define FRAC_1_SQRT_2PI 0.3989422804014327f

// f(x). p0, p1: the op's parameters (powf: p, p - 1; clamp: lo, hi; affine: a, b).
template <int OP> __device__ __forceinline__ float unary_f(float x, float p0, float p1) {
    if constexpr (OP == U_NEG) return -x;
    else if constexpr (OP == U_EXP) return expf(x);
    else if constexpr (OP == U_LOG) return logf(x);
    else if constexpr (OP == U_SQRT) return sqrtf(x);
    else if constexpr (OP == U_RSQRT) return 1.f / sqrtf(x);
    else if constexpr (OP == U_TANH) return tanhf(x);
    else if constexpr (OP == U_SIGMOID) return sigmoid_f(x);
    else if constexpr (OP == U_SILU) return x * sigmoid_f(x);
    else if constexpr (OP == U_GELU_TANH)
        return 0.5f * x * (1.f + tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)));
    else if constexpr (OP == U_GELU_ERF) return 0.5f * x * (1.f + erff(x * FRAC_1_SQRT_2));
    else if constexpr (OP == U_SOFTPLUS) return softplus_f(x);
    else if constexpr (OP == U_ABS) return fabsf(x);
    else if constexpr (OP == U_SQR) return x * x;
    else if constexpr (OP == U_RECIP) return 1.f / x;
    else if constexpr (OP == U_POWF) return powf(x, p0);
    else if constexpr (OP == U_CLAMP) return fminf(fmaxf(x, p0), p1);
    else if constexpr (OP == U_AFFINE) return p0 * x + p1;
    else return (x > 0.f || isnan(x)) ? x : 0.f; // relu, NaN-propagating
}

// f'(x), as the CPU reference's `UnaryOp::derivative`.
template <int OP> __device__ __forceinline__ float unary_df(float x, float p0, float p1) {
    if constexpr (OP == U_NEG) return -1.f;
    else if constexpr (OP == U_EXP) return expf(x);
    else if constexpr (OP == U_LOG) return 1.f / x;
    else if constexpr (OP == U_SQRT) return 0.5f / sqrtf(x);
    else if constexpr (OP == U_RSQRT) return -0.5f / (x * sqrtf(x));
    else if constexpr (OP == U_TANH) {
        const float t = tanhf(x);
        return 1.f - t * t;
    } else if constexpr (OP == U_SIGMOID) {
        const float s = sigmoid_f(x);
        return s * (1.f - s);
    } else if constexpr (OP == U_SILU) return silu_grad_f(x);
    else if constexpr (OP == U_GELU_TANH) {
        const float t = tanhf(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
        return 0.5f * (1.f + t) +
               0.5f * x * (1.f - t * t) * SQRT_2_OVER_PI * (1.f + 3.f * GELU_CUBIC * x * x);
    } else if constexpr (OP == U_GELU_ERF) {
        const float pdf = expf(-0.5f * x * x) * FRAC_1_SQRT_2PI;
        return 0.5f * (1.f + erff(x * FRAC_1_SQRT_2)) + x * pdf;
    } else if constexpr (OP == U_SOFTPLUS) return sigmoid_f(x);
    else if constexpr (OP == U_ABS) return isnan(x) ? x : (x == 0.f ? 0.f : copysignf(1.f, x));
    else if constexpr (OP == U_SQR) return 2.f * x;
    else if constexpr (OP == U_RECIP) return -1.f / (x * x);
    else if constexpr (OP == U_POWF) return p0 * powf(x, p1);
    else if constexpr (OP == U_CLAMP) return (x > p0 && x < p1) ? 1.f : 0.f;
    else if constexpr (OP == U_AFFINE) return p0;
    else return x > 0.f ? 1.f : 0.f; // relu
}

template <typename T, int OP> struct Forward {
    float p0, p1;
    __device__ __forceinline__ T operator()(T v) const {
        return from_float<T>(unary_f<OP>(to_float(v), p0, p1));
    }
};

template <typename T, int OP> struct Backward {
    float p0, p1;
    __device__ __forceinline__ T operator()(T x, T g) const {
        return from_float<T>(to_float(g) * unary_df<OP>(to_float(x), p0, p1));
    }
};

template <typename T, int OP>
__device__ __forceinline__ void strided_loop(const T *x, T *y, u64 n, const Strided &l, float p0, float p1) {
    const Forward<T, OP> f{p0, p1};
    for (u64 i = global_thread(); i < n; i += grid_threads()) y[i] = f(x[strided_offset(l, i)]);
}

template <typename T>
__device__ void unary_contiguous(int op, float p0, float p1, const T *x, T *y, u64 n) {
    switch (op) {
#define CASE(OP)                                                                                  \
    case OP: map_contiguous(x, y, n, Forward<T, OP>{p0, p1}); break;
        UNARY_OPS(CASE)
#undef CASE
    }
}

template <typename T>
__device__ void unary_strided(int op, float p0, float p1, const T *x, T *y, u64 n, const Strided &l) {
    switch (op) {
#define CASE(OP)                                                                                  \
    case OP: strided_loop<T, OP>(x, y, n, l, p0, p1); break;
        UNARY_OPS(CASE)
#undef CASE
    }
}

template <typename T>
__device__ void unary_backward(int op, float p0, float p1, const T *x, const T *g, T *dx, u64 n) {
    switch (op) {
#define CASE(OP)                                                                                  \
    case OP: zip_contiguous(x, g, dx, n, Backward<T, OP>{p0, p1}); break;
        UNARY_OPS(CASE)
#undef CASE
    }
}

// y = f(x) over contiguous x; x and y may be the same buffer.
// y = f(x[view]) with x a strided view and y contiguous.
// dx = g * f'(x), all contiguous.
#define UNARY_ENTRIES(T, S)                                                                       \
    extern "C" __global__ void unary_##S(int op, float p0, float p1, const T *x, T *y, u64 n) {  \
        unary_contiguous<T>(op, p0, p1, x, y, n);                                                 \
    }                                                                                             \
    extern "C" __global__ void unary_strided_##S(int op, float p0, float p1, const T *x, T *y,   \
                                                 u64 n, Strided l) {                              \
        unary_strided<T>(op, p0, p1, x, y, n, l);                                                 \
    }                                                                                             \
    extern "C" __global__ void unary_backward_##S(int op, float p0, float p1, const T *x,        \
                                                  const T *g, T *dx, u64 n) {                     \
        unary_backward<T>(op, p0, p1, x, g, dx, n);                                               \
    }

UNARY_ENTRIES(float, f32)
UNARY_ENTRIES(bf16, bf16)
UNARY_ENTRIES(f16, f16)
