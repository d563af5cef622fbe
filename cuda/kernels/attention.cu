// Fused scaled dot-product attention, forward: out = softmax(q kᵀ · scale, masked) v and the
// per-row log-sum-exp, without the score matrix in memory (FlashAttention-2's schedule).
//
// Shapes (contiguous): q and out [B, H, Tq, D], k and v [B, HK, Tk, D] (query head h reads key
// head h / (H / HK)), lse [B, H, Tq] in f32, keep (optional) u32 [B, Tk], nonzero = keep.
// Masks: every kind lets query i see a prefix of the keys, 0 .. att_key_end(i) (0: all keys;
// 1: causal aligned to the end of the keys, j <= i + Tk - Tq; 2: block-causal over raster rows
// `width` wide); key tiles past a block's last prefix are never loaded. A query that sees no key
// gets a zero row and a log-sum-exp of -inf. Head dims up to ATT_MAX_D.
//
// bf16 and f16: one block of four warps per (batch, head, tile of 64 queries); each warp owns 16
// query rows, holds their Q fragments in registers, and streams tiles of 64 keys through shared
// memory: S = Q Kᵀ and O += P V on the tensor cores (mma m16n8k16, f32 accumulation), the online
// softmax in registers. Head dims that are not a multiple of 16 (72, 80) are zero-filled up to the
// next multiple in shared memory only; the tensors are read and written at their own width.
// f32: one warp per query row on the CUDA cores (the precise path the tests compare against).
#include "common.cuh"

#define ATT_BR 64                    // query rows per block
#define ATT_BC 64                    // keys per tile
#define ATT_WARPS 4                  // warps per block (16 query rows each)
#define ATT_THREADS (32 * ATT_WARPS) // threads per block
#define ATT_MAX_D 128                // largest head dim
#define ATT_KLD (ATT_MAX_D / 2 + 4)  // words per row of the Q / K tile (pairs of d), padded
#define ATT_VLD (ATT_BC / 2 + 4)     // words per row of the Vᵀ tile (pairs of keys), padded

// The number of leading keys query i of tq may see (kind and width as above).
__device__ __forceinline__ u64 att_key_end(int kind, u64 width, u64 i, u64 tq, u64 tk) {
    if (kind == 0) return tk;
    if (kind == 1) {
        const u64 e = i + tk + 1;
        const u64 end = e > tq ? e - tq : 0;
        return end < tk ? end : tk;
    }
    const u64 w = width ? width : 1;
    const u64 end = (i / w + 1) * w;
    return end < tk ? end : tk;
}

// The raw 16 bits of a bf16 or f16 value, and two of them as one mma register (lo in the low half).
__device__ __forceinline__ u32 att_bits(bf16 v) { return v.bits; }
__device__ __forceinline__ u32 att_bits(f16 v) { return v.bits; }
template <typename T> __device__ __forceinline__ u32 att_pack(float lo, float hi) {
    return att_bits(from_float<T>(lo)) | (att_bits(from_float<T>(hi)) << 16);
}

// d += A B with 16-bit operands of type T.
__device__ __forceinline__ void att_mma(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2], bf16) {
    mma_bf16_16816(d, a, b);
}
__device__ __forceinline__ void att_mma(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2], f16) {
    mma_f16_16816(d, a, b);
}

// Stores row g (r = 0) or g + 8 (r = 1) of a warp's 16-row f32 accumulator tiles, times
// `factor`, rounded to T, into the row `dst` of D elements (every lane of the quad its columns).
template <typename T>
__device__ __forceinline__ void att_store_row(T *dst, const float (&acc)[ATT_MAX_D / 8][4], int r, float factor,
                                              u64 D) {
    const int t = threadIdx.x & 3, dtiles = (int)((D + 7) / 8);
#pragma unroll
    for (int n = 0; n < ATT_MAX_D / 8; ++n) {
        if (n >= dtiles) break;
        const u64 col = 8 * (u64)n + 2 * t;
        if (col < D) dst[col] = from_float<T>(acc[n][2 * r] * factor);
        if (col + 1 < D) dst[col + 1] = from_float<T>(acc[n][2 * r + 1] * factor);
    }
}

template <typename T>
__device__ void attention_forward_tc(const T *q, const T *k, const T *v, const u32 *keep, T *out, float *lse,
                                     u64 B, u64 H, u64 HK, u64 TQ, u64 TK, u64 D, float scale, int kind,
                                     u64 width) {
    __shared__ u32 ks[ATT_BC][ATT_KLD];     // the Q tile while it is loaded, then each K tile: [row][d pair]
    __shared__ u32 vt[ATT_MAX_D][ATT_VLD];  // Vᵀ of each tile: [d][key pair]
    __shared__ float kbias[ATT_BC];         // 0 for a kept key of the tile, -inf for padding
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int dw = (int)((D + 15) / 16) * 8; // words per row, d zero-filled to a multiple of 16
    const int dpad = 2 * dw;
    const int ksteps = dw / 8;          // 16-wide k steps of S = Q Kᵀ
    const int dtiles = (int)((D + 7) / 8); // 8-wide column tiles of O
    const u64 qtiles = (TQ + ATT_BR - 1) / ATT_BR;
    const T zero = from_float<T>(0.f);
    for (u64 blk = blockIdx.x; blk < B * H * qtiles; blk += gridDim.x) {
        const u64 qt = blk % qtiles, bh = blk / qtiles, hh = bh % H, bb = bh / H;
        const u64 kh = hh / (H / HK);
        const T *qp = q + bh * TQ * D;
        const T *kp = k + (bb * HK + kh) * TK * D;
        const T *vp = v + (bb * HK + kh) * TK * D;
        const u64 q0 = qt * ATT_BR;
        for (int e = tid; e < ATT_BR * dw; e += ATT_THREADS) {
            const int r = e / dw, w = e % dw;
            const u64 row = q0 + r, d0 = 2 * (u64)w;
            const T lo = row < TQ && d0 < D ? qp[row * D + d0] : zero;
            const T hi = row < TQ && d0 + 1 < D ? qp[row * D + d0 + 1] : zero;
            ks[r][w] = att_bits(lo) | (att_bits(hi) << 16);
        }
        __syncthreads();
        u32 qf[ATT_MAX_D / 16][4];
#pragma unroll
        for (int s = 0; s < ATT_MAX_D / 16; ++s)
            if (s < ksteps) load_frag_a(qf[s], &ks[0][0], ATT_KLD, warp * 16, s * 8);
        __syncthreads();

        // This thread's two rows (g and g + 8 of the warp's 16) and what they see.
        const u64 row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
        u64 end[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) end[r] = row[r] < TQ ? att_key_end(kind, width, row[r], TQ, TK) : 0;
        const u64 last = (q0 + ATT_BR < TQ ? q0 + ATT_BR : TQ) - 1;
        const u64 block_end = att_key_end(kind, width, last, TQ, TK); // the prefix is non-decreasing in i
        float m[2] = {-EMMA_INF, -EMMA_INF}, l[2] = {0.f, 0.f};
        float o[ATT_MAX_D / 8][4];
#pragma unroll
        for (int n = 0; n < ATT_MAX_D / 8; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) o[n][c] = 0.f;

        for (u64 k0 = 0; k0 < block_end; k0 += ATT_BC) {
            for (int e = tid; e < ATT_BC * dw; e += ATT_THREADS) {
                const int r = e / dw, w = e % dw;
                const u64 key = k0 + r, d0 = 2 * (u64)w;
                const T lo = key < TK && d0 < D ? kp[key * D + d0] : zero;
                const T hi = key < TK && d0 + 1 < D ? kp[key * D + d0 + 1] : zero;
                ks[r][w] = att_bits(lo) | (att_bits(hi) << 16);
            }
            for (int e = tid; e < dpad * (ATT_BC / 2); e += ATT_THREADS) {
                const int d = e % dpad, w = e / dpad;
                const u64 key = k0 + 2 * (u64)w;
                const T lo = key < TK && (u64)d < D ? vp[key * D + d] : zero;
                const T hi = key + 1 < TK && (u64)d < D ? vp[(key + 1) * D + d] : zero;
                vt[d][w] = att_bits(lo) | (att_bits(hi) << 16);
            }
            for (int j = tid; j < ATT_BC; j += ATT_THREADS) {
                const u64 key = k0 + j;
                const bool kept = key < TK && (keep == nullptr || keep[bb * TK + key] != 0);
                kbias[j] = kept ? 0.f : -EMMA_INF;
            }
            __syncthreads();

            float s[ATT_BC / 8][4];
#pragma unroll
            for (int n = 0; n < ATT_BC / 8; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) s[n][c] = 0.f;
#pragma unroll
            for (int st = 0; st < ATT_MAX_D / 16; ++st) {
                if (st >= ksteps) break;
#pragma unroll
                for (int n = 0; n < ATT_BC / 8; ++n) {
                    u32 bf[2];
                    load_frag_b(bf, &ks[0][0], ATT_KLD, 8 * n, st * 8);
                    att_mma(s[n], qf[st], bf, zero);
                }
            }
            // Scale and mask; the new row maxima (over the quad of lanes that share a row).
            float mx[2] = {-EMMA_INF, -EMMA_INF};
#pragma unroll
            for (int n = 0; n < ATT_BC / 8; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int col = 8 * n + 2 * t + (c & 1), r = c >> 1;
                    const bool seen = k0 + col < end[r] && kbias[col] == 0.f;
                    s[n][c] = seen ? s[n][c] * scale : -EMMA_INF;
                    mx[r] = fmaxf(mx[r], s[n][c]);
                }
            float corr[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float next = fmaxf(m[r], mx[r]);
                corr[r] = next == -EMMA_INF ? 1.f : expf(m[r] - next);
                m[r] = next;
                l[r] *= corr[r];
            }
#pragma unroll
            for (int n = 0; n < ATT_BC / 8; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int r = c >> 1;
                    s[n][c] = s[n][c] == -EMMA_INF ? 0.f : expf(s[n][c] - m[r]);
                    l[r] += s[n][c];
                }
#pragma unroll
            for (int n = 0; n < ATT_MAX_D / 8; ++n) {
                o[n][0] *= corr[0];
                o[n][1] *= corr[0];
                o[n][2] *= corr[1];
                o[n][3] *= corr[1];
            }
            // O += P V: the S accumulators of two adjacent column tiles are one A fragment.
#pragma unroll
            for (int kk = 0; kk < ATT_BC / 16; ++kk) {
                const u32 a[4] = {
                    att_pack<T>(s[2 * kk][0], s[2 * kk][1]),
                    att_pack<T>(s[2 * kk][2], s[2 * kk][3]),
                    att_pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                    att_pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]),
                };
#pragma unroll
                for (int n = 0; n < ATT_MAX_D / 8; ++n) {
                    if (n >= dtiles) break;
                    u32 bf[2];
                    load_frag_b(bf, &vt[0][0], ATT_VLD, 8 * n, kk * 8);
                    att_mma(o[n], a, bf, zero);
                }
            }
            __syncthreads();
        }
        // The row sums over the quad, then the normalised rows and their log-sum-exp.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (row[r] >= TQ) continue;
            att_store_row(out + (bh * TQ + row[r]) * D, o, r, l[r] > 0.f ? 1.f / l[r] : 0.f, D);
            if (t == 0) lse[bh * TQ + row[r]] = l[r] > 0.f ? m[r] + logf(l[r]) : -EMMA_INF;
        }
    }
}

// f32: one warp per query row; lane c holds channels c, c + 32, c + 64 and c + 96.
__device__ void attention_rows_f32(const float *q, const float *k, const float *v, const u32 *keep, float *out,
                                   float *lse, u64 B, u64 H, u64 HK, u64 TQ, u64 TK, u64 D, float scale, int kind,
                                   u64 width) {
    const int lane = threadIdx.x & 31;
    for (u64 rowi = global_warp(); rowi < B * H * TQ; rowi += grid_warps()) {
        const u64 i = rowi % TQ, bh = rowi / TQ, hh = bh % H, bb = bh / H;
        const u64 kh = hh / (H / HK);
        const float *kp = k + (bb * HK + kh) * TK * D;
        const float *vp = v + (bb * HK + kh) * TK * D;
        float qv[ATT_MAX_D / 32], acc[ATT_MAX_D / 32];
#pragma unroll
        for (int c = 0; c < ATT_MAX_D / 32; ++c) {
            const u64 d = lane + 32 * (u64)c;
            qv[c] = d < D ? q[rowi * D + d] : 0.f;
            acc[c] = 0.f;
        }
        const u64 end = att_key_end(kind, width, i, TQ, TK);
        float m = -EMMA_INF, l = 0.f;
        for (u64 j = 0; j < end; ++j) {
            if (keep != nullptr && keep[bb * TK + j] == 0) continue;
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < ATT_MAX_D / 32; ++c) {
                const u64 d = lane + 32 * (u64)c;
                if (d < D) dot += qv[c] * kp[j * D + d];
            }
            const float s = warp_reduce(dot, SumOp()) * scale;
            const float next = fmaxf(m, s);
            const float corr = expf(m - next), p = expf(s - next);
            l = l * corr + p;
#pragma unroll
            for (int c = 0; c < ATT_MAX_D / 32; ++c) {
                const u64 d = lane + 32 * (u64)c;
                acc[c] = acc[c] * corr + (d < D ? p * vp[j * D + d] : 0.f);
            }
            m = next;
        }
        const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
        for (int c = 0; c < ATT_MAX_D / 32; ++c) {
            const u64 d = lane + 32 * (u64)c;
            if (d < D) out[rowi * D + d] = acc[c] * inv;
        }
        if (lane == 0) lse[rowi] = l > 0.f ? m + logf(l) : -EMMA_INF;
    }
}

extern "C" __global__ void __launch_bounds__(ATT_THREADS)
    attention_forward_f32(const float *q, const float *k, const float *v, const u32 *keep, float *out, float *lse,
                          u64 B, u64 H, u64 HK, u64 TQ, u64 TK, u64 D, float scale, int kind, u64 width) {
    attention_rows_f32(q, k, v, keep, out, lse, B, H, HK, TQ, TK, D, scale, kind, width);
}

#define ATTENTION_TC_ENTRY(T, S)                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                             \
        attention_forward_##S(const T *q, const T *k, const T *v, const u32 *keep, T *out, float *lse,  \
                              u64 B, u64 H, u64 HK, u64 TQ, u64 TK, u64 D, float scale, int kind,       \
                              u64 width) {                                                               \
        attention_forward_tc<T>(q, k, v, keep, out, lse, B, H, HK, TQ, TK, D, scale, kind, width);      \
    }

ATTENTION_TC_ENTRY(bf16, bf16)
ATTENTION_TC_ENTRY(f16, f16)

// ---- backward ----------------------------------------------------------------------------------
// Deterministic, without atomics: a pre-pass takes delta = rowsum(dO ∘ O) per query; one kernel
// owns a tile of keys of one key head and sums dK and dV over every query (of every query head of
// its group) that sees them; another owns a tile of queries and sums dQ over the keys they see.
// Both recompute P = exp(S · scale - lse) from the saved log-sum-exp and round once when they
// store. In f32 they run on the CUDA cores (below): four threads share a key (or a query), thread
// part p of the four holds channels p, p + 4, p + 8, ..., and the dot products are summed over the
// four lanes. bf16 and f16 use the tensor-core versions further down.
#define ATT_BWD_TILE 32                 // keys (or queries) per block: 4 threads each
#define ATT_BWD_CHUNK 16                // query (or key) rows staged in shared memory at once
#define ATT_PER_THREAD (ATT_MAX_D / 4)  // channels per thread

// delta[row] = Σ_d dO[row, d] · O[row, d]: one warp per row.
template <typename T>
__device__ void attention_delta(const T *out, const T *grad, float *delta, u64 rows, u64 D) {
    const int lane = threadIdx.x & 31;
    for (u64 r = global_warp(); r < rows; r += grid_warps()) {
        float acc = 0.f;
        for (u64 d = lane; d < D; d += 32) acc += to_float(out[r * D + d]) * to_float(grad[r * D + d]);
        acc = warp_reduce(acc, SumOp());
        if (lane == 0) delta[r] = acc;
    }
}

// The first query of tq whose prefix reaches past key k0 (tq when none does); the prefix is
// non-decreasing in the query.
__device__ __forceinline__ u64 att_first_query(int kind, u64 width, u64 k0, u64 tq, u64 tk) {
    u64 lo = 0, hi = tq;
    while (lo < hi) {
        const u64 mid = (lo + hi) / 2;
        if (att_key_end(kind, width, mid, tq, tk) > k0) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}

// The sum of a value over the four lanes that share a key or a query.
__device__ __forceinline__ float att_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

template <typename T>
__device__ void attention_backward_kv(const T *q, const T *k, const T *v, const T *grad, const float *lse,
                                      const float *delta, const u32 *keep, T *dk, T *dv, u64 B, u64 H, u64 HK,
                                      u64 TQ, u64 TK, u64 D, float scale, int kind, u64 width) {
    __shared__ float qs[ATT_BWD_CHUNK][ATT_MAX_D];
    __shared__ float gs[ATT_BWD_CHUNK][ATT_MAX_D];
    __shared__ float rl[ATT_BWD_CHUNK], rd[ATT_BWD_CHUNK];
    __shared__ u64 rend[ATT_BWD_CHUNK];
    const int tid = threadIdx.x, jj = tid >> 2, part = tid & 3;
    const u64 ktiles = (TK + ATT_BWD_TILE - 1) / ATT_BWD_TILE, group = H / HK;
    for (u64 blk = blockIdx.x; blk < B * HK * ktiles; blk += gridDim.x) {
        const u64 kt = blk % ktiles, bk = blk / ktiles, kh = bk % HK, bb = bk / HK;
        const u64 k0 = kt * ATT_BWD_TILE, key = k0 + jj;
        const bool live = key < TK && (keep == nullptr || keep[bb * TK + key] != 0);
        float kr[ATT_PER_THREAD], vr[ATT_PER_THREAD], gk[ATT_PER_THREAD], gv[ATT_PER_THREAD];
#pragma unroll
        for (int c = 0; c < ATT_PER_THREAD; ++c) {
            const u64 d = part + 4 * (u64)c;
            const bool in = key < TK && d < D;
            kr[c] = in ? to_float(k[(bk * TK + key) * D + d]) : 0.f;
            vr[c] = in ? to_float(v[(bk * TK + key) * D + d]) : 0.f;
            gk[c] = gv[c] = 0.f;
        }
        const u64 first = att_first_query(kind, width, k0, TQ, TK);
        for (u64 hh = kh * group; hh < (kh + 1) * group; ++hh) {
            const u64 bh = bb * H + hh;
            for (u64 i0 = first; i0 < TQ; i0 += ATT_BWD_CHUNK) {
                __syncthreads(); // the previous chunk's readers are done
                for (int e = tid; e < ATT_BWD_CHUNK * ATT_MAX_D; e += ATT_THREADS) {
                    const int r = e / ATT_MAX_D, d = e % ATT_MAX_D;
                    const u64 row = i0 + r;
                    const bool in = row < TQ && (u64)d < D;
                    qs[r][d] = in ? to_float(q[(bh * TQ + row) * D + d]) : 0.f;
                    gs[r][d] = in ? to_float(grad[(bh * TQ + row) * D + d]) : 0.f;
                }
                for (int r = tid; r < ATT_BWD_CHUNK; r += ATT_THREADS) {
                    const u64 row = i0 + r;
                    rl[r] = row < TQ ? lse[bh * TQ + row] : -EMMA_INF;
                    rd[r] = row < TQ ? delta[bh * TQ + row] : 0.f;
                    rend[r] = row < TQ ? att_key_end(kind, width, row, TQ, TK) : 0;
                }
                __syncthreads();
                for (int r = 0; r < ATT_BWD_CHUNK; ++r) {
                    float s = 0.f, dp = 0.f;
#pragma unroll
                    for (int c = 0; c < ATT_PER_THREAD; ++c) {
                        const int d = part + 4 * c;
                        s += qs[r][d] * kr[c];
                        dp += gs[r][d] * vr[c];
                    }
                    s = att_quad_sum(s);
                    dp = att_quad_sum(dp);
                    const bool seen = live && key < rend[r] && rl[r] != -EMMA_INF;
                    const float p = seen ? expf(s * scale - rl[r]) : 0.f;
                    const float ds = p * (dp - rd[r]) * scale;
#pragma unroll
                    for (int c = 0; c < ATT_PER_THREAD; ++c) {
                        const int d = part + 4 * c;
                        gv[c] += p * gs[r][d];
                        gk[c] += ds * qs[r][d];
                    }
                }
            }
        }
        if (key < TK) {
#pragma unroll
            for (int c = 0; c < ATT_PER_THREAD; ++c) {
                const u64 d = part + 4 * (u64)c;
                if (d < D) {
                    dk[(bk * TK + key) * D + d] = from_float<T>(gk[c]);
                    dv[(bk * TK + key) * D + d] = from_float<T>(gv[c]);
                }
            }
        }
        __syncthreads();
    }
}

template <typename T>
__device__ void attention_backward_q(const T *q, const T *k, const T *v, const T *grad, const float *lse,
                                     const float *delta, const u32 *keep, T *dq, u64 B, u64 H, u64 HK, u64 TQ,
                                     u64 TK, u64 D, float scale, int kind, u64 width) {
    __shared__ float ks_[ATT_BWD_CHUNK][ATT_MAX_D];
    __shared__ float vs_[ATT_BWD_CHUNK][ATT_MAX_D];
    __shared__ int kept[ATT_BWD_CHUNK];
    const int tid = threadIdx.x, ii = tid >> 2, part = tid & 3;
    const u64 qtiles = (TQ + ATT_BWD_TILE - 1) / ATT_BWD_TILE, group = H / HK;
    for (u64 blk = blockIdx.x; blk < B * H * qtiles; blk += gridDim.x) {
        const u64 qt = blk % qtiles, bh = blk / qtiles, hh = bh % H, bb = bh / H;
        const u64 bk = bb * HK + hh / group;
        const u64 q0 = qt * ATT_BWD_TILE, row = q0 + ii;
        const u64 last = (q0 + ATT_BWD_TILE < TQ ? q0 + ATT_BWD_TILE : TQ) - 1;
        const u64 block_end = att_key_end(kind, width, last, TQ, TK);
        const u64 end = row < TQ ? att_key_end(kind, width, row, TQ, TK) : 0;
        const float l = row < TQ ? lse[bh * TQ + row] : -EMMA_INF;
        const float dl = row < TQ ? delta[bh * TQ + row] : 0.f;
        float qr[ATT_PER_THREAD], gr[ATT_PER_THREAD], gq[ATT_PER_THREAD];
#pragma unroll
        for (int c = 0; c < ATT_PER_THREAD; ++c) {
            const u64 d = part + 4 * (u64)c;
            const bool in = row < TQ && d < D;
            qr[c] = in ? to_float(q[(bh * TQ + row) * D + d]) : 0.f;
            gr[c] = in ? to_float(grad[(bh * TQ + row) * D + d]) : 0.f;
            gq[c] = 0.f;
        }
        for (u64 j0 = 0; j0 < block_end; j0 += ATT_BWD_CHUNK) {
            __syncthreads();
            for (int e = tid; e < ATT_BWD_CHUNK * ATT_MAX_D; e += ATT_THREADS) {
                const int r = e / ATT_MAX_D, d = e % ATT_MAX_D;
                const u64 key = j0 + r;
                const bool in = key < TK && (u64)d < D;
                ks_[r][d] = in ? to_float(k[(bk * TK + key) * D + d]) : 0.f;
                vs_[r][d] = in ? to_float(v[(bk * TK + key) * D + d]) : 0.f;
            }
            for (int r = tid; r < ATT_BWD_CHUNK; r += ATT_THREADS) {
                const u64 key = j0 + r;
                kept[r] = key < TK && (keep == nullptr || keep[bb * TK + key] != 0);
            }
            __syncthreads();
            for (int r = 0; r < ATT_BWD_CHUNK; ++r) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int c = 0; c < ATT_PER_THREAD; ++c) {
                    const int d = part + 4 * c;
                    s += qr[c] * ks_[r][d];
                    dp += gr[c] * vs_[r][d];
                }
                s = att_quad_sum(s);
                dp = att_quad_sum(dp);
                const bool seen = kept[r] && j0 + r < end && l != -EMMA_INF;
                const float p = seen ? expf(s * scale - l) : 0.f;
                const float ds = p * (dp - dl) * scale;
#pragma unroll
                for (int c = 0; c < ATT_PER_THREAD; ++c) gq[c] += ds * ks_[r][part + 4 * c];
            }
        }
        if (row < TQ) {
#pragma unroll
            for (int c = 0; c < ATT_PER_THREAD; ++c) {
                const u64 d = part + 4 * (u64)c;
                if (d < D) dq[(bh * TQ + row) * D + d] = from_float<T>(gq[c]);
            }
        }
    }
}

// ---- backward on the tensor cores (bf16, f16) ----------------------------------------------------
// The same two kernels with the products on the tensor cores: each warp owns 16 keys (dK, dV) or
// 16 queries (dQ) of a 64-wide block and holds their K and V (or Q and dO) fragments in
// registers; the other side streams through shared memory in tiles of 32, stored both by row
// (for Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, or S = Q Kᵀ and dP = dO Vᵀ) and transposed (for dV += Pᵀ dO and
// dK += dSᵀ Q, or dQ += dS K). P and dS are rounded to the operand type for their products.
#define ATT_TT 32                  // queries (or keys) per streamed tile
#define ATT_TLD (ATT_TT / 2 + 4)   // words per row of a transposed tile (pairs along the tile)

// Elements (row, col) and (row, col + 1) of a row-major [rows, D] matrix as one mma register
// (zero past the edges).
template <typename T>
__device__ __forceinline__ u32 att_pair(const T *p, u64 row, u64 rows, u64 col, u64 D) {
    const T zero = from_float<T>(0.f);
    const T lo = row < rows && col < D ? p[row * D + col] : zero;
    const T hi = row < rows && col + 1 < D ? p[row * D + col + 1] : zero;
    return att_bits(lo) | (att_bits(hi) << 16);
}

// Elements (row, col) and (row + 1, col) as one register (a transposed pair).
template <typename T>
__device__ __forceinline__ u32 att_pair_down(const T *p, u64 row, u64 rows, u64 col, u64 D) {
    const T zero = from_float<T>(0.f);
    const T lo = row < rows && col < D ? p[row * D + col] : zero;
    const T hi = row + 1 < rows && col < D ? p[(row + 1) * D + col] : zero;
    return att_bits(lo) | (att_bits(hi) << 16);
}

// The A fragments (16 rows from r0, every 16-wide k step of the head dim) of a row-major matrix.
template <typename T>
__device__ __forceinline__ void att_frags(u32 (&f)[ATT_MAX_D / 16][4], const T *p, u64 r0, u64 rows, u64 D) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int s = 0; s < ATT_MAX_D / 16; ++s) {
        const u64 c = 16 * (u64)s + 2 * t;
        f[s][0] = att_pair(p, r0 + g, rows, c, D);
        f[s][1] = att_pair(p, r0 + g + 8, rows, c, D);
        f[s][2] = att_pair(p, r0 + g, rows, c + 8, D);
        f[s][3] = att_pair(p, r0 + g + 8, rows, c + 8, D);
    }
}

// Stages rows r0 .. r0 + ATT_TT of a row-major [rows, D] matrix into `by_row` ([row][d pair]) and
// `by_col` ([d][row pair]).
template <typename T>
__device__ __forceinline__ void att_stage(u32 (*by_row)[ATT_KLD], u32 (*by_col)[ATT_TLD], const T *p, u64 r0,
                                          u64 rows, u64 D, int dw) {
    for (int e = threadIdx.x; e < ATT_TT * dw; e += ATT_THREADS) {
        const int r = e / dw, w = e % dw;
        by_row[r][w] = att_pair(p, r0 + r, rows, 2 * (u64)w, D);
    }
    for (int e = threadIdx.x; e < 2 * dw * (ATT_TT / 2); e += ATT_THREADS) {
        const int d = e % (2 * dw), w = e / (2 * dw);
        by_col[d][w] = att_pair_down(p, r0 + 2 * (u64)w, rows, (u64)d, D);
    }
}

// The A fragment of one 16-wide k step made of two adjacent 8-wide accumulator tiles.
template <typename T> __device__ __forceinline__ void att_acc_frag(u32 (&a)[4], const float (&x)[4], const float (&y)[4]) {
    a[0] = att_pack<T>(x[0], x[1]);
    a[1] = att_pack<T>(x[2], x[3]);
    a[2] = att_pack<T>(y[0], y[1]);
    a[3] = att_pack<T>(y[2], y[3]);
}

// x = A₁ B₁ and y = A₂ B₂ over the head dim for one warp's 16 rows and a streamed tile's 32
// columns: the A fragments in registers, the B tiles in shared memory by row ([column][d pair]).
template <typename T>
__device__ __forceinline__ void att_tile_products(float (&x)[ATT_TT / 8][4], float (&y)[ATT_TT / 8][4],
                                                  const u32 (&a1)[ATT_MAX_D / 16][4], const u32 *b1,
                                                  const u32 (&a2)[ATT_MAX_D / 16][4], const u32 *b2, int ksteps) {
    const T zero = from_float<T>(0.f);
#pragma unroll
    for (int n = 0; n < ATT_TT / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) x[n][c] = y[n][c] = 0.f;
#pragma unroll
    for (int s = 0; s < ATT_MAX_D / 16; ++s) {
        if (s >= ksteps) break;
#pragma unroll
        for (int n = 0; n < ATT_TT / 8; ++n) {
            u32 bf[2];
            load_frag_b(bf, b1, ATT_KLD, 8 * n, s * 8);
            att_mma(x[n], a1[s], bf, zero);
            load_frag_b(bf, b2, ATT_KLD, 8 * n, s * 8);
            att_mma(y[n], a2[s], bf, zero);
        }
    }
}

template <typename T>
__device__ void attention_backward_kv_tc(const T *q, const T *k, const T *v, const T *grad, const float *lse,
                                         const float *delta, const u32 *keep, T *dk, T *dv, u64 B, u64 H, u64 HK,
                                         u64 TQ, u64 TK, u64 D, float scale, int kind, u64 width) {
    __shared__ u32 qs[ATT_TT][ATT_KLD], gs[ATT_TT][ATT_KLD];
    __shared__ u32 qt[ATT_MAX_D][ATT_TLD], gt[ATT_MAX_D][ATT_TLD];
    __shared__ float rl[ATT_TT], rd[ATT_TT];
    __shared__ u64 rend[ATT_TT];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int dw = (int)((D + 15) / 16) * 8, ksteps = dw / 8, dtiles = (int)((D + 7) / 8);
    const u64 ktiles = (TK + ATT_BC - 1) / ATT_BC, group = H / HK;
    const T zero = from_float<T>(0.f);
    for (u64 blk = blockIdx.x; blk < B * HK * ktiles; blk += gridDim.x) {
        const u64 kt = blk % ktiles, bk = blk / ktiles, kh = bk % HK, bb = bk / HK;
        const u64 k0 = kt * ATT_BC, r0 = k0 + warp * 16;
        const T *kp = k + bk * TK * D, *vp = v + bk * TK * D;
        u32 kf[ATT_MAX_D / 16][4], vf[ATT_MAX_D / 16][4];
        att_frags(kf, kp, r0, TK, D);
        att_frags(vf, vp, r0, TK, D);
        const u64 key[2] = {r0 + g, r0 + g + 8};
        bool live[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) live[r] = key[r] < TK && (keep == nullptr || keep[bb * TK + key[r]] != 0);
        float gk[ATT_MAX_D / 8][4], gv[ATT_MAX_D / 8][4];
#pragma unroll
        for (int n = 0; n < ATT_MAX_D / 8; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) gk[n][c] = gv[n][c] = 0.f;
        const u64 first = att_first_query(kind, width, k0, TQ, TK);
        for (u64 hh = kh * group; hh < (kh + 1) * group; ++hh) {
            const u64 bh = bb * H + hh;
            for (u64 i0 = first; i0 < TQ; i0 += ATT_TT) {
                __syncthreads(); // the previous tile's readers are done
                att_stage(qs, qt, q + bh * TQ * D, i0, TQ, D, dw);
                att_stage(gs, gt, grad + bh * TQ * D, i0, TQ, D, dw);
                for (int r = tid; r < ATT_TT; r += ATT_THREADS) {
                    const u64 row = i0 + r;
                    rl[r] = row < TQ ? lse[bh * TQ + row] : -EMMA_INF;
                    rd[r] = row < TQ ? delta[bh * TQ + row] : 0.f;
                    rend[r] = row < TQ ? att_key_end(kind, width, row, TQ, TK) : 0;
                }
                __syncthreads();
                float st[ATT_TT / 8][4], dpt[ATT_TT / 8][4];
                att_tile_products<T>(st, dpt, kf, &qs[0][0], vf, &gs[0][0], ksteps);
                // Pᵀ and dSᵀ in place of Sᵀ and dPᵀ: rows are keys, columns queries.
#pragma unroll
                for (int n = 0; n < ATT_TT / 8; ++n)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const int col = 8 * n + 2 * t + (c & 1), r = c >> 1;
                        const bool seen = live[r] && key[r] < rend[col] && rl[col] != -EMMA_INF;
                        const float p = seen ? expf(st[n][c] * scale - rl[col]) : 0.f;
                        st[n][c] = p;
                        dpt[n][c] = p * (dpt[n][c] - rd[col]) * scale;
                    }
#pragma unroll
                for (int kk = 0; kk < ATT_TT / 16; ++kk) {
                    u32 pa[4], sa[4];
                    att_acc_frag<T>(pa, st[2 * kk], st[2 * kk + 1]);
                    att_acc_frag<T>(sa, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
                    for (int n = 0; n < ATT_MAX_D / 8; ++n) {
                        if (n >= dtiles) break;
                        u32 bf[2];
                        load_frag_b(bf, &gt[0][0], ATT_TLD, 8 * n, kk * 8);
                        att_mma(gv[n], pa, bf, zero);
                        load_frag_b(bf, &qt[0][0], ATT_TLD, 8 * n, kk * 8);
                        att_mma(gk[n], sa, bf, zero);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (key[r] >= TK) continue;
            att_store_row(dk + (bk * TK + key[r]) * D, gk, r, 1.f, D);
            att_store_row(dv + (bk * TK + key[r]) * D, gv, r, 1.f, D);
        }
    }
}

template <typename T>
__device__ void attention_backward_q_tc(const T *q, const T *k, const T *v, const T *grad, const float *lse,
                                        const float *delta, const u32 *keep, T *dq, u64 B, u64 H, u64 HK, u64 TQ,
                                        u64 TK, u64 D, float scale, int kind, u64 width) {
    __shared__ u32 ks[ATT_TT][ATT_KLD], vs[ATT_TT][ATT_KLD];
    __shared__ u32 kt[ATT_MAX_D][ATT_TLD];
    __shared__ int kept[ATT_TT];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int dw = (int)((D + 15) / 16) * 8, ksteps = dw / 8, dtiles = (int)((D + 7) / 8);
    const u64 qtiles = (TQ + ATT_BR - 1) / ATT_BR, group = H / HK;
    const T zero = from_float<T>(0.f);
    for (u64 blk = blockIdx.x; blk < B * H * qtiles; blk += gridDim.x) {
        const u64 qtile = blk % qtiles, bh = blk / qtiles, hh = bh % H, bb = bh / H;
        const u64 bk = bb * HK + hh / group;
        const u64 q0 = qtile * ATT_BR, r0 = q0 + warp * 16;
        const T *kp = k + bk * TK * D, *vp = v + bk * TK * D;
        u32 qf[ATT_MAX_D / 16][4], gf[ATT_MAX_D / 16][4];
        att_frags(qf, q + bh * TQ * D, r0, TQ, D);
        att_frags(gf, grad + bh * TQ * D, r0, TQ, D);
        const u64 row[2] = {r0 + g, r0 + g + 8};
        float l[2], dl[2];
        u64 end[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] = row[r] < TQ ? lse[bh * TQ + row[r]] : -EMMA_INF;
            dl[r] = row[r] < TQ ? delta[bh * TQ + row[r]] : 0.f;
            end[r] = row[r] < TQ ? att_key_end(kind, width, row[r], TQ, TK) : 0;
        }
        const u64 last = (q0 + ATT_BR < TQ ? q0 + ATT_BR : TQ) - 1;
        const u64 block_end = att_key_end(kind, width, last, TQ, TK);
        float gq[ATT_MAX_D / 8][4];
#pragma unroll
        for (int n = 0; n < ATT_MAX_D / 8; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) gq[n][c] = 0.f;
        for (u64 j0 = 0; j0 < block_end; j0 += ATT_TT) {
            __syncthreads();
            att_stage(ks, kt, kp, j0, TK, D, dw);
            for (int e = tid; e < ATT_TT * dw; e += ATT_THREADS) {
                const int r = e / dw, w = e % dw;
                vs[r][w] = att_pair(vp, j0 + r, TK, 2 * (u64)w, D);
            }
            for (int r = tid; r < ATT_TT; r += ATT_THREADS) {
                const u64 key = j0 + r;
                kept[r] = key < TK && (keep == nullptr || keep[bb * TK + key] != 0);
            }
            __syncthreads();
            float s[ATT_TT / 8][4], dp[ATT_TT / 8][4];
            att_tile_products<T>(s, dp, qf, &ks[0][0], gf, &vs[0][0], ksteps);
#pragma unroll
            for (int n = 0; n < ATT_TT / 8; ++n)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int col = 8 * n + 2 * t + (c & 1), r = c >> 1;
                    const bool seen = kept[col] && j0 + col < end[r] && l[r] != -EMMA_INF;
                    const float p = seen ? expf(s[n][c] * scale - l[r]) : 0.f;
                    s[n][c] = p * (dp[n][c] - dl[r]) * scale;
                }
#pragma unroll
            for (int kk = 0; kk < ATT_TT / 16; ++kk) {
                u32 sa[4];
                att_acc_frag<T>(sa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int n = 0; n < ATT_MAX_D / 8; ++n) {
                    if (n >= dtiles) break;
                    u32 bf[2];
                    load_frag_b(bf, &kt[0][0], ATT_TLD, 8 * n, kk * 8);
                    att_mma(gq[n], sa, bf, zero);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (row[r] >= TQ) continue;
            att_store_row(dq + (bh * TQ + row[r]) * D, gq, r, 1.f, D);
        }
    }
}

#define ATTENTION_BWD_ENTRIES(T, S, KV, Q)                                                                \
    extern "C" __global__ void attention_delta_##S(const T *out, const T *grad, float *delta, u64 rows,   \
                                                   u64 D) {                                              \
        attention_delta<T>(out, grad, delta, rows, D);                                                    \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_kv_##S(                  \
        const T *q, const T *k, const T *v, const T *grad, const float *lse, const float *delta,          \
        const u32 *keep, T *dk, T *dv, u64 B, u64 H, u64 HK, u64 TQ, u64 TK, u64 D, float scale, int kind, \
        u64 width) {                                                                                      \
        KV<T>(q, k, v, grad, lse, delta, keep, dk, dv, B, H, HK, TQ, TK, D, scale, kind, width);           \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) attention_backward_q_##S(                   \
        const T *q, const T *k, const T *v, const T *grad, const float *lse, const float *delta,          \
        const u32 *keep, T *dq, u64 B, u64 H, u64 HK, u64 TQ, u64 TK, u64 D, float scale, int kind,       \
        u64 width) {                                                                                      \
        Q<T>(q, k, v, grad, lse, delta, keep, dq, B, H, HK, TQ, TK, D, scale, kind, width);                \
    }

ATTENTION_BWD_ENTRIES(float, f32, attention_backward_kv, attention_backward_q)
ATTENTION_BWD_ENTRIES(bf16, bf16, attention_backward_kv_tc, attention_backward_q_tc)
ATTENTION_BWD_ENTRIES(f16, f16, attention_backward_kv_tc, attention_backward_q_tc)
