//! [`Packing`]: a padded batch ↔ packed tokens with offsets (Hugging Face's `_upad_input` /
//! `pad_input`).

use candle_core::{bail, DType, Device, Result, Tensor};

use super::SeqOffsets;

/// Where the real tokens of a padded `(B, T, …)` batch go in a packed `(total, …)` tensor, and
/// back: the kept positions in order (sequence by sequence) and their [`SeqOffsets`].
///
/// Padding may sit anywhere (right, left, or holes): every position whose mask is nonzero is
/// kept, in order.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use candle_mha::sdpa::Packing;
/// let dev = Device::Cpu;
/// // Hugging Face polarity: 1 = token, 0 = padding (here right and left padding).
/// let mask = Tensor::new(&[[1u8, 1, 1, 0], [0, 0, 1, 1]], &dev)?;
/// let packing = Packing::from_attention_mask(&mask)?;
/// assert_eq!(packing.offsets().as_slice(), &[0, 3, 5]);
/// let hidden = Tensor::arange(0f32, 8., &dev)?.reshape((2, 4, 1))?; // (B, T, E)
/// let packed = packing.pack(&hidden)?; // (5, 1)
/// assert_eq!(packed.flatten_all()?.to_vec1::<f32>()?, [0., 1., 2., 6., 7.]);
/// let back = packing.unpack(&packed)?; // (2, 4, 1), zeros where the padding was
/// assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, [0., 1., 2., 0., 0., 0., 6., 7.]);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Packing {
    /// Flat indices `b·T + t` of the kept positions, `u32`, `(total,)`.
    indices: Tensor,
    offsets: SeqOffsets,
    batch: usize,
    seq_len: usize,
}

impl Packing {
    /// From Hugging Face's `attention_mask` `(B, T)` (integer or float; nonzero = token).
    pub fn from_attention_mask(mask: &Tensor) -> Result<Self> {
        let (b, t) = match mask.dims() {
            &[b, t] => (b, t),
            other => bail!("attention_mask: expected shape (B, T), got {other:?}"),
        };
        let keep = mask.ne(0f64)?.flatten_all()?.to_vec1::<u8>()?;
        let mut idx = Vec::new();
        let mut lengths = Vec::with_capacity(b);
        for bi in 0..b {
            let row = &keep[bi * t..(bi + 1) * t];
            let before = idx.len();
            idx.extend(
                row.iter()
                    .enumerate()
                    .filter(|(_, &k)| k != 0)
                    .map(|(ti, _)| (bi * t + ti) as u32),
            );
            lengths.push(idx.len() - before);
        }
        Self::build(idx, SeqOffsets::from_lengths(&lengths), b, t, mask.device())
    }

    /// Right-padded sequences of the given lengths in a batch of `seq_len` positions.
    pub fn from_lengths(lengths: &[usize], seq_len: usize, device: &Device) -> Result<Self> {
        if let Some(bad) = lengths.iter().find(|&&n| n > seq_len) {
            bail!("packing: length {bad} exceeds the padded length {seq_len}")
        }
        let idx = lengths
            .iter()
            .enumerate()
            .flat_map(|(bi, &n)| (0..n).map(move |ti| (bi * seq_len + ti) as u32))
            .collect();
        Self::build(
            idx,
            SeqOffsets::from_lengths(lengths),
            lengths.len(),
            seq_len,
            device,
        )
    }

    fn build(
        idx: Vec<u32>,
        offsets: SeqOffsets,
        batch: usize,
        seq_len: usize,
        device: &Device,
    ) -> Result<Self> {
        if batch * seq_len > u32::MAX as usize {
            bail!("packing: {batch} × {seq_len} positions do not fit u32 indices")
        }
        let n = idx.len();
        Ok(Self {
            indices: Tensor::from_vec(idx, n, device)?,
            offsets,
            batch,
            seq_len,
        })
    }

    /// The packed sequences' offsets.
    pub fn offsets(&self) -> &SeqOffsets {
        &self.offsets
    }

    /// Flat indices `b·T + t` of the kept positions (`u32`, `(total,)`).
    pub fn indices(&self) -> &Tensor {
        &self.indices
    }

    /// Batch size B of the padded side.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Padded length T.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Kept tokens in all.
    pub fn total(&self) -> usize {
        self.offsets.total()
    }

    /// `(B, T, …)` → `(total, …)`: the kept positions, sequence after sequence.
    pub fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 || dims[0] != self.batch || dims[1] != self.seq_len {
            bail!(
                "packing: expected a ({}, {}, …) tensor, got shape {dims:?}",
                self.batch,
                self.seq_len
            )
        }
        let mut flat = vec![self.batch * self.seq_len];
        flat.extend_from_slice(&dims[2..]);
        x.reshape(flat)?.index_select(&self.indices, 0)
    }

    /// `(total, …)` → `(B, T, …)` with zeros at the padding.
    pub fn unpack(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.is_empty() || dims[0] != self.total() {
            bail!(
                "packing: expected a ({}, …) packed tensor, got shape {dims:?}",
                self.total()
            )
        }
        let mut flat = vec![self.batch * self.seq_len];
        flat.extend_from_slice(&dims[1..]);
        let zeros = Tensor::zeros(flat.as_slice(), x.dtype(), x.device())?;
        let mut out = vec![self.batch, self.seq_len];
        out.extend_from_slice(&dims[1..]);
        if self.total() == 0 {
            return zeros.reshape(out);
        }
        zeros.index_add(&self.indices, x, 0)?.reshape(out)
    }

    /// The keep-mask `(B, T)` in `dtype` (1 = token), e.g. for pooling.
    pub fn keep_mask(&self, dtype: DType) -> Result<Tensor> {
        let ones = Tensor::ones(self.total(), dtype, self.indices.device())?;
        let zeros = Tensor::zeros(self.batch * self.seq_len, dtype, self.indices.device())?;
        if self.total() == 0 {
            return zeros.reshape((self.batch, self.seq_len));
        }
        zeros
            .index_add(&self.indices, &ones, 0)?
            .reshape((self.batch, self.seq_len))
    }
}
