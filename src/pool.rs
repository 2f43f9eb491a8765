//! Where a forward runs: decode-sized forwards on a thread of rayon's pool.

/// Most rows (new tokens) in a forward that [`on_pool`] moves onto rayon's pool.
const MAX_ROWS: usize = 64;

/// Runs `f`, a forward over `rows` new tokens, on a thread of rayon's pool (the caller blocks
/// until it returns) when the forward is decode-sized (at most [`MAX_ROWS`] rows) and the
/// caller is not a worker of a rayon pool already; otherwise on the caller.
///
/// A forward makes many parallel calls (projections, attention, norms; a few hundred in a
/// model's decode step). Called from outside the pool, each one parks the caller and wakes it
/// again; called from a worker, the other workers steal their parts while they still spin.
/// For SmolLM2-135M's decode steps (tens of microseconds per call) that is 10–25% of a token's
/// time, for one MiniLM sentence 10% (see `docs/performance.md`). Larger forwards stay on the
/// caller: their big intermediate tensors would come from glibc's per-thread arena of a
/// worker, which hands freed memory back to the system more eagerly (all-MiniLM-L6-v2's
/// encoder at batch 32 took 50% more page faults and 10% more time there).
pub(crate) fn on_pool<R: Send>(rows: usize, f: impl FnOnce() -> R + Send) -> R {
    if rows > MAX_ROWS || rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// Rows of `t`: its elements over its last dimension (tokens of a `(.., L, E)` input).
pub(crate) fn rows(t: &candle_core::Tensor) -> usize {
    t.elem_count() / t.dims().last().copied().unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_sized_work_moves_to_a_worker_and_larger_work_stays() {
        // The test harness's threads are not rayon workers.
        assert_eq!(rayon::current_thread_index(), None);
        let here = std::thread::current().id();
        let (id, index) = on_pool(1, || {
            (std::thread::current().id(), rayon::current_thread_index())
        });
        assert_ne!(id, here);
        assert!(index.is_some());
        assert!(on_pool(MAX_ROWS, rayon::current_thread_index).is_some());
        let (id, index) = on_pool(MAX_ROWS + 1, || {
            (std::thread::current().id(), rayon::current_thread_index())
        });
        assert_eq!((id, index), (here, None));
        // Inside a worker the call runs where it is (no nested scope, no other thread).
        let (outer, inner) = on_pool(1, || {
            let outer = std::thread::current().id();
            (outer, on_pool(1, || std::thread::current().id()))
        });
        assert_eq!(outer, inner);
    }
}
