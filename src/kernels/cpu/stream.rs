//! A software prefetch stream spread over the compute.
//!
//! The decode path reads K and V once, a sub-tile of keys for every KV head at a time, and
//! prefetches the next sub-tile while it computes the current one. Issued as one burst, those
//! prefetches (hundreds of KiB) stall the core until the memory system has taken them — the
//! core's miss buffers hold a few dozen lines — and the compute then runs with no load in
//! flight: memory and compute add up instead of overlapping. Queued here instead, the
//! micro-kernels issue a few lines at each step ([`step`]), so the loads stay in flight while
//! the products run; whatever is left when the sub-tile is done is issued by [`flush`].
//!
//! How many lines a step issues comes from how many steps the micro-kernels took over the
//! previous sub-tile ([`queue_spread`]): the lines then spread over the whole of the sub-tile's
//! compute, whichever kernels run it (they step at different rates: AVX2's blocks are smaller
//! than AVX-512's).

use std::cell::Cell;

/// Bytes per cache line.
const LINE: usize = 64;

/// Most byte ranges queued at once: K's and V's rows of a sub-tile, in up to 4 runs of
/// consecutive rows (a paged cache's blocks).
pub(super) const MAX_RANGES: usize = 8;

thread_local! {
    /// The range being prefetched (`next`, `end`) and the lines to issue per step (0: empty).
    static CUR: Cell<(usize, usize, usize)> = const { Cell::new((0, 0, 0)) };
    /// The ranges queued after it (K's and V's rows of the next sub-tile), in order.
    static REST: Cell<([(usize, usize); MAX_RANGES], usize)> =
        const { Cell::new(([(0, 0); MAX_RANGES], 0)) };
    /// Steps taken since the last [`queue_spread`] or [`restart`].
    static STEPS: Cell<usize> = const { Cell::new(0) };
}

/// Forgets the steps counted so far: the next [`queue_spread`] uses its estimate. Called when a
/// walk over sub-tiles begins.
pub(super) fn restart() {
    STEPS.with(|s| s.set(0));
}

/// Queues `ranges` (as [`queue`]) spread over as many steps as were taken since the last call
/// (the previous sub-tile's compute), or over `guess` steps when none were counted (the first
/// sub-tile of a walk).
pub(super) fn queue_spread(ranges: &[(usize, usize)], guess: usize) {
    let steps = STEPS.with(|s| s.replace(0));
    let steps = if steps > 0 { steps } else { guess.max(1) };
    let lines: usize = ranges
        .iter()
        .take(MAX_RANGES)
        .map(|r| r.1.saturating_sub(r.0).div_ceil(LINE))
        .sum();
    queue(ranges, lines.div_ceil(steps));
}

/// Queues `ranges` (byte address ranges, at most [`MAX_RANGES`]: the rest are dropped) to be
/// prefetched `per_step` lines at a time.
pub(super) fn queue(ranges: &[(usize, usize)], per_step: usize) {
    let mut all = [(0, 0); MAX_RANGES];
    let mut n = 0;
    for r in ranges.iter().take(MAX_RANGES).filter(|r| r.0 < r.1) {
        all[n] = *r;
        n += 1;
    }
    if n == 0 {
        CUR.with(|c| c.set((0, 0, 0)));
        return;
    }
    CUR.with(|c| c.set((all[0].0, all[0].1, per_step.max(1))));
    REST.with(|q| q.set((all, 1)));
}

/// Issues the next lines of the queue (none when it is empty). Called by the x86 micro-kernels
/// every few products; elsewhere [`flush`] issues everything.
///
/// Always inlined, with nothing it calls left out of line ([`next_range`]): a call inside a
/// micro-kernel's loop clobbers every vector register, and the register allocator then kept the
/// accumulators on the stack for the whole loop (a load and a store around every product). Which
/// build got the call depended on unrelated code elsewhere in the crate; measured on AMD Zen 4,
/// the bf16 `P · V` of causal L = 2048 attention ran at half its speed in those builds.
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) fn step() {
    STEPS.with(|s| s.set(s.get() + 1));
    CUR.with(|c| {
        let (mut a, mut b, mut per) = c.get();
        let mut left = per;
        while left > 0 {
            if a < b {
                prefetch(a);
                a += LINE;
                left -= 1;
            } else {
                (a, b, per) = next_range(per);
                if per == 0 {
                    break;
                }
            }
        }
        if a >= b && per > 0 {
            (a, b, per) = next_range(per);
        }
        c.set((a, b, per));
    });
}

/// The queued range after the current one, as [`CUR`]'s value (`per` 0 when there is none).
#[inline(always)]
fn next_range(per: usize) -> (usize, usize, usize) {
    REST.with(|q| {
        let (all, i) = q.get();
        match all.get(i) {
            Some(&(a, b)) if a < b => {
                q.set((all, i + 1));
                (a, b, per)
            }
            _ => (0, 0, 0),
        }
    })
}

/// Issues everything still queued, and empties the queue.
pub(super) fn flush() {
    let mut cur = CUR.with(|c| c.get());
    while cur.2 > 0 {
        let (mut a, b, per) = cur;
        while a < b {
            prefetch(a);
            a += LINE;
        }
        cur = next_range(per);
    }
    CUR.with(|c| c.set((0, 0, 0)));
}

/// One line into L2 (`prefetcht1`), not L1: a sub-tile's rows (every KV head, 128–512 KiB)
/// are several times L1, so prefetches into L1 evicted each other, and the rows being computed,
/// before their use, and held L1's few miss buffers. Measured on AMD Zen 4 (B8 H32 Hkv8 D128,
/// S 4096–32768): bf16 decode from 32–52% to 50–80% of the streaming-read rate (about 1.8×
/// faster), f32 about 12% faster.
#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint and never faults, and reads nothing the program sees (so
    // the address needs no provenance); the queued ranges lie inside K and V.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
            std::ptr::without_provenance(addr),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left() -> usize {
        let (a, b, per) = CUR.with(|c| c.get());
        if per == 0 {
            return 0;
        }
        let (all, i) = REST.with(|q| q.get());
        (b - a)
            + all[i..]
                .iter()
                .map(|r| r.1.saturating_sub(r.0))
                .sum::<usize>()
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
        assert_eq!(CUR.with(|c| c.get().0), a + 64 * 8);
        step();
        assert_eq!(left(), 0);
        assert_eq!(CUR.with(|c| c.get().2), 0, "an empty queue stops stepping");
        queue(&[(a, a + 64 * 10)], 2);
        step();
        flush();
        assert_eq!(left(), 0);
    }

    /// `queue_spread` issues a sub-tile's lines over as many steps as the previous sub-tile
    /// took, or over its estimate after a `restart`.
    #[test]
    fn spread_follows_the_steps_counted() {
        let buf = vec![0u8; 64 * 12];
        let a = buf.as_ptr() as usize;
        restart();
        queue_spread(&[(a, a + 64 * 12)], 4);
        assert_eq!(
            CUR.with(|c| c.get().2),
            3,
            "12 lines over the 4 steps guessed"
        );
        for _ in 0..6 {
            step();
        }
        flush();
        queue_spread(&[(a, a + 64 * 12)], 4);
        assert_eq!(
            CUR.with(|c| c.get().2),
            2,
            "12 lines over the 6 steps counted"
        );
        for _ in 0..6 {
            step();
        }
        assert_eq!(left(), 0, "the last step issued the last line");
        restart();
        queue_spread(&[(a, a + 64 * 12)], 12);
        assert_eq!(CUR.with(|c| c.get().2), 1);
        flush();
    }
}
