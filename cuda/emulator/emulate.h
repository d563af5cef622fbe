// The emulated GPU's view of CUDA C++: force-included before every kernel source when the host
// C++ compiler builds it for the emulator (src/emulator/compile.rs). It defines the CUDA keywords,
// builtin variables and intrinsics the kernels use in terms of the emulator's runtime
// (runtime.cpp), and the PTX sites of common.cuh (`cvt` and `mma.sync`) bit for bit. Kernels stay
// as they are: what the emulator cannot express is added here, not in a kernel.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>
#include <utility>

#define EMMA_EMULATE 1

// ---- keywords ----------------------------------------------------------------------------------
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Static shared memory: one copy per host thread, which runs one block at a time. The runtime
// poisons it before each block and watches every access to it.
#define __shared__ static thread_local
#ifdef EMMA_EMU_SCAN
// Only while the kernel entry points are being listed (never compiled).
#define __global__ @@KERNEL@@
#define __launch_bounds__(...) @@BOUNDS(__VA_ARGS__)@@
#else
#define __global__
#define __launch_bounds__(...)
#endif

// ---- builtin variables -----------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
typedef uint3 dim3;

extern "C" {
uint3 emu_thread_idx();
uint3 emu_block_idx();
dim3 emu_block_dim();
dim3 emu_grid_dim();
void emu_syncthreads();
void emu_syncwarp(unsigned mask);
unsigned long long emu_shfl(unsigned mask, unsigned long long value, int kind, int arg, int width);
unsigned emu_vote(unsigned mask, int kind, int pred);
void emu_mma_bf16_16816(float *d, const unsigned *a, const unsigned *b);
void emu_mma_f32frag_16816(float *d, const float *a, const float *b);
void *emu_dynamic_shared();
void emu_trap(const char *what);
float emu_atomic_add_f32(float *p, float v);
double emu_atomic_add_f64(double *p, double v);
unsigned emu_atomic_add_u32(unsigned *p, unsigned v);
int emu_atomic_add_i32(int *p, int v);
unsigned long long emu_atomic_add_u64(unsigned long long *p, unsigned long long v);
unsigned emu_atomic_and_u32(unsigned *p, unsigned v);
unsigned emu_atomic_or_u32(unsigned *p, unsigned v);
unsigned emu_atomic_min_u32(unsigned *p, unsigned v);
unsigned emu_atomic_max_u32(unsigned *p, unsigned v);
int emu_atomic_min_i32(int *p, int v);
int emu_atomic_max_i32(int *p, int v);
unsigned long long emu_atomic_min_u64(unsigned long long *p, unsigned long long v);
unsigned long long emu_atomic_max_u64(unsigned long long *p, unsigned long long v);
unsigned emu_atomic_exch_u32(unsigned *p, unsigned v);
unsigned long long emu_atomic_exch_u64(unsigned long long *p, unsigned long long v);
unsigned emu_atomic_cas_u32(unsigned *p, unsigned expected, unsigned v);
unsigned long long emu_atomic_cas_u64(unsigned long long *p, unsigned long long expected, unsigned long long v);
}

#define threadIdx (emu_thread_idx())
#define blockIdx (emu_block_idx())
#define blockDim (emu_block_dim())
#define gridDim (emu_grid_dim())
#define warpSize 32

inline void __syncthreads() { emu_syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_syncwarp(mask); }
inline void __trap() { emu_trap("__trap()"); }

// ---- reinterpretation ------------------------------------------------------------------------
template <typename To, typename From> inline To emu_bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
    return __builtin_bit_cast(To, v);
}
inline float __int_as_float(int v) { return emu_bit_cast<float>(v); }
inline float __uint_as_float(unsigned v) { return emu_bit_cast<float>(v); }
inline int __float_as_int(float v) { return emu_bit_cast<int>(v); }
inline unsigned __float_as_uint(float v) { return emu_bit_cast<unsigned>(v); }

// A value of up to 8 bytes as the 64 bits a shuffle carries, and back.
template <typename T> inline unsigned long long emu_to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled types are 1 to 8 bytes");
    if constexpr (sizeof(T) == 8) return emu_bit_cast<unsigned long long>(v);
    else if constexpr (sizeof(T) == 4) return emu_bit_cast<unsigned>(v);
    else if constexpr (sizeof(T) == 2) return emu_bit_cast<unsigned short>(v);
    else return emu_bit_cast<unsigned char>(v);
}
template <typename T> inline T emu_from_bits(unsigned long long b) {
    if constexpr (sizeof(T) == 8) return emu_bit_cast<T>(b);
    else if constexpr (sizeof(T) == 4) return emu_bit_cast<T>((unsigned)b);
    else if constexpr (sizeof(T) == 2) return emu_bit_cast<T>((unsigned short)b);
    else return emu_bit_cast<T>((unsigned char)b);
}

// ---- warp shuffles and votes (every lane of the mask must call them) ----------------------------
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu_from_bits<T>(emu_shfl(mask, emu_to_bits(v), 0, src, width));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu_from_bits<T>(emu_shfl(mask, emu_to_bits(v), 1, lane_mask, width));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu_from_bits<T>(emu_shfl(mask, emu_to_bits(v), 2, (int)delta, width));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu_from_bits<T>(emu_shfl(mask, emu_to_bits(v), 3, (int)delta, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu_vote(mask, 0, pred); }
inline int __any_sync(unsigned mask, int pred) { return (int)emu_vote(mask, 1, pred); }
inline int __all_sync(unsigned mask, int pred) { return (int)emu_vote(mask, 2, pred); }

// ---- atomics ---------------------------------------------------------------------------------
inline float atomicAdd(float *p, float v) { return emu_atomic_add_f32(p, v); }
inline double atomicAdd(double *p, double v) { return emu_atomic_add_f64(p, v); }
inline unsigned atomicAdd(unsigned *p, unsigned v) { return emu_atomic_add_u32(p, v); }
inline int atomicAdd(int *p, int v) { return emu_atomic_add_i32(p, v); }
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) { return emu_atomic_add_u64(p, v); }
inline unsigned atomicAnd(unsigned *p, unsigned v) { return emu_atomic_and_u32(p, v); }
inline unsigned atomicOr(unsigned *p, unsigned v) { return emu_atomic_or_u32(p, v); }
inline unsigned atomicMin(unsigned *p, unsigned v) { return emu_atomic_min_u32(p, v); }
inline unsigned atomicMax(unsigned *p, unsigned v) { return emu_atomic_max_u32(p, v); }
inline int atomicMin(int *p, int v) { return emu_atomic_min_i32(p, v); }
inline int atomicMax(int *p, int v) { return emu_atomic_max_i32(p, v); }
inline unsigned long long atomicMin(unsigned long long *p, unsigned long long v) { return emu_atomic_min_u64(p, v); }
inline unsigned long long atomicMax(unsigned long long *p, unsigned long long v) { return emu_atomic_max_u64(p, v); }
inline unsigned atomicExch(unsigned *p, unsigned v) { return emu_atomic_exch_u32(p, v); }
inline unsigned long long atomicExch(unsigned long long *p, unsigned long long v) { return emu_atomic_exch_u64(p, v); }
inline float atomicExch(float *p, float v) {
    return __uint_as_float(emu_atomic_exch_u32(reinterpret_cast<unsigned *>(p), __float_as_uint(v)));
}
inline unsigned atomicCAS(unsigned *p, unsigned expected, unsigned v) { return emu_atomic_cas_u32(p, expected, v); }
inline unsigned long long atomicCAS(unsigned long long *p, unsigned long long expected, unsigned long long v) {
    return emu_atomic_cas_u64(p, expected, v);
}

// Conversions with an explicit rounding mode (CUDA saturates float-to-integer conversions).
inline float __uint2float_rn(unsigned u) { return (float)u; }
inline float __uint2float_rz(unsigned u) {
    const float f = (float)u;
    return (double)f > (double)u ? nextafterf(f, 0.f) : f;
}
inline unsigned __float2uint_rz(float f) {
    if (!(f > 0.f)) return 0;
    return f >= 4294967296.f ? 0xffffffffu : (unsigned)f;
}

// ---- math the host library lacks -------------------------------------------------------------
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float saturatef(float x) { return fminf(fmaxf(x, 0.f), 1.f); }
template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// ---- the PTX sites of common.cuh ---------------------------------------------------------------
// cvt.f32.f16: exact widening.
inline float cvt_f32_f16(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu;
    unsigned m = h & 0x3ffu;
    if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return __uint_as_float(sign);
        unsigned exp = 113; // normalise the subnormal
        while (!(m & 0x400u)) m <<= 1, --exp;
        return __uint_as_float(sign | ((exp - 1) << 23) | ((m & 0x3ffu) << 13));
    }
    return __uint_as_float(sign | ((e + 112) << 23) | (m << 13));
}

// cvt.rn.bf16.f32: round to nearest even, subnormals kept, NaN to the canonical 0x7fff.
inline unsigned short cvt_rn_bf16_f32(float f) {
    const unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// cvt.rn.f16.f32: round to nearest even, with subnormals, overflow to infinity, NaN to 0x7fff.
inline unsigned short cvt_rn_f16_f32(float f) {
    const unsigned x = __float_as_uint(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fff;
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u); // 65520 and above round to infinity
    if (ax <= 0x33000000u) return (unsigned short)sign;             // at most half the smallest subnormal
    if (ax < 0x38800000u) {                                           // an f16 subnormal
        const unsigned m = (ax & 0x7fffffu) | 0x800000u, shift = 126 - (ax >> 23);
        unsigned r = m >> shift;
        const unsigned rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u))) ++r;
        return (unsigned short)(sign | r);
    }
    unsigned r = (ax - 0x38000000u) >> 13;
    const unsigned rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 over the warp: the runtime gathers every
// lane's fragments (the PTX ISA's layout) and accumulates in f32.
inline void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    emu_mma_bf16_16816(d, a, b);
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: the f16 halves are widened exactly here.
inline void mma_f16_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    float af[8], bf[4];
    for (int i = 0; i < 8; ++i) af[i] = cvt_f32_f16((unsigned short)(a[i / 2] >> (16 * (i & 1))));
    for (int i = 0; i < 4; ++i) bf[i] = cvt_f32_f16((unsigned short)(b[i / 2] >> (16 * (i & 1))));
    emu_mma_f32frag_16816(d, af, bf);
}

// ---- kernel entry points -----------------------------------------------------------------------
// What the Rust side reads of a kernel before launching it.
struct EmuKernelInfo {
    unsigned params;           // parameter count
    unsigned launch_bound;     // __launch_bounds__'s thread limit, 0 for none
    unsigned sizes[32];        // each parameter's size in bytes
};

template <typename... P> constexpr EmuKernelInfo emu_kernel_info(void (*)(P...), unsigned bound) {
    static_assert(sizeof...(P) <= 32, "kernels take at most 32 parameters");
    EmuKernelInfo info{sizeof...(P), bound, {}};
    unsigned i = 0;
    ((info.sizes[i++] = (unsigned)sizeof(std::decay_t<P>)), ...);
    return info;
}

// Calls a kernel with its parameters read from the launch's array of pointers to values, as
// cuLaunchKernel takes them.
template <typename... P, size_t... I>
__attribute__((no_sanitize_thread)) inline void emu_invoke_at(void (*f)(P...), void **params, std::index_sequence<I...>) {
    f(*static_cast<std::decay_t<P> *>(params[I])...);
}
template <typename... P> __attribute__((no_sanitize_thread)) inline void emu_invoke(void (*f)(P...), void **params) {
    emu_invoke_at(f, params, std::index_sequence_for<P...>{});
}

// One anchor in the library's TLS block (the shared memory), so that there is one to allocate.
static thread_local char emu_tls_anchor;
extern "C" __attribute__((visibility("default"), no_sanitize_thread)) void *emu_tls_touch() {
    emu_tls_anchor = 1;
    return &emu_tls_anchor;
}

// Appended after the kernel source for each entry point found in it.
#define EMU_ENTRY(name, bound)                                                                                  \
    extern "C" __attribute__((visibility("default"))) const EmuKernelInfo emu_info_##name =                   \
        emu_kernel_info(&name, (unsigned)(bound));                                                             \
    extern "C" __attribute__((visibility("default"), no_sanitize_thread)) void emu_entry_##name(void **params) { \
        emu_invoke(&name, params);                                                                             \
    }
