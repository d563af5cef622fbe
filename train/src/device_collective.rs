//! The exchanges of sharded training over device tensors: the gradients' reduce-scatter and the
//! updated weights' all-gather, each over a flat 1-D buffer of `world` equal segments (see
//! [`crate::flat_layout::FlatLayout`]). On GPUs of a multi-process run they are NCCL's
//! ([`tensor::nccl::NcclGroup`]), on a second stream of each device (the reduce-scatter may be
//! only started, to overlap the backward pass); otherwise ([`HostStaged`]: the CPU,
//! thread ranks, the emulated GPU) the buffers go through the host collective, and the result
//! comes back to the tensor's device.

use crate::collective::{equal_lengths, Collective};
use crate::error::{Result, TrainError};
use tensor::nccl::NcclGroup;
use tensor::{DType, Tensor};

/// The two exchanges of a sharded step, on flat 1-D tensors. Shared with the thread that
/// exchanges gradients while the backward pass runs.
pub trait DeviceCollective: Sync {
    /// The sum over ranks of `flat` (`world` equal segments), segment `rank` of it, on `flat`'s
    /// device and in its dtype.
    fn reduce_scatter_sum(&self, flat: &Tensor) -> Result<Tensor>;
    /// [`DeviceCollective::reduce_scatter_sum`], possibly still running on the device when this
    /// returns: its result holds the sum only after [`DeviceCollective::settle`]. By default it
    /// is the whole exchange.
    fn start_reduce_scatter_sum(&self, flat: &Tensor) -> Result<Tensor> {
        self.reduce_scatter_sum(flat)
    }
    /// Makes this rank's later device work wait for every started exchange.
    fn settle(&self) -> Result<()> {
        Ok(())
    }
    /// Every rank's `segment`, in rank order, on `segment`'s device and in its dtype.
    fn all_gather(&self, segment: &Tensor) -> Result<Tensor>;
}

/// The exchanges through a host [`Collective`]: each buffer is read back to the host, gathered
/// from every rank and summed there in rank order, so every kind of rank group gives the same
/// bits.
pub struct HostStaged<'a>(pub &'a dyn Collective);

impl HostStaged<'_> {
    /// `t`'s values on the host in f32 (f32, bf16 and f16 convert exactly).
    fn values(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.to_vec::<f32>()?)
    }

    /// `values` as a 1-D tensor like `like` (its device and dtype).
    fn back(values: &[f32], like: &Tensor) -> Result<Tensor> {
        Ok(Tensor::from_slice(values, &[values.len()])?
            .to_dtype(like.dtype())?
            .to_device(like.device())?)
    }
}

impl DeviceCollective for HostStaged<'_> {
    fn reduce_scatter_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let (rank, world) = (self.0.rank(), self.0.world());
        if !flat.numel().is_multiple_of(world) {
            return Err(TrainError::Options(format!(
                "reduce-scatter of {} values over {world} ranks: not equal segments",
                flat.numel()
            )));
        }
        let n = flat.numel() / world;
        let mut sum = Self::values(flat)?;
        self.0.all_reduce_sum(&mut sum)?;
        Self::back(&sum[rank * n..(rank + 1) * n], flat)
    }

    fn all_gather(&self, segment: &Tensor) -> Result<Tensor> {
        let all = self.0.all_gather(Self::values(segment)?)?;
        equal_lengths(&all, segment.numel())?;
        let gathered: Vec<f32> = all.iter().flat_map(|buf| buf.iter().copied()).collect();
        Self::back(&gathered, segment)
    }
}

impl DeviceCollective for NcclGroup {
    fn reduce_scatter_sum(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(NcclGroup::reduce_scatter_sum(self, flat)?)
    }

    fn start_reduce_scatter_sum(&self, flat: &Tensor) -> Result<Tensor> {
        Ok(NcclGroup::start_reduce_scatter_sum(self, flat)?)
    }

    fn settle(&self) -> Result<()> {
        Ok(NcclGroup::settle(self)?)
    }

    fn all_gather(&self, segment: &Tensor) -> Result<Tensor> {
        Ok(NcclGroup::all_gather(self, segment)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{DeviceCollective, HostStaged};
    use crate::collective::ThreadGroup;
    use tensor::{DType, Tensor};

    #[test]
    fn host_staged_reduce_scatter_and_all_gather_follow_their_definitions() {
        let world = 3;
        let ranks = ThreadGroup::new(world);
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    s.spawn(move || {
                        let staged = HostStaged(g);
                        // Rank r holds r + 0.5 i at position i of 3 segments of 2.
                        let flat: Vec<f32> = (0..6).map(|i| r as f32 + 0.5 * i as f32).collect();
                        let flat = Tensor::from_slice(&flat, &[6]).unwrap();
                        let mine = staged.reduce_scatter_sum(&flat).unwrap();
                        let seg = Tensor::from_slice(&[r as f32, -(r as f32)], &[2]).unwrap();
                        let all = staged.all_gather(&seg).unwrap();
                        // A bf16 segment comes back in bf16, exactly.
                        let half = staged.all_gather(&seg.to_dtype(DType::BF16).unwrap()).unwrap();
                        assert_eq!(half.dtype(), DType::BF16);
                        assert_eq!(half.to_vec_f64(), all.to_vec_f64());
                        (mine.to_vec::<f32>().unwrap(), all.to_vec::<f32>().unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (mine, all)) in results.iter().enumerate() {
            // Sum over ranks q of q + 0.5 i = 3 + 1.5 i, for i in rank r's segment.
            let expect: Vec<f32> = (2 * r..2 * r + 2).map(|i| 3.0 + 1.5 * i as f32).collect();
            assert_eq!(mine, &expect);
            assert_eq!(all, &vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0]);
        }
    }
}
