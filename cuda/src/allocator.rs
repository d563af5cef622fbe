//! A caching device allocator. Freed blocks go to a free list keyed by their size class and are
//! handed out again to later requests of the same class, so that a training step's many
//! temporary buffers cost no driver calls once the first step has run. The bookkeeping here is
//! independent of CUDA (the driver sits behind [`RawMemory`]) and is tested on the CPU.
//!
//! Reuse is safe without synchronisation because every kernel and copy of a device runs on its
//! one stream: work that uses a recycled block is queued after the work that used it before.

use crate::error::{CudaError, Result};
use std::collections::BTreeMap;

/// Granularity of small size classes, in bytes.
pub const SMALL_CLASS_STEP: usize = 512;
/// Requests up to this many bytes are rounded to a multiple of [`SMALL_CLASS_STEP`]; larger
/// ones to one of four classes per power of two (`2^k · {1.25, 1.5, 1.75, 2}`), so that at most
/// a quarter of a large block is wasted.
pub const SMALL_CLASS_LIMIT: usize = 1 << 20;

/// The size class of a request of `bytes` bytes (0 for 0); never smaller than `bytes`.
pub fn size_class(bytes: usize) -> usize {
    if bytes <= SMALL_CLASS_LIMIT {
        return bytes.div_ceil(SMALL_CLASS_STEP) * SMALL_CLASS_STEP;
    }
    // bytes in (2^k, 2^(k+1)]: steps of 2^(k-2).
    let k = usize::BITS - 1 - (bytes - 1).leading_zeros();
    let step = 1usize << (k - 2);
    bytes.div_ceil(step) * step
}

/// Why a raw allocation failed.
#[derive(Debug)]
pub enum AllocFailure {
    /// The device has no room for it.
    OutOfMemory,
    /// Anything else (reported as is).
    Other(CudaError),
}

/// Raw device memory: what the pool draws blocks from and returns them to.
pub trait RawMemory {
    /// `bytes` bytes of fresh device memory; returns the device address.
    fn allocate(&mut self, bytes: usize) -> std::result::Result<u64, AllocFailure>;
    /// Returns a block obtained from `allocate` to the device.
    fn free(&mut self, ptr: u64, bytes: usize) -> Result<()>;
    /// Waits until no queued work can still use any block (before blocks go back to the device).
    fn synchronize(&mut self) -> Result<()>;
}

/// A block handed out by the pool: its device address and its size class in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// The device address (0 for an empty block).
    pub ptr: u64,
    /// The block's size class in bytes.
    pub bytes: usize,
}

/// Counters of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes in blocks held by live buffers (size classes, not requested sizes).
    pub in_use: usize,
    /// The largest `in_use` seen (since the last [`CachingPool::reset_peak`]).
    pub peak_in_use: usize,
    /// Bytes in cached free blocks.
    pub cached: usize,
    /// Blocks obtained from the device.
    pub device_allocations: u64,
    /// Requests served from the cache.
    pub reuses: u64,
}

/// The caching pool over a [`RawMemory`].
#[derive(Debug)]
pub struct CachingPool<M: RawMemory> {
    memory: M,
    free: BTreeMap<usize, Vec<u64>>,
    stats: MemoryStats,
}

impl<M: RawMemory> CachingPool<M> {
    /// An empty pool drawing from `memory`.
    pub fn new(memory: M) -> Self {
        CachingPool {
            memory,
            free: BTreeMap::new(),
            stats: MemoryStats::default(),
        }
    }

    /// The raw memory behind the pool.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// A block of at least `bytes` bytes: a cached block of its size class if there is one,
    /// else a new one; when the device is out of memory the cache is emptied and the
    /// allocation retried once before [`CudaError::OutOfMemory`].
    pub fn allocate(&mut self, bytes: usize) -> Result<Block> {
        let class = size_class(bytes);
        if class == 0 {
            return Ok(Block { ptr: 0, bytes: 0 });
        }
        let cached = self.free.get_mut(&class).and_then(Vec::pop);
        let ptr = match cached {
            Some(ptr) => {
                self.stats.cached -= class;
                self.stats.reuses += 1;
                ptr
            }
            None => self.allocate_fresh(class)?,
        };
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok(Block { ptr, bytes: class })
    }

    /// A new block of exactly `class` bytes from the device.
    fn allocate_fresh(&mut self, class: usize) -> Result<u64> {
        let out_of_memory = |in_use| CudaError::OutOfMemory {
            requested: class,
            in_use,
        };
        let ptr = match self.memory.allocate(class) {
            Ok(ptr) => ptr,
            Err(AllocFailure::Other(e)) => return Err(e),
            Err(AllocFailure::OutOfMemory) => {
                if self.stats.cached == 0 {
                    return Err(out_of_memory(self.stats.in_use));
                }
                self.empty_cache()?;
                match self.memory.allocate(class) {
                    Ok(ptr) => ptr,
                    Err(AllocFailure::Other(e)) => return Err(e),
                    Err(AllocFailure::OutOfMemory) => return Err(out_of_memory(self.stats.in_use)),
                }
            }
        };
        self.stats.device_allocations += 1;
        Ok(ptr)
    }

    /// Takes a block back into the cache (no device call).
    pub fn release(&mut self, block: Block) {
        if block.bytes == 0 {
            return;
        }
        self.stats.in_use -= block.bytes;
        self.stats.cached += block.bytes;
        self.free.entry(block.bytes).or_default().push(block.ptr);
    }

    /// Returns every cached block to the device (after waiting for queued work).
    pub fn empty_cache(&mut self) -> Result<()> {
        if self.stats.cached == 0 {
            return Ok(());
        }
        self.memory.synchronize()?;
        while let Some((class, mut ptrs)) = self.free.pop_first() {
            while let Some(ptr) = ptrs.pop() {
                if let Err(e) = self.memory.free(ptr, class) {
                    // Keep what was not freed, so that the counters stay true.
                    ptrs.push(ptr);
                    self.free.insert(class, ptrs);
                    return Err(e);
                }
                self.stats.cached -= class;
            }
        }
        Ok(())
    }

    /// The pool's counters.
    pub fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// Restarts the peak from the current use.
    pub fn reset_peak(&mut self) {
        self.stats.peak_in_use = self.stats.in_use;
    }
}

impl<M: RawMemory> Drop for CachingPool<M> {
    fn drop(&mut self) {
        // Live buffers keep the pool alive, so only cached blocks remain here.
        let _ = self.empty_cache();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Device memory simulated on the host, with a capacity.
    #[derive(Debug, Default)]
    struct FakeMemory {
        capacity: usize,
        live: HashMap<u64, usize>,
        next: u64,
        syncs: usize,
    }

    impl FakeMemory {
        fn with_capacity(capacity: usize) -> Self {
            FakeMemory {
                capacity,
                next: 0x1000,
                ..Default::default()
            }
        }

        fn used(&self) -> usize {
            self.live.values().sum()
        }
    }

    impl RawMemory for FakeMemory {
        fn allocate(&mut self, bytes: usize) -> std::result::Result<u64, AllocFailure> {
            if self.used() + bytes > self.capacity {
                return Err(AllocFailure::OutOfMemory);
            }
            let ptr = self.next;
            self.next += bytes as u64;
            self.live.insert(ptr, bytes);
            Ok(ptr)
        }

        fn free(&mut self, ptr: u64, bytes: usize) -> Result<()> {
            assert_eq!(self.live.remove(&ptr), Some(bytes), "bad free of {ptr:#x}");
            Ok(())
        }

        fn synchronize(&mut self) -> Result<()> {
            self.syncs += 1;
            Ok(())
        }
    }

    #[test]
    fn size_classes_round_up_with_bounded_waste() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(512), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(SMALL_CLASS_LIMIT), SMALL_CLASS_LIMIT);
        assert_eq!(size_class(SMALL_CLASS_LIMIT + 1), SMALL_CLASS_LIMIT * 5 / 4);
        assert_eq!(size_class(3 << 20), 3 << 20);
        assert_eq!(size_class((3 << 20) + 1), 7 << 19);
        for bytes in (1..40_000_000usize).step_by(99_991) {
            let c = size_class(bytes);
            assert!(c >= bytes && c.is_multiple_of(SMALL_CLASS_STEP), "{bytes} -> {c}");
            if bytes > SMALL_CLASS_LIMIT {
                assert!(c - bytes <= bytes / 4, "{bytes} -> {c}");
            }
            assert_eq!(size_class(c), c, "classes are fixed points");
        }
    }

    #[test]
    fn freed_blocks_are_reused_by_class() {
        let mut pool = CachingPool::new(FakeMemory::with_capacity(1 << 30));
        let a = pool.allocate(1000).unwrap();
        assert_eq!(a.bytes, 1024);
        let b = pool.allocate(3000).unwrap();
        pool.release(a);
        // Same class: the cached block comes back.
        let c = pool.allocate(600).unwrap();
        assert_eq!(c, a);
        // Another class: a new block.
        let d = pool.allocate(100).unwrap();
        assert_ne!(d.ptr, a.ptr);
        let s = pool.stats();
        assert_eq!((s.device_allocations, s.reuses), (3, 1));
        assert_eq!(s.in_use, 1024 + 3072 + 512);
        assert_eq!(s.cached, 0);
        for blk in [b, c, d] {
            pool.release(blk);
        }
        let s = pool.stats();
        assert_eq!(
            (s.in_use, s.cached, s.peak_in_use),
            (0, 1024 + 3072 + 512, 1024 + 3072 + 512)
        );
        assert_eq!(pool.memory().live.len(), 3, "released blocks stay allocated");
        pool.empty_cache().unwrap();
        assert_eq!(pool.stats().cached, 0);
        assert!(pool.memory().live.is_empty());
        assert_eq!(pool.memory().syncs, 1);
    }

    #[test]
    fn peak_tracks_the_high_water_mark() {
        let mut pool = CachingPool::new(FakeMemory::with_capacity(1 << 30));
        let blocks: Vec<_> = (0..4).map(|_| pool.allocate(SMALL_CLASS_STEP).unwrap()).collect();
        for b in blocks {
            pool.release(b);
        }
        let _held = pool.allocate(1).unwrap();
        assert_eq!(pool.stats().peak_in_use, 4 * SMALL_CLASS_STEP);
        pool.reset_peak();
        assert_eq!(pool.stats().peak_in_use, SMALL_CLASS_STEP);
    }

    #[test]
    fn out_of_memory_empties_the_cache_then_errors() {
        let mut pool = CachingPool::new(FakeMemory::with_capacity(4096));
        let a = pool.allocate(2048).unwrap();
        let b = pool.allocate(1024).unwrap();
        pool.release(a);
        // 2048 cached + 1024 in use: a 3072-byte block fits only once the cache is emptied.
        let c = pool.allocate(3000).unwrap();
        assert_eq!(pool.stats().cached, 0);
        assert_eq!(pool.stats().in_use, 1024 + 3072);
        match pool.allocate(512) {
            Err(CudaError::OutOfMemory { requested, in_use }) => {
                assert_eq!((requested, in_use), (512, 4096));
            }
            other => panic!("expected out of memory, got {other:?}"),
        }
        pool.release(b);
        pool.release(c);
    }

    #[test]
    fn empty_requests_take_no_memory() {
        let mut pool = CachingPool::new(FakeMemory::with_capacity(0));
        let e = pool.allocate(0).unwrap();
        assert_eq!(e, Block { ptr: 0, bytes: 0 });
        pool.release(e);
        assert_eq!(pool.stats(), MemoryStats::default());
    }
}
