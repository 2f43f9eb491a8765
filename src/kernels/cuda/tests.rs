//! The launcher against the manifest, and the manifest against the shipped PTX and the Triton
//! source: no GPU needed.

use std::io::Read;

use super::artifact::{find, Artifact, KernelKind};
use super::*;
use sha2::{Digest, Sha256};

fn flags() -> Flags {
    Flags {
        causal: 1,
        bottom_right: 0,
        window: 0,
        has_range: 0,
        nan_rows: 0,
        scale: 0.125,
    }
}

/// Every variant in the manifest takes exactly the arguments the launcher builds for it.
#[test]
fn launcher_arguments_match_every_artifact() {
    let z = [0usize; 3];
    for a in manifest::ARTIFACTS {
        let args = match a.kind {
            KernelKind::Fwd => fwd_args([0; 8], z, z, z, z, z, (1, 1, 1), flags(), false),
            KernelKind::DecodeSplit => {
                decode_split_args([0; 8], z, z, z, z, (1, 1, 1, 1), flags(), false, (64, 1))
            }
            KernelKind::DecodeCombine => decode_combine_args([0; 4], z, (1, 1, 1), 0),
        };
        check_args(a, &args).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        assert_eq!(a.global_scratch_bytes + a.profile_scratch_bytes, 0);
    }
}

/// A stale argument list is refused: one argument dropped, or two swapped.
#[test]
fn argument_drift_is_an_error() {
    let (_, a): (usize, &Artifact) = find(KernelKind::Fwd, 90, Dt::BF16, 128, true).unwrap();
    let z = [0usize; 3];
    let mut args = fwd_args([0; 8], z, z, z, z, z, (1, 1, 1), flags(), false);
    args.swap(8, 9);
    assert!(check_args(a, &args).unwrap_err().contains("stride_q"));
    args.pop();
    assert!(check_args(a, &args).unwrap_err().contains("arguments"));
}

/// Every (kind, arch, dtype, head size, bias) the launcher can ask for was compiled.
#[test]
fn every_variant_the_launcher_can_pick_exists() {
    for arch in [80, 90] {
        for dt in [Dt::F16, Dt::BF16] {
            for d in [64, 80, 96, 128, 256] {
                for bias in [false, true] {
                    assert!(find(KernelKind::Fwd, arch, dt, d, bias).is_some());
                }
                let (_, s) = find(KernelKind::DecodeSplit, arch, dt, d, false).unwrap();
                assert_eq!(s.block_m, DECODE_MAX_ROWS);
                assert!(find(KernelKind::DecodeCombine, arch, dt, d, false).is_some());
            }
        }
    }
    assert_eq!(artifact::arch_for(9, 0), Some(90));
    assert_eq!(artifact::arch_for(8, 6), Some(80));
    assert_eq!(artifact::arch_for(12, 0), Some(80));
    assert_eq!(artifact::arch_for(7, 5), None);
}

/// Splits cover every key once, in whole tiles, and never exceed the tiles there are.
#[test]
fn decode_splits_cover_the_keys() {
    for s in [1, 63, 64, 65, 1000, 4096, 100_000] {
        for programs in [1, 8, 256, 10_000] {
            for sms in [1, 78, 132] {
                let (splits, chunk) = decode_splits(s, 64, programs, sms);
                assert_eq!(chunk % 64, 0);
                assert!(splits >= 1 && splits * chunk >= s && (splits - 1) * chunk < s);
                assert!(splits <= s.div_ceil(64));
            }
        }
    }
    assert_eq!(decode_splits(4096, 64, 64, 132).0, 5);
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn shipped_ptx() -> Vec<u8> {
    let mut xz = Vec::new();
    std::fs::File::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/kernels/cuda/kernels.ptx.xz"
    ))
    .and_then(|mut f| f.read_to_end(&mut xz))
    .expect("read kernels.ptx.xz");
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut xz.as_slice(), &mut out).expect("decompress kernels.ptx.xz");
    out
}

/// The shipped kernels were compiled from the committed Triton source: a change to the source
/// without `python scripts/build_cuda_kernels.py` fails here (`scripts/cuda-cpu-check.sh` also
/// recompiles everything and compares).
#[test]
fn artifacts_match_the_triton_source() {
    let src = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/kernels/triton/flash_attention.py"
    ))
    .expect("read the Triton source");
    assert_eq!(
        sha256_hex(&src),
        SOURCE_SHA256,
        "kernels/triton/flash_attention.py changed: run python scripts/build_cuda_kernels.py"
    );
}

/// Each variant's PTX is where the manifest says, with the manifest's hash, an entry of that
/// name taking the manifest's parameters (then Triton's two scratch pointers), the manifest's
/// thread count (`.reqntid`) and the right target.
#[test]
fn shipped_ptx_matches_the_manifest() {
    let blob = shipped_ptx();
    assert_eq!(sha256_hex(&blob), manifest::BLOB_SHA256);
    let mut end = 0;
    for a in manifest::ARTIFACTS {
        assert_eq!(a.ptx_offset, end, "{a:?}");
        end += a.ptx_len;
        let ptx = std::str::from_utf8(&blob[a.ptx_offset..end]).expect("PTX is text");
        assert_eq!(sha256_hex(ptx.as_bytes()), a.ptx_sha256, "{a:?}");
        let target = if a.arch == 90 { "sm_90a" } else { "sm_80" };
        assert!(ptx.contains(&format!(".target {target}")), "{a:?}");
        let head = format!(".entry {}(", a.entry);
        let start = ptx
            .find(&head)
            .unwrap_or_else(|| panic!("no {head} in {a:?}"));
        let params = &ptx[start + head.len()..];
        let params = &params[..params.find(')').expect("end of the parameter list")];
        let got: Vec<&str> = params
            .split(',')
            .map(|p| p.split_whitespace().nth(1).unwrap_or(""))
            .collect();
        let mut want: Vec<&str> = a
            .params
            .split(',')
            .map(|p| match p.split_once(':').map(|x| x.1) {
                Some(t) if t.starts_with('*') || t == "i64" => ".u64",
                Some("i32") => ".u32",
                Some("fp32") => ".f32",
                other => panic!("unknown parameter type {other:?}"),
            })
            .collect();
        want.extend([".u64", ".u64"]);
        assert_eq!(got, want, "{a:?}");
        let ntid = format!(".reqntid {}", 32 * a.num_warps);
        assert!(ptx.contains(&ntid), "{a:?}: no {ntid}");
        assert!(a.block_m > 0 && a.block_n > 0 && a.block_d >= a.head_dim && a.num_stages > 0);
    }
    assert_eq!(end, blob.len());
}
