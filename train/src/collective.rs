//! Communication between data-parallel ranks. The training loop is written against
//! [`Collective`]; the ranks are threads of one process ([`ThreadGroup`], `--ranks`) or
//! processes that met at the rendezvous ([`crate::process_group::ProcessGroup`], one per
//! `train --nproc-per-node` worker).
//!
//! Every rank must make the same calls in the same order (as with NCCL). Sums are taken in rank
//! order on every rank, so all ranks see bit-identical results and a run is deterministic,
//! whichever kind of group it runs on.

use crate::error::TrainError;
use crate::rendezvous::RendezvousError;
use std::collections::BTreeMap;
use std::sync::{Arc, Barrier, Mutex};
use tensor::{Device, Tensor};

/// What a collective call can fail with: another rank left, hung or aborted the run.
pub type CollectiveError = RendezvousError;

/// The collective operations of one rank.
pub trait Collective: Send + Sync {
    /// This rank's index, from 0.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Every rank's `local` buffer, in rank order (the buffers may differ in length).
    fn all_gather(&self, local: Vec<f32>) -> Result<Vec<Arc<Vec<f32>>>, CollectiveError>;

    /// The element-wise sum over ranks of equally long buffers, written into `data` on every
    /// rank (summed in rank order).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let all = self.all_gather(data.to_vec())?;
        equal_lengths(&all, data.len())?;
        data.copy_from_slice(&all[0]);
        for other in &all[1..] {
            for (d, o) in data.iter_mut().zip(other.iter()) {
                *d += o;
            }
        }
        Ok(())
    }

    /// Rank 0's `data` on every rank (the others' `data` is replaced).
    fn broadcast(&self, data: &mut Vec<f32>) -> Result<(), CollectiveError> {
        let mine = if self.rank() == 0 {
            std::mem::take(data)
        } else {
            Vec::new()
        };
        let all = self.all_gather(mine)?;
        *data = all[0].as_ref().clone();
        Ok(())
    }

    /// The sum over ranks of each value of `local`, in f64 (for counts and losses).
    fn sum_f64(&self, local: &[f64]) -> Result<Vec<f64>, CollectiveError> {
        // Each f64 travels as two f32 halves of its bits, so nothing is rounded.
        let bits: Vec<f32> = local
            .iter()
            .flat_map(|v| {
                let b = v.to_bits();
                [f32::from_bits((b >> 32) as u32), f32::from_bits(b as u32)]
            })
            .collect();
        let all = self.all_gather(bits)?;
        let mut out = vec![0.0; local.len()];
        for buf in &all {
            for (i, o) in out.iter_mut().enumerate() {
                let b = (u64::from(buf[2 * i].to_bits()) << 32) | u64::from(buf[2 * i + 1].to_bits());
                *o += f64::from_bits(b);
            }
        }
        Ok(out)
    }

    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.all_gather(Vec::new()).map(drop)
    }
}

/// Errors naming the first rank whose buffer in `all` is not `expected` values long.
pub fn equal_lengths(all: &[Arc<Vec<f32>>], expected: usize) -> Result<(), CollectiveError> {
    match all.iter().position(|buf| buf.len() != expected) {
        Some(rank) => Err(RendezvousError::Mismatched {
            rank,
            len: all[rank].len(),
            expected,
        }),
        None => Ok(()),
    }
}

/// The f32 values of `tensors`, one after another: a buffer for a collective.
pub fn flatten<'a>(tensors: impl IntoIterator<Item = &'a Tensor>) -> crate::error::Result<Vec<f32>> {
    let mut flat = Vec::new();
    for t in tensors {
        flat.extend(t.to_vec::<f32>()?);
    }
    Ok(flat)
}

/// The inverse of [`flatten`]: tensors named and shaped as `shapes` says, cut in order from
/// `flat` (a buffer `sender` sent through a collective) and placed on `device`; an error naming
/// the sender when `flat` is too short.
pub fn unflatten<'a>(
    flat: &[f32],
    shapes: impl IntoIterator<Item = (&'a String, &'a [usize])>,
    device: Device,
    sender: &str,
) -> crate::error::Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let mut at = 0;
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        let values = flat.get(at..at + n).ok_or_else(|| {
            TrainError::Options(format!(
                "{sender} sent {} values, fewer than the tensors it stands for",
                flat.len()
            ))
        })?;
        out.insert(
            name.clone(),
            Tensor::from_slice(values, shape)?.to_device(device)?,
        );
        at += n;
    }
    Ok(out)
}

/// State shared by the threads of a [`ThreadGroup`].
struct Shared {
    slots: Mutex<Vec<Arc<Vec<f32>>>>,
    barrier: Barrier,
}

/// One rank of a group of threads in this process.
pub struct ThreadGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// The `world` ranks of a new group; hand one to each thread.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            slots: Mutex::new((0..world).map(|_| Arc::new(Vec::new())).collect()),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_gather(&self, local: Vec<f32>) -> Result<Vec<Arc<Vec<f32>>>, CollectiveError> {
        self.shared.slot_lock()[self.rank] = Arc::new(local);
        // Every rank has written before anyone reads ...
        self.shared.barrier.wait();
        let all = self.shared.slot_lock().clone();
        // ... and every rank has read before anyone writes the next call's buffer.
        self.shared.barrier.wait();
        Ok(all)
    }
}

impl Shared {
    /// The slots; a rank that panicked while holding the lock cannot leave them half-written
    /// (each write is one pointer), so a poisoned lock is still usable.
    fn slot_lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Vec<f32>>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::{Collective, ThreadGroup};

    #[test]
    fn threads_gather_and_sum_in_rank_order() {
        let ranks = ThreadGroup::new(3);
        let results: Vec<(Vec<f32>, Vec<f64>, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut data = vec![r, 10.0 * r, 1.0];
                        for _ in 0..5 {
                            // Repeated calls must not mix up rounds.
                            g.barrier().unwrap();
                        }
                        g.all_reduce_sum(&mut data).unwrap();
                        let sums = g.sum_f64(&[0.1 * g.rank() as f64, 1e-17]).unwrap();
                        let lens = g
                            .all_gather(vec![0.0; g.rank()])
                            .unwrap()
                            .iter()
                            .map(|b| b.len())
                            .sum();
                        let mut shared = vec![g.rank() as f32; 2 + g.rank()];
                        g.broadcast(&mut shared).unwrap();
                        assert_eq!(shared, vec![0.0, 0.0]);
                        (data, sums, lens)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (data, sums, lens) in results {
            assert_eq!(data, vec![3.0, 30.0, 3.0]);
            assert_eq!(sums, vec![0.0 + 0.1 + 0.2, 3e-17]);
            assert_eq!(lens, 3);
        }
    }
}
