//! Keeps freed tensor memory in the process between training steps.
//!
//! A training step allocates and frees the same large buffers (activations, gradients) every step.
//! glibc's malloc serves blocks above its mmap threshold with a fresh `mmap`, gives them back with
//! `munmap` on free, and trims the heap top above 128 KiB, so each step page-faulted and
//! zero-filled every such buffer again: on all-MiniLM-L6-v2 at batch 32 × 64 tokens with 2 threads
//! that was about a quarter of the step (BENCHMARKS.md, encoder step time). Binaries that train
//! call [`retain_freed_memory`] once at start; a library never changes the allocator's behaviour
//! behind its caller's back. (Raising the mmap threshold instead is capped at 32 MiB when done from
//! a program, below the 47 MB word-embedding gradient of a BERT-base vocabulary; mimalloc and
//! jemalloc at their defaults were measured too and kept faulting.)
//!
//! ```
//! qn_train::allocator::retain_freed_memory();
//! ```

/// Serves every allocation from the heap (no per-block `mmap`) and never trims it, so freed blocks
/// are reused by the next step instead of returned to the OS. The process keeps its peak
/// footprint, which a training loop reaches every step anyway. Returns whether the settings took;
/// off glibc it does nothing and returns `false`.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters and may be called at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(super::retain_freed_memory());
    }
}
