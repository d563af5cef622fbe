// Gathers, scatter-add and concatenation over contiguous tensors seen as [outer, len, inner]
// along the indexed axis, as the CPU reference (tensor/src/ops/index.rs).
//   index_select: out[o, i, k] = x[o, ids[i], k]        (an embedding lookup is outer = 1)
//   index_add:    acc[o, ids[i], k] += src[o, i, k]     (f32; the embedding backward)
//   concat:       one part copied into its slot of each output row
// An id >= len is recorded in `bad` (see record_bad_index) and skipped (its output is 0); the
// host turns it into an error. Gathers and copies work by element width, so they serve every
// dtype.
#include "common.cuh"

template <typename T>
__device__ void index_select(const T *x, const u32 *ids, T *out, u64 outer, u64 len, u64 inner, u64 n_ids,
                             u64 *bad) {
    const u64 total = outer * n_ids * inner;
    for (u64 e = global_thread(); e < total; e += grid_threads()) {
        const u64 k = e % inner, i = (e / inner) % n_ids, o = e / (inner * n_ids);
        const u32 id = ids[i];
        if ((u64)id >= len) {
            if (k == 0 && o == 0) record_bad_index(bad, i, id);
            out[e] = T{0};
            continue;
        }
        out[e] = x[(o * len + id) * inner + k];
    }
}

// Without atomics: thread (o, s, k) owns column k of the rows whose id is s modulo `slots` and
// walks all ids in order, so every row's sum is taken in order of i (as the CPU reference does)
// whatever `slots` is, and the result is bitwise reproducible.
template <typename T>
__device__ void index_add(const T *src, const u32 *ids, float *acc, u64 outer, u64 len, u64 inner, u64 n_ids,
                          u64 slots, u64 *bad) {
    const u64 total = outer * slots * inner;
    for (u64 e = global_thread(); e < total; e += grid_threads()) {
        const u64 k = e % inner, s = (e / inner) % slots, o = e / (inner * slots);
        for (u64 i = 0; i < n_ids; ++i) {
            const u32 id = ids[i];
            if (id % slots != s) continue;
            if ((u64)id >= len) {
                if (k == 0 && o == 0) record_bad_index(bad, i, id);
                continue;
            }
            acc[(o * len + id) * inner + k] += to_float(src[(o * n_ids + i) * inner + k]);
        }
    }
}

// out[o * run_out + offset + k] = src[o * run_src + k] for k < run_src.
template <typename T>
__device__ void concat_part(const T *src, T *out, u64 outer, u64 run_src, u64 run_out, u64 offset) {
    const u64 total = outer * run_src;
    for (u64 e = global_thread(); e < total; e += grid_threads()) {
        const u64 o = e / run_src, k = e % run_src;
        out[o * run_out + offset + k] = src[e];
    }
}

#define GATHER_ENTRIES(T, S)                                                                      \
    extern "C" __global__ void index_select_##S(const T *x, const u32 *ids, T *out, u64 outer,   \
                                                u64 len, u64 inner, u64 n_ids, u64 *bad) {        \
        index_select<T>(x, ids, out, outer, len, inner, n_ids, bad);                              \
    }                                                                                             \
    extern "C" __global__ void concat_##S(const T *src, T *out, u64 outer, u64 run_src,          \
                                          u64 run_out, u64 offset) {                              \
        concat_part<T>(src, out, outer, run_src, run_out, offset);                                \
    }

GATHER_ENTRIES(u16, b16)
GATHER_ENTRIES(u32, b32)

#define INDEX_ADD_ENTRY(T, S)                                                                     \
    extern "C" __global__ void index_add_##S(const T *src, const u32 *ids, float *acc, u64 outer, \
                                             u64 len, u64 inner, u64 n_ids, u64 slots, u64 *bad) { \
        index_add<T>(src, ids, acc, outer, len, inner, n_ids, slots, bad);                        \
    }

INDEX_ADD_ENTRY(float, f32)
INDEX_ADD_ENTRY(bf16, bf16)
INDEX_ADD_ENTRY(f16, f16)
