//! NCCL collectives on device tensors: the GPU side of multi-process data-parallel training.
//! An [`NcclGroup`] is this process's rank on one CUDA device; its calls take 1-D tensors on that
//! device (f32, bf16 or f16), return new packed tensors there, and are ordered with the kernels
//! around them, except the started reduce-scatter, which later kernels wait for only at
//! [`NcclGroup::settle`].

use crate::gpu::{cuda_float_dispatch, Gpu, OnDevice};
use crate::{cuda_device, Device, Result, Tensor, TensorError};
use cuda::nccl::NcclComm;
use std::sync::Mutex;

/// This process's rank of an NCCL communicator, on one CUDA device.
pub struct NcclGroup {
    comm: NcclComm,
    device: Device,
    /// The buffers of the last started collective, kept from the memory pool until it settles.
    in_flight: Mutex<Vec<Tensor>>,
}

impl NcclGroup {
    /// A fresh NCCL unique id, made by rank 0 and handed to every rank.
    pub fn unique_id() -> Result<Vec<u8>> {
        cuda::nccl::unique_id().on("nccl unique id", Device::Cpu)
    }

    /// Joins the communicator of `world` ranks that share `id`, as `rank`, on `device` (a CUDA
    /// device). Blocks until every rank has joined.
    pub fn new(device: Device, id: &[u8], rank: usize, world: usize) -> Result<Self> {
        let op = "nccl init";
        let Device::Cuda(ordinal) = device else {
            return Err(TensorError::OutOfRange {
                op,
                detail: format!("NCCL runs on CUDA devices, not {device}"),
            });
        };
        let gpu = cuda_device(ordinal)?;
        let comm = NcclComm::new(&gpu, id, rank, world).on(op, device)?;
        Ok(NcclGroup {
            comm,
            device,
            in_flight: Mutex::new(Vec::new()),
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// The device helper for `t`, checked to be a 1-D tensor on this group's device, and `t`
    /// packed.
    fn operand(&self, op: &'static str, t: &Tensor) -> Result<(Gpu, Tensor)> {
        if t.shape().len() != 1 {
            return Err(TensorError::Shape {
                op,
                detail: format!("a 1-D buffer expected, got {:?}", t.shape()),
            });
        }
        match Gpu::of(op, &[t])? {
            Some(g) if g.device == self.device => {
                let x = g.packed(t)?;
                Ok((g, x))
            }
            _ => Err(TensorError::DeviceMismatch {
                op,
                lhs: t.device(),
                rhs: self.device,
            }),
        }
    }

    /// The element-wise sum over ranks of `t`, on every rank.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = "nccl all_reduce";
        let (g, x) = self.operand(op, t)?;
        cuda_float_dispatch!(op, self.device, x.dtype(), T => {
            let mut out = g.alloc::<T>(x.numel())?;
            g.check(self.comm.all_reduce_sum(x.cuda_buffer::<T>(), &mut out))?;
            Ok(g.tensor(out, x.shape()))
        })
    }

    /// The sum over ranks of `t` (`world` equal segments), segment `rank` of it.
    pub fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(self.reduce_scatter(t, false)?.1)
    }

    /// [`NcclGroup::reduce_scatter_sum`], only started: it runs while the kernels queued after
    /// it do, and its result holds the sum only after [`NcclGroup::settle`]. The kernels queued
    /// after it wait for the reduce-scatter started before it, whose buffers go back to the
    /// memory pool then (so a pipeline of them holds at most two).
    pub fn start_reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        let (sent, out) = self.reduce_scatter(t, true)?;
        // The device's stream now waits for the one started before: its buffers may go.
        *self.in_flight.lock().unwrap_or_else(|e| e.into_inner()) = vec![sent, out.clone()];
        Ok(out)
    }

    /// The reduce-scatter of `t`, whole or only `started`: the buffer sent (`t` packed) and the
    /// result.
    fn reduce_scatter(&self, t: &Tensor, started: bool) -> Result<(Tensor, Tensor)> {
        let op = if started {
            "nccl reduce_scatter (started)"
        } else {
            "nccl reduce_scatter"
        };
        let (g, x) = self.operand(op, t)?;
        let n = x.numel() / self.world();
        let out = cuda_float_dispatch!(op, self.device, x.dtype(), T => {
            let mut out = g.alloc::<T>(n)?;
            let send = x.cuda_buffer::<T>();
            g.check(if started {
                self.comm.start_reduce_scatter_sum(send, &mut out)
            } else {
                self.comm.reduce_scatter_sum(send, &mut out)
            })?;
            Ok::<_, TensorError>(g.tensor(out, &[n]))
        })?;
        Ok((x, out))
    }

    /// Makes the device's later work wait for every collective started so far; their results
    /// may then be read.
    pub fn settle(&self) -> Result<()> {
        self.comm.settle().on("nccl settle", self.device)?;
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(())
    }

    /// Aborts the communicator: its unfinished collectives end, and every later call fails.
    pub fn abort(&self) -> Result<()> {
        self.comm.abort().on("nccl abort", self.device)
    }

    /// Every rank's `t`, in rank order.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let op = "nccl all_gather";
        let (g, x) = self.operand(op, t)?;
        let n = x.numel() * self.world();
        cuda_float_dispatch!(op, self.device, x.dtype(), T => {
            let mut out = g.alloc::<T>(n)?;
            g.check(self.comm.all_gather(x.cuda_buffer::<T>(), &mut out))?;
            Ok(g.tensor(out, &[n]))
        })
    }
}
