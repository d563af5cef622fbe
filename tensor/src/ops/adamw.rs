//! The fused AdamW update: one pass over a parameter, its gradient and its two moments.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, CudaBuffer, Gpu};
use crate::storage::{CpuStorage, Storage};
use crate::{DType, FloatElement, Real, Result, Tensor, TensorError};
use cuda::kernels::{AdamCoefficients, AdamWStep};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

/// The CPU update of packed slices, in place.
fn update_cpu<T: FloatElement>(
    (p, g, m, v): (&mut [T], &[T], &mut [T], &mut [T]),
    c: &AdamCoefficients<T::Acc>,
) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
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

/// The checks every AdamW update makes: the operands share the parameter's shape and the
/// step is counted from 1.
fn check(
    op: &'static str,
    p: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    hyper: &AdamWStep,
) -> Result<()> {
    for (name, t) in [("gradient", grad), ("first moment", m), ("second moment", v)] {
        if t.shape() != p.shape() {
            return shape_err(
                op,
                format!("{name} has shape {:?}, the parameter {:?}", t.shape(), p.shape()),
            );
        }
    }
    if hyper.step == 0 {
        return shape_err(op, "steps are counted from 1");
    }
    Ok(())
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
        check(op, self, grad, m, v, hyper)?;
        if let Some(gpu) = Gpu::of(op, &[self, grad, m, v])? {
            return update_cuda(&gpu, self, grad, m, v, hyper);
        }
        for t in [grad, m, v] {
            self.check_same_dtype(op, t)?;
        }
        let packed: Vec<Tensor> = [self, grad, m, v].iter().map(|t| t.contiguous()).collect();
        float_dispatch!(op, self.dtype(), T => {
            let s = |i: usize| packed[i].contiguous_slice::<T>();
            let (mut p, mut m, mut v) = (s(0).to_vec(), s(2).to_vec(), s(3).to_vec());
            let c = hyper.coefficients().map(<T as FloatElement>::Acc::lit);
            update_cpu::<T>((&mut p, s(1), &mut m, &mut v), &c);
            let wrap = |data: Vec<T>| Tensor::from_cpu(CpuStorage::from_vec(data), self.shape());
            Ok([wrap(p), wrap(m), wrap(v)])
        })
    }

    /// [`Tensor::adamw_update`] written into `self`, `m` and `v` themselves: one pass of the
    /// fused update over their own memory, no new buffers, when each is the only handle on its
    /// memory (as an optimizer's parameters and moments are between steps). A tensor whose
    /// memory is shared with another handle, or borrowed from a mapped file, is replaced by an
    /// updated copy instead, and the other handles keep the old values.
    pub fn adamw_update_in_place(
        &mut self,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        hyper: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw_update_in_place";
        check(op, self, grad, m, v, hyper)?;
        let gpu = Gpu::of(op, &[self, grad, m, v])?;
        if gpu.is_none() {
            for t in [grad, &*m, &*v] {
                self.check_same_dtype(op, t)?;
            }
        }
        let dtype = self.dtype();
        match (
            self.sole_storage_mut(),
            m.sole_storage_mut(),
            v.sole_storage_mut(),
        ) {
            (Some(Storage::Cpu(p)), Some(Storage::Cpu(ms)), Some(Storage::Cpu(vs))) => {
                let g = grad.contiguous();
                float_dispatch!(op, dtype, T => {
                    if let (Some(p), Some(m), Some(v)) =
                        (p.as_mut_slice::<T>(), ms.as_mut_slice::<T>(), vs.as_mut_slice::<T>())
                    {
                        let c = hyper.coefficients().map(<T as FloatElement>::Acc::lit);
                        update_cpu::<T>((p, g.contiguous_slice::<T>(), m, v), &c);
                        return Ok(());
                    }
                });
            }
            (Some(Storage::Cuda(p)), Some(Storage::Cuda(ms)), Some(Storage::Cuda(vs))) => {
                if let (Some(gpu), CudaBuffer::F32(p), CudaBuffer::F32(m), CudaBuffer::F32(v)) =
                    (&gpu, p.buffer_mut(), ms.buffer_mut(), vs.buffer_mut())
                {
                    let g = gpu.packed(grad)?;
                    cuda_float_dispatch!(gpu.op, gpu.device, g.dtype(), G => {
                        gpu.check(gpu.dev.adamw(p, g.cuda_buffer::<G>(), (m, v), None, hyper))?;
                    });
                    return Ok(());
                }
            }
            _ => {}
        }
        let [p2, m2, v2] = self.adamw_update(grad, m, v, hyper)?;
        (*self, *m, *v) = (p2, m2, v2);
        Ok(())
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

    #[test]
    fn in_place_writes_the_same_values_into_the_same_memory() {
        let h = AdamWStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
        };
        let mut rng = crate::seeded_rng(7);
        let mut r = || Tensor::randn(&[5, 7], DType::F32, 0.0, 1.0, &mut rng).unwrap();
        let fresh = |t: &Tensor| Tensor::from_vec(t.to_vec::<f32>().unwrap(), t.shape()).unwrap();
        let squared = |t: Tensor| {
            let values: Vec<f32> = t.to_vec::<f32>().unwrap().iter().map(|x| x * x).collect();
            Tensor::from_vec(values, t.shape()).unwrap()
        };
        let (p, g, m, v) = (r(), r(), r(), squared(r()));
        let [p2, m2, v2] = p.adamw_update(&g, &m, &v, &h).unwrap();
        let (mut pi, mut mi, mut vi) = (fresh(&p), fresh(&m), fresh(&v));
        let addr = |t: &Tensor| t.contiguous_slice::<f32>().as_ptr();
        let before = [addr(&pi), addr(&mi), addr(&vi)];
        pi.adamw_update_in_place(&g, &mut mi, &mut vi, &h).unwrap();
        assert_eq!([addr(&pi), addr(&mi), addr(&vi)], before, "not updated in place");
        for (a, b) in [(&p2, &pi), (&m2, &mi), (&v2, &vi)] {
            assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        }
        // A parameter shared with another handle is replaced, and the other handle keeps its
        // values.
        let mut shared = p.clone();
        let (mut ms, mut vs) = (fresh(&m), fresh(&v));
        shared.adamw_update_in_place(&g, &mut ms, &mut vs, &h).unwrap();
        assert_eq!(shared.to_vec::<f32>().unwrap(), p2.to_vec::<f32>().unwrap());
        assert_ne!(p.to_vec::<f32>().unwrap(), p2.to_vec::<f32>().unwrap());
    }
}
