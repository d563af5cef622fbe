// Fused cross-entropy over logits [rows, classes] with u32 targets and an ignore index, as the
// CPU reference (tensor/src/ops/loss.rs): the loss is the mean over counted rows of
// log-sum-exp(row) - row[target] (0 when no row counts), and its gradient is
// grad * (softmax - onehot) / count on counted rows, 0 on ignored rows.
//
// A target >= classes that is not the ignore index is recorded in `bad` (see record_bad_index)
// and its row treated as ignored; the host turns it into an error.
#include "common.cuh"

// Per-row losses (f32; 0 on ignored rows), one block per row.
template <typename T>
__device__ void ce_forward(const T *logits, const u32 *targets, float *row_loss, u64 *bad, u64 rows,
                           u64 classes, u32 ignore) {
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u32 t = targets[r];
        if (t == ignore || (u64)t >= classes) {
            if (threadIdx.x == 0) {
                row_loss[r] = 0.f;
                if (t != ignore) record_bad_index(bad, r, t);
            }
            continue; // uniform across the block
        }
        const T *xr = logits + r * classes;
        MaxSum st{-EMMA_INF, 0.f};
        for (u64 j = threadIdx.x; j < classes; j += blockDim.x) st = max_sum_push(st, to_float(xr[j]));
        st = block_max_sum(st);
        if (threadIdx.x == 0) row_loss[r] = (st.m + logf(st.s)) - to_float(xr[t]);
    }
}

// The number of counted rows (target != ignore), by one block.
__device__ u32 count_counted(const u32 *targets, u64 rows, u32 ignore) {
    u32 n = 0;
    for (u64 r = threadIdx.x; r < rows; r += blockDim.x) n += targets[r] != ignore ? 1u : 0u;
    return block_reduce(n, 0u, SumOp());
}

// out[0] = mean of the counted rows' losses (0 if none), count[0] = their number; one block.
template <typename T>
__device__ void ce_mean(const float *row_loss, const u32 *targets, T *out, u32 *count, u64 rows, u32 ignore) {
    float total = 0.f;
    for (u64 r = threadIdx.x; r < rows; r += blockDim.x) total += targets[r] != ignore ? row_loss[r] : 0.f;
    total = block_sum(total);
    const u32 n = count_counted(targets, rows, ignore);
    if (threadIdx.x == 0) {
        out[0] = from_float<T>(n == 0 ? 0.f : total / (float)n);
        count[0] = n;
    }
}

// dx = grad * (softmax - onehot) / max(count, 1) on counted rows, 0 elsewhere; grad is the
// upstream scalar (f32) and count the number of counted rows, both on the device.
template <typename T>
__device__ void ce_backward(const T *logits, const u32 *targets, const float *grad, const u32 *count, T *dx,
                            u64 rows, u64 classes, u32 ignore) {
    const u32 n = count[0];
    const float scale = (float)((double)grad[0] / (double)(n > 0 ? n : 1u));
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const u32 t = targets[r];
        const T *xr = logits + r * classes;
        T *dr = dx + r * classes;
        if (t == ignore || (u64)t >= classes) {
            for (u64 j = threadIdx.x; j < classes; j += blockDim.x) dr[j] = from_float<T>(0.f);
            continue;
        }
        MaxSum st{-EMMA_INF, 0.f};
        for (u64 j = threadIdx.x; j < classes; j += blockDim.x) st = max_sum_push(st, to_float(xr[j]));
        st = block_max_sum(st);
        const float lse = st.m + logf(st.s);
        for (u64 j = threadIdx.x; j < classes; j += blockDim.x) {
            const float p = expf(to_float(xr[j]) - lse);
            dr[j] = from_float<T>((j == t ? p - 1.f : p) * scale);
        }
    }
}

#define CE_ENTRIES(T, S)                                                                          \
    extern "C" __global__ void cross_entropy_rows_##S(const T *logits, const u32 *targets,       \
                                                      float *row_loss, u64 *bad, u64 rows,        \
                                                      u64 classes, u32 ignore) {                  \
        ce_forward<T>(logits, targets, row_loss, bad, rows, classes, ignore);                     \
    }                                                                                             \
    extern "C" __global__ void cross_entropy_mean_##S(const float *row_loss, const u32 *targets, \
                                                      T *out, u32 *count, u64 rows, u32 ignore) { \
        ce_mean<T>(row_loss, targets, out, count, rows, ignore);                                  \
    }                                                                                             \
    extern "C" __global__ void cross_entropy_backward_##S(                                        \
        const T *logits, const u32 *targets, const float *grad, const u32 *count, T *dx,         \
        u64 rows, u64 classes, u32 ignore) {                                                      \
        ce_backward<T>(logits, targets, grad, count, dx, rows, classes, ignore);                  \
    }

CE_ENTRIES(float, f32)
CE_ENTRIES(bf16, bf16)
CE_ENTRIES(f16, f16)

// count[0] = number of rows whose target is not the ignore index; one block.
extern "C" __global__ void cross_entropy_count(const u32 *targets, u32 *count, u64 rows, u32 ignore) {
    const u32 n = count_counted(targets, rows, ignore);
    if (threadIdx.x == 0) count[0] = n;
}
