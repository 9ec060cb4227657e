//! 64-bit offsets: T·k·d > 2^31 elements in the permuted rows.
use super::common::{Tolerance, assert_close, devices};
use half::bf16;
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::dispatch;
use moe_kernels::reference::dispatch as reference;
use moe_kernels::{Device, DeviceBuffer};

/// The rows of a buffer as f32, without a copy on the emulator (the permuted buffer is 4 GiB).
fn with_host_view<T: FloatElement, R>(device: &Device, buffer: &DeviceBuffer<T>, f: impl FnOnce(&[T]) -> R) -> R {
    match buffer {
        DeviceBuffer::Host(h) => f(h.as_slice()),
        DeviceBuffer::Cuda(_) => f(&device.download(buffer).unwrap()),
    }
}

#[test]
#[cfg_attr(
    any(moe_emu_asan, moe_emu_profile),
    ignore = "4 GiB of rows: checked by the plain and shuffled runs; the instrumented builds would take minutes over it"
)]
fn permute_and_combine_use_64_bit_row_offsets() {
    // rows · d = (2^23 + 32) · 256 > 2^31: Xp is 4 GiB of bf16.
    let (k, d) = (32usize, 256usize);
    let tokens = (1usize << 18) + 1;
    let slots = tokens * k;
    assert!(slots * d > 1 << 31);
    // A map with every slot kept: token-major rows reversed within each block of 8 rows, so
    // the gather really permutes.
    let sorted_rows: Vec<i32> = (0..slots).map(|r| (r ^ 7) as i32).collect();
    let mut inverse = vec![0i32; slots];
    for (r, &s) in sorted_rows.iter().enumerate() {
        inverse[s as usize] = r as i32;
    }
    let value = |t: usize, c: usize| ((t * 31 + c * 7) % 251) as f32 - 125.0; // exact in bf16
    let token_row = |t: usize| -> Vec<f32> { (0..d).map(|c| value(t, c)).collect() };
    for device in devices() {
        let x: Vec<bf16> = (0..tokens * d).map(|i| bf16::from_f32(value(i / d, i % d))).collect();
        let x_d = device.upload(&x).unwrap();
        drop(x);
        let sorted_d = device.upload(&sorted_rows).unwrap();
        let inverse_d = device.upload(&inverse).unwrap();
        let mut xp = device.alloc_zeros::<bf16>(slots * d).unwrap();
        dispatch::permute(&device, &x_d, &sorted_d, &inverse_d, tokens, k, d, &mut xp).unwrap();
        // Rows spread over the buffer, the last ones past 2^31 elements included.
        let sample: Vec<usize> = (0..64).map(|i| i * (slots / 64) + i).chain(slots - 9..slots).collect();
        with_host_view(&device, &xp, |xp| {
            for &r in &sample {
                let got: Vec<f32> = xp[r * d..(r + 1) * d].iter().map(|v| v.to_f32()).collect();
                assert_eq!(got, token_row(sorted_rows[r] as usize / k), "row {r}");
            }
        });
        // The combine reads the rows back through inverse: y[t] = sum_j xp[inverse[t, j]] + x[t],
        // and every one of those rows is x[t].
        let mut y = device.alloc_zeros::<bf16>(tokens * d).unwrap();
        let no_weights: Option<&DeviceBuffer<f32>> = None;
        dispatch::combine(&device, &xp, &inverse_d, no_weights, Some(&x_d), tokens, k, d, &mut y).unwrap();
        drop(xp);
        let y = device.download(&y).unwrap();
        for t in (0..tokens).step_by(tokens / 61).chain(tokens - 3..tokens) {
            let got: Vec<f32> = y[t * d..(t + 1) * d].iter().map(|v| v.to_f32()).collect();
            let want = reference::combine(&token_row(t), &vec![0; k], None, Some(&token_row(t)), 1, k, d);
            assert_close(&format!("combine row {t}"), &got, &want, Tolerance::BF16);
        }
    }
}
