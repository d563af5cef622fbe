// The Mamba-1 selective scan, as the CPU reference (tensor/src/ops/selective_scan.rs) defines it:
// u, delta, z [B, D, L]; A [D, N]; B, C [B, N, L]; D, delta_bias [D];
//   dt_t = softplus(delta_t + delta_bias)   (or without softplus)
//   h_t[n] = exp(dt_t A[d, n]) h_{t-1}[n] + dt_t B[b, n, t] u_t,   h_{-1} = 0
//   y_t = (sum_n C[b, n, t] h_t[n] + D[d] u_t) * silu(z_t)
// computed in f32 and rounded once to T.
//
// Forward: one block per row (b, d). The sequence is cut into chunks of SCAN_CHUNK = 2048 steps;
// each thread owns consecutive steps of a chunk. For every state n the block runs a parallel scan
// of the affine maps h -> a h + b (a = exp(dt A), b = dt B u): a sequential pass over a thread's
// steps, a warp scan with shuffles, then the warp totals composed through shared memory, starting
// from the state carried in from the previous chunk. The state entering each chunk is written to
// `chunk_states` [B, D, n_chunks, N] (f32) for the backward pass.
//
// Backward: one block per (b, group of consecutive channels), its rows in order, chunks in reverse. Per chunk and state n it recomputes the states
// from the saved chunk-entering state (forward block scan), then runs the reverse scan of
// R_t = exp(dt_t A) (g_t C_t + R_{t+1}) (the gradient flowing into h_{t-1}), carried across chunks
// from right to left. du, ddelta, dz are written per row; dA, dD, d(delta_bias) are reduced per
// row in a fixed order into f32 partials [B, ...] that `sum_parts` sums over the batch;
// dB and dC, which sum over channels, are summed per block (its channels in order) into f32 partials
// [groups, B, N, L] that `sum_parts` sums over the groups. No atomics: the backward is bitwise
// reproducible for given shapes and group count.
//
// `selective_state_update`: one decoding step, one warp per row (b, d), lanes over the states.
#include "common.cuh"

#define SCAN_FWD_THREADS 128
#define SCAN_FWD_ITEMS 16
#define SCAN_BWD_THREADS 256
#define SCAN_BWD_ITEMS 8
// Steps per chunk; forward and backward cut the sequence identically.
#define SCAN_CHUNK (SCAN_FWD_THREADS * SCAN_FWD_ITEMS)
// Largest state size the kernels hold in shared memory.
#define SCAN_MAX_STATE 256

static_assert(SCAN_CHUNK == SCAN_BWD_THREADS * SCAN_BWD_ITEMS, "one chunk size");

#define FULL_MASK 0xffffffffu

// The affine map h -> a h + b.
struct Affine {
    float a;
    float b;
};

// `f` then `g`.
__device__ __forceinline__ Affine compose(Affine f, Affine g) { return Affine{g.a * f.a, g.a * f.b + g.b}; }

// Block-wide scan of one affine map per thread, in thread order (forward) or reverse thread order
// (reverse), applied to `carry` (the state entering the block's first map in scan order). Returns
// the state entering this thread's map; `end` receives the state after all maps. `tot` is shared
// scratch of WARPS entries that no other thread uses until the next __syncthreads after this call
// (callers alternate two buffers). Every thread of the block must call it.
template <int WARPS, bool REVERSE>
__device__ __forceinline__ float block_scan(Affine v, float carry, Affine *tot, float &end) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Inclusive warp scan in scan order.
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float pa, pb;
        if (REVERSE) {
            pa = __shfl_down_sync(FULL_MASK, v.a, o);
            pb = __shfl_down_sync(FULL_MASK, v.b, o);
        } else {
            pa = __shfl_up_sync(FULL_MASK, v.a, o);
            pb = __shfl_up_sync(FULL_MASK, v.b, o);
        }
        const bool has = REVERSE ? lane + o < 32 : lane >= o;
        if (has) v = compose(Affine{pa, pb}, v);
    }
    // Exclusive: the neighbour's inclusive value (identity for the first lane in scan order).
    Affine ex;
    if (REVERSE) {
        ex.a = __shfl_down_sync(FULL_MASK, v.a, 1);
        ex.b = __shfl_down_sync(FULL_MASK, v.b, 1);
        if (lane == 31) ex = Affine{1.f, 0.f};
        if (lane == 0) tot[warp] = v;
    } else {
        ex.a = __shfl_up_sync(FULL_MASK, v.a, 1);
        ex.b = __shfl_up_sync(FULL_MASK, v.b, 1);
        if (lane == 0) ex = Affine{1.f, 0.f};
        if (lane == 31) tot[warp] = v;
    }
    __syncthreads();
    float h = carry, mine = carry;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) {
        const int w = REVERSE ? WARPS - 1 - k : k;
        if (w == warp) mine = h;
        const Affine t = tot[w];
        h = t.a * h + t.b;
    }
    end = h;
    return ex.a * mine + ex.b;
}

// ITEMS consecutive values of a row from `t0` (zero past `len`), widened to f32.
template <typename T, int ITEMS>
__device__ __forceinline__ void load_items(const T *row, u64 t0, u64 len, float *out) {
    constexpr int PER = Pack<T>::N;
    static_assert(ITEMS % PER == 0, "whole 16-byte vectors");
    if (t0 + ITEMS <= len && aligned16(row + t0)) {
        const Pack<T> *v = reinterpret_cast<const Pack<T> *>(row + t0);
#pragma unroll
        for (int k = 0; k < ITEMS / PER; ++k) {
            const Pack<T> p = v[k];
#pragma unroll
            for (int i = 0; i < PER; ++i) out[k * PER + i] = to_float(p.v[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) out[i] = t0 + i < len ? to_float(row[t0 + i]) : 0.f;
    }
}

// Stores ITEMS values of a row from `t0` (those before `len`), rounded to T.
template <typename T, int ITEMS>
__device__ __forceinline__ void store_items(T *row, u64 t0, u64 len, const float *in) {
    constexpr int PER = Pack<T>::N;
    if (t0 + ITEMS <= len && aligned16(row + t0)) {
        Pack<T> *v = reinterpret_cast<Pack<T> *>(row + t0);
#pragma unroll
        for (int k = 0; k < ITEMS / PER; ++k) {
            Pack<T> p;
#pragma unroll
            for (int i = 0; i < PER; ++i) p.v[i] = from_float<T>(in[k * PER + i]);
            v[k] = p;
        }
    } else {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i)
            if (t0 + i < len) row[t0 + i] = from_float<T>(in[i]);
    }
}

// The steps dt of ITEMS items (0 past the end, so that padding steps keep the state), and the
// raw values delta + delta_bias.
template <int ITEMS>
__device__ __forceinline__ void steps(const float *delta, float bias, int softplus, u64 t0, u64 len, float *dt,
                                      float *raw) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        raw[i] = delta[i] + bias;
        dt[i] = t0 + i < len ? scan_dt(raw[i], softplus) : 0.f;
    }
}

// State n at a thread's ITEMS steps: B and C, and the map h -> decay h + input of every step.
template <int ITEMS> struct StateSteps {
    float b[ITEMS], c[ITEMS], decay[ITEMS], input[ITEMS];
};

// Loads B and C of state n (rows `Brow`, `Crow`) at the ITEMS steps from `t0` and forms each
// step's map: decay = exp(dt A_n), input = dt B u. Returns the maps composed in step order.
template <typename T, int ITEMS>
__device__ __forceinline__ Affine state_steps(StateSteps<ITEMS> &s, const T *Brow, const T *Crow, u64 t0, u64 len,
                                              const float *dt, const float *u, float an) {
    load_items<T, ITEMS>(Brow, t0, len, s.b);
    load_items<T, ITEMS>(Crow, t0, len, s.c);
    Affine agg{1.f, 0.f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        s.decay[i] = expf(dt[i] * an);
        s.input[i] = dt[i] * s.b[i] * u[i];
        agg = compose(agg, Affine{s.decay[i], s.input[i]});
    }
    return agg;
}

template <typename T>
__device__ void scan_forward(const T *u, const T *delta, const T *A, const T *Bm, const T *Cm, const T *Dv,
                             const T *z, const T *dbias, T *y, T *last, float *chunk_states, u64 batch, u64 D,
                             u64 L, u64 N, int softplus) {
    constexpr int ITEMS = SCAN_FWD_ITEMS, WARPS = SCAN_FWD_THREADS / 32;
    __shared__ Affine tot[2][WARPS];
    __shared__ float carry[2][SCAN_MAX_STATE];
    const int tid = threadIdx.x;
    const u64 chunks = (L + SCAN_CHUNK - 1) / SCAN_CHUNK;
    int it = 0;
    for (u64 row = blockIdx.x; row < batch * D; row += gridDim.x) {
        const u64 b = row / D, d = row % D;
        for (u64 n = tid; n < N; n += blockDim.x) carry[0][n] = 0.f;
        __syncthreads();
        const float skip = value_or_zero(Dv, d), bias = value_or_zero(dbias, d);
        for (u64 c = 0; c < chunks; ++c) {
            const u64 t0 = c * SCAN_CHUNK + (u64)tid * ITEMS;
            float uv[ITEMS], dt[ITEMS], acc[ITEMS], raw[ITEMS];
            load_items<T, ITEMS>(u + row * L, t0, L, uv);
            load_items<T, ITEMS>(delta + row * L, t0, L, raw);
            steps<ITEMS>(raw, bias, softplus, t0, L, dt, raw);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) acc[i] = 0.f;
            for (u64 n = 0; n < N; ++n) {
                StateSteps<ITEMS> st;
                const Affine agg = state_steps<T, ITEMS>(st, Bm + (b * N + n) * L, Cm + (b * N + n) * L, t0, L, dt,
                                                         uv, to_float(A[d * N + n]));
                const float h0 = carry[c & 1][n];
                if (tid == 0 && chunk_states != nullptr) chunk_states[(row * chunks + c) * N + n] = h0;
                float end;
                float h = block_scan<WARPS, false>(agg, h0, tot[it & 1], end);
                ++it;
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    h = st.decay[i] * h + st.input[i];
                    acc[i] += st.c[i] * h;
                }
                if (tid == 0) carry[(c + 1) & 1][n] = end;
            }
            if (y != nullptr) {
                float zv[ITEMS];
                if (z != nullptr) load_items<T, ITEMS>(z + row * L, t0, L, zv);
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    acc[i] += skip * uv[i];
                    if (z != nullptr) acc[i] *= silu_f(zv[i]);
                }
                store_items<T, ITEMS>(y + row * L, t0, L, acc);
            }
        }
        __syncthreads(); // the last chunk's carry is written
        if (last != nullptr)
            for (u64 n = tid; n < N; n += blockDim.x) last[row * N + n] = from_float<T>(carry[chunks & 1][n]);
        __syncthreads(); // before the next row resets the carry
    }
}

template <typename T>
__device__ void scan_backward(const T *u, const T *delta, const T *A, const T *Bm, const T *Cm, const T *Dv,
                              const T *z, const T *dbias, const T *dout, const float *chunk_states, T *du,
                              T *ddelta, T *dz, float *da_part, float *dd_part, float *dbias_part, float *dB,
                              float *dC, u64 batch, u64 D, u64 L, u64 N, int softplus, u64 groups) {
    constexpr int ITEMS = SCAN_BWD_ITEMS, WARPS = SCAN_BWD_THREADS / 32;
    __shared__ Affine tot[2][WARPS];
    __shared__ float rcarry[2][SCAN_MAX_STATE];
    __shared__ float da_warp[WARPS][SCAN_MAX_STATE];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const u64 chunks = (L + SCAN_CHUNK - 1) / SCAN_CHUNK;
    int it = 0;
    const u64 b = blockIdx.x / groups, group = blockIdx.x % groups, per = (D + groups - 1) / groups;
    // The block's share of dB and dC: this thread adds to the same steps for every row.
    float *const db_part = dB + (group * batch + b) * N * L, *const dc_part = dC + (group * batch + b) * N * L;
    for (u64 d = group * per; d < D && d < (group + 1) * per; ++d) {
        const u64 row = b * D + d;
        for (u64 n = tid; n < N; n += blockDim.x) {
            rcarry[0][n] = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) da_warp[w][n] = 0.f;
        }
        __syncthreads();
        const float skip = value_or_zero(Dv, d), bias = value_or_zero(dbias, d);
        float dd_acc = 0.f, dbias_acc = 0.f;
        for (u64 k = 0; k < chunks; ++k) {
            const u64 c = chunks - 1 - k;
            const u64 t0 = c * SCAN_CHUNK + (u64)tid * ITEMS;
            float uv[ITEMS], dt[ITEMS], raw[ITEMS], g0[ITEMS], go[ITEMS], zv[ITEMS];
            float du_acc[ITEMS], ddt_acc[ITEMS], y0[ITEMS];
            load_items<T, ITEMS>(u + row * L, t0, L, uv);
            load_items<T, ITEMS>(delta + row * L, t0, L, raw);
            load_items<T, ITEMS>(dout + row * L, t0, L, go);
            steps<ITEMS>(raw, bias, softplus, t0, L, dt, raw);
            if (z != nullptr) load_items<T, ITEMS>(z + row * L, t0, L, zv);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                g0[i] = z != nullptr ? go[i] * silu_f(zv[i]) : go[i];
                du_acc[i] = g0[i] * skip;
                ddt_acc[i] = 0.f;
                y0[i] = skip * uv[i];
                dd_acc += g0[i] * uv[i];
            }
            for (u64 n = 0; n < N; ++n) {
                const float an = to_float(A[d * N + n]);
                StateSteps<ITEMS> st;
                float hprev[ITEMS];
                // The states of the chunk, from the one saved at its start.
                Affine agg = state_steps<T, ITEMS>(st, Bm + (b * N + n) * L, Cm + (b * N + n) * L, t0, L, dt, uv, an);
                float end;
                float h = block_scan<WARPS, false>(agg, chunk_states[(row * chunks + c) * N + n], tot[it & 1], end);
                ++it;
                float *dc_row = dc_part + n * L;
                float *db_row = db_part + n * L;
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    hprev[i] = h;
                    h = st.decay[i] * h + st.input[i];
                    y0[i] += st.c[i] * h;
                    if (t0 + i < L) dc_row[t0 + i] += g0[i] * h;
                }
                // R_t = decay_t (g_t C_t + R_{t+1}), scanned from the right.
                agg = Affine{1.f, 0.f};
#pragma unroll
                for (int i = ITEMS - 1; i >= 0; --i) agg = compose(agg, Affine{st.decay[i], st.decay[i] * g0[i] * st.c[i]});
                const float r0 = rcarry[k & 1][n];
                float r = block_scan<WARPS, true>(agg, r0, tot[it & 1], end);
                ++it;
                if (tid == 0) rcarry[(k + 1) & 1][n] = end;
                float da = 0.f;
#pragma unroll
                for (int i = ITEMS - 1; i >= 0; --i) {
                    const float g = g0[i] * st.c[i] + r; // dL/dh_t
                    ddt_acc[i] += g * (an * st.decay[i] * hprev[i] + st.b[i] * uv[i]);
                    da += g * dt[i] * st.decay[i] * hprev[i];
                    du_acc[i] += g * dt[i] * st.b[i];
                    if (t0 + i < L) db_row[t0 + i] += g * dt[i] * uv[i];
                    r = st.decay[i] * g;
                }
                da = warp_reduce(da, SumOp());
                if (lane == 0) da_warp[warp][n] += da;
            }
            if (dz != nullptr) {
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) zv[i] = go[i] * y0[i] * silu_grad_f(zv[i]);
                store_items<T, ITEMS>(dz + row * L, t0, L, zv);
            }
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) {
                if (softplus) ddt_acc[i] *= sigmoid_f(raw[i]);
                if (t0 + i < L) dbias_acc += ddt_acc[i];
            }
            store_items<T, ITEMS>(ddelta + row * L, t0, L, ddt_acc);
            store_items<T, ITEMS>(du + row * L, t0, L, du_acc);
        }
        dd_acc = block_sum(dd_acc);
        dbias_acc = block_sum(dbias_acc);
        if (tid == 0) {
            dd_part[row] = dd_acc;
            dbias_part[row] = dbias_acc;
        }
        __syncthreads(); // every warp's dA share is in
        for (u64 n = tid; n < N; n += blockDim.x) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) s += da_warp[w][n];
            da_part[row * N + n] = s;
        }
        __syncthreads(); // before the next row resets the shared sums
    }
}

// One decoding step per row (b, d), one warp each: the new state [B, D, N] (may alias `state`) and
// y [B, D].
template <typename T>
__device__ void state_update(const T *state, const T *x, const T *dt_in, const T *A, const T *Bm, const T *Cm,
                             const T *Dv, const T *z, const T *dbias, T *y, T *state_out, u64 batch, u64 D, u64 N,
                             int softplus) {
    for (u64 row = global_warp(); row < batch * D; row += grid_warps()) {
        const u64 b = row / D, d = row % D;
        const float dt = scan_dt(to_float(dt_in[row]) + value_or_zero(dbias, d), softplus);
        const float xv = to_float(x[row]);
        const float acc =
            warp_state_step(state + row * N, A + d * N, 1, Bm + b * N, Cm + b * N, dt, xv, N, state_out + row * N);
        if ((threadIdx.x & 31) == 0) {
            float out = acc + value_or_zero(Dv, d) * xv;
            if (z != nullptr) out *= silu_f(to_float(z[row]));
            y[row] = from_float<T>(out);
        }
    }
}

#define SCAN_ENTRIES(T, S)                                                                                   \
    extern "C" __global__ void __launch_bounds__(SCAN_FWD_THREADS)                                           \
        selective_scan_fwd_##S(const T *u, const T *delta, const T *A, const T *Bm, const T *Cm,             \
                               const T *Dv, const T *z, const T *dbias, T *y, T *last, float *chunk_states,  \
                               u64 batch, u64 D, u64 L, u64 N, int softplus) {                               \
        scan_forward<T>(u, delta, A, Bm, Cm, Dv, z, dbias, y, last, chunk_states, batch, D, L, N, softplus); \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(SCAN_BWD_THREADS) selective_scan_bwd_##S(                   \
        const T *u, const T *delta, const T *A, const T *Bm, const T *Cm, const T *Dv, const T *z,           \
        const T *dbias, const T *dout, const float *chunk_states, T *du, T *ddelta, T *dz, float *da_part,   \
        float *dd_part, float *dbias_part, float *dB, float *dC, u64 batch, u64 D, u64 L, u64 N,             \
        int softplus, u64 groups) {                                                                          \
        scan_backward<T>(u, delta, A, Bm, Cm, Dv, z, dbias, dout, chunk_states, du, ddelta, dz, da_part,     \
                         dd_part, dbias_part, dB, dC, batch, D, L, N, softplus, groups);                     \
    }                                                                                                        \
    extern "C" __global__ void sum_parts_##S(const float *part, T *out, u64 parts, u64 M) {                  \
        sum_parts<T>(part, out, parts, M);                                                                   \
    }                                                                                                        \
    extern "C" __global__ void selective_state_update_##S(                                                   \
        const T *state, const T *x, const T *dt, const T *A, const T *Bm, const T *Cm, const T *Dv,          \
        const T *z, const T *dbias, T *y, T *state_out, u64 batch, u64 D, u64 N, int softplus) {             \
        state_update<T>(state, x, dt, A, Bm, Cm, Dv, z, dbias, y, state_out, batch, D, N, softplus);         \
    }

SCAN_ENTRIES(float, f32)
SCAN_ENTRIES(bf16, bf16)
SCAN_ENTRIES(f16, f16)
