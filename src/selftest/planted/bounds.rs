//! Launcher for `planted_array_overrun` (`kernels/planted_bugs.cu`): an array of known size
//! indexed past its end, which the emulator's bounds checks must turn into a launch failure.
use super::*;

/// `planted_array_overrun`: each of 32 threads reads element `index` of its local array
/// (10 t + i) or, with `shared`, of a static shared array (i). `index` outside 0..8 is the bug.
pub fn array_overrun(device: &Device, index: i32, shared: bool) -> Result<Outputs<i32>> {
    emulator_only(device, "planted_array_overrun")?;
    let mut out = device.alloc_zeros::<i32>(32)?;
    device.launch(
        "planted_array_overrun",
        LaunchConfig::linear(1, 32, 0),
        KernelArgs::new(device)
            .output("out", &mut out)
            .scalar(index)
            .scalar(i32::from(shared)),
    )?;
    let expected = (0..32).map(|t| if shared { index } else { 10 * t + index }).collect();
    Ok(Outputs {
        got: device.download(&out)?,
        expected,
    })
}
