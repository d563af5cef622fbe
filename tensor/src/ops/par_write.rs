//! Outputs written in place by parallel tasks, without a zero fill first: a kernel that writes
//! every element of its output would otherwise pay one more pass over it (a `memset`, or the
//! kernel's zeroing of fresh pages), which for memory-bound ops is a third of their time or more.

use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A vector of `n` elements written in parallel tasks of `chunk` elements (the last one shorter):
/// `write(c, piece)` writes elements `c·chunk .. c·chunk + piece.len()`.
///
/// # Safety
/// `write` must write every element of each `piece` it is given (or panic, in which case the
/// vector is dropped unread).
pub(crate) unsafe fn par_write<O: Send>(
    n: usize,
    chunk: usize,
    write: impl Fn(usize, &mut [MaybeUninit<O>]) + Sync,
) -> Vec<O> {
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(c, piece)| write(c, piece));
    // SAFETY: the caller's `write` wrote all n elements (a panic above never reaches here).
    unsafe { out.set_len(n) };
    out
}

/// Writes `values` into `piece`, one per element, in order.
///
/// # Panics
/// When `values` runs out before `piece` is full: a piece is never left partly unwritten.
#[inline(always)]
pub(crate) fn write_each<O>(piece: &mut [MaybeUninit<O>], mut values: impl Iterator<Item = O>) {
    for slot in piece {
        slot.write(values.next().expect("one value per element"));
    }
}

#[cfg(test)]
mod tests {
    use super::{par_write, write_each};

    #[test]
    fn every_task_writes_its_own_elements() {
        for (n, chunk) in [(0, 4), (1, 4), (10, 3), (1000, 7), (64, 64), (5, 0)] {
            // SAFETY: each piece is written in full.
            let v: Vec<u64> = unsafe {
                par_write(n, chunk, |c, piece| {
                    let start = c * chunk.max(1);
                    for (k, o) in piece.iter_mut().enumerate() {
                        o.write((start + k) as u64 * 3);
                    }
                })
            };
            assert_eq!(
                v,
                (0..n as u64).map(|i| i * 3).collect::<Vec<_>>(),
                "n {n} chunk {chunk}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "one value per element")]
    fn too_few_values_panic_rather_than_leave_elements_unwritten() {
        let mut piece = [std::mem::MaybeUninit::<u8>::uninit(); 3];
        write_each(&mut piece, [1, 2].into_iter());
    }
}
