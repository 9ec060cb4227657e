//! # moe-kernels
//!
//! Hand-written CUDA kernels for Mixture-of-Experts layers, driven from safe Rust.
//!
//! Every kernel in `kernels/*.cu` runs on two devices from one source:
//! - [`Device::Cuda`]: a GPU through cudarc, from fatbins that `build.rs` compiled with nvcc;
//! - [`Device::Emulator`]: the CPU, where the same source was compiled as host C++ against
//!   an emulation of the CUDA execution model (every CUDA thread a fiber). This is how the
//!   kernels are executed and tested on machines without a GPU.
//!
//! Ops validate their arguments, choose a launch configuration and build the kernel's
//! argument list once; only the final launch differs per device (see [`device`]).
pub mod device;
pub mod error;
pub mod layers;
pub mod ops;

// Development tooling (feature `dev-tools`, on for this crate's own tests, examples and benches).
#[cfg(feature = "dev-tools")]
pub mod benchmarks;
#[cfg(feature = "dev-tools")]
pub mod kernel_report;
#[cfg(feature = "dev-tools")]
pub mod reference;
#[cfg(feature = "dev-tools")]
pub mod selftest;

pub use device::{BufferView, BufferViewMut, Device, DeviceBuffer, DeviceKind, DeviceSlice, DeviceSliceMut, Element};
pub use error::{Error, Result};
