//! Self-tests of the CUDA primitives that the emulator reimplements (`kernels/selftest.cu`).
//!
//! Each check launches one self-test kernel on a few shapes, with inputs from a small
//! deterministic generator, and compares the output with what the host computes by replaying
//! the formula documented above the kernel (never a stored constant). The same checks run on
//! the GPU and on the emulator under every schedule: a correct kernel passes everywhere, so a
//! failure points at the device, not at the kernel.
//!
//! [`planted`] holds the launchers of the deliberately broken kernels of
//! `kernels/planted_bugs.cu`, for the tests that prove the emulator's tools catch them.
pub mod hopper;
pub mod hopper_demo;
#[doc(hidden)]
pub mod probes;
mod wgmma;

pub use wgmma::wgmma;

use crate::device::{Device, DeviceKind, Element, KernelArgs, LaunchConfig};
use crate::ops::check_range;
use crate::{Error, Result};
use half::{bf16, f16};
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;

/// The outcome of one self-test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    /// What ran and how closely it matched, or the first mismatches (index, got, expected).
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed { "pass" } else { "FAIL" };
        write!(f, "{verdict} {}: {}", self.name, self.detail)
    }
}

/// Every self-test, in the order of `kernels/selftest.cu`.
pub fn run_all(device: &Device) -> Result<Vec<Check>> {
    let checks: [fn(&Device) -> Result<Check>; 12] = [
        block_reduce,
        shuffles,
        votes,
        atomics,
        mma,
        ldmatrix,
        cp_async,
        dynamic_shared,
        convert_16bit,
        convert_tf32,
        barrier_reduce,
        float_minmax,
    ];
    checks.iter().map(|check| check(device)).collect()
}

// ------------------------------------------------------------------------------------------
// Inputs and comparison.

/// The crate's seeded generator (ChaCha8), so every run sees the same inputs, with the draws
/// the checks need.
struct Rng(ChaCha8Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `lo..=hi`.
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        self.0.random_range(lo..=hi)
    }

    /// Uniform in [-1, 1), a multiple of 2^-23 (exact in f32).
    fn signed_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 23) as f32 - 1.0
    }

    fn vec<T>(&mut self, len: usize, mut draw: impl FnMut(&mut Self) -> T) -> Vec<T> {
        (0..len).map(|_| draw(self)).collect()
    }
}

/// How many mismatches a failed comparison lists, and how many failed comparisons a check.
const SHOWN: usize = 4;
const SHOWN_FAILURES: usize = 3;

/// The cases of one check (each a launch or a few alike), and the first mismatches of every
/// comparison that failed.
struct Report {
    name: &'static str,
    cases: Vec<String>,
    max_error: Option<f64>,
    failures: Vec<String>,
}

impl Report {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            cases: vec![],
            max_error: None,
            failures: vec![],
        }
    }

    /// Starts a case; its label names it in the detail and in its failures.
    fn case(&mut self, label: String) {
        self.cases.push(label);
    }

    /// `got` must equal `expected` bit for bit. `what` names the output within the case.
    fn exact<T: Element + fmt::Debug>(&mut self, what: &str, got: &[T], expected: &[T]) {
        self.compare(what, got.len(), expected.len(), |i| {
            let (g, e) = (got[i], expected[i]);
            (bytemuck::bytes_of(&g) != bytemuck::bytes_of(&e)).then(|| format!("[{i}] got {g:?}, expected {e:?}"))
        });
    }

    /// Each `got[i]` must be within `tolerance[i]` of `expected[i]`.
    fn within(&mut self, what: &str, got: &[f32], expected: &[f64], tolerance: &[f64]) {
        let error = |i: usize| (f64::from(got[i]) - expected[i]).abs();
        let errors = (0..got.len().min(expected.len())).map(error);
        self.max_error = Some(errors.fold(self.max_error.unwrap_or(0.0), f64::max));
        self.compare(what, got.len(), expected.len(), |i| {
            let error = error(i);
            (error.is_nan() || error > tolerance[i]).then(|| {
                format!(
                    "[{i}] got {}, expected {} (error {error:.2e} > {:.2e})",
                    got[i], expected[i], tolerance[i]
                )
            })
        });
    }

    /// Records a failure of the current case.
    fn fail(&mut self, message: String) {
        let case = self.cases.last().map_or("", String::as_str);
        self.failures.push(format!("{case}: {message}"));
    }

    /// Counts the indices where `mismatch` describes a difference; keeps the first few.
    fn compare(&mut self, what: &str, got: usize, expected: usize, mut mismatch: impl FnMut(usize) -> Option<String>) {
        let what = if what.is_empty() {
            String::new()
        } else {
            format!("{what}: ")
        };
        if got != expected {
            return self.fail(format!("{what}{got} outputs, expected {expected}"));
        }
        let (mut count, mut shown) = (0, vec![]);
        for m in (0..got).filter_map(&mut mismatch) {
            count += 1;
            if shown.len() < SHOWN {
                shown.push(m);
            }
        }
        if count > 0 {
            self.fail(format!("{what}{count} of {got} differ: {}", shown.join(", ")));
        }
    }

    fn finish(self) -> Check {
        let passed = self.failures.is_empty();
        let detail = if !passed {
            let more = self.failures.len().saturating_sub(SHOWN_FAILURES);
            let shown = self.failures[..self.failures.len() - more].join("; ");
            if more > 0 {
                format!("{shown}; and {more} more failed comparisons")
            } else {
                shown
            }
        } else if let Some(e) = self.max_error {
            format!(
                "{}: bit-exact, and max error {e:.1e} where a tolerance applies",
                self.cases.join("; ")
            )
        } else {
            format!("{}: bit-exact", self.cases.join("; "))
        };
        Check {
            name: self.name,
            passed,
            detail,
        }
    }
}

// ------------------------------------------------------------------------------------------
// The checks, in the order of kernels/selftest.cu.

/// `__syncthreads` and dynamic shared memory through `selftest_block_reduce_f32`: a grid-stride
/// f32 sum, then a shared-memory tree. The host replays the same f32 additions in the same
/// order, so every block sum must match bit for bit.
pub fn block_reduce(device: &Device) -> Result<Check> {
    let mut report = Report::new("block_reduce");
    let mut rng = Rng::new(1);
    for (grid, block, n) in [
        (1u32, 1u32, 5usize),
        (1, 32, 1),
        (3, 64, 1000),
        (5, 128, 300),
        (64, 256, 100_003),
    ] {
        // Magnitudes up to 2^16 so that the summation order shows in the rounding.
        let x = rng.vec(n, |r| r.signed_unit() * (1u32 << r.int(0, 16)) as f32);
        let x_dev = device.upload(&x)?;
        let mut sums = device.alloc_zeros::<f32>(grid as usize)?;
        let args = KernelArgs::new(device)
            .input("x", &x_dev)
            .scalar(n as i64)
            .output("block_sums", &mut sums);
        device.launch(
            "selftest_block_reduce_f32",
            LaunchConfig::linear(grid, block, block * 4),
            args,
        )?;
        report.case(format!("{grid}x{block} n={n}"));
        report.exact(
            "",
            &device.download(&sums)?,
            &block_sums(&x, grid as usize, block as usize),
        );
    }
    Ok(report.finish())
}

/// The host replay of `selftest_block_reduce_f32`.
fn block_sums(x: &[f32], grid: usize, block: usize) -> Vec<f32> {
    let stride = grid * block;
    let block_sum = |b: usize| {
        let mut s: Vec<f32> = (0..block)
            .map(|t| {
                x.iter()
                    .skip(b * block + t)
                    .step_by(stride)
                    .fold(0.0f32, |v, &xi| v + xi)
            })
            .collect();
        let mut half = block / 2;
        while half > 0 {
            for t in 0..half {
                s[t] += s[t + half];
            }
            half /= 2;
        }
        s[0]
    };
    (0..grid).map(block_sum).collect()
}

/// `__shfl_sync`, `__shfl_xor_sync`, `__shfl_up_sync` and `__shfl_down_sync` through
/// `selftest_shuffle`, for every segment width 1 .. 32 and two warps or more.
pub fn shuffles(device: &Device) -> Result<Check> {
    let mut report = Report::new("shuffles");
    let mut rng = Rng::new(2);
    const WIDTHS: [usize; 6] = [1, 2, 4, 8, 16, 32];
    for threads in [64u32, 128] {
        report.case(format!(
            "{threads} threads, widths {}..{}",
            WIDTHS[0],
            WIDTHS[WIDTHS.len() - 1]
        ));
        for width in WIDTHS {
            let input = rng.vec(threads as usize, |r| r.next_u32() as i32);
            let input_dev = device.upload(&input)?;
            let mut out = device.alloc_zeros::<i32>(4 * threads as usize)?;
            let args = KernelArgs::new(device)
                .input("in", &input_dev)
                .output("out", &mut out)
                .scalar(width as i32);
            device.launch("selftest_shuffle", LaunchConfig::linear(1, threads, 0), args)?;
            report.exact(
                &format!("width {width}"),
                &device.download(&out)?,
                &shuffle_expected(&input, width),
            );
        }
    }
    Ok(report.finish())
}

/// The four shuffles of each thread, as CUDA defines them for a segment `width`.
fn shuffle_expected(input: &[i32], width: usize) -> Vec<i32> {
    let thread = |i: usize| {
        let (v, lane, p) = (input[i], i % 32, i % width);
        let (warp, segment) = (i - lane, i - p);
        let xor_source = lane ^ 5;
        // A source in a later segment returns the caller's own value.
        let xor = if xor_source < lane - p + width {
            input[warp + xor_source]
        } else {
            v
        };
        let up = if p >= 3 { input[i - 3] } else { v };
        let down = if p + 3 < width { input[i + 3] } else { v };
        [input[segment + (lane * 7 + 3) % width], xor, up, down]
    };
    (0..input.len()).flat_map(thread).collect()
}

/// `__ballot_sync`, `__any_sync` and `__all_sync` through `selftest_vote`, on warps whose
/// predicates are all zero, all nonzero, mixed, and a single lane.
pub fn votes(device: &Device) -> Result<Check> {
    let mut report = Report::new("votes");
    let mut rng = Rng::new(3);
    for threads in [32usize, 128, 256] {
        let pred: Vec<i32> = (0..threads).map(|i| vote_predicate(&mut rng, i / 32, i % 32)).collect();
        let pred_dev = device.upload(&pred)?;
        let mut out = device.alloc_zeros::<u32>(3 * threads)?;
        let args = KernelArgs::new(device).input("pred", &pred_dev).output("out", &mut out);
        device.launch("selftest_vote", LaunchConfig::linear(1, threads as u32, 0), args)?;
        report.case(format!("{threads} threads"));
        report.exact("", &device.download(&out)?, &vote_expected(&pred));
    }
    Ok(report.finish())
}

/// Lane `lane` of warp `warp`'s predicate. The warps cycle through mixed, a single lane, all
/// zero and all nonzero; nonzero values are odd, negative half the time.
fn vote_predicate(rng: &mut Rng, warp: usize, lane: usize) -> i32 {
    let nonzero = (rng.next_u32() | 1) as i32;
    let set = match warp % 4 {
        0 => rng.next_u32() % 2 == 0,
        1 => lane == 31,
        2 => false,
        _ => true,
    };
    if set { nonzero } else { 0 }
}

/// Ballot, any and all of each thread's warp.
fn vote_expected(pred: &[i32]) -> Vec<u32> {
    let warp = |lanes: &[i32]| {
        let ballot = lanes
            .iter()
            .enumerate()
            .fold(0u32, |b, (l, &p)| b | u32::from(p != 0) << l);
        let all = lanes.iter().all(|&p| p != 0);
        std::iter::repeat_n([ballot, u32::from(ballot != 0), u32::from(all)], lanes.len()).flatten()
    };
    pred.chunks(32).flat_map(warp).collect()
}

/// The slots of `selftest_atomics`, as the host initialises them or reads them back.
#[derive(Debug, Clone)]
struct AtomicSlots {
    i32: Vec<i32>,
    u32: Vec<u32>,
    u64: Vec<u64>,
    f32: Vec<f32>,
}

/// Contended `atomicAdd`/`Min`/`Max`/`Exch`/`CAS` on int, unsigned, 64-bit and float in global
/// memory, and `atomicAdd` on a `__shared__` counter, through `selftest_atomics`.
pub fn atomics(device: &Device) -> Result<Check> {
    let mut report = Report::new("atomics");
    let mut rng = Rng::new(4);
    let carry = (1u64 << 32) - 16; // both 64-bit adds carry into the high word
    for (grid, block, iters) in [(7u32, 96u32, 5i32), (1, 32, 3), (2, 64, 0)] {
        // Initial values: the first case wraps i32[0] and u32[0] and lets the threads win
        // every min/max; the second lets the initial values win them.
        let wins = grid > 1;
        let init = AtomicSlots {
            i32: vec![
                i32::MAX - 1000,
                if wins { -5 } else { -100_000 },
                if wins { 3 } else { 100_000 },
                rng.int(-1_000_000, 1_000_000),
                -1,
                rng.int(-1000, 1000),
                rng.int(-1000, 1000),
            ],
            u32: vec![
                u32::MAX - 100,
                if wins { 7 } else { u32::MAX - 3 },
                if wins { 1000 } else { 2 },
            ],
            u64: vec![carry, carry, rng.next_u64()],
            f32: vec![if wins { 0.5 } else { -3.0 }],
        };
        let got = run_atomics(device, grid, block, iters, &init)?;
        report.case(format!("{grid}x{block}, {iters} iterations"));
        let expected = atomics_expected(&mut report, &init, &got, i64::from(grid * block), iters);
        report.exact("i32 slots", &got.i32, &expected.i32);
        report.exact("u32 slots", &got.u32, &expected.u32);
        report.exact("u64 slots", &got.u64, &expected.u64);
        report.exact("f32 slots", &got.f32, &expected.f32);
    }
    Ok(report.finish())
}

/// Launches `selftest_atomics` on slots initialised to `init`; returns the slots after it.
fn run_atomics(device: &Device, grid: u32, block: u32, iters: i32, init: &AtomicSlots) -> Result<AtomicSlots> {
    let mut i32_slots = device.upload(&init.i32)?;
    let mut u32_slots = device.upload(&init.u32)?;
    let mut u64_slots = device.upload(&init.u64)?;
    let mut f32_slots = device.upload(&init.f32)?;
    let args = KernelArgs::new(device)
        .output("i32_slots", &mut i32_slots)
        .output("u32_slots", &mut u32_slots)
        .output("u64_slots", &mut u64_slots)
        .output("f32_slots", &mut f32_slots)
        .scalar(iters);
    device.launch("selftest_atomics", LaunchConfig::linear(grid, block, 0), args)?;
    Ok(AtomicSlots {
        i32: device.download(&i32_slots)?,
        u32: device.download(&u32_slots)?,
        u64: device.download(&u64_slots)?,
        f32: device.download(&f32_slots)?,
    })
}

/// The slots after `g` threads ran `iters` iterations. The winners of `atomicExch` and of the
/// one-shot `atomicCAS` depend on the order, so those slots are taken from `got` once checked
/// to hold a thread id.
fn atomics_expected(report: &mut Report, init: &AtomicSlots, got: &AtomicSlots, g: i64, iters: i32) -> AtomicSlots {
    let (i, u, ran) = (&init.i32, &init.u32, iters > 0);
    let adds = g * i64::from(iters);
    for slot in [3, 4] {
        if !(0..g).contains(&i64::from(got.i32[slot])) {
            report.fail(format!(
                "i32[{slot}] = {} is not a thread id in [0, {g})",
                got.i32[slot]
            ));
        }
    }
    let exchanged_sum = (g * (g - 1) / 2) as u64;
    AtomicSlots {
        i32: vec![
            i[0].wrapping_add(adds as i32),
            if ran { i[1].min(-(g as i32 - 1)) } else { i[1] },
            if ran { i[2].max(g as i32 - 1) } else { i[2] },
            got.i32[3],
            got.i32[4],
            i[5].wrapping_add(adds as i32),
            i[6] + 1,
        ],
        u32: vec![
            u[0].wrapping_add((2 * adds) as u32),
            if ran { u[1].max(g as u32 - 1) } else { u[1] },
            if ran { u[2].min(5) } else { u[2] },
        ],
        u64: vec![
            init.u64[0].wrapping_add((adds as u64).wrapping_mul((1 << 32) + 1)),
            init.u64[1].wrapping_add(adds as u64),
            // The exchanges form one chain: every id but the last one out is added once,
            // and so is the initial value.
            init.u64[2]
                .wrapping_add(exchanged_sum)
                .wrapping_add(i64::from(i[3]) as u64)
                .wrapping_sub(i64::from(got.i32[3]) as u64),
        ],
        f32: vec![(f64::from(init.f32[0]) + adds as f64) as f32],
    }
}

/// A 16-bit float type the mma kernels take.
trait MmaInput: Element {
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
}
impl MmaInput for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}
impl MmaInput for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

/// f32 inputs of the tf32 self-test: the value the kernel's cvt.rna.tf32.f32 makes of each.
impl MmaInput for f32 {
    fn from_f32(x: f32) -> Self {
        tf32_round(x)
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

/// `cvt.rna.tf32.f32` on the host: the nearest value with 10 explicit mantissa bits (the low 13
/// bits of the f32 pattern zero), ties away from zero, a carry reaching infinity; NaN stays NaN.
fn tf32_round(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    f32::from_bits(x.to_bits().wrapping_add(0x1000) & !0x1fff)
}

/// `mma.m16n8k16` (bf16 and f16) and `mma.m16n8k8` (tf32) with fragments gathered from global
/// memory, and the bf16 product through a 3-stage `cp.async` pipeline and `ldmatrix`, against
/// a CPU GEMM: exact on small integers, within a tolerance growing with k on random values.
pub fn mma(device: &Device) -> Result<Check> {
    let mut report = Report::new("mma");
    let mut rng = Rng::new(5);
    mma_kernel::<bf16>(device, &mut report, &mut rng, "selftest_mma_direct_bf16")?;
    mma_kernel::<f16>(device, &mut report, &mut rng, "selftest_mma_direct_f16")?;
    mma_kernel::<f32>(device, &mut report, &mut rng, "selftest_mma_direct_tf32")?;
    mma_kernel::<bf16>(device, &mut report, &mut rng, "selftest_mma_ldmatrix_bf16")?;
    Ok(report.finish())
}

/// One mma kernel on a few k: pipelines of 1, 2 and 3 tiles and a long one.
fn mma_kernel<T: MmaInput>(device: &Device, report: &mut Report, rng: &mut Rng, kernel: &'static str) -> Result<()> {
    const K_EXACT: [usize; 4] = [16, 32, 48, 256];
    const K_RANDOM: usize = 128;
    let short = kernel.trim_start_matches("selftest_");
    report.case(format!("{short} k={}..{}", K_EXACT[0], K_EXACT[K_EXACT.len() - 1]));
    for k in K_EXACT {
        // |A|, |B| <= 8 and k <= 256: every product and partial sum is exact in f32.
        let (a, bt) = (
            rng.vec(16 * k, |r| r.int(-8, 8) as f32),
            rng.vec(8 * k, |r| r.int(-8, 8) as f32),
        );
        let out = run_mma::<T>(device, kernel, &a, &bt, k)?;
        let expected: Vec<f32> = out.sums.iter().map(|&sum| sum as f32).collect();
        report.exact(&format!("k={k}, integers"), &out.c, &expected);
    }
    let k = K_RANDOM;
    let (a, bt) = (rng.vec(16 * k, Rng::signed_unit), rng.vec(8 * k, Rng::signed_unit));
    let out = run_mma::<T>(device, kernel, &a, &bt, k)?;
    // The products are exact in f32; each of the k f32 additions may round.
    let tolerance: Vec<f64> = out
        .magnitudes
        .iter()
        .map(|&m| 1e-6 + k as f64 * f64::from(f32::EPSILON) * m)
        .collect();
    report.within(&format!("k={k}, random values"), &out.c, &out.sums, &tolerance);
    Ok(())
}

/// An mma self-test's C beside the host's GEMM.
struct MmaOutput {
    c: Vec<f32>,
    /// The exact C, in f64.
    sums: Vec<f64>,
    /// Per element of C, the sum of its products' magnitudes (the scale of rounding errors).
    magnitudes: Vec<f64>,
}

/// Launches a 16 x 8 x k mma self-test on `a` and `bt` rounded to `T`.
fn run_mma<T: MmaInput>(device: &Device, kernel: &'static str, a: &[f32], bt: &[f32], k: usize) -> Result<MmaOutput> {
    let round = |x: &[f32]| -> Vec<T> { x.iter().map(|&v| T::from_f32(v)).collect() };
    let (a, bt) = (round(a), round(bt));
    let (a_dev, bt_dev) = (device.upload(&a)?, device.upload(&bt)?);
    let mut c = device.alloc_zeros::<f32>(16 * 8)?;
    let args = KernelArgs::new(device)
        .input("a", &a_dev)
        .input("b", &bt_dev)
        .output("c", &mut c)
        .scalar(k as i32);
    device.launch(kernel, LaunchConfig::linear(1, 32, 0), args)?;
    let products = |mn: usize| {
        let (row, col) = (&a[(mn / 8) * k..][..k], &bt[(mn % 8) * k..][..k]);
        row.iter().zip(col).map(|(&x, &y)| x.to_f64() * y.to_f64())
    };
    Ok(MmaOutput {
        c: device.download(&c)?,
        sums: (0..16 * 8).map(|mn| products(mn).sum()).collect(),
        magnitudes: (0..16 * 8).map(|mn| products(mn).map(f64::abs).sum()).collect(),
    })
}

/// `ldmatrix.x1/.x2/.x4`, plain and `.trans`, through `selftest_ldmatrix`.
pub fn ldmatrix(device: &Device) -> Result<Check> {
    let mut report = Report::new("ldmatrix");
    let mut rng = Rng::new(6);
    for num in [1usize, 2, 4] {
        for trans in [false, true] {
            let m = rng.vec(num * 64, |r| r.next_u32() as u16);
            let m_dev = device.upload(&m)?;
            let mut out = device.alloc_zeros::<u32>(32 * num)?;
            let args = KernelArgs::new(device)
                .input("m", &m_dev)
                .output("out", &mut out)
                .scalar(num as i32)
                .scalar(i32::from(trans));
            device.launch("selftest_ldmatrix", LaunchConfig::linear(1, 32, 0), args)?;
            report.case(format!("x{num}{}", if trans { ".trans" } else { "" }));
            report.exact("", &device.download(&out)?, &ldmatrix_expected(&m, num, trans));
        }
    }
    Ok(report.finish())
}

/// The registers `ldmatrix.x{num}[.trans]` gives each lane, `m` holding the `num` 8x8
/// matrices row-major, one after the other: out[lane * num + j] is register j of lane.
fn ldmatrix_expected(m: &[u16], num: usize, trans: bool) -> Vec<u32> {
    let register = |lane: usize, j: usize| {
        let (g, t, matrix) = (lane / 4, lane % 4, &m[j * 64..][..64]);
        let at = |r: usize, c: usize| u32::from(matrix[if trans { c * 8 + r } else { r * 8 + c }]);
        at(g, 2 * t) | at(g, 2 * t + 1) << 16
    };
    (0..32)
        .flat_map(|lane| (0..num).map(move |j| register(lane, j)))
        .collect()
}

/// `cp.async` of 16, 8 and 4 bytes, full and zero-filled (`selftest_cp_async`), and two commit
/// groups waited for one at a time (`selftest_cp_async_groups`).
pub fn cp_async(device: &Device) -> Result<Check> {
    let mut report = Report::new("cp_async");
    let mut rng = Rng::new(7);
    // Never the byte the kernels fill shared memory with, so a copy that did not land shows.
    let byte = |r: &mut Rng| match r.next_u32() as u8 {
        0xA5 => 0x5A,
        b => b,
    };
    for (threads, n) in [(32u32, 1usize), (64, 17), (128, 100), (32, 300)] {
        let src = rng.vec(56 * n, byte);
        let dst = run_cp_async("selftest_cp_async", device, threads, &src, n)?;
        report.case(format!("16/8/4-byte copies, {threads} threads, {n} chunks"));
        report.exact("", &dst, &cp_async_expected(&src, n));
    }
    for (threads, n) in [(32u32, 1usize), (64, 33), (128, 200)] {
        let src = rng.vec(32 * n, byte);
        let dst = run_cp_async("selftest_cp_async_groups", device, threads, &src, n)?;
        report.case(format!("two groups, {threads} threads, {n} chunks"));
        report.exact("", &dst, &src);
    }
    Ok(report.finish())
}

/// Both cp.async kernels take (src, dst, n_chunks) and as much shared memory as `src`.
fn run_cp_async(kernel: &'static str, device: &Device, threads: u32, src: &[u8], n: usize) -> Result<Vec<u8>> {
    let src_dev = device.upload(src)?;
    let mut dst = device.alloc_zeros::<u8>(src.len())?;
    let args = KernelArgs::new(device)
        .input("src", &src_dev)
        .output("dst", &mut dst)
        .scalar(n as i32);
    device.launch(kernel, LaunchConfig::linear(1, threads, src.len() as u32), args)?;
    device.download(&dst)
}

/// `selftest_cp_async`'s six regions: chunk c of a region of chunk size z keeps its first
/// src_bytes(c) bytes of `src` and is zero past them.
fn cp_async_expected(src: &[u8], n: usize) -> Vec<u8> {
    let mut dst = vec![0u8; src.len()];
    let mut offset = 0;
    for region in 0..6 {
        let size = 16 >> (region / 2);
        for c in 0..n {
            let src_bytes = if region % 2 == 1 { c % (size + 1) } else { size };
            let at = offset + c * size;
            dst[at..at + src_bytes].copy_from_slice(&src[at..at + src_bytes]);
        }
        offset += size * n;
    }
    dst
}

/// Dynamic shared memory of several sizes, up to 96 KiB (past the 48 KiB default of a GPU),
/// through `selftest_dynamic_shared`.
pub fn dynamic_shared(device: &Device) -> Result<Check> {
    let mut report = Report::new("dynamic_shared");
    for (grid, block, n) in [(1u32, 32u32, 1usize), (3, 256, 1000), (4, 64, 777), (2, 1024, 24_000)] {
        let mut out = device.alloc_zeros::<f32>(grid as usize * n)?;
        let args = KernelArgs::new(device).output("out", &mut out).scalar(n as i32);
        device.launch(
            "selftest_dynamic_shared",
            LaunchConfig::linear(grid, block, 4 * n as u32),
            args,
        )?;
        let expected: Vec<f32> = (0..grid as usize * n)
            .map(|i| (2 * n - 1 - 2 * (i % n)) as f32)
            .collect();
        report.case(format!("{grid}x{block}, {n} floats"));
        report.exact("", &device.download(&out)?, &expected);
    }
    Ok(report.finish())
}

/// `__syncthreads_count`, `_and` and `_or` through `selftest_barrier_reduce`: threads past
/// `active` exit before the barriers and take no part in them, as on sm_70 and newer.
pub fn barrier_reduce(device: &Device) -> Result<Check> {
    let mut report = Report::new("barrier_reduce");
    let mut rng = Rng::new(11);
    for (block, active, density) in [
        (32u32, 32usize, 2),
        (64, 40, 1),
        (256, 256, 0),
        (128, 100, 100),
        (96, 1, 1),
    ] {
        // density 0: all false; 1: all true; n: true with probability 1 - 1/n.
        let pred: Vec<i32> = (0..block)
            .map(|_| i32::from(density == 1 || (density > 1 && rng.int(0, density - 1) != 0)))
            .collect();
        let pred_buf = device.upload(&pred)?;
        let mut out = device.alloc_zeros::<i32>(3 * active)?;
        let args = KernelArgs::new(device)
            .input("pred", &pred_buf)
            .output("out", &mut out)
            .scalar(active as i32);
        device.launch("selftest_barrier_reduce", LaunchConfig::linear(1, block, 0), args)?;
        let count = pred[..active].iter().filter(|&&p| p != 0).count() as i32;
        let expected: Vec<i32> = (0..active)
            .flat_map(|_| [count, i32::from(count == active as i32), i32::from(count > 0)])
            .collect();
        report.case(format!("{block} threads, {active} active, {count} true"));
        report.exact("", &device.download(&out)?, &expected);
    }
    Ok(report.finish())
}

/// `min`/`max` of floats through `selftest_float_minmax`: a NaN loses to a number in either
/// argument order (fminf/fmaxf), signed zeros and infinities included.
pub fn float_minmax(device: &Device) -> Result<Check> {
    let mut report = Report::new("float_minmax");
    let specials = [f32::NAN, 1.0, -1.0, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 3.5];
    let (mut a, mut b) = (vec![], vec![]);
    for &x in &specials {
        for &y in &specials {
            a.push(x);
            b.push(y);
        }
    }
    let n = a.len();
    let (a_buf, b_buf) = (device.upload(&a)?, device.upload(&b)?);
    let mut lo = device.alloc_zeros::<f32>(n)?;
    let mut hi = device.alloc_zeros::<f32>(n)?;
    let args = KernelArgs::new(device)
        .input("a", &a_buf)
        .input("b", &b_buf)
        .output("out_min", &mut lo)
        .output("out_max", &mut hi)
        .scalar(n as i64);
    device.launch("selftest_float_minmax", LaunchConfig::linear(1, n as u32, 0), args)?;
    // Compared up to the sign of zero (fminf(-0, +0) may return either) and NaN payloads.
    let normalize = |v: f32| {
        if v.is_nan() {
            f32::NAN
        } else if v == 0.0 {
            0.0
        } else {
            v
        }
    };
    let expected = |op: fn(f32, f32) -> f32| -> Vec<f32> { (0..n).map(|i| normalize(op(a[i], b[i]))).collect() };
    let got = |buf| -> Result<Vec<f32>> { Ok(device.download(buf)?.into_iter().map(normalize).collect()) };
    report.case(format!("{n} pairs of specials"));
    report.exact("min", &got(&lo)?, &expected(f32::min));
    report.exact("max", &got(&hi)?, &expected(f32::max));
    Ok(report.finish())
}

/// `__float2half_rn` and `__float2bfloat16_rn` (round to nearest even, overflow to infinity,
/// NaN kept) and the exact widenings `__half2float` / `__bfloat162float`, through
/// `selftest_convert_16bit`. The widenings see all 65536 bit patterns; the narrowings see
/// random bit patterns, exact ties, subnormals and the edges of both ranges. A NaN must stay
/// a NaN; its payload is not compared.
pub fn convert_16bit(device: &Device) -> Result<Check> {
    let mut report = Report::new("convert_16bit");
    let mut rng = Rng::new(8);
    for (n, threads) in [(1usize << 16, 256u32), (1001, 128)] {
        let x: Vec<f32> = CONVERSION_EDGES
            .iter()
            .copied()
            .chain(std::iter::repeat_with(|| conversion_input(&mut rng)))
            .take(n)
            .collect();
        let bits: Vec<u16> = (0..n).map(|i| i as u16).collect();
        let (x_dev, bits_dev) = (device.upload(&x)?, device.upload(&bits)?);
        let (mut f16_bits, mut bf16_bits) = (device.alloc_zeros::<u16>(n)?, device.alloc_zeros::<u16>(n)?);
        let (mut f16_wide, mut bf16_wide) = (device.alloc_zeros::<f32>(n)?, device.alloc_zeros::<f32>(n)?);
        let args = KernelArgs::new(device)
            .input("x", &x_dev)
            .input("bits", &bits_dev)
            .scalar(n as i64)
            .output("f16_bits", &mut f16_bits)
            .output("bf16_bits", &mut bf16_bits)
            .output("f16_wide", &mut f16_wide)
            .output("bf16_wide", &mut bf16_wide);
        let blocks = n.div_ceil(threads as usize) as u32;
        device.launch("selftest_convert_16bit", LaunchConfig::linear(blocks, threads, 0), args)?;
        report.case(format!("n={n}"));
        let f16_nan = |b: &u16| f16::from_bits(*b).is_nan().then_some(f16::NAN.to_bits());
        let bf16_nan = |b: &u16| bf16::from_bits(*b).is_nan().then_some(bf16::NAN.to_bits());
        let f32_nan = |v: &f32| v.is_nan().then_some(f32::NAN);
        let narrow_f16: Vec<u16> = x.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        let narrow_bf16: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let wide_f16: Vec<f32> = bits.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
        let wide_bf16: Vec<f32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        for (what, got, expected, nan) in [
            (
                "f32 -> f16",
                device.download(&f16_bits)?,
                narrow_f16,
                &f16_nan as &dyn Fn(&u16) -> Option<u16>,
            ),
            ("f32 -> bf16", device.download(&bf16_bits)?, narrow_bf16, &bf16_nan),
        ] {
            report.exact(what, &any_nan(&got, nan), &any_nan(&expected, nan));
        }
        for (what, got, expected) in [
            ("f16 -> f32", device.download(&f16_wide)?, wide_f16),
            ("bf16 -> f32", device.download(&bf16_wide)?, wide_bf16),
        ] {
            report.exact(what, &any_nan(&got, &f32_nan), &any_nan(&expected, &f32_nan));
        }
    }
    Ok(report.finish())
}

/// `cvt.rna.tf32.f32` through `selftest_convert_tf32`, against the host model (`tf32_round`): the edges of
/// the 16-bit formats, exact ties between tf32 neighbours (they round away from zero), values
/// that carry into the exponent and to infinity, and random bit patterns. A NaN must stay a
/// NaN; its payload is not compared.
pub fn convert_tf32(device: &Device) -> Result<Check> {
    let mut report = Report::new("convert_tf32");
    let mut rng = Rng::new(9);
    let n = 4096;
    let edges = CONVERSION_EDGES.iter().copied().chain([
        f32::from_bits(0x3F80_1000), // 1 + 2^-11: the tie above 1, rounds up to 1 + 2^-10
        f32::from_bits(0xBF80_1000), // its negative: away from zero
        f32::from_bits(0x3F80_0FFF), // just below the tie: rounds to 1
        f32::from_bits(0x3FFF_F000), // the tie below 2: carries into the exponent
        f32::from_bits(0x7F7F_F000), // the tie above the tf32 max: rounds to infinity
        f32::from_bits(0x0000_1000), // a subnormal tie
    ]);
    let x: Vec<f32> = edges
        .chain(std::iter::repeat_with(|| match rng.next_u32() % 2 {
            0 => f32::from_bits(rng.next_u32()),
            _ => f32::from_bits(rng.next_u32() & !0x1fff | 0x1000), // an exact tie
        }))
        .take(n)
        .collect();
    let x_dev = device.upload(&x)?;
    let mut out = device.alloc_zeros::<u32>(n)?;
    let args = KernelArgs::new(device)
        .input("x", &x_dev)
        .scalar(n as i64)
        .output("out", &mut out);
    device.launch(
        "selftest_convert_tf32",
        LaunchConfig::linear(n.div_ceil(256) as u32, 256, 0),
        args,
    )?;
    report.case(format!("n={n}"));
    let nan = |b: &u32| f32::from_bits(*b).is_nan().then_some(f32::NAN.to_bits());
    let expected: Vec<u32> = x.iter().map(|&v| tf32_round(v).to_bits()).collect();
    report.exact(
        "f32 -> tf32",
        &any_nan(&device.download(&out)?, &nan),
        &any_nan(&expected, &nan),
    );
    Ok(report.finish())
}

/// Replaces every NaN (`nan` gives the canonical one) so that NaNs compare equal.
fn any_nan<T: Copy>(values: &[T], nan: &dyn Fn(&T) -> Option<T>) -> Vec<T> {
    values.iter().map(|v| nan(v).unwrap_or(*v)).collect()
}

/// The edges of the 16-bit formats, converted first by `convert_16bit`.
const CONVERSION_EDGES: [f32; 17] = [
    0.0,
    -0.0,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    65504.0,                     // the f16 max
    f32::from_bits(0x477F_EFFF), // just below 65520: rounds down to the f16 max
    65520.0,                     // the tie above the f16 max: rounds to infinity
    f32::MAX,                    // rounds to infinity in bf16 too
    f32::MIN_POSITIVE,           // bf16 keeps the f32 exponent range
    f32::from_bits(0x3380_0000), // 2^-24: the smallest f16 subnormal
    f32::from_bits(0x3300_0000), // 2^-25: the tie between 0 and 2^-24, rounds to 0
    f32::from_bits(0x3340_0000), // 1.5 * 2^-25: rounds up to 2^-24
    f32::from_bits(0x387F_C000), // 1023 * 2^-24: the largest f16 subnormal
    f32::from_bits(0x387F_E000), // 1023.5 * 2^-24: the tie below 2^-14, rounds to the smallest normal
    f32::from_bits(0x3F80_1000), // 1 + 2^-11: the f16 tie above 1, rounds to 1
    f32::from_bits(0x3F80_8000), // 1 + 2^-8: the bf16 tie above 1, rounds to 1
];

/// A value for the narrowing conversions: random bits (any exponent, NaNs and infinities
/// included), an exact tie between two neighbouring f16 or bf16 values, or an f16 subnormal.
fn conversion_input(rng: &mut Rng) -> f32 {
    let draw = rng.next_u32();
    let pattern = rng.next_u32();
    match draw % 4 {
        0 => f32::from_bits(pattern),
        1 => {
            let below = f16::from_bits(pattern as u16 & 0x7bfe); // finite, below the max
            let above = f16::from_bits(below.to_bits() + 1);
            (below.to_f32() + above.to_f32()) / 2.0
        }
        2 => {
            let below = bf16::from_bits(pattern as u16 & 0x7f7e);
            let above = bf16::from_bits(below.to_bits() + 1);
            (below.to_f32() + above.to_f32()) / 2.0
        }
        _ => f32::from_bits(0x3300_0000 + pattern % 0x0580_0000), // 2^-25 .. 2^-14
    }
}

// ------------------------------------------------------------------------------------------

/// Launchers of the kernels with planted bugs (`kernels/planted_bugs.cu`) and of deliberately
/// wrong launches, for the tests that prove the emulator catches them. The bugs are undefined
/// behaviour on a GPU: these launchers refuse any device but the emulator.
#[doc(hidden)]
pub mod planted {
    use super::*;

    pub mod bounds;
    pub mod hopper;
    pub mod races;
    pub mod wgmma;

    /// A planted kernel's output beside what the correct kernel writes.
    #[derive(Debug, Clone)]
    pub struct Outputs<T> {
        pub got: Vec<T>,
        pub expected: Vec<T>,
    }

    impl<T: PartialEq> Outputs<T> {
        /// How many elements differ from the expectation (a NaN always does).
        pub fn differing(&self) -> usize {
            self.got.iter().zip(&self.expected).filter(|(g, e)| g != e).count()
                + self.got.len().abs_diff(self.expected.len())
        }
    }

    fn emulator_only(device: &Device, kernel: &'static str) -> Result<()> {
        if device.kind() == DeviceKind::Emulator {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            argument: "device",
            value: device.description(),
            expected: format!("the CPU emulator: `{kernel}` is never launched on a GPU"),
        })
    }

    /// `planted_missing_syncthreads` (or, `with_sync`, the control `planted_with_syncthreads`):
    /// `y[g] = x[g-1]` within each block of 256 threads, through shared memory. Inputs come from
    /// `seed`: vary it between launches, so stale shared memory never holds the right values.
    pub fn shift(device: &Device, with_sync: bool, blocks: u32, seed: u64) -> Result<Outputs<f32>> {
        let kernel = if with_sync {
            "planted_with_syncthreads"
        } else {
            "planted_missing_syncthreads"
        };
        emulator_only(device, kernel)?;
        let x = Rng::new(seed).vec(256 * blocks as usize, Rng::signed_unit);
        let x_dev = device.upload(&x)?;
        let mut y = device.alloc_zeros::<f32>(x.len())?;
        device.launch(
            kernel,
            LaunchConfig::linear(blocks, 256, 0),
            KernelArgs::new(device).input("x", &x_dev).output("y", &mut y),
        )?;
        let expected = (0..x.len()).map(|g| if g % 256 > 0 { x[g - 1] } else { 0.0 }).collect();
        Ok(Outputs {
            got: device.download(&y)?,
            expected,
        })
    }

    /// `planted_missing_cp_async_wait`: each block rotates its float4s by one through shared
    /// memory filled by cp.async, waiting for the copies only if `do_wait`. The inputs are
    /// finite, so they never equal the emulator's 0xFF fill of shared memory. The outputs
    /// are flattened: four floats a thread.
    pub fn cp_async_stage(
        device: &Device,
        do_wait: bool,
        blocks: u32,
        threads: u32,
        seed: u64,
    ) -> Result<Outputs<f32>> {
        emulator_only(device, "planted_missing_cp_async_wait")?;
        let bd = threads as usize;
        let input = Rng::new(seed).vec(4 * bd * blocks as usize, Rng::signed_unit);
        let input_dev = device.upload(&input)?;
        let mut out = device.alloc_zeros::<f32>(input.len())?;
        device.launch(
            "planted_missing_cp_async_wait",
            LaunchConfig::linear(blocks, threads, 16 * threads),
            KernelArgs::new(device)
                .input("in", &input_dev)
                .output("out", &mut out)
                .scalar(i32::from(do_wait)),
        )?;
        let source = |i: usize| {
            let (g, e) = (i / 4, i % 4);
            let (b, t) = (g / bd, g % bd);
            4 * (b * bd + (t + 1) % bd) + e
        };
        let expected = (0..input.len()).map(|i| input[source(i)]).collect();
        Ok(Outputs {
            got: device.download(&out)?,
            expected,
        })
    }

    /// `planted_missing_syncwarp`: `ldmatrix.x4` of rows that other lanes just wrote to shared
    /// memory, with a `__syncwarp` in between only if `do_sync`.
    pub fn ldmatrix_after_writes(device: &Device, do_sync: bool, seed: u64) -> Result<Outputs<u32>> {
        emulator_only(device, "planted_missing_syncwarp")?;
        let m = Rng::new(seed).vec(4 * 64, |r| r.next_u32() as u16);
        let m_dev = device.upload(&m)?;
        let mut out = device.alloc_zeros::<u32>(32 * 4)?;
        device.launch(
            "planted_missing_syncwarp",
            LaunchConfig::linear(1, 32, 0),
            KernelArgs::new(device)
                .input("m", &m_dev)
                .output("out", &mut out)
                .scalar(i32::from(do_sync)),
        )?;
        Ok(Outputs {
            got: device.download(&out)?,
            expected: ldmatrix_expected(&m, 4, false),
        })
    }

    /// `planted_out_of_bounds_write`: writes one float past the end of a 100-float buffer.
    /// Corrupts the heap unless this is the AddressSanitizer build, which aborts the process.
    pub fn out_of_bounds_write(device: &Device) -> Result<()> {
        emulator_only(device, "planted_out_of_bounds_write")?;
        let n = 100;
        let mut out = device.alloc_zeros::<f32>(n)?;
        let args = KernelArgs::new(device).output("out", &mut out).scalar(n as i32);
        device.launch("planted_out_of_bounds_write", LaunchConfig::linear(1, 128, 0), args)
    }

    /// `planted_static_shared_overrun`: thread 63 writes one float past a static `__shared__`
    /// array. Corrupts memory unless this is the AddressSanitizer build, which aborts the process.
    pub fn static_shared_overrun(device: &Device) -> Result<()> {
        emulator_only(device, "planted_static_shared_overrun")?;
        let mut out = device.alloc_zeros::<f32>(2 * 64)?;
        let args = KernelArgs::new(device).output("out", &mut out);
        device.launch("planted_static_shared_overrun", LaunchConfig::linear(2, 64, 0), args)
    }

    /// `planted_divergent_barrier`: half the warp at `__syncthreads`, half in a full-mask
    /// shuffle; the emulator must report the deadlock.
    pub fn divergent_barrier(device: &Device) -> Result<()> {
        emulator_only(device, "planted_divergent_barrier")?;
        let mut out = device.alloc_zeros::<i32>(32)?;
        let args = KernelArgs::new(device).output("out", &mut out);
        device.launch("planted_divergent_barrier", LaunchConfig::linear(1, 32, 0), args)
    }

    /// `planted_trap`: thread 5 of block 0 executes `__trap()`.
    pub fn trap(device: &Device) -> Result<()> {
        emulator_only(device, "planted_trap")?;
        let (blocks, threads) = (3, 64);
        let mut out = device.alloc_zeros::<i32>((blocks * threads) as usize)?;
        let args = KernelArgs::new(device).output("out", &mut out);
        device.launch("planted_trap", LaunchConfig::linear(blocks, threads, 0), args)
    }

    /// `planted_raw_tf32_operand`: a tf32 mma on raw f32 bit patterns (`raw`), or on values
    /// rounded with cvt.rna.tf32.f32 (the control).
    pub fn raw_tf32_operand(device: &Device, raw: bool) -> Result<()> {
        emulator_only(device, "planted_raw_tf32_operand")?;
        // 1 + 2^-20 has bits below tf32's precision.
        let x = device.upload(&[1.0f32 + 2f32.powi(-20); 32])?;
        let mut out = device.alloc_zeros::<f32>(32)?;
        let args = KernelArgs::new(device)
            .input("x", &x)
            .output("out", &mut out)
            .scalar(i32::from(raw));
        device.launch("planted_raw_tf32_operand", LaunchConfig::linear(1, 32, 0), args)
    }

    /// The accesses of `planted_misaligned_access`, in the kernel's numbering.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum MisalignedAccess {
        Load128,
        Store128,
        CpAsync16Source,
        CpAsync16Destination,
        CpAsync8,
        CpAsync4,
        LdMatrixRow,
        Float2Load,
        U32Store,
        AtomicAdd,
        LdgFloat4,
        Load64,
        Store64,
    }

    impl MisalignedAccess {
        pub const ALL: [MisalignedAccess; 13] = [
            Self::Load128,
            Self::Store128,
            Self::CpAsync16Source,
            Self::CpAsync16Destination,
            Self::CpAsync8,
            Self::CpAsync4,
            Self::LdMatrixRow,
            Self::Float2Load,
            Self::U32Store,
            Self::AtomicAdd,
            Self::LdgFloat4,
            Self::Load64,
            Self::Store64,
        ];

        /// The alignment the GPU requires of the access, in bytes.
        pub fn alignment(self) -> usize {
            match self {
                Self::CpAsync8 | Self::Float2Load | Self::Load64 | Self::Store64 => 8,
                Self::CpAsync4 | Self::U32Store | Self::AtomicAdd => 4,
                _ => 16,
            }
        }
    }

    /// `planted_misaligned_access`: each of 32 lanes makes `access` at `offset` bytes past an
    /// aligned address (`offset` < 16; 0 is the control, which must succeed).
    pub fn misaligned_access(device: &Device, access: MisalignedAccess, offset: usize) -> Result<()> {
        emulator_only(device, "planted_misaligned_access")?;
        check_range("offset", offset, 0..=15)?;
        let mut bytes = device.alloc_zeros::<u8>(1024)?;
        let mut out = device.alloc_zeros::<u32>(32 * 4)?;
        let args = KernelArgs::new(device)
            .output("bytes", &mut bytes)
            .output("out", &mut out)
            .scalar(access as i32)
            .scalar(offset as i32);
        device.launch("planted_misaligned_access", LaunchConfig::linear(1, 32, 0), args)
    }

    /// How [`launch_with_wrong_arguments`] gets `selftest_dynamic_shared(float* out, int n)` wrong.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ArgumentMistake {
        /// Leaves out `n`.
        MissingScalar,
        /// Passes `n` as a 64-bit integer.
        WideScalar,
    }

    /// Launches `selftest_dynamic_shared` with an argument list that does not match its
    /// signature: the emulator must refuse it before running anything.
    pub fn launch_with_wrong_arguments(device: &Device, mistake: ArgumentMistake) -> Result<()> {
        emulator_only(device, "selftest_dynamic_shared with wrong arguments")?;
        let n = 64;
        let mut out = device.alloc_zeros::<f32>(n)?;
        let args = KernelArgs::new(device).output("out", &mut out);
        let args = match mistake {
            ArgumentMistake::MissingScalar => args,
            ArgumentMistake::WideScalar => args.scalar(n as i64),
        };
        device.launch(
            "selftest_dynamic_shared",
            LaunchConfig::linear(1, 32, 4 * n as u32),
            args,
        )
    }

    /// Launches `selftest_dynamic_shared` correctly but with `config` (n = shared_bytes / 4),
    /// for tests of invalid configurations.
    pub fn launch_with_config(device: &Device, config: LaunchConfig) -> Result<()> {
        let n = config.shared_bytes / 4;
        let mut out = device.alloc_zeros::<f32>((config.grid.0 as usize * n as usize).max(1))?;
        let args = KernelArgs::new(device).output("out", &mut out).scalar(n as i32);
        device.launch("selftest_dynamic_shared", config, args)
    }

    /// Launches `selftest_dynamic_shared` on `device` with an output buffer allocated on
    /// `other`: must fail with [`Error::WrongDevice`] before anything runs.
    pub fn launch_with_buffer_from(device: &Device, other: &Device) -> Result<()> {
        let n = 32;
        let mut out = other.alloc_zeros::<f32>(n)?;
        let args = KernelArgs::new(device).output("out", &mut out).scalar(n as i32);
        device.launch(
            "selftest_dynamic_shared",
            LaunchConfig::linear(1, 32, 4 * n as u32),
            args,
        )
    }
}
