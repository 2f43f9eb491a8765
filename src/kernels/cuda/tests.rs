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
        softcap: 0.0,
        has_alibi: 0,
        alibi_stride: 0,
        has_sinks: 0,
    }
}

/// Every variant in the manifest takes exactly the arguments the launcher builds for it.
#[test]
fn launcher_arguments_match_every_artifact() {
    let z = [0usize; 3];
    for a in manifest::ARTIFACTS {
        let args = match a.kind {
            KernelKind::Fwd => fwd_args([0; 10], z, z, z, z, z, (1, 1, 1), flags(), false),
            KernelKind::DecodeSplit => {
                decode_split_args([0; 9], z, z, z, z, (1, 1, 1, 1), flags(), false, (64, 1))
            }
            KernelKind::DecodeCombine => decode_combine_args([0; 5], z, (1, 1, 1), flags()),
        };
        check_args(a, &args).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        assert_eq!(a.global_scratch_bytes + a.profile_scratch_bytes, 0);
    }
}

/// A stale argument list is refused: one argument dropped, or two swapped.
#[test]
fn argument_drift_is_an_error() {
    let (_, a): (usize, &Artifact) = find(KernelKind::Fwd, 90, Dt::BF16, 128, true, false).unwrap();
    let z = [0usize; 3];
    let mut args = fwd_args([0; 10], z, z, z, z, z, (1, 1, 1), flags(), false);
    args.swap(10, 11);
    assert!(check_args(a, &args).unwrap_err().contains("stride_q"));
    args.pop();
    assert!(check_args(a, &args).unwrap_err().contains("arguments"));
}

/// The score modifiers reach the kernels as runtime arguments: soft-cap and ALiBi in both
/// attention kernels, the sinks in the forward and, on the decode path, in the combine kernel
/// only (joined once per row, not per split).
#[test]
fn score_modifiers_are_runtime_arguments() {
    let f = Flags {
        softcap: 30.0,
        has_alibi: 1,
        alibi_stride: 8,
        has_sinks: 1,
        ..flags()
    };
    let z = [0usize; 3];
    let get = |args: &[(&str, Arg)], name: &str| args.iter().find(|(n, _)| *n == name).map(|a| a.1);
    let fwd = fwd_args([7; 10], z, z, z, z, z, (1, 1, 1), f, false);
    let split = decode_split_args([7; 9], z, z, z, z, (1, 1, 1, 1), f, false, (64, 1));
    let combine = decode_combine_args([7; 5], z, (1, 1, 1), f);
    for args in [&fwd, &split] {
        assert_eq!(get(args, "softcap"), Some(Arg::F32(30.0)));
        assert_eq!(get(args, "has_alibi"), Some(Arg::I32(1)));
        assert_eq!(get(args, "stride_ab"), Some(Arg::I32(8)));
        assert_eq!(get(args, "Alibi"), Some(Arg::Ptr(7)));
    }
    assert_eq!(get(&fwd, "has_sinks"), Some(Arg::I32(1)));
    assert_eq!(get(&split, "has_sinks"), None);
    assert_eq!(get(&split, "Sinks"), None);
    assert_eq!(get(&combine, "has_sinks"), Some(Arg::I32(1)));
    assert_eq!(get(&combine, "Sinks"), Some(Arg::Ptr(7)));
    // The forward has one compile-time flag for them (HAS_MODIFIERS: soft-capping or ALiBi),
    // the decode kernels none: 2 targets x 2 dtypes x 5 head sizes x (4 forwards + 2 decode).
    assert_eq!(manifest::ARTIFACTS.len(), 120);
    assert!(manifest::ARTIFACTS
        .iter()
        .all(|a| a.kind == KernelKind::Fwd || !a.has_modifiers));
}

/// Every (kind, arch, dtype, head size, bias) the launcher can ask for was compiled.
#[test]
fn every_variant_the_launcher_can_pick_exists() {
    for arch in [80, 90] {
        for dt in [Dt::F16, Dt::BF16] {
            for d in [64, 80, 96, 128, 256] {
                for bias in [false, true] {
                    for mods in [false, true] {
                        let (_, a) = find(KernelKind::Fwd, arch, dt, d, bias, mods).unwrap();
                        assert_eq!((a.has_bias, a.has_modifiers), (bias, mods));
                    }
                }
                let (_, s) = find(KernelKind::DecodeSplit, arch, dt, d, false, false).unwrap();
                assert_eq!(s.block_m, DECODE_MAX_ROWS);
                assert!(find(KernelKind::DecodeCombine, arch, dt, d, false, false).is_some());
            }
        }
    }
    assert_eq!(artifact::arch_for(9, 0), Some(90));
    assert_eq!(artifact::arch_for(8, 6), Some(80));
    assert_eq!(artifact::arch_for(12, 0), Some(80));
    assert_eq!(artifact::arch_for(7, 5), None);
}

/// Each GPU loads the image that runs on it: the `sm_80` cubins on every 8.x GPU, the `sm_90a`
/// ones on 9.0 only, the `sm_80` PTX on any later GPU; every artifact the launcher can pick for
/// a GPU has that image.
#[test]
fn each_gpu_loads_a_cubin_it_runs_or_the_ptx() {
    use artifact::{image_for, Image};
    for (cc, want) in [
        ((8, 0), Image::Cubin),
        ((8, 6), Image::Cubin),
        ((8, 9), Image::Cubin),
        ((9, 0), Image::Cubin),
        ((10, 0), Image::Ptx),
        ((12, 0), Image::Ptx),
    ] {
        let arch = artifact::arch_for(cc.0, cc.1).unwrap();
        assert_eq!(image_for(arch, cc.0, cc.1), Some(want), "{cc:?}");
        for a in manifest::ARTIFACTS.iter().filter(|a| a.arch == arch) {
            let len = match want {
                Image::Cubin => a.cubin_len,
                Image::Ptx => a.ptx_len,
            };
            assert!(len > 0, "{cc:?}: {a:?}");
        }
    }
    assert_eq!(image_for(90, 9, 1), None);
    assert_eq!(image_for(90, 10, 0), None);
    assert_eq!(image_for(80, 7, 5), None);
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

fn shipped(file: &str) -> Vec<u8> {
    let path = format!("{}/src/kernels/cuda/{file}", env!("CARGO_MANIFEST_DIR"));
    let mut xz = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut xz))
        .unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut xz.as_slice(), &mut out).expect("decompress");
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
    let blob = shipped("kernels.ptx.xz");
    assert_eq!(sha256_hex(&blob), manifest::BLOB_SHA256);
    let mut end = 0;
    for a in manifest::ARTIFACTS {
        assert_eq!(a.ptx_offset, end, "{a:?}");
        end += a.ptx_len;
        // sm_90a ships as a cubin only: no other GPU could run its PTX.
        assert_eq!(a.ptx_len == 0, a.arch == 90, "{a:?}");
        if a.ptx_len == 0 {
            continue;
        }
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

/// Each variant's cubin is where the manifest says, with the manifest's hash: an ELF image for
/// the variant's GPU holding its entry, and ptxas reported no spill, no stack and at most 255
/// registers for it.
#[test]
fn shipped_cubins_match_the_manifest() {
    let blob = shipped("kernels.cubin.xz");
    assert_eq!(sha256_hex(&blob), manifest::CUBIN_BLOB_SHA256);
    let mut end = 0;
    for a in manifest::ARTIFACTS {
        assert_eq!(a.cubin_offset, end, "{a:?}");
        end += a.cubin_len;
        let cubin = &blob[a.cubin_offset..end];
        assert_eq!(sha256_hex(cubin), a.cubin_sha256, "{a:?}");
        assert_eq!(&cubin[..4], b"\x7fELF", "{a:?}");
        let entry = a.entry.as_bytes();
        assert!(cubin.windows(entry.len()).any(|w| w == entry), "{a:?}");
        assert_eq!(
            (a.spill_store_bytes, a.spill_load_bytes, a.stack_bytes),
            (0, 0, 0),
            "{a:?}"
        );
        assert!(a.registers > 0 && a.registers <= 255, "{a:?}");
        assert!(
            a.shared_bytes + a.static_shared_bytes <= shared_limit(a.arch),
            "{a:?}"
        );
    }
    assert_eq!(end, blob.len());
    assert!(PTXAS_VERSION.starts_with("12.8."));
    assert!(manifest::ARTIFACTS
        .iter()
        .all(|a| a.ptxas_version == PTXAS_VERSION));
}

/// The shared memory a block may use on every GPU an architecture's cubins run on: 99 KiB on
/// sm_86/sm_89 (A100 allows 163), 227 KiB on H100/H200.
fn shared_limit(arch: u32) -> u32 {
    if arch == 90 {
        227 * 1024
    } else {
        99 * 1024
    }
}

/// The layouts the artifacts were compiled for: batch, row and head strides multiples of 16
/// elements (0 where a dimension has size 1) and a 16-byte aligned start; anything else is
/// refused with the reason.
#[test]
fn layouts_the_artifacts_assume() {
    let ok = Layout::contiguous((2, 70, 4, 64));
    assert_eq!(layout_problem("q", &ok, 2), None);
    // A qkv buffer narrowed to q: row stride 3 * 4 * 64, batch stride 70 times that.
    let qkv = Layout::contiguous((2, 70, 12, 64)).narrow(2, 0, 4).unwrap();
    assert_eq!(layout_problem("q", &qkv, 2), None);
    let batch = Layout::new((2, 70, 4, 64).into(), vec![70 * 256 + 8, 256, 64, 1], 0);
    assert!(layout_problem("q", &batch, 2)
        .unwrap()
        .contains("batch, row and head strides"));
    let one = Layout::new((1, 70, 4, 64).into(), vec![8, 256, 64, 1], 0);
    assert_eq!(
        layout_problem("q", &one, 2),
        None,
        "size-1 batch: never stepped over"
    );
    let odd = Layout::contiguous_with_offset((2, 70, 4, 64), 1);
    assert!(layout_problem("q", &odd, 2)
        .unwrap()
        .contains("16-byte aligned"));
}
