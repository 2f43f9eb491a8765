//! The pool's block allocator: a free list and a reference count per block.

/// Free blocks and reference counts (a block is free when its count is 0).
#[derive(Debug, Clone)]
pub(super) struct Blocks {
    /// Free block ids; the next allocation pops the last one (lowest ids first).
    free: Vec<u32>,
    /// References per block (sequences whose table holds it).
    refs: Vec<u32>,
}

impl Blocks {
    /// `n` free blocks.
    pub(super) fn new(n: usize) -> Self {
        Self {
            free: (0..n as u32).rev().collect(),
            refs: vec![0; n],
        }
    }

    /// Blocks that can be allocated.
    pub(super) fn available(&self) -> usize {
        self.free.len()
    }

    /// Blocks held by at least one sequence.
    pub(super) fn in_use(&self) -> usize {
        self.refs.len() - self.free.len()
    }

    /// A free block with one reference (`None` when the pool is exhausted).
    pub(super) fn alloc(&mut self) -> Option<u32> {
        let id = self.free.pop()?;
        self.refs[id as usize] = 1;
        Some(id)
    }

    /// One more reference to an allocated block.
    pub(super) fn retain(&mut self, id: u32) {
        debug_assert!(self.refs[id as usize] > 0, "retain of free block {id}");
        self.refs[id as usize] += 1;
    }

    /// One reference fewer; the block is free again at 0.
    pub(super) fn release(&mut self, id: u32) {
        let r = &mut self.refs[id as usize];
        debug_assert!(*r > 0, "release of free block {id}");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(id);
        }
    }

    /// References to `id` (0: free; `None`: no such block).
    pub(super) fn refs(&self, id: u32) -> Option<u32> {
        self.refs.get(id as usize).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::Blocks;

    #[test]
    fn alloc_retain_release_reuse() {
        let mut b = Blocks::new(3);
        let (x, y) = (b.alloc().unwrap(), b.alloc().unwrap());
        assert_eq!((x, y, b.available(), b.in_use()), (0, 1, 1, 2));
        b.retain(x);
        b.release(x);
        assert_eq!((b.refs(x), b.available()), (Some(1), 1));
        b.release(x);
        assert_eq!((b.refs(x), b.available()), (Some(0), 2));
        assert_eq!(b.alloc(), Some(0)); // reused
        assert_eq!(b.alloc(), Some(2));
        assert_eq!(b.alloc(), None);
        assert_eq!(b.refs(7), None);
    }
}
