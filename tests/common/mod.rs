//! What every op-family test file shares: the devices to run on, a seeded generator of
//! inputs, and the math §9 comparison of a device's output with the reference.
//! Each test file includes it with `mod common;` and uses what it needs.
#![allow(dead_code)]

use moe_kernels::device::{Device, available_devices};
use moe_kernels::{BufferView, BufferViewMut, DeviceBuffer, Element, Error};
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Every device available here (the emulator, and a GPU when there is one). Prints why a
/// device was skipped; `MOE_REQUIRE_GPU=1` turns a missing GPU into a failure.
pub fn devices() -> Vec<Device> {
    let list = available_devices().expect("device list");
    for (kind, why) in &list.skipped {
        eprintln!("skipped {}: {why}", kind.name());
    }
    list.devices
}

/// The crate's seeded generator (ChaCha8, the `rand` family), with the draws tests use. The
/// same seed gives the same inputs everywhere, so a failing case replays.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(ChaCha8Rng::seed_from_u64(seed))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }
    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        if lo < hi { self.0.random_range(lo..hi) } else { lo }
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform(f32::MIN_POSITIVE, 1.0) as f64;
        let u2 = self.uniform(0.0, 1.0) as f64;
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
    pub fn normals(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.normal() * scale).collect()
    }
}

/// math §9: per element `|got - ref| <= atol + rtol * |ref|`, and per tensor
/// `||got - ref|| <= rtol * ||ref|| + atol * sqrt(n)`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub const F32: Tolerance = Tolerance { atol: 1e-5, rtol: 1e-5 };
    pub const F16: Tolerance = Tolerance { atol: 1e-3, rtol: 1e-3 };
    pub const BF16: Tolerance = Tolerance { atol: 1e-2, rtol: 1e-2 };

    /// The tolerance of values stored as `T` (by its kernel name: f32, f16, bf16).
    pub fn of<T: moe_kernels::Element>() -> Tolerance {
        match T::NAME {
            "f16" => Tolerance::F16,
            "bf16" => Tolerance::BF16,
            _ => Tolerance::F32,
        }
    }

    /// For a reduction over `k` terms: atol grows like sqrt(k) * eps.
    pub fn over(self, k: usize) -> Tolerance {
        Tolerance {
            atol: self.atol * (k.max(1) as f64).sqrt(),
            rtol: self.rtol,
        }
    }

    pub fn scaled(self, factor: f64) -> Tolerance {
        Tolerance {
            atol: self.atol * factor,
            rtol: self.rtol * factor,
        }
    }
}

/// Panics with the worst elements unless `got` matches `reference` within `tol`. NaN must
/// meet NaN and an infinity the same infinity.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], reference: &[f64], tol: Tolerance) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    let mut bad = vec![];
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        let g = g as f64;
        if !r.is_finite() || !g.is_finite() {
            let same = (r.is_nan() && g.is_nan()) || r == g;
            if !same {
                bad.push((i, g, r));
            }
            continue;
        }
        let d = (g - r).abs();
        diff2 += d * d;
        ref2 += r * r;
        if d > tol.atol + tol.rtol * r.abs() {
            bad.push((i, g, r));
        }
    }
    let norm_ok = diff2.sqrt() <= tol.rtol * ref2.sqrt() + tol.atol * (got.len() as f64).sqrt();
    if !bad.is_empty() || !norm_ok {
        let shown: Vec<String> = bad
            .iter()
            .take(8)
            .map(|(i, g, r)| format!("[{i}] got {g} want {r}"))
            .collect();
        panic!(
            "{what}: {} of {} elements outside atol {} rtol {}; |diff| {} vs |ref| {}; {}",
            bad.len(),
            got.len(),
            tol.atol,
            tol.rtol,
            diff2.sqrt(),
            ref2.sqrt(),
            shown.join(", ")
        );
    }
}

/// `Err` naming `argument` (Shape or InvalidArgument), and nothing launched.
#[track_caller]
pub fn assert_refused(device: &Device, argument: &str, op: impl FnOnce() -> moe_kernels::Result<()>) {
    let launches = device.stats().launches;
    match op() {
        Err(Error::Shape { argument: a, .. } | Error::InvalidArgument { argument: a, .. }) => {
            assert_eq!(a, argument, "the error names the wrong argument")
        }
        other => panic!("expected an error naming {argument}, got {other:?}"),
    }
    assert_eq!(
        device.stats().launches,
        launches,
        "{argument}: launched after a refusal"
    );
}

/// A buffer whose data starts `offset` elements in, like a cudarc view of a bigger tensor:
/// for 16-bit elements an odd offset is 2 bytes off every 16-byte boundary (device buffers
/// themselves start 256-byte aligned). The padding before the data is zeros.
pub struct AtOffset<T: Element> {
    pub buffer: DeviceBuffer<T>,
    pub offset: usize,
}

impl<T: Element> AtOffset<T> {
    pub fn upload(device: &Device, data: &[T], offset: usize) -> Self {
        let mut padded = vec![<T as bytemuck::Zeroable>::zeroed(); offset];
        padded.extend_from_slice(data);
        AtOffset {
            buffer: device.upload(&padded).expect("upload"),
            offset,
        }
    }

    pub fn zeros(device: &Device, len: usize, offset: usize) -> Self {
        AtOffset {
            buffer: device.alloc_zeros(offset + len).expect("alloc"),
            offset,
        }
    }

    pub fn view(&self) -> BufferView<'_, T> {
        self.buffer.slice(self.offset..).expect("view")
    }

    pub fn view_mut(&mut self) -> BufferViewMut<'_, T> {
        self.buffer.slice_mut(self.offset..).expect("view")
    }

    /// The view's elements; the padding before them must still be zeros (nothing wrote
    /// outside the view).
    pub fn download(&self, device: &Device) -> Vec<T> {
        let all = device.download(&self.buffer).expect("download");
        let zero = <T as bytemuck::Zeroable>::zeroed();
        assert!(
            all[..self.offset]
                .iter()
                .all(|v| bytemuck::bytes_of(v) == bytemuck::bytes_of(&zero)),
            "a write landed before the view"
        );
        all[self.offset..].to_vec()
    }
}

/// The element offset of argument number `i` of a call whose buffers are views at `off`: 0
/// for every argument when `off` is 0, else offsets in 1..=7 (never a whole 16 bytes of a
/// 16-bit type) that differ between neighbouring arguments.
pub fn view_offset(off: usize, i: usize) -> usize {
    if off == 0 { 0 } else { 1 + (off + 2 * i) % 7 }
}
