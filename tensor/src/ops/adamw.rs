//! The fused AdamW update: one pass over a parameter, its gradient and its two moments.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::storage::CpuStorage;
use crate::{DType, FloatElement, Real, Result, Tensor, TensorError};
use cuda::kernels::{AdamCoefficients, AdamWStep};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// The CPU update of packed slices into fresh parameter and moment vectors.
fn update_cpu<T: FloatElement>(
    (p, g, m, v): (&[T], &[T], &[T], &[T]),
    c: &AdamCoefficients<T::Acc>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (mut p_out, mut m_out, mut v_out) = (p.to_vec(), m.to_vec(), v.to_vec());
    p_out
        .par_chunks_mut(CHUNK)
        .zip(m_out.par_chunks_mut(CHUNK))
        .zip(v_out.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                let gi = g[i].to_acc();
                let mi = c.beta1 * m[i].to_acc() + c.one_minus_beta1 * gi;
                let vi = c.beta2 * v[i].to_acc() + c.one_minus_beta2 * (gi * gi);
                let denom = num_traits::Float::sqrt(vi * c.inv_bc2) + c.eps;
                let pi = p[i].to_acc() * c.decay_factor - ((mi * c.inv_bc1) / denom) * c.lr;
                (p[i], m[i], v[i]) = (T::from_acc(pi), T::from_acc(mi), T::from_acc(vi));
            }
        });
    (p_out, m_out, v_out)
}

/// The CUDA update: f32 weights and moments (copied, then updated in place by the fused kernel),
/// a gradient of any float dtype.
fn update_cuda(
    gpu: &Gpu,
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &AdamWStep,
) -> Result<[Tensor; 3]> {
    for t in [p, m, v] {
        if t.dtype() != DType::F32 {
            return Err(TensorError::DeviceDType {
                op: gpu.op,
                dtype: t.dtype(),
                device: gpu.device,
            });
        }
    }
    let n = p.numel();
    let fresh = |t: &Tensor| -> Result<cuda::DeviceBuffer<f32>> {
        let packed = gpu.packed(t)?;
        let mut out = gpu.alloc::<f32>(n)?;
        gpu.check(gpu.dev.copy(packed.cuda_buffer::<f32>(), &mut out))?;
        Ok(out)
    };
    let (mut p_out, mut m_out, mut v_out) = (fresh(p)?, fresh(m)?, fresh(v)?);
    let g = gpu.packed(g)?;
    cuda_float_dispatch!(gpu.op, gpu.device, g.dtype(), G => {
        gpu.check(gpu.dev.adamw(&mut p_out, g.cuda_buffer::<G>(), (&mut m_out, &mut v_out), None, h))?;
    });
    let shape = p.shape();
    Ok([
        gpu.tensor(p_out, shape),
        gpu.tensor(m_out, shape),
        gpu.tensor(v_out, shape),
    ])
}

impl Tensor {
    /// One AdamW step of the parameter `self` given its gradient and moments `m`, `v` (all of
    /// one shape): `m' = β1·m + (1−β1)·g`, `v' = β2·v + (1−β2)·g²`,
    /// `p' = p·(1 − lr·wd) − lr·(m'/bc1) / (√(v'/bc2) + eps)` with `bc = 1 − β^step`, in one
    /// pass. Returns `[p', m', v']`. On the CPU every operand has the parameter's dtype and the
    /// arithmetic is done in its compute type; on a GPU the parameter and moments are f32
    /// (master weights) and the gradient any float dtype.
    pub fn adamw_update(
        &self,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
        hyper: &AdamWStep,
    ) -> Result<[Tensor; 3]> {
        let op = "adamw_update";
        for (name, t) in [("gradient", grad), ("first moment", m), ("second moment", v)] {
            if t.shape() != self.shape() {
                return shape_err(
                    op,
                    format!(
                        "{name} has shape {:?}, the parameter {:?}",
                        t.shape(),
                        self.shape()
                    ),
                );
            }
        }
        if hyper.step == 0 {
            return shape_err(op, "steps are counted from 1");
        }
        if let Some(gpu) = Gpu::of(op, &[self, grad, m, v])? {
            return update_cuda(&gpu, self, grad, m, v, hyper);
        }
        for t in [grad, m, v] {
            self.check_same_dtype(op, t)?;
        }
        let packed: Vec<Tensor> = [self, grad, m, v].iter().map(|t| t.contiguous()).collect();
        float_dispatch!(op, self.dtype(), T => {
            let s = |i: usize| packed[i].contiguous_slice::<T>();
            let (p, m, v) = update_cpu::<T>((s(0), s(1), s(2), s(3)), &hyper.coefficients().map(<T as FloatElement>::Acc::lit));
            let wrap = |data: Vec<T>| Tensor::from_cpu(CpuStorage::from_vec(data), self.shape());
            Ok([wrap(p), wrap(m), wrap(v)])
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{AdamWStep, DType, Tensor};

    #[test]
    fn one_step_matches_the_formula_in_f64() {
        let h = AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.5,
            step: 2,
        };
        let t = |v: Vec<f64>| Tensor::from_vec(v, &[3]).unwrap();
        let (p, g, m, v) = (
            vec![1.0, -2.0, 0.5],
            vec![0.3, -0.1, 2.0],
            vec![0.1, 0.2, -0.3],
            vec![0.01, 0.02, 0.03],
        );
        let [p2, m2, v2] = t(p.clone())
            .adamw_update(&t(g.clone()), &t(m.clone()), &t(v.clone()), &h)
            .unwrap();
        let (bc1, bc2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.99f64.powi(2));
        for i in 0..3 {
            let mi = 0.9 * m[i] + 0.1 * g[i];
            let vi = 0.99 * v[i] + 0.01 * g[i] * g[i];
            let pi = p[i] * (1.0 - 0.1 * 0.5) - 0.1 * (mi / bc1) / ((vi / bc2).sqrt() + 1e-8);
            for (got, want) in [(&p2, pi), (&m2, mi), (&v2, vi)] {
                let got = got.to_vec_f64()[i];
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let h = AdamWStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let p = Tensor::ones(&[2, 3], DType::F32);
        let err = p
            .adamw_update(&Tensor::ones(&[3, 2], DType::F32), &p, &p, &h)
            .unwrap_err();
        assert!(err.to_string().contains("gradient has shape [3, 2]"), "{err}");
        let err = p
            .adamw_update(&Tensor::ones(&[2, 3], DType::BF16), &p, &p, &h)
            .unwrap_err();
        assert!(err.to_string().contains("bf16"), "{err}");
        assert!(p.adamw_update(&p, &p, &p, &AdamWStep { step: 0, ..h }).is_err());
    }
}
