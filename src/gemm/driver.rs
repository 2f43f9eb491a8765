//! The parallel driver of the packed GEMM: tasks of row × column blocks on rayon's pool, each
//! packing its rows of `x` per `K` block and running the micro-kernel over every tile; and
//! [`mlp`], two products chained per block of rows.

use std::cell::RefCell;

use rayon::prelude::*;

use super::pack::{self, Elem, Form, Src};
use super::ukr::{Half, Out};
use super::{blocking, ukr, Blocking, Lines, PackedWeight};

/// Per-thread scratch, kept for the thread's life and grown to the largest call: the packed
/// block of `x` (`mc × kc` f32, about 0.35 MiB on a 1 MiB-L2 CPU), for half outputs the f32
/// sums of a task's block while `K` has more than one block (`mc × min(N, nc)` f32: 3.4 MiB at
/// N = 4096), and [`mlp`]'s hidden block (`mc × N1` f32: 1.3 MiB for a BERT-base
/// feed-forward).
#[derive(Default)]
struct Scratch {
    a: Lines,
    c: Vec<f32>,
    /// [`mlp`]'s block of the hidden layer.
    #[cfg_attr(not(feature = "models"), allow(dead_code))]
    hidden: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// An output written from many tasks, each writing its own block of rows × columns (also the
/// dot-product GEMM's, `kernels/cpu/gemm.rs`).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint blocks of the buffer, which outlives the parallel loop.
unsafe impl<T> Send for OutPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for OutPtr<T> {}

impl<T> OutPtr<T> {
    /// Element `i` (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn at(self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

/// A function applied to each finished row of the product, in f32 before the rounding to the
/// output dtype: `(row index, the row's N values)`. Fuses an activation or a residual add and
/// layer norm into the GEMM while the row is still in cache.
pub(crate) type RowFn<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// `out[r][j] = round(Σ_k x[r][k]·w[j][k] + bias[j])` for `r < m`, `j < w.n`, on rayon's pool:
/// `x` is `m` rows of `K` elements, contiguous. With `epilogue`, each whole row of sums
/// goes through it before the rounding (tasks then span whole rows).
///
/// # Panics
/// When `x`, `out` or `bias` are shorter than `m·K`, `m·N`, `N`, when the CPU lacks the
/// weight's kernel, or when `T` does not match the packed form (pairs are bf16 only).
pub(crate) fn gemm<T: Elem>(
    x: &[T],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [T],
    epilogue: Option<RowFn>,
) {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len() >= m * k,
        "gemm: x has {} elements, needs {m}·{k}",
        x.len()
    );
    assert!(
        out.len() >= m * n,
        "gemm: out has {} elements, needs {m}·{n}",
        out.len()
    );
    assert!(
        bias.is_none_or(|b| b.len() >= n),
        "gemm: bias shorter than {n}"
    );
    assert!(
        w.kernel.supported(),
        "gemm: the CPU lacks {}",
        w.kernel.name()
    );
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    run(x, m, w, bias, out, epilogue);
}

/// The packed block of rows `r0 .. r0 + mv` of `job.src` (rows past its end as zeros) times
/// weight columns `c0 .. c0 + nv`, into the f32 block at `c` (`ldc` apart): `C = bias + x·wᵀ`,
/// then `job.epilogue` on each row (index `row_base + r`; whole rows only: `nv = N`).
///
/// # Safety
/// `c` covers `mv` rows of `nv` f32, `ldc` apart, written by nobody else meanwhile (with
/// `direct` and a single block of `K` it is never read or written and may dangle: only
/// addresses are formed from it); the CPU has the weight's kernel; `c0` is a multiple of the
/// kernel's `NR`.
#[cfg(target_arch = "x86_64")]
unsafe fn block<T: Elem>(
    job: &Job<T>,
    (r0, mv): (usize, usize),
    (c0, nv): (usize, usize),
    (cptr, ldc): (*mut f32, usize),
    row_base: usize,
    abuf: &mut Lines,
    direct: Option<(Half, *mut u16, usize)>,
) -> bool {
    let w = job.w;
    let kernel = w.kernel;
    let (mr, nr) = kernel.tile();
    let (form, ukr, units, kc) = (kernel.form(), kernel.ukr(), w.units, job.kc);
    let wdata = w.data.as_slice();
    let per_panel = units * nr;
    let a_panels = mv.div_ceil(mr);
    abuf.reserve(a_panels * mr * kc.min(units).max(1));
    if units == 0 {
        for r in 0..mv {
            // SAFETY: row r of the block has nv elements (the caller's promise).
            let row = unsafe { std::slice::from_raw_parts_mut(cptr.add(r * ldc), nv) };
            match job.bias {
                Some(b) => row.copy_from_slice(&b[c0..c0 + nv]),
                None => row.fill(0.0),
            }
        }
    }
    let direct = direct.filter(|_| units > 0 && job.epilogue.is_none());
    let mut u0 = 0;
    while u0 < units {
        let kcv = (units - u0).min(kc);
        let init = u0 == 0;
        // The last block of K writes the rounded output itself.
        let (half, h, ldh) = match direct {
            Some(d) if u0 + kcv == units => d,
            _ => (Half::No, std::ptr::null_mut(), 0),
        };
        let apanel = kcv * mr;
        pack::pack(
            form,
            job.src,
            r0,
            a_panels,
            mr,
            (u0, kcv),
            abuf.as_mut_slice(),
            apanel,
        );
        let a = abuf.as_slice().as_ptr();
        // Each sliver of x (L1) passes `job.nb` weight panels (L2: the first sliver brings them
        // from L3 or memory, the next ones find them there), then the next `nb` panels.
        let np = nv.div_ceil(nr);
        for jp0 in (0..np).step_by(job.nb.max(1)) {
            for ip in 0..a_panels {
                let rows = (mv - ip * mr).min(mr);
                for jp in jp0..(jp0 + job.nb.max(1)).min(np) {
                    let cols = (nv - jp * nr).min(nr);
                    let j = c0 + jp * nr;
                    let b = wdata[(j / nr) * per_panel + u0 * nr..].as_ptr();
                    // SAFETY: the tile's C block lies in the caller's block (rows ip·mr..,
                    // columns jp·nr..); a and b cover kcv steps of a packed sliver and panel; the
                    // CPU has the kernel (the caller's promise).
                    unsafe {
                        let out = Out {
                            // Wrapping: `cptr` may dangle (see the safety section).
                            c: cptr.wrapping_add(ip * mr * ldc + jp * nr),
                            ldc,
                            bias: job.bias.map_or(std::ptr::null(), |bb| bb.as_ptr().add(j)),
                            init,
                            half,
                            h: if h.is_null() {
                                h
                            } else {
                                h.add(ip * mr * ldh + jp * nr)
                            },
                            ldh,
                        };
                        let a = a.add(ip * apanel);
                        if rows == mr && cols == nr {
                            ukr(kcv, a, b, out);
                        } else {
                            edge_tile(ukr, (kcv, a, b), out, (rows, cols));
                        }
                    }
                }
            }
        }
        u0 += kcv;
    }
    if let Some(f) = job.epilogue {
        for r in 0..mv {
            // SAFETY: row r of the block has nv = N elements (the caller's promise).
            let row = unsafe { std::slice::from_raw_parts_mut(cptr.add(r * ldc), nv) };
            f(row_base + r, row);
        }
    }
    direct.is_some()
}

/// One product's operands: `x` (as a packing source), the packed weight, the bias, the `K`
/// block, the weight panels per pass of the slivers ([`Blocking::nb`]) and the epilogue.
struct Job<'a, T> {
    src: Src<'a, T>,
    w: &'a PackedWeight,
    bias: Option<&'a [f32]>,
    kc: usize,
    nb: usize,
    epilogue: Option<RowFn<'a>>,
}

/// Row blocks for `m` rows in slivers of `mr`, at most `mc` rows each, when the columns are cut
/// in `tn` blocks: equal blocks, at least 8 tasks per thread where there are enough slivers, a
/// whole number per thread (a sliver is packed once per task whatever the task count, so small
/// tasks only cost the balance they buy). Returns `(rows per block, blocks)`.
fn row_blocks(m: usize, mr: usize, mc: usize, tn: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let slivers = m.div_ceil(mr);
    let mut tm = slivers
        .div_ceil(mc / mr)
        .max((8 * threads).div_ceil(tn))
        .min(slivers);
    if tn < threads {
        tm = (tm.div_ceil(threads) * threads).min(slivers);
    }
    let mc = slivers.div_ceil(tm) * mr;
    (mc, m.div_ceil(mc))
}

#[cfg(target_arch = "x86_64")]
fn run<T: Elem>(
    x: &[T],
    m: usize,
    w: &PackedWeight,
    bias: Option<&[f32]>,
    out: &mut [T],
    epilogue: Option<RowFn>,
) {
    let (n, k) = (w.n, w.k);
    let (_, nr) = w.kernel.tile();
    let Blocking { kc, mc, nc, nb } = blocking(w.kernel);
    // An epilogue sees whole rows: one column block.
    let nc = if epilogue.is_some() {
        nc.max(n.div_ceil(nr) * nr)
    } else {
        nc
    };
    let tn = n.div_ceil(nc);
    let (mc, tm) = row_blocks(m, w.kernel.tile().0, mc, tn);
    let dst = OutPtr(out.as_mut_ptr());
    let job = Job {
        src: Src {
            data: x,
            stride: k,
            rows: m,
            k,
        },
        w,
        bias,
        kc,
        nb,
        epilogue,
    };
    (0..tm * tn).into_par_iter().for_each(|t| {
        let (r0, c0) = ((t / tn) * mc, (t % tn) * nc);
        let (mv, nv) = ((m - r0).min(mc), (n - c0).min(nc));
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            let Scratch {
                a: abuf, c: cbuf, ..
            } = &mut *s;
            // The f32 sums: the output itself (f32), or for half outputs the scratch block,
            // needed only when K has several blocks (partial sums), none (the bias alone) or the
            // rows go through an epilogue: otherwise the kernels round straight into `out`.
            let sums = w.units == 0 || w.units > kc || epilogue.is_some();
            let (cptr, ldc) = if T::IS_F32 {
                (dst.at(r0 * n + c0) as *mut f32, n)
            } else if sums {
                if cbuf.len() < mv * nv {
                    cbuf.resize(mv * nv, 0.0);
                }
                (cbuf.as_mut_ptr(), nv)
            } else {
                (std::ptr::NonNull::<f32>::dangling().as_ptr(), nv)
            };
            // Half outputs are rounded and written by the kernel itself.
            let direct =
                (T::HALF != Half::No).then(|| (T::HALF, dst.at(r0 * n + c0) as *mut u16, n));
            // SAFETY: rows r0.. and columns c0.. of the output (or the scratch block) are this
            // task's alone; the CPU has the kernel (asserted by `gemm`); c0 is a multiple of NR;
            // with `direct`, T is a 16-bit type and the pointer covers the same block of `out`.
            let wrote = unsafe { block(&job, (r0, mv), (c0, nv), (cptr, ldc), r0, abuf, direct) };
            if !T::IS_F32 && !wrote {
                for r in 0..mv {
                    // SAFETY: row r0 + r < m and columns c0..c0+nv < n are this task's alone.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst.at((r0 + r) * n + c0), nv) };
                    T::store(&cbuf[r * nv..r * nv + nv], row);
                }
            }
        });
    });
}

#[cfg_attr(not(feature = "models"), allow(dead_code))]
/// A function given each finished output row of [`mlp`] with the input row it came from (for a
/// residual connection): `(output row, input row)`.
pub(crate) type ResidualFn<'a> = &'a (dyn Fn(&mut [f32], &[f32]) + Sync);

/// A two-layer perceptron in f32, `out = epilogue(act(x · w1ᵀ + b1) · w2ᵀ + b2, x)`, one block of
/// rows at a time: each task computes its rows of the hidden layer into a per-thread buffer
/// (`rows × N1` f32, about 1 MiB for a BERT-base feed-forward) and multiplies them by `w2` while
/// they are in cache; the hidden layer is never written out whole (for all-MiniLM-L6-v2 a
/// 40 MB tensor per layer, page-faulted in and read back from memory).
///
/// # Panics
/// When the shapes disagree (`w2`'s `K` must be `w1`'s `N`), the slices are short, a weight is
/// not packed as f32, or the CPU lacks a kernel.
#[cfg_attr(not(feature = "models"), allow(dead_code))]
pub(crate) fn mlp(
    x: &[f32],
    m: usize,
    (w1, b1, act): (&PackedWeight, Option<&[f32]>, RowFn),
    (w2, b2, epilogue): (&PackedWeight, Option<&[f32]>, Option<ResidualFn>),
    out: &mut [f32],
) {
    let (n1, n2, k) = (w1.n, w2.n, w1.k);
    assert_eq!(w2.k, n1, "mlp: the second weight's K must be the first's N");
    assert!(w1.kernel.form() == Form::F32 && w2.kernel.form() == Form::F32);
    assert!(
        w1.kernel.supported() && w2.kernel.supported(),
        "mlp: kernel"
    );
    assert!(
        x.len() >= m * k && out.len() >= m * n2,
        "mlp: slices too short"
    );
    assert!(b1.is_none_or(|b| b.len() >= n1) && b2.is_none_or(|b| b.len() >= n2));
    if m == 0 || n2 == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (b1k, b2k) = (blocking(w1.kernel), blocking(w2.kernel));
        let (mc, tm) = row_blocks(m, w1.kernel.tile().0, b1k.mc.min(b2k.mc), 1);
        let dst = OutPtr(out.as_mut_ptr());
        (0..tm).into_par_iter().for_each(|t| {
            let r0 = t * mc;
            let mv = (m - r0).min(mc);
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                let Scratch {
                    a: abuf, hidden, ..
                } = &mut *s;
                if hidden.len() < mv * n1 {
                    hidden.resize(mv * n1, 0.0);
                }
                let first = Job {
                    src: Src {
                        data: x,
                        stride: k,
                        rows: m,
                        k,
                    },
                    w: w1,
                    bias: b1,
                    kc: b1k.kc,
                    nb: b1k.nb,
                    epilogue: Some(act),
                };
                // SAFETY: the per-thread hidden block holds mv rows of n1; kernels checked.
                unsafe {
                    block(
                        &first,
                        (r0, mv),
                        (0, n1),
                        (hidden.as_mut_ptr(), n1),
                        r0,
                        abuf,
                        None,
                    )
                };
                let with_input = |r: usize, row: &mut [f32]| {
                    if let Some(f) = epilogue {
                        f(row, &x[r * k..(r + 1) * k]);
                    }
                };
                let second = Job {
                    src: Src {
                        data: &hidden[..mv * n1],
                        stride: n1,
                        rows: mv,
                        k: n1,
                    },
                    w: w2,
                    bias: b2,
                    kc: b2k.kc,
                    nb: b2k.nb,
                    epilogue: epilogue.map(|_| &with_input as RowFn),
                };
                // SAFETY: output rows r0..r0+mv are this task's alone; kernels checked.
                unsafe {
                    block(
                        &second,
                        (0, mv),
                        (0, n2),
                        (dst.at(r0 * n2), n2),
                        r0,
                        abuf,
                        None,
                    )
                };
            });
        });
    }
}

/// Largest tile (`MR × NR`) of any kernel.
const MAX_TILE: usize = ukr::MR_512 * ukr::NR_512;

/// A partial tile (`rows × cols` of the kernel's `MR × NR`) through a scratch tile: `out` as
/// for a whole tile, but only its first `rows × cols` elements exist (bias: `cols`).
///
/// # Safety
/// As the kernel's, for the partial tile.
#[cfg(target_arch = "x86_64")]
unsafe fn edge_tile(
    ukr: ukr::Ukr,
    (kc, a, b): (usize, *const u32, *const u32),
    out: Out,
    (rows, cols): (usize, usize),
) {
    let nr = ukr::NR_512; // the scratch tile's stride: wide enough for every kernel
    let mut tile = [0f32; MAX_TILE];
    let mut b_tile = [0f32; ukr::NR_512];
    // SAFETY: as the caller promised; the scratch tile holds MR_512 rows of NR_512.
    unsafe {
        if !out.init {
            for r in 0..rows {
                let src = out.c.add(r * out.ldc);
                std::ptr::copy_nonoverlapping(src, tile.as_mut_ptr().add(r * nr), cols);
            }
        }
        let bias = if out.bias.is_null() {
            std::ptr::null()
        } else {
            std::ptr::copy_nonoverlapping(out.bias, b_tile.as_mut_ptr(), cols);
            b_tile.as_ptr()
        };
        let scratch = Out {
            c: tile.as_mut_ptr(),
            ldc: nr,
            bias,
            half: Half::No,
            ..out
        };
        ukr(kc, a, b, scratch);
        for r in 0..rows {
            let sums = &tile[r * nr..r * nr + cols];
            match out.half {
                Half::No => {
                    std::ptr::copy_nonoverlapping(sums.as_ptr(), out.c.add(r * out.ldc), cols)
                }
                Half::Bf16 => {
                    let h = std::slice::from_raw_parts_mut(out.h.add(r * out.ldh), cols);
                    for (d, &x) in h.iter_mut().zip(sums) {
                        *d = crate::kernels::cpu::bf16_nearest(x).to_bits();
                    }
                }
                Half::F16 => {
                    let h = std::slice::from_raw_parts_mut(out.h.add(r * out.ldh), cols);
                    for (d, &x) in h.iter_mut().zip(sums) {
                        *d = half::f16::from_f32(x).to_bits();
                    }
                }
            }
        }
    }
}
