// Dtype conversions among f32, bf16, f16 and u32, and strided copies (materialising a view).
// Conversions round to nearest once, like the CPU reference (tensor/src/dtype.rs): 16-bit
// floats widen to f32 exactly; u32 -> 16-bit goes through f32 rounded to odd, so that the final
// rounding is not a double rounding; floats -> u32 truncate and saturate, NaN -> 0.
#include "common.cuh"

__device__ __forceinline__ u32 float_to_u32(float f) {
    if (!(f > 0.f)) return 0u; // negatives, zero and NaN
    if (f >= 4294967296.f) return 0xffffffffu;
    return (u32)f;
}

// u32 -> f32 rounded to odd: truncated, with the last bit set when inexact.
__device__ __forceinline__ float u32_to_float_odd(u32 u) {
    const float t = __uint2float_rz(u);
    return __float2uint_rz(t) == u ? t : __uint_as_float(__float_as_uint(t) | 1u);
}

template <typename S, typename D> struct Cast {
    __device__ __forceinline__ D operator()(S v) const { return from_float<D>(to_float(v)); }
};
template <typename S> struct Cast<S, u32> {
    __device__ __forceinline__ u32 operator()(S v) const { return float_to_u32(to_float(v)); }
};
template <> struct Cast<u32, float> {
    __device__ __forceinline__ float operator()(u32 v) const { return __uint2float_rn(v); }
};
template <typename D> struct Cast<u32, D> {
    __device__ __forceinline__ D operator()(u32 v) const { return from_float<D>(u32_to_float_odd(v)); }
};

// y = x converted, both contiguous.
#define CAST_ENTRY(S, SN, D, DN)                                                                  \
    extern "C" __global__ void cast_##SN##_##DN(const S *x, D *y, u64 n) {                        \
        map_contiguous(x, y, n, Cast<S, D>());                                                    \
    }

CAST_ENTRY(float, f32, bf16, bf16)
CAST_ENTRY(float, f32, f16, f16)
CAST_ENTRY(float, f32, u32, u32)
CAST_ENTRY(bf16, bf16, float, f32)
CAST_ENTRY(bf16, bf16, f16, f16)
CAST_ENTRY(bf16, bf16, u32, u32)
CAST_ENTRY(f16, f16, float, f32)
CAST_ENTRY(f16, f16, bf16, bf16)
CAST_ENTRY(f16, f16, u32, u32)
CAST_ENTRY(u32, u32, float, f32)
CAST_ENTRY(u32, u32, bf16, bf16)
CAST_ENTRY(u32, u32, f16, f16)

// y (contiguous) = x (a strided view), by element width so that it serves every dtype.
#define COPY_ENTRY(T, S)                                                                          \
    extern "C" __global__ void copy_strided_##S(const T *x, T *y, u64 n, Strided l) {            \
        for (u64 i = global_thread(); i < n; i += grid_threads()) y[i] = x[strided_offset(l, i)]; \
    }

COPY_ENTRY(u16, b16)
COPY_ENTRY(u32, b32)
