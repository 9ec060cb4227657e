//! Runs every self-test kernel on the best device here (a GPU if there is one, else the
//! CPU emulator) and prints what each one proved.
//!
//!     cargo run --release --example selftest
//!
//! Each check launches one kernel from `kernels/selftest.cu` that exercises a CUDA
//! primitive (barriers, shuffles, votes, atomics, tensor-core mma, ldmatrix, cp.async,
//! dynamic shared memory) and compares its output with a host computation.
use moe_kernels::device::{Device, registry};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let device = match Device::cuda() {
        Ok(gpu) => gpu,
        Err(why) => {
            println!("no GPU: {why}");
            match Device::emulator() {
                Ok(emulator) => emulator,
                Err(e) => {
                    eprintln!("no emulator either: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    println!("device: {}", device.description());
    println!("GPU kernels in this build: {}", registry::GPU_BUILD_NOTE);
    let start = Instant::now();
    let checks = match moe_kernels::selftest::run_all(&device) {
        Ok(checks) => checks,
        Err(e) => {
            eprintln!("self-test could not run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let elapsed = start.elapsed();
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in &checks {
        let verdict = if c.passed { "pass" } else { "FAIL" };
        println!("  {verdict}  {:width$}  {}", c.name, c.detail);
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    let stats = device.stats();
    println!(
        "{} checks, {failed} failed; {} kernel launches in {:.1} ms wall time ({})",
        checks.len(),
        stats.launches,
        elapsed.as_secs_f64() * 1e3,
        match device.kind() {
            moe_kernels::DeviceKind::Cuda => "GPU, including host transfers",
            moe_kernels::DeviceKind::Emulator => "CPU emulation: not a GPU speed",
        }
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
