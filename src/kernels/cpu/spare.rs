//! Buffers for the per-call copies of K and V, reused from call to call on the calling thread.
//!
//! A fresh allocation of several MiB per call is returned to the system when it is freed and
//! page-faulted in again by the next call: on the padded B4 L512 encoder shape the faults of one
//! 6 MiB copy cost 4 ms, more than the attention it served (9 ms). Each thread keeps the buffers
//! of its last call instead (at most [`KEEP`], the largest first), so repeated calls of one shape
//! allocate nothing.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// Buffers kept per thread.
const KEEP: usize = 4;
/// 4-byte words per cache line.
const LINE_WORDS: usize = 16;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u32>>> = const { RefCell::new(Vec::new()) };
}

/// Bytes the calling thread keeps for the next call.
pub(super) fn retained() -> usize {
    SPARE
        .try_with(|s| s.borrow().iter().map(|w| w.capacity() * 4).sum())
        .unwrap_or(0)
}

/// Frees what the calling thread keeps; the bytes freed.
pub(super) fn release() -> usize {
    SPARE
        .try_with(|s| {
            let freed: Vec<Vec<u32>> = std::mem::take(&mut *s.borrow_mut());
            freed.iter().map(|w| w.capacity() * 4).sum()
        })
        .unwrap_or(0)
}

/// Element types a [`Spare`] holds: plain data of 2 or 4 bytes, any bit pattern valid.
pub(super) trait Word: Copy {}
impl Word for f32 {}
impl Word for u32 {}
impl Word for half::bf16 {}
impl Word for half::f16 {}

/// `len` elements of `T` in a reused buffer of 4-byte words, the first at the start of a cache
/// line (so that the micro-kernels' whole-vector loads of K and V rows do not straddle two);
/// contents unspecified until written: every user writes what it reads.
pub(super) struct Spare<T: Word> {
    words: Vec<u32>,
    /// Words before the first element (which starts a cache line).
    off: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Word> Spare<T> {
    /// A buffer of `len` elements: the thread's smallest spare buffer that holds them, or a new
    /// one.
    pub(super) fn new(len: usize) -> Self {
        const { assert!(std::mem::size_of::<T>() == 2 || std::mem::size_of::<T>() == 4) };
        let n = (len * std::mem::size_of::<T>()).div_ceil(4);
        let mut words = SPARE
            .with(|s| {
                let mut s = s.borrow_mut();
                let best = (0..s.len())
                    .filter(|&i| s[i].capacity() >= n)
                    .min_by_key(|&i| s[i].capacity());
                best.map(|i| s.swap_remove(i))
            })
            .unwrap_or_default();
        let padded = n + LINE_WORDS - 1;
        if words.len() < padded {
            words.resize(padded, 0);
        }
        words.truncate(padded);
        // Words to the next 64-byte boundary (`Vec<u32>` is 4-byte aligned): 0..16, inside the
        // `LINE_WORDS - 1` words of padding.
        let off = (64 - words.as_ptr() as usize % 64) % 64 / 4;
        Self {
            words,
            off,
            len,
            _t: PhantomData,
        }
    }
}

impl<T: Word> Deref for Spare<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the words hold at least `len` elements of `T` (2 or 4 bytes, alignment ≤ 4),
        // every bit pattern of which is a valid `T`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().add(self.off).cast(), self.len) }
    }
}

impl<T: Word> DerefMut for Spare<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`; the buffer is borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr().add(self.off).cast(), self.len)
        }
    }
}

impl<T: Word> Drop for Spare<T> {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        // `try_with`: nothing is kept while the thread's storage is being torn down.
        let _ = SPARE.try_with(|s| {
            let mut s = s.borrow_mut();
            s.push(words);
            if s.len() > KEEP {
                // Keep the largest.
                let smallest = (0..s.len()).min_by_key(|&i| s[i].capacity()).unwrap_or(0);
                s.swap_remove(smallest);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer returned on drop is handed out again (same allocation) to a request it holds;
    /// lengths and element sizes are honoured.
    #[test]
    fn buffers_are_reused() {
        let a = Spare::<f32>::new(1000);
        let ptr = a.as_ptr() as usize;
        assert_eq!(a.len(), 1000);
        assert_eq!(ptr % 64, 0, "the first element starts a cache line");
        drop(a);
        let mut b = Spare::<half::bf16>::new(1999);
        assert_eq!(b.len(), 1999);
        assert_eq!(b.as_ptr() as usize, ptr, "the spare buffer is reused");
        b[1998] = half::bf16::ONE;
        let c = Spare::<u32>::new(10);
        assert_eq!(c.as_ptr() as usize % 64, 0);
        assert_ne!(
            c.as_ptr() as usize,
            ptr,
            "a buffer in use is not handed out twice"
        );
        drop((b, c));
        let many: Vec<Spare<f32>> = (1..=6).map(|i| Spare::new(i * 100)).collect();
        drop(many);
        SPARE.with(|s| {
            let s = s.borrow();
            assert_eq!(s.len(), KEEP);
            assert!(
                s.iter().all(|w| w.capacity() >= 300),
                "the largest are kept"
            );
        });
    }
}
