//! The host allocator's policy for tensor buffers.
//!
//! Tensors are large and short-lived: a training step frees and allocates buffers of the same
//! sizes over and over. With glibc's default settings a buffer above an adaptive threshold is
//! mapped fresh from the kernel and unmapped when freed, and the heap's free top is trimmed back
//! to the kernel, so new buffers page-fault their memory in again (a tenth of a small SigLIP
//! training step in a `perf` profile, page faults and their zero fill).

/// Asks glibc to keep freed memory for reuse: every buffer comes from the heap (none is mapped
/// and unmapped on its own, however large: a fresh 64 MiB output would otherwise page-fault
/// 16,384 pages in on every call), and the heap is never trimmed. The process then holds on to
/// its peak resident memory instead of returning it between steps. Our binaries call this first
/// thing; a program embedding the library decides for itself. Returns whether the settings were
/// applied (only with glibc).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
