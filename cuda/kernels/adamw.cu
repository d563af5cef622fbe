// The fused AdamW step on f32 master weights and moments, as the CPU optimiser
// (nn/src/adamw.rs), with every coefficient computed in f64 on the host and rounded to f32:
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   p = p * (1 - lr * weight_decay) - lr * (m / bc1) / (sqrt(v / bc2) + eps)
// where bc1, bc2 are the bias corrections 1 - beta^step (passed as their reciprocals) and the
// decay is decoupled (0 for parameters that take none). Optionally writes a bf16 copy of the
// updated weights (for bf16 forward passes).
#include "common.cuh"

struct AdamParams {
    float beta1, one_minus_beta1;
    float beta2, one_minus_beta2;
    float inv_bc1, inv_bc2;
    float eps, lr, decay_factor;
};

template <typename G>
__device__ void adamw(float *p, const G *grad, float *m, float *v, bf16 *p_bf16, u64 n, const AdamParams &a) {
    for (u64 i = global_thread(); i < n; i += grid_threads()) {
        const float g = to_float(grad[i]);
        const float mi = a.beta1 * m[i] + a.one_minus_beta1 * g;
        const float vi = a.beta2 * v[i] + a.one_minus_beta2 * (g * g);
        const float denom = sqrtf(vi * a.inv_bc2) + a.eps;
        const float pi = p[i] * a.decay_factor - ((mi * a.inv_bc1) / denom) * a.lr;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (p_bf16 != nullptr) p_bf16[i] = from_float<bf16>(pi);
    }
}

// The gradient may be f32, bf16 or f16; weights and moments are f32.
#define ADAMW_ENTRY(G, S)                                                                         \
    extern "C" __global__ void adamw_##S(float *p, const G *grad, float *m, float *v,            \
                                         bf16 *p_bf16, u64 n, AdamParams a) {                     \
        adamw<G>(p, grad, m, v, p_bf16, n, a);                                                    \
    }

ADAMW_ENTRY(float, f32)
ADAMW_ENTRY(bf16, bf16)
ADAMW_ENTRY(f16, f16)
