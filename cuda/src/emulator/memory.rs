//! The emulated device's memory: host allocations whose addresses serve as device addresses, so
//! that kernels dereference them directly; and the registry of live buffers, against which every
//! kernel access is checked.

use crate::allocator::{AllocFailure, RawMemory};
use crate::error::Result;
use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Alignment of emulated allocations, as `cuMemAlloc` gives.
const ALIGN: usize = 256;

/// The byte pattern fresh buffers are filled with: each 32-bit word `0x7fc07fc0` is an f32 NaN
/// and each 16-bit half `0x7fc0` a bf16 and f16 NaN, so reading memory no kernel wrote shows up;
/// as a u32 id it is out of range for any table.
pub(crate) const POISON_WORD: u32 = 0x7fc0_7fc0;

/// Host memory standing in for device memory, with a capacity.
#[derive(Debug)]
pub struct HostMemory {
    capacity: usize,
    used: usize,
    blocks: HashMap<u64, usize>,
}

impl HostMemory {
    /// Memory of at most `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> Self {
        HostMemory {
            capacity,
            used: 0,
            blocks: HashMap::new(),
        }
    }
}

impl RawMemory for HostMemory {
    fn allocate(&mut self, bytes: usize) -> std::result::Result<u64, AllocFailure> {
        if self.used + bytes > self.capacity {
            return Err(AllocFailure::OutOfMemory);
        }
        let layout = Layout::from_size_align(bytes.max(1), ALIGN).map_err(|_| AllocFailure::OutOfMemory)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            return Err(AllocFailure::OutOfMemory);
        }
        self.used += bytes;
        self.blocks.insert(ptr as u64, bytes);
        Ok(ptr as u64)
    }

    fn free(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        if let Some(size) = self.blocks.remove(&ptr) {
            debug_assert_eq!(size, bytes);
            let layout = Layout::from_size_align(size.max(1), ALIGN).expect("allocated with this layout");
            // SAFETY: `ptr` came from `allocate` with this layout and is freed once.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
            self.used -= size;
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        for (ptr, size) in self.blocks.drain() {
            let layout = Layout::from_size_align(size.max(1), ALIGN).expect("allocated with this layout");
            // SAFETY: as in `free`.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }
}

/// The live buffers of an emulated device: start address to length in bytes.
#[derive(Debug, Default)]
pub struct LiveBuffers {
    extents: Mutex<BTreeMap<u64, usize>>,
}

impl LiveBuffers {
    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.extents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new buffer.
    pub(crate) fn insert(&self, ptr: u64, bytes: usize) {
        if bytes > 0 {
            self.map().insert(ptr, bytes);
        }
    }

    /// Forgets a dropped buffer.
    pub(crate) fn remove(&self, ptr: u64) {
        self.map().remove(&ptr);
    }

    /// The live buffer holding address `ptr`: its start and length.
    pub(crate) fn containing(&self, ptr: u64) -> Option<(u64, usize)> {
        let map = self.map();
        let (&start, &len) = map.range(..=ptr).next_back()?;
        (ptr - start < len as u64).then_some((start, len))
    }

    /// Errors unless `[ptr, ptr + bytes)` lies inside one live buffer.
    pub(crate) fn check_range(&self, what: &str, ptr: u64, bytes: usize) -> std::result::Result<(), String> {
        if bytes == 0 {
            return Ok(());
        }
        match self.containing(ptr) {
            Some((start, len)) if ptr + bytes as u64 <= start + len as u64 => Ok(()),
            Some((start, len)) => Err(format!(
                "{what} reaches byte {} of a {len}-byte buffer",
                ptr + bytes as u64 - start
            )),
            None => Err(format!("{what} at {ptr:#x} is in no live buffer")),
        }
    }
}

/// Fills `bytes` bytes at `ptr` with the poison pattern.
///
/// # Safety
/// `ptr` must address `bytes` writable bytes.
pub(crate) unsafe fn poison(ptr: u64, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let pattern = POISON_WORD.to_le_bytes();
    // SAFETY: as the caller promises.
    let mem = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, bytes) };
    for (i, b) in mem.iter_mut().enumerate() {
        *b = pattern[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_buffers_find_their_extent() {
        let live = LiveBuffers::default();
        live.insert(1000, 100);
        live.insert(2000, 8);
        assert_eq!(live.containing(1000), Some((1000, 100)));
        assert_eq!(live.containing(1099), Some((1000, 100)));
        assert_eq!(live.containing(1100), None);
        assert!(live.check_range("x", 1090, 10).is_ok());
        assert!(live.check_range("x", 1090, 11).is_err());
        live.remove(1000);
        assert_eq!(live.containing(1050), None);
    }

    #[test]
    fn memory_has_a_capacity_and_frees() {
        let mut m = HostMemory::new(1024);
        let a = m.allocate(512).ok().unwrap();
        assert_eq!(a % ALIGN as u64, 0);
        let b = m.allocate(512).ok().unwrap();
        assert!(matches!(m.allocate(1), Err(AllocFailure::OutOfMemory)));
        m.free(a, 512).unwrap();
        assert!(m.allocate(256).is_ok());
        m.free(b, 512).unwrap();
    }
}
