// Broadcasting binary ops, comparisons (u32 0/1 masks) and `where`, as the CPU reference
// (tensor/src/ops/binary.rs): floats compute in f32 and round once; max/min ignore a NaN
// operand like f32::max/min.
#include "common.cuh"

// Op codes; the Rust side (src/kernels/elementwise.rs) uses the same numbers.
#define B_ADD 0
#define B_SUB 1
#define B_MUL 2
#define B_DIV 3
#define B_MAX 4
#define B_MIN 5
#define BINARY_OPS(X) X(B_ADD) X(B_SUB) X(B_MUL) X(B_DIV) X(B_MAX) X(B_MIN)

#define C_EQ 0
#define C_NE 1
#define C_LT 2
#define C_LE 3
#define C_GT 4
#define C_GE 5
#define COMPARE_OPS(X) X(C_EQ) X(C_NE) X(C_LT) X(C_LE) X(C_GT) X(C_GE)

template <int OP> __device__ __forceinline__ float binary_f(float a, float b) {
    if constexpr (OP == B_ADD) return a + b;
    else if constexpr (OP == B_SUB) return a - b;
    else if constexpr (OP == B_MUL) return a * b;
    else if constexpr (OP == B_DIV) return a / b;
    else if constexpr (OP == B_MAX) return fmaxf(a, b);
    else return fminf(a, b);
}

template <int OP, typename V> __device__ __forceinline__ u32 compare_f(V a, V b) {
    if constexpr (OP == C_EQ) return a == b;
    else if constexpr (OP == C_NE) return a != b;
    else if constexpr (OP == C_LT) return a < b;
    else if constexpr (OP == C_LE) return a <= b;
    else if constexpr (OP == C_GT) return a > b;
    else return a >= b;
}

// The value a comparison looks at: floats widened, u32 as is.
template <typename T> __device__ __forceinline__ float compared(T v) { return to_float(v); }
__device__ __forceinline__ u32 compared(u32 v) { return v; }

template <typename T, int OP> struct Binary {
    __device__ __forceinline__ T operator()(T a, T b) const {
        return from_float<T>(binary_f<OP>(to_float(a), to_float(b)));
    }
};

template <typename T, int OP>
__device__ __forceinline__ void broadcast_loop(const T *a, const T *b, T *out, u64 n, const Broadcast &l) {
    const Binary<T, OP> f;
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        i64 off[2];
        broadcast_offsets(l, i, 2, off);
        out[i] = f(a[off[0]], b[off[1]]);
    }
}

template <typename T, int OP>
__device__ __forceinline__ void compare_loop(const T *a, const T *b, u32 *out, u64 n, const Broadcast &l) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        i64 off[2];
        broadcast_offsets(l, i, 2, off);
        out[i] = compare_f<OP>(compared(a[off[0]]), compared(b[off[1]]));
    }
}

template <typename T> __device__ void binary_contiguous(int op, const T *a, const T *b, T *out, u64 n) {
    switch (op) {
#define CASE(OP)                                                                                  \
    case OP: zip_contiguous(a, b, out, n, Binary<T, OP>()); break;
        BINARY_OPS(CASE)
#undef CASE
    }
}

template <typename T>
__device__ void binary_broadcast(int op, const T *a, const T *b, T *out, u64 n, const Broadcast &l) {
    switch (op) {
#define CASE(OP)                                                                                  \
    case OP: broadcast_loop<T, OP>(a, b, out, n, l); break;
        BINARY_OPS(CASE)
#undef CASE
    }
}

template <typename T>
__device__ void compare_broadcast(int op, const T *a, const T *b, u32 *out, u64 n, const Broadcast &l) {
    switch (op) {
#define CASE(OP)                                                                                  \
    case OP: compare_loop<T, OP>(a, b, out, n, l); break;
        COMPARE_OPS(CASE)
#undef CASE
    }
}

// out = op(a, b): a, b, out contiguous with one shape (`binary_S`), or a and b strided views
// broadcast to out's shape (`binary_broadcast_S`, strides 0 and 1 of the layout).
#define BINARY_ENTRIES(T, S)                                                                      \
    extern "C" __global__ void binary_##S(int op, const T *a, const T *b, T *out, u64 n) {       \
        binary_contiguous<T>(op, a, b, out, n);                                                   \
    }                                                                                             \
    extern "C" __global__ void binary_broadcast_##S(int op, const T *a, const T *b, T *out,      \
                                                    u64 n, Broadcast l) {                         \
        binary_broadcast<T>(op, a, b, out, n, l);                                                 \
    }

BINARY_ENTRIES(float, f32)
BINARY_ENTRIES(bf16, bf16)
BINARY_ENTRIES(f16, f16)

// out (u32 mask) = a op b, broadcast like binary_broadcast.
#define COMPARE_ENTRY(T, S)                                                                       \
    extern "C" __global__ void compare_##S(int op, const T *a, const T *b, u32 *out, u64 n,      \
                                           Broadcast l) {                                         \
        compare_broadcast<T>(op, a, b, out, n, l);                                                \
    }

COMPARE_ENTRY(float, f32)
COMPARE_ENTRY(bf16, bf16)
COMPARE_ENTRY(f16, f16)
COMPARE_ENTRY(u32, u32)

// out = cond != 0 ? a : b, all three broadcast (strides 0, 1, 2 of the layout); by element width,
// so it serves every dtype.
#define WHERE_ENTRY(T, S)                                                                         \
    extern "C" __global__ void where_##S(const u32 *cond, const T *a, const T *b, T *out, u64 n, \
                                         Broadcast l) {                                           \
        for (u64 i = global_thread(); i < n; i += grid_threads()) {                               \
            i64 off[3];                                                                           \
            broadcast_offsets(l, i, 3, off);                                                      \
            out[i] = cond[off[0]] != 0 ? a[off[1]] : b[off[2]];                                   \
        }                                                                                         \
    }

WHERE_ENTRY(u16, b16)
WHERE_ENTRY(u32, b32)
