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
//!
//! ## Quick start
//!
//! A routed MoE layer (8 experts, 2 per token, SwiGLU experts), forward and backward, on the
//! best device here: the first GPU, or else the CPU emulator (the default feature `emulator`),
//! so this runs on any machine.
//!
//! ```
//! use moe_kernels::Device;
//! use moe_kernels::layers::{HostWeights, MoeConfig, MoeLayer};
//!
//! # fn main() -> moe_kernels::Result<()> {
//! let device = Device::best()?;
//! let config = MoeConfig { experts: 8, k: 2, dim: 16, hidden: 32, max_tokens: 4, ..MoeConfig::default() };
//! let weights = HostWeights::random(&config, 42);
//! let mut layer = MoeLayer::<f32>::new(&device, config, &weights)?;
//!
//! let tokens = 4;
//! let x = device.upload(&vec![0.5f32; tokens * config.dim])?;
//! let mut y = device.alloc_zeros::<f32>(tokens * config.dim)?;
//! layer.forward(&x, tokens, &mut y)?; // no host sync inside
//!
//! let dy = device.upload(&vec![1.0f32; tokens * config.dim])?;
//! let mut dx = device.alloc_zeros::<f32>(tokens * config.dim)?;
//! layer.backward(&x, &dy, &mut dx)?;
//! let dw1 = device.download(&layer.expert_grads().w1)?; // the one host sync
//! assert_eq!(dw1.len(), config.experts * 2 * config.hidden * config.dim);
//! assert!(device.download(&y)?.iter().all(|v| v.is_finite()));
//! # Ok(())
//! # }
//! ```
//!
//! Bad input is an [`Error`] naming the argument, never a panic:
//!
//! ```
//! # use moe_kernels::{Device, Error};
//! # use moe_kernels::layers::{HostWeights, MoeConfig, MoeLayer};
//! # let device = Device::emulator().unwrap();
//! let config = MoeConfig { k: 9, ..MoeConfig::default() }; // 8 experts
//! let weights = HostWeights::random(&MoeConfig::default(), 1);
//! match MoeLayer::<f32>::new(&device, config, &weights) {
//!     Err(Error::InvalidArgument { argument, .. }) => assert_eq!(argument, "k"),
//!     other => panic!("expected an error naming `k`, got {:?}", other.err()),
//! }
//! ```
//!
//! ## Where things are
//!
//! - [`layers`]: what models call: [`MoeLayer`](layers::MoeLayer),
//!   [`ChainOfExperts`](layers::ChainOfExperts), [`VqMoe`](layers::VqMoe), ESFT;
//! - [`ops`]: the kernels one by one (gate, router, dispatch, grouped GEMM, codebook, mix, ESFT),
//!   each taking caller-provided device buffers ([`DeviceSlice`]);
//! - `candle` (feature `candle`): candle `Tensor`s through a layer's forward;
//! - [`checkpoint`]: Hugging Face Mixtral, Qwen3-MoE and DeepSeek-V3 MoE blocks as layers;
//! - [`device`]: the two devices, memory ([`DeviceBuffer`] and its views) and launch counters;
//! - [`report`]: routing reports (load, capacity, transitions, code use, margins, ESFT) read
//!   back after a forward, as text and figures;
//! - [`math`]: the definitions the docs cite as "math §n".
//!
//! ## Cargo features
//!
//! - `emulator` (default): the CPU emulator, so everything runs without a GPU;
//! - `cuda-12080` (default), `cuda-12090`, `cuda-13000`, `cuda-version-from-build-system`: the
//!   CUDA driver API version cudarc binds (exactly one; pick another with
//!   `default-features = false`);
//! - `cuda-dynamic-loading` (default: libcuda is loaded at run time if present),
//!   `cuda-dynamic-linking`, `cuda-static-linking`: how the driver library is found;
//! - `checkpoint` (default): [`checkpoint`], Hugging Face checkpoints (safetensors, memory-mapped,
//!   and `config.json`) loaded into layers;
//! - `figures`: `report::figures`, the routing report's PNG figures (plotters, with an embedded
//!   font); off by default, on for this crate's own tests and examples;
//! - `candle`: `moe_kernels::candle`, a layer's forward on candle 0.11 `Tensor`s (candle's
//!   CPU device through the emulator); `candle-cuda` adds candle's CUDA device, zero copy on
//!   its stream (candle's cudarc needs `cuda-version-from-build-system` and
//!   `cuda-dynamic-linking` in place of the defaults);
//! - `dev-tools`: this crate's development tooling (CPU references, self-tests, kernel report,
//!   benchmark tables) and the test-only kernels; not part of the API.
//!
//! GPU kernels are compiled when `build.rs` finds nvcc (`NVCC`, `CUDA_HOME`, PATH or a pip
//! `nvidia-cuda-nvcc`); without it the crate builds emulator-only, with a warning.
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "checkpoint")]
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod layers;
pub mod ops;
pub mod report;

#[doc = include_str!("../docs/math.md")]
pub mod math {}

// Development tooling (feature `dev-tools`, on for this crate's own tests, examples and benches).
#[cfg(feature = "dev-tools")]
pub mod benchmarks;
#[cfg(feature = "dev-tools")]
pub mod kernel_report;
#[cfg(feature = "dev-tools")]
pub mod reference;
#[cfg(feature = "dev-tools")]
pub mod selftest;

pub use device::{
    BufferView, BufferViewMut, Device, DeviceBuffer, DeviceKind, DeviceSlice, DeviceSliceMut, Element, Graph,
};
pub use error::{Error, Result};
