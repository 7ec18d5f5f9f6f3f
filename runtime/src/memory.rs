//! How the process's heap treats the large blocks a generation frees.
//!
//! Every call's KV cache is a new block a little larger than the last (`Concat(past, new)`),
//! and ONNX Runtime's CPU arena, which would keep such blocks, is off: it keeps one of every
//! size it has seen. glibc's malloc serves blocks above its threshold (128 KiB, raised as
//! large blocks are freed, up to 32 MiB) straight from the kernel and gives them back when
//! they are freed, so each call's cache and logits arrive as fresh pages the kernel must
//! zero on first touch: at batch 8, about 240 000 page faults and 0.7 s of system time per
//! NAR-B generation (a tenth of it).

/// Blocks up to this size come from the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 << 20;
/// The upper limit mallopt(3) documents on 64-bit systems, which some glibc releases
/// enforce: where the larger threshold is refused, this one still keeps every block up to
/// a batch-1 NAR-B cache.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const OLD_GLIBC_MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// The heap gives memory back to the kernel only when this much is free at its top.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// Serves large blocks from the heap and keeps what is freed there for the next call, so a
/// generation reuses its memory instead of faulting it in afresh at every call. It affects
/// the whole process, so the application decides: `narx` calls it at start-up. Returns
/// whether the allocator took the settings (glibc only; elsewhere it does nothing).
pub fn keep_freed_blocks() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets malloc's parameters, under malloc's own lock.
        let set = |option, value| unsafe { libc::mallopt(option, value) == 1 };
        let mmap = set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            || set(libc::M_MMAP_THRESHOLD, OLD_GLIBC_MMAP_THRESHOLD);
        let trim = set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        mmap && trim
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    fn faults() -> i64 {
        // SAFETY: getrusage writes into the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Allocates and writes a 16 MiB block, frees it; returns the page faults it took.
    fn touch_a_block() -> i64 {
        let before = faults();
        let block = std::hint::black_box(vec![1u8; 16 << 20]);
        drop(block);
        faults() - before
    }

    #[test]
    fn a_freed_block_is_reused_without_faults() {
        assert!(keep_freed_blocks());
        touch_a_block();
        // 4096 pages when the block comes fresh from the kernel.
        let again = touch_a_block();
        assert!(
            again < 64,
            "{again} page faults for a block freed just before"
        );
    }
}
