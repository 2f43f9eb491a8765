//! What the ahead-of-time compiler produced for each kernel variant ([`Artifact`]), and the
//! choice of a variant for a call.

use candle_core::DType;

/// Which of the three Triton kernels an artifact holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KernelKind {
    /// `attn_fwd`: flash attention, one program per `BLOCK_M` query rows of one head.
    Fwd,
    /// `attn_decode_split`: flash-decoding partial results over a chunk of keys.
    DecodeSplit,
    /// `attn_decode_combine`: merges the partial results.
    DecodeCombine,
}

/// Element type of q, k, v and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dt {
    F16,
    BF16,
}

impl Dt {
    /// The artifact dtype for a candle dtype, if there is one.
    pub(crate) fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F16 => Some(Dt::F16),
            DType::BF16 => Some(Dt::BF16),
            _ => None,
        }
    }
}

/// One compiled variant: a cubin (and, for `sm_80`, the PTX) with one entry, how to launch it,
/// and what ptxas reported when it assembled the cubin. Some fields are read only by the tests
/// that check the shipped blobs against this manifest.
#[derive(Debug)]
#[allow(dead_code)]
pub(crate) struct Artifact {
    pub kind: KernelKind,
    /// 80: compiled for `sm_80` (a cubin that every 8.x GPU runs, and PTX the driver compiles
    /// for later GPUs); 90: for `sm_90a` (a cubin for H100/H200 only: wgmma).
    pub arch: u32,
    pub dtype: Dt,
    pub head_dim: usize,
    /// Whether the variant reads a dense additive bias (`HAS_BIAS`).
    pub has_bias: bool,
    /// Whether the variant applies soft-capping and ALiBi (`HAS_MODIFIERS`, forward only; the
    /// sinks are runtime arguments of every variant).
    pub has_modifiers: bool,
    pub block_m: usize,
    pub block_n: usize,
    pub block_d: usize,
    pub num_warps: u32,
    pub num_stages: u32,
    /// Dynamic shared memory per program (above 48 KiB the launcher raises the limit).
    pub shared_bytes: u32,
    /// Registers per thread, as ptxas reported for the shipped cubin.
    pub registers: u32,
    /// Spill stores and loads per thread (ptxas): the build refuses a variant with any.
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Stack frame per thread (ptxas): 0, like the spills.
    pub stack_bytes: u32,
    /// Static shared memory (ptxas), besides `shared_bytes`.
    pub static_shared_bytes: u32,
    /// The ptxas that assembled the cubin and reported these numbers (`PTXAS_VERSION`).
    pub ptxas_version: &'static str,
    /// Scratch sizes Triton asks for (the manifest holds only variants with none).
    pub global_scratch_bytes: u32,
    pub profile_scratch_bytes: u32,
    /// Entry name.
    pub entry: &'static str,
    /// `name:type` of each kernel parameter, in order (Triton's two scratch pointers follow).
    pub params: &'static str,
    /// Byte range of the PTX in the uncompressed PTX blob (empty for `sm_90a`: no GPU but the
    /// one its cubin is for could run it).
    pub ptx_offset: usize,
    pub ptx_len: usize,
    pub ptx_sha256: &'static str,
    /// Byte range of the cubin in the uncompressed cubin blob.
    pub cubin_offset: usize,
    pub cubin_len: usize,
    pub cubin_sha256: &'static str,
}

/// What a GPU loads of an artifact: its cubin, or its PTX for the driver to compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Image {
    Cubin,
    Ptx,
}

/// The architecture whose artifacts a GPU of compute capability `major.minor` runs: `sm_90a` on
/// exactly 9.0, `sm_80` on every other capability from 8.0, none below 8.0.
pub(crate) fn arch_for(major: i32, minor: i32) -> Option<u32> {
    match (major, minor) {
        (9, 0) => Some(90),
        (m, _) if m >= 8 => Some(80),
        _ => None,
    }
}

/// How a GPU of compute capability `major.minor` loads an artifact of `arch`: the cubin where the
/// GPU runs it (`sm_80` cubins on every 8.x GPU, `sm_90a` ones on 9.0), else the PTX (`sm_80`'s,
/// on any later GPU), `None` where neither fits.
pub(crate) fn image_for(arch: u32, major: i32, minor: i32) -> Option<Image> {
    match (arch, major, minor) {
        (80, 8, _) | (90, 9, 0) => Some(Image::Cubin),
        (80, m, _) if m >= 8 => Some(Image::Ptx),
        _ => None,
    }
}

/// The variant of `kind` for these parameters, if one was compiled (`has_bias` and
/// `has_modifiers` choose among the forward variants only).
pub(crate) fn find(
    kind: KernelKind,
    arch: u32,
    dtype: Dt,
    head_dim: usize,
    has_bias: bool,
    has_modifiers: bool,
) -> Option<(usize, &'static Artifact)> {
    super::manifest::ARTIFACTS
        .iter()
        .enumerate()
        .find(|(_, a)| {
            a.kind == kind
                && a.arch == arch
                && a.dtype == dtype
                && a.head_dim == head_dim
                && (kind != KernelKind::Fwd
                    || (a.has_bias == has_bias && a.has_modifiers == has_modifiers))
        })
}

/// The head sizes the artifacts cover.
pub(crate) fn head_dims() -> Vec<usize> {
    let mut d: Vec<usize> = super::manifest::ARTIFACTS
        .iter()
        .map(|a| a.head_dim)
        .collect();
    d.sort_unstable();
    d.dedup();
    d
}
