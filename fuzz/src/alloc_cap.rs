//! A global allocator that, while armed, refuses any single allocation over
//! [`MAX_ALLOCATION`].
//!
//! The protocol caps every length a peer controls before allocating. Without a sanitizer,
//! libFuzzer cannot see a violation of that rule (`-malloc_limit_mb` needs ASan's malloc
//! hooks, and a huge untouched `Vec::with_capacity` barely moves the RSS), so the targets
//! enforce it here: an oversized request returns null, Rust's allocation-error handler aborts,
//! and libFuzzer records the input as a crash.
//!
//! The cap is armed only while a check runs ([`capped`]) and is disarmed before anything
//! reports a failure, because printing a backtrace itself allocates several megabytes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

/// The largest single allocation a check may make. The biggest legitimate one is the frame
/// decoder's buffer: at most the fuzz input (libFuzzer's default `-max_len` is 4096) plus one
/// capped frame (16 KiB). A sequence or string whose declared length escaped its cap would
/// ask for far more.
pub const MAX_ALLOCATION: usize = 1 << 20;

static ARMED: AtomicBool = AtomicBool::new(false);

/// Runs `check` with the cap armed.
pub(crate) fn capped<R>(check: impl FnOnce() -> R) -> R {
    static DISARM_ON_PANIC: Once = Once::new();
    DISARM_ON_PANIC.call_once(|| {
        // libfuzzer-sys has installed its hook (report, then abort) by the time a target first
        // runs; wrap it so the report can allocate freely.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            ARMED.store(false, Ordering::Relaxed);
            report(info);
        }));
    });
    ARMED.store(true, Ordering::Relaxed);
    let result = check();
    ARMED.store(false, Ordering::Relaxed);
    result
}

/// Whether a request for `size` bytes is refused; a refusal disarms the cap so that the
/// allocation-error report that follows can allocate.
fn refuse(size: usize) -> bool {
    size > MAX_ALLOCATION && ARMED.swap(false, Ordering::Relaxed)
}

struct CappedAlloc;

// SAFETY: every call forwards unchanged to `System`, except that a refused request returns
// null, which the `GlobalAlloc` contract allows as an allocation failure.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if refuse(layout.size()) {
            return core::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract for `layout`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if refuse(layout.size()) {
            return core::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc_zeroed`'s contract for `layout`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, hence from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if refuse(new_size) {
            return core::ptr::null_mut();
        }
        // SAFETY: the caller upholds `realloc`'s contract; `ptr` came from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CappedAlloc = CappedAlloc;
