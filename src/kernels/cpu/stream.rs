//! A software prefetch stream spread over the compute.
//!
//! The decode path reads K and V once, a sub-tile of keys for every KV head at a time, and
//! prefetches the next sub-tile while it computes the current one. Issued as one burst, those
//! prefetches (hundreds of KiB) stall the core until the memory system has taken them — the
//! core's miss buffers hold a few dozen lines — and the compute then runs with no load in
//! flight: memory and compute add up instead of overlapping. Queued here instead, the
//! micro-kernels issue a few lines at each step ([`step`]), so the loads stay in flight while
//! the products run; whatever is left when the sub-tile is done is issued by [`flush`].

use std::cell::Cell;

/// Bytes per cache line.
const LINE: usize = 64;

/// Most byte ranges queued at once: K's and V's rows of a sub-tile, in up to 4 runs of
/// consecutive rows (a paged cache's blocks).
pub(super) const MAX_RANGES: usize = 8;

thread_local! {
    /// Byte ranges (`next`, `end`) still to prefetch (K's and V's rows of the next sub-tile),
    /// and the lines to issue per step.
    static QUEUE: Cell<([(usize, usize); MAX_RANGES], usize)> =
        const { Cell::new(([(0, 0); MAX_RANGES], 0)) };
}

/// Queues `ranges` (byte address ranges, at most [`MAX_RANGES`]: the rest are dropped) to be
/// prefetched `per_step` lines at a time.
pub(super) fn queue(ranges: &[(usize, usize)], per_step: usize) {
    let mut all = [(0, 0); MAX_RANGES];
    for (a, r) in all.iter_mut().zip(ranges) {
        *a = *r;
    }
    QUEUE.with(|q| q.set((all, per_step.max(1))));
}

/// Issues the next lines of the queue (none when it is empty). Called by the x86 micro-kernels;
/// elsewhere [`flush`] issues everything.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn step() {
    QUEUE.with(|q| {
        let (mut ranges, per) = q.get();
        if per == 0 {
            return;
        }
        let mut left = per;
        for r in ranges.iter_mut() {
            while left > 0 && r.0 < r.1 {
                prefetch(r.0);
                r.0 += LINE;
                left -= 1;
            }
        }
        let empty = ranges.iter().all(|r| r.0 >= r.1);
        q.set((ranges, if empty { 0 } else { per }));
    });
}

/// Issues everything still queued, and empties the queue.
pub(super) fn flush() {
    QUEUE.with(|q| {
        let (ranges, _) = q.get();
        for (mut a, b) in ranges {
            while a < b {
                prefetch(a);
                a += LINE;
            }
        }
        q.set(([(0, 0); MAX_RANGES], 0));
    });
}

#[inline]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint and never faults; the queued ranges lie inside K and V.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(addr as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left() -> usize {
        QUEUE.with(|q| q.get().0.iter().map(|r| r.1.saturating_sub(r.0)).sum())
    }

    /// Each step issues `per_step` lines, the first range before the second; the queue
    /// empties exactly, and `flush` issues the rest at once.
    #[test]
    fn steps_drain_the_queue_in_order() {
        let buf = vec![0u8; 64 * 10];
        let a = buf.as_ptr() as usize;
        queue(&[(a, a + 64 * 4), (a + 64 * 6, a + 64 * 10)], 3);
        assert_eq!(left(), 64 * 8);
        step();
        assert_eq!(left(), 64 * 5);
        step(); // one line of the first range, two of the second
        assert_eq!(QUEUE.with(|q| q.get().0[1].0), a + 64 * 8);
        step();
        assert_eq!(left(), 0);
        assert_eq!(
            QUEUE.with(|q| q.get().1),
            0,
            "an empty queue stops stepping"
        );
        queue(&[(a, a + 64 * 10)], 2);
        step();
        flush();
        assert_eq!(left(), 0);
    }
}
