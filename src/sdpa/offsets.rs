//! [`SeqOffsets`]: where each packed sequence starts and ends.

use std::sync::Arc;

use candle_core::{bail, DType, Result, Tensor};

/// Cumulative offsets of packed sequences: `n + 1` values rising from 0, sequence `b` owns rows
/// `offsets[b] .. offsets[b + 1]` (flash-attn's `cu_seqlens`). A sequence may be empty.
///
/// ```
/// use candle_mha::sdpa::SeqOffsets;
/// let a = SeqOffsets::from_lengths(&[3, 0, 5]);
/// let b = SeqOffsets::from_cumulative(&[0, 3, 3, 8])?;
/// assert_eq!(a, b);
/// assert_eq!((a.num_seqs(), a.total(), a.max_len()), (3, 8, 5));
/// assert_eq!(a.range(2), 3..8);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqOffsets(Arc<[usize]>);

impl SeqOffsets {
    /// From cumulative offsets (`cu_seqlens`): at least 2 values, the first 0, never decreasing.
    pub fn from_cumulative(cu: &[usize]) -> Result<Self> {
        if cu.len() < 2 {
            bail!(
                "cu_seqlens: expected n + 1 >= 2 cumulative offsets, got {} ({cu:?})",
                cu.len()
            )
        }
        if cu[0] != 0 {
            bail!("cu_seqlens: must start at 0, got {cu:?}")
        }
        if let Some(i) = cu.windows(2).position(|w| w[0] > w[1]) {
            bail!(
                "cu_seqlens: must never decrease, got {} then {} at index {i} ({cu:?})",
                cu[i],
                cu[i + 1]
            )
        }
        Ok(Self(cu.into()))
    }

    /// From per-sequence lengths (candle-nn's CPU varlen convention).
    pub fn from_lengths(lengths: &[usize]) -> Self {
        let mut cu = Vec::with_capacity(lengths.len() + 1);
        cu.push(0);
        let mut acc = 0;
        for &n in lengths {
            acc += n;
            cu.push(acc);
        }
        Self(cu.into())
    }

    /// From a 1-D integer tensor of cumulative offsets (`u32`, `i32`, `i64`, `u8`, as
    /// `flash_attn_varlen_func` takes them), on any device.
    pub fn from_cumulative_tensor(cu: &Tensor) -> Result<Self> {
        Self::from_cumulative(&tensor_values("cu_seqlens", cu)?)
    }

    /// From a 1-D integer tensor of per-sequence lengths.
    pub fn from_lengths_tensor(lengths: &Tensor) -> Result<Self> {
        Ok(Self::from_lengths(&tensor_values("seqlens", lengths)?))
    }

    /// The cumulative offsets, `n + 1` values.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }

    /// The number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.0.len() - 1
    }

    /// Rows in all sequences together.
    pub fn total(&self) -> usize {
        self.0[self.0.len() - 1]
    }

    /// The rows of sequence `b`.
    pub fn range(&self, b: usize) -> std::ops::Range<usize> {
        self.0[b]..self.0[b + 1]
    }

    /// Per-sequence lengths.
    pub fn lengths(&self) -> Vec<usize> {
        self.0.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.lengths().into_iter().max().unwrap_or(0)
    }

    /// Position of each row within its sequence (`0, 1, …` restarting at every sequence).
    pub fn positions(&self) -> Vec<usize> {
        let mut pos = Vec::with_capacity(self.total());
        for w in self.0.windows(2) {
            pos.extend(0..w[1] - w[0]);
        }
        pos
    }

    /// The offsets as a `u32` tensor of `n + 1` values.
    pub fn to_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<u32> = self.0.iter().map(|&x| x as u32).collect();
        Tensor::from_vec(v, self.0.len(), device)
    }
}

fn tensor_values(name: &str, t: &Tensor) -> Result<Vec<usize>> {
    if t.rank() != 1 {
        bail!("{name}: expected a 1-D tensor, got shape {:?}", t.dims())
    }
    let vals: Vec<i64> = match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I16 => t.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec1::<i64>()?,
        other => bail!("{name}: expected an integer tensor, got {other:?}"),
    };
    vals.into_iter()
        .map(|x| {
            usize::try_from(x)
                .map_err(|_| candle_core::Error::Msg(format!("{name}: negative value {x}")))
        })
        .collect()
}
