//! `out[m, n] = x[m, k] · W[n, k]ᵀ` with f32 accumulation, W in f32 or BF16.
//!
//! Two regimes, chosen by `m` (the number of activation rows):
//! - **small m** (decode, MoE experts with few tokens): the op is bound by reading W once.
//!   A register-blocked AVX2/FMA kernel streams each weight row once and applies it to up to
//!   four activation rows held in L1, converting BF16 to f32 in registers (a 16-bit shift).
//! - **large m** (prefill): compute bound. W is converted block by block to f32 and handed to
//!   the `gemm` crate (182 GFLOP/s f32 on this machine's two cores, ../shared/reference/deps.md).
//!
//! Both split the weight rows across the rayon pool, so each thread reads a disjoint part of W.

use half::bf16;
use rayon::prelude::*;

use super::Elem;

/// Rows of `x` up to which the streaming kernel is used; above it, the blocked gemm path.
/// From `examples/matmul_bench.rs` on BF16 weights: streaming held ~155 GFLOP/s at m = 16–24 while
/// convert-then-gemm gave 83–106 at m = 32–64 and 185 at m = 512; 96 is a judgment between those
/// points, not itself measured (BENCHMARKS.md).
pub const STREAM_M_MAX: usize = 96;

/// Weight rows per parallel task: large enough to amortise rayon's scheduling (~µs), small
/// enough that two cores still balance on the smallest layer (an expert of 48–512 rows).
const ROWS_PER_TASK_MIN: usize = 16;

/// Weight rows converted to f32 at once on the gemm path: 64 rows × 7168 × 4 B ≈ 1.8 MiB, an L2-ish
/// working set per thread.
const GEMM_ROW_BLOCK: usize = 64;

/// A raw output pointer that tasks write to at disjoint column ranges.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of columns of `out` (its own weight rows), and the
// buffer outlives the parallel scope that uses the pointer.
unsafe impl Send for OutPtr {}
// SAFETY: as above; the pointer is only written through at disjoint indices.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Through a method so closures capture the whole `Send` wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

pub fn matmul<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(wb) = W::as_bf16(w).filter(|_| avx512bf16::available()) {
        let mut p = [Problem {
            x,
            m,
            k,
            w: wb,
            n,
            out,
        }];
        avx512bf16::matmul_grouped(&mut p);
        return;
    }
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let ptr = OutPtr(out.as_mut_ptr());
    if m <= STREAM_M_MAX {
        let rows_per_task = n.div_ceil(threads * 4).max(ROWS_PER_TASK_MIN);
        let tasks = n.div_ceil(rows_per_task);
        (0..tasks).into_par_iter().for_each(|t| {
            let j0 = t * rows_per_task;
            let j1 = (j0 + rows_per_task).min(n);
            // SAFETY: rows j0..j1 are this task's alone; `out` has m*n elements.
            unsafe { stream_rows(x, m, k, &w[j0 * k..j1 * k], j0, j1 - j0, n, ptr.get()) };
        });
    } else {
        let blocks = n.div_ceil(GEMM_ROW_BLOCK);
        (0..blocks)
            .into_par_iter()
            .for_each_init(Vec::new, |scratch, b| {
                let j0 = b * GEMM_ROW_BLOCK;
                let nb = GEMM_ROW_BLOCK.min(n - j0);
                let wb = W::as_f32_block(&w[j0 * k..(j0 + nb) * k], scratch);
                // SAFETY: dst covers columns j0..j0+nb of the row-major [m, n] `out` (row stride n),
                // disjoint from every other block; lhs is [m, k] row-major; rhs is the block read as
                // its transpose [k, nb] (row stride 1, column stride k). All in bounds.
                unsafe {
                    gemm::gemm(
                        m,
                        nb,
                        k,
                        ptr.get().add(j0),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        wb.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
    }
}

/// Whether BF16-weight matmuls on this machine round activations to BF16 (the AVX512-BF16
/// kernel) rather than multiplying them in f32 (the AVX2 kernel). Set `DUET_NO_AVX512=1` to force
/// the latter.
pub fn bf16_weights_round_activations() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512bf16::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `(problem, first row, end row, output)` of one parallel task.
type RowTask = (usize, usize, usize, OutPtr);

/// Cuts the `eligible` problems into row ranges carrying about equal work (multiply-adds), about
/// four per thread: a grouped call mixes a shared expert over every token with routed experts
/// over a few, and splitting by rows alone would leave one thread finishing the big one while
/// the other idles.
fn row_tasks<W>(
    problems: &mut [Problem<'_, W>],
    eligible: impl Fn(&Problem<'_, W>) -> bool,
) -> Vec<RowTask> {
    let threads = rayon::current_num_threads().max(1);
    let total_work: usize = problems
        .iter()
        .filter(|p| eligible(p))
        .map(|p| p.n * p.m * p.k)
        .sum();
    let work_per_task = total_work.div_ceil(threads * 4);
    let mut tasks = Vec::new();
    for (pi, p) in problems.iter_mut().enumerate() {
        assert_eq!(p.x.len(), p.m * p.k);
        assert_eq!(p.w.len(), p.n * p.k);
        assert_eq!(p.out.len(), p.m * p.n);
        if !eligible(p) {
            continue;
        }
        let rows_per_task = (work_per_task / (p.m * p.k).max(1)).max(ROWS_PER_TASK_MIN);
        let mut j0 = 0;
        while j0 < p.n {
            let j1 = (j0 + rows_per_task).min(p.n);
            tasks.push((pi, j0, j1, OutPtr(p.out.as_mut_ptr())));
            j0 = j1;
        }
    }
    tasks
}

/// One problem of a grouped matmul: `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub struct Problem<'a, W> {
    pub x: &'a [f32],
    pub m: usize,
    pub k: usize,
    pub w: &'a [W],
    pub n: usize,
    pub out: &'a mut [f32],
}

/// Several independent matmuls in one parallel region (MoE experts of a step, or projections
/// sharing an input). Each small problem is cut into row tasks and all tasks of all problems go to
/// the pool at once: waking the pool costs tens of µs, which at batch 1 is the price of reading
/// a whole expert, so one wake-up per layer instead of one per expert matters.
pub fn matmul_grouped<W: Elem>(problems: &mut [Problem<'_, W>]) {
    #[cfg(target_arch = "x86_64")]
    if avx512bf16::available() && problems.iter().all(|p| W::as_bf16(p.w).is_some()) {
        let mut ps: Vec<Problem<'_, bf16>> = problems
            .iter_mut()
            .map(|p| Problem {
                x: p.x,
                m: p.m,
                k: p.k,
                w: W::as_bf16(p.w).expect("checked"),
                n: p.n,
                out: &mut *p.out,
            })
            .collect();
        avx512bf16::matmul_grouped(&mut ps);
        return;
    }
    let streamed = |p: &Problem<'_, W>| p.m <= STREAM_M_MAX && p.k > 0;
    for p in problems.iter_mut().filter(|p| !streamed(p)) {
        matmul(p.x, p.m, p.k, p.w, p.n, p.out);
    }
    let tasks = row_tasks(problems, streamed);
    let problems = &*problems;
    tasks.into_par_iter().for_each(|(pi, j0, j1, ptr)| {
        let p = &problems[pi];
        // SAFETY: rows j0..j1 of problem pi belong to this task alone; its `out` has m*n elements
        // and outlives the parallel loop.
        unsafe {
            stream_rows(
                p.x,
                p.m,
                p.k,
                &p.w[j0 * p.k..j1 * p.k],
                j0,
                j1 - j0,
                p.n,
                ptr.get(),
            )
        };
    });
}

/// Computes `out[t, j0 + j] = x[t] · w[j]` for `j < nw`, all `t < m`.
///
/// # Safety
/// `out` must point to an `[m, n]` buffer and columns `j0..j0 + nw` must be this caller's alone.
unsafe fn stream_rows<W: Elem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    j0: usize,
    nw: usize,
    n: usize,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if W::HAS_AVX2_LOAD && avx2::available() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); the caller's contract on
            // `out` is passed through.
            unsafe { avx2::stream_rows(x, m, k, w, j0, nw, n, out) };
            return;
        }
    }
    for j in 0..nw {
        let wr = &w[j * k..(j + 1) * k];
        for t in 0..m {
            let xr = &x[t * k..(t + 1) * k];
            let mut acc = 0.0f32;
            for i in 0..k {
                acc += wr[i].to_f32() * xr[i];
            }
            // SAFETY: t < m and j0 + j < n, inside the caller's columns.
            unsafe { *out.add(t * n + j0 + j) = acc };
        }
    }
}

impl Elem for f32 {
    const HAS_AVX2_LOAD: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32_block<'a>(src: &'a [Self], _scratch: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
    fn as_bf16(_: &[Self]) -> Option<&[bf16]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable f32 at p.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for bf16 {
    const HAS_AVX2_LOAD: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn as_bf16(s: &[Self]) -> Option<&[bf16]> {
        Some(s)
    }
    fn as_f32_block<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.extend(src.iter().map(|v| v.to_f32()));
        scratch
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bf16 (16 bytes) at p and AVX2 support.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Elem;

    pub fn available() -> bool {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: plain register arithmetic; AVX is available (caller's contract).
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// `R` weight rows × `T` activation rows per pass: R·T accumulators stay in registers
    /// (≤ 12 of the 16 ymm), each weight vector is loaded once and used `T` times.
    #[inline(always)]
    unsafe fn block<W: Elem, const R: usize, const T: usize>(
        x: *const f32,
        k: usize,
        w: *const W,
        out: *mut f32,
        n: usize,
    ) {
        // SAFETY: the caller guarantees R rows of k weights at w, T rows of k activations at x,
        // and the R×T output cells (row stride n) writable; AVX2+FMA are available.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); T]; R];
            let k8 = k & !7;
            let mut i = 0;
            while i < k8 {
                let mut wv = [_mm256_setzero_ps(); R];
                for r in 0..R {
                    wv[r] = W::load8(w.add(r * k + i));
                }
                for t in 0..T {
                    let xv = _mm256_loadu_ps(x.add(t * k + i));
                    for r in 0..R {
                        acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
                    }
                }
                i += 8;
            }
            for r in 0..R {
                for t in 0..T {
                    let mut s = hsum(acc[r][t]);
                    for j in k8..k {
                        s += (*w.add(r * k + j)).to_f32() * *x.add(t * k + j);
                    }
                    *out.add(t * n + r) = s;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn stream_rows<W: Elem>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[W],
        j0: usize,
        nw: usize,
        n: usize,
        out: *mut f32,
    ) {
        // SAFETY (whole body): every pointer offset stays inside x ([m, k]), w ([nw, k]) and the
        // caller's columns j0..j0+nw of out ([m, n]).
        unsafe {
            let xp = x.as_ptr();
            let wp = w.as_ptr();
            // Weight rows outermost: a block of R rows is read from memory once and reused from L1
            // for every group of activation rows.
            macro_rules! row_block {
                ($r:literal, $j:expr) => {{
                    let wj = wp.add($j * k);
                    let mut t = 0;
                    while t < m {
                        let xt = xp.add(t * k);
                        let ot = out.add(t * n + j0 + $j);
                        match m - t {
                            1 => {
                                block::<W, $r, 1>(xt, k, wj, ot, n);
                                t += 1;
                            }
                            _ if $r > 4 => unreachable!("8-row blocks are only used for m = 1"),
                            2 => {
                                block::<W, $r, 2>(xt, k, wj, ot, n);
                                t += 2;
                            }
                            3 => {
                                block::<W, $r, 3>(xt, k, wj, ot, n);
                                t += 3;
                            }
                            _ => {
                                block::<W, $r, 4>(xt, k, wj, ot, n);
                                t += 4;
                            }
                        }
                    }
                }};
            }
            let mut j = 0;
            if m == 1 {
                while j + 8 <= nw {
                    row_block!(8, j);
                    j += 8;
                }
            } else if m <= 2 {
                while j + 4 <= nw {
                    row_block!(4, j);
                    j += 4;
                }
            } else {
                while j + 3 <= nw {
                    row_block!(3, j);
                    j += 3;
                }
            }
            while j < nw {
                row_block!(1, j);
                j += 1;
            }
        }
    }
}

/// BF16 weights on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later): activations are
/// rounded to BF16 once per call and `vdpbf16ps` does 32 multiply-adds per instruction with f32
/// accumulation — four times the AVX2 path's, the same arithmetic as HF transformers' BF16 path
/// on these CPUs. One kernel serves every m: weight rows are streamed once and each block of
/// rows is reused from L1 for all activation rows, so prefill is compute bound at BF16 rate and
/// decode stays bound by reading W.
#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use std::arch::x86_64::*;

    use half::bf16;
    use rayon::prelude::*;

    use super::{Problem, row_tasks};

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16")
                && std::env::var_os("DUET_NO_AVX512").is_none()
        })
    }

    pub fn matmul_grouped(problems: &mut [Problem<'_, bf16>]) {
        // Activations as BF16 bits, converted once per problem rather than once per weight row.
        let xs: Vec<Vec<u16>> = problems
            .iter()
            .map(|p| p.x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect())
            .collect();
        for p in problems.iter_mut().filter(|p| p.k == 0) {
            p.out.fill(0.0);
        }
        let tasks = row_tasks(problems, |p| p.m > 0 && p.k > 0);
        let problems = &*problems;
        tasks.into_par_iter().for_each(|(pi, j0, j1, ptr)| {
            let p = &problems[pi];
            let w = &p.w[j0 * p.k..j1 * p.k];
            // SAFETY: AVX512-BF16 is available (checked by the caller through `available`);
            // rows j0..j1 of problem pi are this task's alone and its `out` has m*n elements.
            unsafe { rows(&xs[pi], p.m, p.k, w, j0, j1 - j0, p.n, ptr.get()) };
        });
    }

    #[inline(always)]
    unsafe fn load32(p: *const u16) -> __m512bh {
        // SAFETY: the caller guarantees 32 readable u16 at p.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
    }

    /// Loads the last `len < 32` elements, zero-filled.
    #[inline(always)]
    unsafe fn load_tail(p: *const u16, len: usize) -> __m512bh {
        // SAFETY: the caller guarantees `len` readable u16 at p; the mask reads only those.
        unsafe {
            let mask: __mmask32 = if len >= 32 { !0 } else { (1u32 << len) - 1 };
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(
                mask,
                p as *const i16,
            ))
        }
    }

    #[inline(always)]
    unsafe fn block<const R: usize, const T: usize>(
        x: *const u16,
        k: usize,
        w: *const u16,
        out: *mut f32,
        n: usize,
    ) {
        // SAFETY: R weight rows and T activation rows of k elements are readable; R×T outputs
        // (row stride n) are this task's.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); T]; R];
            let k32 = k & !31;
            let mut i = 0;
            while i < k32 {
                let mut wv = [std::mem::zeroed::<__m512bh>(); R];
                for r in 0..R {
                    wv[r] = load32(w.add(r * k + i));
                }
                for t in 0..T {
                    let xv = load32(x.add(t * k + i));
                    for r in 0..R {
                        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv[r], xv);
                    }
                }
                i += 32;
            }
            if k32 < k {
                let len = k - k32;
                for t in 0..T {
                    let xv = load_tail(x.add(t * k + k32), len);
                    for r in 0..R {
                        acc[r][t] =
                            _mm512_dpbf16_ps(acc[r][t], load_tail(w.add(r * k + k32), len), xv);
                    }
                }
            }
            for r in 0..R {
                for t in 0..T {
                    *out.add(t * n + r) = _mm512_reduce_add_ps(acc[r][t]);
                }
            }
        }
    }

    /// Activation rows per cache block: 48 rows of a 7168-wide BF16 input are 688 KiB, which stays
    /// in L2 while the task's weight rows stream past it; without blocking, prefill re-reads all
    /// activations from L3 for every 4 weight rows.
    const TOKENS_PER_BLOCK: usize = 48;

    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn rows(
        x: &[u16],
        m: usize,
        k: usize,
        w: &[bf16],
        j0: usize,
        nw: usize,
        n: usize,
        out: *mut f32,
    ) {
        // SAFETY (whole body): offsets stay inside x ([m, k]), w ([nw, k]) and columns
        // j0..j0+nw of out ([m, n]).
        unsafe {
            let xp = x.as_ptr();
            let wp = w.as_ptr() as *const u16;
            let mut t0 = 0;
            while t0 < m {
                let t1 = (t0 + TOKENS_PER_BLOCK).min(m);
                macro_rules! row_block {
                    ($r:literal, $j:expr) => {{
                        let wj = wp.add($j * k);
                        let mut t = t0;
                        while t < t1 {
                            let xt = xp.add(t * k);
                            let ot = out.add(t * n + j0 + $j);
                            match t1 - t {
                                1 => {
                                    block::<$r, 1>(xt, k, wj, ot, n);
                                    t += 1;
                                }
                                2 => {
                                    block::<$r, 2>(xt, k, wj, ot, n);
                                    t += 2;
                                }
                                3 => {
                                    block::<$r, 3>(xt, k, wj, ot, n);
                                    t += 3;
                                }
                                _ => {
                                    block::<$r, 4>(xt, k, wj, ot, n);
                                    t += 4;
                                }
                            }
                        }
                    }};
                }
                let mut j = 0;
                if t1 - t0 <= 2 {
                    while j + 8 <= nw {
                        row_block!(8, j);
                        j += 8;
                    }
                } else {
                    while j + 4 <= nw {
                        row_block!(4, j);
                        j += 4;
                    }
                }
                while j < nw {
                    row_block!(1, j);
                    j += 1;
                }
                t0 = t1;
            }
        }
    }
}
