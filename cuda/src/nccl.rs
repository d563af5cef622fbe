//! NCCL collectives between the ranks of a multi-process run, one GPU per process. Rank 0
//! creates NCCL's unique id ([`unique_id`]), the rendezvous hands it to every rank, and each
//! rank builds its [`NcclComm`] from it on its own device. The collectives run on a second
//! stream of the device: each waits for the work queued before it on the device's stream, and
//! the device's stream waits for it either at once (in order with the kernels around it, as if
//! it were one of them) or, for the calls that are only started, at [`NcclComm::settle`], so
//! the exchange overlaps the kernels queued in between. They sum in the library's order (fixed
//! for a given topology, so runs repeat).
//!
//! NCCL needs a real GPU: on the emulated device every call is an error saying so.

use crate::device::{DType, DeviceBuffer, DeviceElem, GpuDevice};
use crate::error::{CudaError, DriverContext, Result};
use crate::probe::{self, Library};
use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};
use std::sync::{Arc, Mutex};

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// A fresh NCCL unique id (rank 0 makes it; every rank builds its communicator from it).
pub fn unique_id() -> Result<Vec<u8>> {
    probe::require(&[Library::Nccl])?;
    let id = result::get_uniqueid().map_err(|status| CudaError::Nccl {
        op: "ncclGetUniqueId",
        status,
    })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The NCCL element type of `dtype`.
fn nccl_type(op: &'static str, dtype: DType) -> Result<sys::ncclDataType_t> {
    match dtype {
        DType::F32 => Ok(sys::ncclDataType_t::ncclFloat32),
        DType::BF16 => Ok(sys::ncclDataType_t::ncclBfloat16),
        DType::F16 => Ok(sys::ncclDataType_t::ncclFloat16),
        other => Err(CudaError::shape(op, format!("no NCCL sum for {other:?}"))),
    }
}

/// This rank's NCCL communicator, on one device.
pub struct NcclComm {
    /// The communicator; NCCL calls on one communicator must not overlap, hence the lock.
    comm: Mutex<sys::ncclComm_t>,
    /// The stream the collectives run on.
    side: Arc<CudaStream>,
    device: GpuDevice,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator handle may move between threads; every use goes through the mutex,
// so no two calls overlap.
unsafe impl Send for NcclComm {}
// SAFETY: as above.
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the communicator of `world` ranks that share `id` as `rank`, on `device`. Blocks
    /// until every rank has joined (NCCL's own rendezvous over the id).
    pub fn new(device: &GpuDevice, id: &[u8], rank: usize, world: usize) -> Result<Self> {
        let op = "ncclCommInitRank";
        if device.is_emulated() {
            return Err(CudaError::NoDevice(
                "NCCL needs a real GPU; the emulated device exchanges through the host".into(),
            ));
        }
        probe::require(&[Library::Nccl])?;
        if id.len() != UNIQUE_ID_BYTES || rank >= world {
            return Err(CudaError::shape(
                op,
                format!(
                    "rank {rank} of {world} with a {}-byte id ({UNIQUE_ID_BYTES} expected)",
                    id.len()
                ),
            ));
        }
        let mut uid = sys::ncclUniqueId {
            internal: [0; UNIQUE_ID_BYTES],
        };
        for (dst, &src) in uid.internal.iter_mut().zip(id) {
            *dst = src as _;
        }
        device.bind()?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let (n, r) = (world as i32, rank as i32);
        // SAFETY: `comm` receives the new communicator; the device's context is current.
        unsafe { result::comm_init_rank(&mut comm, n, uid, r) }
            .map_err(|status| CudaError::Nccl { op, status })?;
        let side = device
            .driver_stream()?
            .fork()
            .during("creating the collectives' stream")?;
        Ok(NcclComm {
            comm: Mutex::new(comm),
            side,
            device: device.clone(),
            rank,
            world,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The device the communicator runs on.
    pub fn device(&self) -> &GpuDevice {
        &self.device
    }

    /// Checks `send` and `recv` (on this device, of lengths that fit `call`) and queues `call`
    /// on the collectives' stream, after the work queued so far on the device's stream; with
    /// `wait`, the device's stream then waits for it.
    fn launch<T: DeviceElem>(
        &self,
        call: Call,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
        wait: bool,
    ) -> Result<()> {
        let op = call.name();
        self.device.check_owner(op, send)?;
        self.device.check_owner(op, recv)?;
        let (s, r, w) = (send.len(), recv.len(), self.world);
        let fits = match call {
            Call::AllReduce => s == r,
            Call::ReduceScatter => r.checked_mul(w) == Some(s),
            Call::AllGather => s.checked_mul(w) == Some(r),
        };
        if !fits {
            return Err(CudaError::shape(
                op,
                format!("{s} elements sent and {r} received do not fit {w} ranks"),
            ));
        }
        let dtype = nccl_type(op, T::DTYPE)?;
        let comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        if comm.is_null() {
            return Err(CudaError::NcclAborted { op });
        }
        self.device.bind()?;
        let main = self.device.driver_stream()?;
        self.side
            .join(main)
            .during("ordering a collective after the kernels before it")?;
        let stream = self.side.cu_stream() as sys::cudaStream_t;
        let (src, dst) = (send.device_ptr() as *const _, recv.device_ptr() as *mut _);
        let sum = sys::ncclRedOp_t::ncclSum;
        // SAFETY: `src` and `dst` address `s` and `r` elements of `dtype` on this device, as the
        // call's counts (per rank where it splits a buffer) say; the communicator is ours.
        let status = unsafe {
            match call {
                Call::AllReduce => result::all_reduce(src, dst, s, dtype, sum, *comm, stream),
                Call::ReduceScatter => result::reduce_scatter(src, dst, r, dtype, sum, *comm, stream),
                Call::AllGather => result::all_gather(src, dst, s, dtype, *comm, stream),
            }
        };
        status
            .map(drop)
            .map_err(|status| CudaError::Nccl { op, status })?;
        if wait {
            self.settle()?;
        }
        Ok(())
    }

    /// Aborts the communicator: NCCL ends its unfinished collectives (for a watchdog, when a
    /// rank they wait for has died), and every later call is an error.
    pub fn abort(&self) -> Result<()> {
        let mut comm = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let live = std::mem::replace(&mut *comm, std::ptr::null_mut());
        if live.is_null() {
            return Ok(());
        }
        // SAFETY: the communicator is ours, and no call of ours is in it (we hold the lock).
        unsafe { result::comm_abort(live) }
            .map(drop)
            .map_err(|status| CudaError::Nccl {
                op: "ncclCommAbort",
                status,
            })
    }

    /// Makes the device's stream wait for every collective queued so far (the started ones
    /// included): after this, their results may be read and their buffers freed.
    pub fn settle(&self) -> Result<()> {
        self.device.bind()?;
        self.device
            .driver_stream()?
            .join(&self.side)
            .during("ordering the kernels after the collectives")
    }

    /// The element-wise sum over ranks of `send`, in `recv` on every rank.
    pub fn all_reduce_sum<T: DeviceElem>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.launch(Call::AllReduce, send, recv, true)
    }

    /// Sums `send` (`world` equal segments) over ranks and leaves segment `rank` of the sum in
    /// `recv`.
    pub fn reduce_scatter_sum<T: DeviceElem>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.launch(Call::ReduceScatter, send, recv, true)
    }

    /// [`NcclComm::reduce_scatter_sum`], only started: the kernels queued after it do not wait
    /// for it, but they wait for the collectives started before it (so one runs at a time
    /// behind the kernels, and a pipeline of started calls holds two calls' buffers). Neither
    /// buffer may be read, written or freed before the next started call or
    /// [`NcclComm::settle`].
    pub fn start_reduce_scatter_sum<T: DeviceElem>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.settle()?;
        self.launch(Call::ReduceScatter, send, recv, false)
    }

    /// Every rank's `send`, in rank order, in `recv` (`world` segments of `send`'s length).
    pub fn all_gather<T: DeviceElem>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.launch(Call::AllGather, send, recv, true)
    }
}

/// The NCCL collectives used here (every reduction is a sum).
#[derive(Clone, Copy)]
enum Call {
    /// Both buffers as long.
    AllReduce,
    /// The sent buffer `world` segments of the received one's length.
    ReduceScatter,
    /// The received buffer `world` segments of the sent one's length.
    AllGather,
}

impl Call {
    /// NCCL's name for it.
    fn name(self) -> &'static str {
        match self {
            Call::AllReduce => "ncclAllReduce",
            Call::ReduceScatter => "ncclReduceScatter",
            Call::AllGather => "ncclAllGather",
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = *self.comm.get_mut().unwrap_or_else(|e| e.into_inner());
        if comm.is_null() {
            return; // aborted
        }
        // SAFETY: the communicator is ours and no call is in flight (we hold it exclusively).
        // A failure here cannot be reported; the process is ending the run anyway.
        let _ = unsafe { result::comm_destroy(comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::{unique_id, NcclComm};
    use crate::CudaError;

    #[test]
    fn without_nccl_or_a_gpu_the_errors_say_what_is_missing() {
        match unique_id() {
            Ok(id) => assert_eq!(id.len(), super::UNIQUE_ID_BYTES),
            Err(e @ CudaError::LibraryMissing { .. }) => assert!(e.to_string().contains("libnccl"), "{e}"),
            Err(e) => panic!("unexpected error {e}"),
        }
        if let Ok(dev) = crate::GpuDevice::open_emulated(0) {
            let err = NcclComm::new(&dev, &[0; 128], 0, 1)
                .err()
                .expect("no NCCL on the emulator");
            assert!(err.to_string().contains("real GPU"), "{err}");
        }
    }
}
