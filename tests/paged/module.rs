//! `attend_paged` against `attend_cached` with a dense `KvCache`: random mixes, forks, errors.

use candle_core::{DType, Result, Tensor};
use candle_mha::cache::{PagedKvPool, PagedPoolConfig, SeqId};
use candle_mha::rope::{Rope, RopeStyle};
use candle_mha::{CausalAlignment, KvCache, KvFormat, MhaConfig, MhaInput, MultiHeadAttention};
use candle_nn::{VarBuilder, VarMap};

use super::support::{check_close, tolerances, Rng};
use super::{randn, DEV};

/// A module, its rope, and one token stream per sequence.
struct Setup {
    mha: MultiHeadAttention,
    rope: Rope,
    e: usize,
    hkv: usize,
    d: usize,
}

fn setup(dtype: DType) -> Result<Setup> {
    let (e, h, hkv) = (32, 4, 2);
    let vm = VarMap::new();
    let cfg = MhaConfig::new(e, h)
        .with_num_kv_heads(hkv)
        .with_batch_first(true);
    let mha = MultiHeadAttention::new(cfg, VarBuilder::from_varmap(&vm, dtype, &DEV))?.inference();
    let d = e / h;
    let rope = Rope::from_theta(10_000.0, d, 512, RopeStyle::HalfSplit, dtype, &DEV)?;
    Ok(Setup {
        mha,
        rope,
        e,
        hkv,
        d,
    })
}

#[test]
fn attend_paged_equals_dense_kv_cache_over_random_mixes() -> Result<()> {
    let mut rng = Rng(0xca11_ab1e);
    for iter in 0..24 {
        let dtype = [DType::F32, DType::BF16][iter % 2];
        let s = setup(dtype)?;
        let odd = 3 + rng.below(6);
        let bs = rng.pick(&[1, 16, 32, odd]);
        let window = (iter % 4 == 3).then(|| 4 + rng.below(20));
        let n = 1 + rng.below(6);
        // Per sequence: its tokens, its prompt length, the step it arrives at.
        let streams: Vec<Tensor> = (0..n)
            .map(|_| {
                let len = 1 + rng.below(50);
                randn(&mut rng, &[len, s.e], dtype)
            })
            .collect();
        let prompts: Vec<usize> = streams
            .iter()
            .map(|t| 1 + rng.below(t.dim(0).unwrap()))
            .collect();
        let arrive: Vec<usize> = (0..n).map(|_| rng.below(6)).collect();
        // Chunks per sequence: the prompt, then mostly single tokens and some chunks of 2 to 4
        // (chunked prefill, speculative tokens).
        let chunks: Vec<Vec<usize>> = streams
            .iter()
            .zip(&prompts)
            .map(|(x, &p)| {
                let mut c = vec![p];
                let mut at = p;
                while at < x.dim(0).unwrap() {
                    let len = if rng.below(4) == 0 {
                        2 + rng.below(3)
                    } else {
                        1
                    };
                    let len = len.min(x.dim(0).unwrap() - at);
                    c.push(len);
                    at += len;
                }
                c
            })
            .collect();
        // Dense: each sequence alone, in the same chunks.
        let mut want = Vec::new();
        for (x, c) in streams.iter().zip(&chunks) {
            let mut cache = KvCache::new();
            let mut outs = Vec::new();
            let mut at = 0;
            for &len in c {
                let mut input =
                    MhaInput::new(x.narrow(0, at, len)?.unsqueeze(0)?).rope(s.rope.clone());
                if let Some(w) = window {
                    input = input.sliding_window(w);
                }
                outs.push(s.mha.attend_cached(&input, &mut cache)?.output.squeeze(0)?);
                at += len;
            }
            want.push(Tensor::cat(&outs, 0)?);
        }
        // Paged: every step, the arrived sequences bring their prompt or their next token.
        let mut cfg = PagedPoolConfig::new(1, s.hkv, s.d, bs, 0, dtype);
        cfg.num_blocks = streams
            .iter()
            .map(|x| x.dim(0).unwrap().div_ceil(bs))
            .sum::<usize>()
            + 1;
        if let Some(w) = window {
            cfg = cfg.with_sliding_window(w);
        }
        let mut pool = PagedKvPool::new(cfg, &DEV)?;
        let ids: Vec<SeqId> = (0..n).map(|_| pool.add_sequence()).collect();
        let mut done = vec![0usize; n];
        let mut next_chunk = vec![0usize; n];
        let mut got: Vec<Vec<Tensor>> = vec![Vec::new(); n];
        let mut t = 0;
        while (0..n).any(|b| done[b] < streams[b].dim(0).unwrap()) {
            let mut batch = Vec::new();
            let mut rows = Vec::new();
            for b in 0..n {
                let total = streams[b].dim(0)?;
                if arrive[b] > t || done[b] == total {
                    continue;
                }
                let len = chunks[b][next_chunk[b]];
                next_chunk[b] += 1;
                batch.push((ids[b], len));
                rows.push(streams[b].narrow(0, done[b], len)?);
            }
            t += 1;
            if batch.is_empty() {
                continue;
            }
            let step = pool.begin_step(&batch)?;
            let mut input = MhaInput::new(Tensor::cat(&rows, 0)?).rope(s.rope.clone());
            if let Some(w) = window {
                input = input.sliding_window(w);
            } else {
                input = input.mask_plan(s.mha.mask_plan_paged(&step)?);
            }
            let out = s.mha.attend_paged(&input, &mut pool, 0, &step)?.output;
            pool.commit(&step)?;
            for (i, &(id, len)) in batch.iter().enumerate() {
                let b = ids.iter().position(|&x| x == id).unwrap();
                got[b].push(out.narrow(0, step.cu_q().range(i).start, len)?);
                done[b] += len;
            }
        }
        let (atol, rtol) = tolerances(dtype);
        for b in 0..n {
            let g = Tensor::cat(&got[b], 0)?;
            check_close(
                &g,
                &want[b],
                atol * 2.0,
                rtol * 2.0,
                &format!("iter {iter} seq {b} bs {bs} window {window:?} {dtype:?}"),
            );
            if window.is_none() {
                assert_eq!(
                    pool.block_table(ids[b])?.len(),
                    streams[b].dim(0)?.div_ceil(bs)
                );
            }
        }
        if let Some(w) = window {
            // Blocks out of the window were released: a sequence whose last step was a decode
            // keeps at most ⌈(w + bs) / bs⌉ + 1 blocks.
            for (b, &id) in ids.iter().enumerate() {
                if chunks[b].last() == Some(&1) && chunks[b].len() > 1 {
                    assert!(pool.block_table(id)?.len() <= (w + bs).div_ceil(bs) + 1);
                }
            }
        }
        for id in ids {
            pool.release(id)?;
        }
        assert_eq!(pool.used_blocks(), 0);
    }
    Ok(())
}

#[test]
fn attend_paged_refuses_what_it_cannot_do() -> Result<()> {
    let s = setup(DType::F32)?;
    let mut pool = PagedKvPool::new(PagedPoolConfig::new(1, s.hkv, s.d, 4, 8, DType::F32), &DEV)?;
    let a = pool.add_sequence();
    let step = pool.begin_step(&[(a, 3)])?;
    let x = Tensor::zeros((3, s.e), DType::F32, &DEV)?;
    let bad = |input: MhaInput, pool: &mut PagedKvPool| {
        s.mha
            .attend_paged(&input, pool, 0, &step)
            .unwrap_err()
            .to_string()
    };
    let e = bad(MhaInput::new(x.narrow(0, 0, 2)?), &mut pool);
    assert!(e.contains("(total_q, embed_dim) = (3, 32)"), "{e}");
    let e = bad(
        MhaInput::new(x.clone()).causal(CausalAlignment::TopLeft),
        &mut pool,
    );
    assert!(e.contains("BottomRight"), "{e}");
    let e = bad(MhaInput::new(x.clone()).left_padding(&[1]), &mut pool);
    assert!(e.contains("left_padding"), "{e}");
    let mut other = PagedKvPool::new(PagedPoolConfig::new(1, 1, s.d, 4, 8, DType::F32), &DEV)?;
    let e = s
        .mha
        .attend_paged(&MhaInput::new(x.clone()), &mut other, 0, &step)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the pool stores"), "{e}");
    let mut windowed = PagedKvPool::new(
        PagedPoolConfig::new(1, s.hkv, s.d, 4, 8, DType::F32).with_sliding_window(8),
        &DEV,
    )?;
    let w = windowed.add_sequence();
    let wstep = windowed.begin_step(&[(w, 3)])?;
    let e = s
        .mha
        .attend_paged(&MhaInput::new(x), &mut windowed, 0, &wstep)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sliding window of 8"), "{e}");
    Ok(())
}

/// Sequences forked (whole, or a prefix) while others run: each continues with its own tokens,
/// and every output equals a dense `KvCache` cloned (and truncated) at the same point.
#[test]
fn forks_and_prefixes_equal_cloned_dense_caches() -> Result<()> {
    let mut rng = Rng(0xf04c_5eed);
    let mut total_forks = 0;
    for iter in 0..12 {
        let dtype = [DType::F32, DType::BF16][iter % 2];
        let s = setup(dtype)?;
        let odd = 2 + rng.below(6);
        let bs = rng.pick(&[1, 16, odd]);
        let mut pool = PagedKvPool::new(PagedPoolConfig::new(1, s.hkv, s.d, bs, 400, dtype), &DEV)?;
        // (paged sequence, dense cache, prompt length, decode steps left).
        let mut live: Vec<(SeqId, KvCache, usize, usize)> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let prompt = 1 + rng.below(40);
            live.push((
                pool.add_sequence(),
                KvCache::new(),
                prompt,
                1 + rng.below(8),
            ));
        }
        let (atol, rtol) = tolerances(dtype);
        for step_no in 0..12 {
            // Fork a running sequence, whole or a prefix of it.
            if step_no > 0 && rng.below(2) == 0 {
                let p = rng.below(live.len());
                let (pid, pcache) = (live[p].0, live[p].1.clone());
                let len = pool.seq_len(pid)?;
                if len > 0 {
                    let (id, cache) = if rng.below(2) == 0 {
                        (pool.fork(pid)?, pcache)
                    } else {
                        let n = 1 + rng.below(len);
                        let mut c = pcache;
                        c.truncate(n)?;
                        (pool.fork_prefix(pid, n)?, c)
                    };
                    live.push((id, cache, 0, 1 + rng.below(8)));
                }
            }
            let mut batch = Vec::new();
            let mut rows = Vec::new();
            for (id, cache, prompt, left) in &live {
                if *left == 0 {
                    continue;
                }
                let n = if cache.is_empty() { *prompt } else { 1 };
                batch.push((*id, n));
                rows.push(randn(&mut rng, &[n, s.e], dtype));
            }
            if batch.is_empty() {
                break;
            }
            let step = pool.begin_step(&batch)?;
            let input = MhaInput::new(Tensor::cat(&rows, 0)?).rope(s.rope.clone());
            let out = s.mha.attend_paged(&input, &mut pool, 0, &step)?.output;
            pool.commit(&step)?;
            for (i, &(id, n)) in batch.iter().enumerate() {
                let (_, cache, _, left) = live.iter_mut().find(|l| l.0 == id).unwrap();
                let x = MhaInput::new(rows[i].unsqueeze(0)?).rope(s.rope.clone());
                let want = s.mha.attend_cached(&x, cache)?.output.squeeze(0)?;
                let got = out.narrow(0, step.cu_q().range(i).start, n)?;
                let what = format!(
                    "iter {iter} step {step_no} seq {} bs {bs} {dtype:?}",
                    id.as_u64()
                );
                check_close(&got, &want, atol * 2.0, rtol * 2.0, &what);
                if cache.len() > n {
                    *left -= 1; // a decode step (the prefill is not counted)
                }
                assert_eq!(pool.seq_len(id)?, cache.len());
            }
        }
        let forks = live.len();
        for (id, _, _, _) in live {
            pool.release(id)?;
        }
        assert_eq!(pool.used_blocks(), 0);
        total_forks += forks;
    }
    assert!(total_forks > 30, "{total_forks} sequences");
    Ok(())
}

/// Int8 and fp8 pools against `KvCache`s of the same format: the same rows are quantized the
/// same way, so the outputs agree as the native ones do, over mixes of prefill and decode.
#[test]
fn quantized_pools_equal_quantized_kv_caches() -> Result<()> {
    let mut rng = Rng(0x9a9e_d080);
    for iter in 0..8 {
        let dtype = [DType::F32, DType::BF16][iter % 2];
        let format = [KvFormat::Int8, KvFormat::Fp8E4M3][iter / 2 % 2];
        let s = setup(dtype)?;
        let bs = rng.pick(&[1, 16, 5]);
        let cfg = PagedPoolConfig::new(1, s.hkv, s.d, bs, 200, dtype).with_format(format);
        let mut pool = PagedKvPool::new(cfg, &DEV)?;
        let n = 1 + rng.below(4);
        let ids: Vec<SeqId> = (0..n).map(|_| pool.add_sequence()).collect();
        let mut caches = vec![KvCache::new().with_format(format); n];
        for step_no in 0..6 {
            let lens: Vec<usize> = (0..n)
                .map(|b| {
                    if caches[b].is_empty() {
                        1 + rng.below(30)
                    } else {
                        1
                    }
                })
                .collect();
            let rows: Vec<Tensor> = lens
                .iter()
                .map(|&l| randn(&mut rng, &[l, s.e], dtype))
                .collect();
            let batch: Vec<(SeqId, usize)> =
                ids.iter().copied().zip(lens.iter().copied()).collect();
            let step = pool.begin_step(&batch)?;
            let input = MhaInput::new(Tensor::cat(&rows, 0)?).rope(s.rope.clone());
            let res = s.mha.attend_paged(&input, &mut pool, 0, &step)?;
            assert_eq!(
                res.kernel, "cpu",
                "the fused kernel reads the quantized blocks in place"
            );
            let out = res.output;
            pool.commit(&step)?;
            // The pool projects every sequence's rows in one GEMM and each cache its own rows:
            // a key can differ in its last bit between the two, and now and then that bit moves
            // it across a rounding boundary of the quantized format (an fp8 step is 1/16 of the
            // value). Then the outputs differ by the format's step, not by f32 rounding: f32
            // calls are held to bf16's tolerance here (the native-format tests above stay at
            // f32's).
            let (atol, rtol) = tolerances(if dtype == DType::F32 {
                DType::BF16
            } else {
                dtype
            });
            for b in 0..n {
                let x = MhaInput::new(rows[b].unsqueeze(0)?).rope(s.rope.clone());
                let want = s.mha.attend_cached(&x, &mut caches[b])?.output.squeeze(0)?;
                let got = out.narrow(0, step.cu_q().range(b).start, lens[b])?;
                let what =
                    format!("iter {iter} step {step_no} seq {b} bs {bs} {format:?} {dtype:?}");
                check_close(&got, &want, atol * 2.0, rtol * 2.0, &what);
            }
        }
    }
    Ok(())
}
