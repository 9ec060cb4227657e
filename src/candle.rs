//! candle `Tensor`s through a layer's forward (feature `candle`).
//!
//! ```
//! # fn main() -> moe_kernels::Result<()> {
//! use candle_core::{DType, Device as CandleDevice, Tensor};
//! use moe_kernels::candle::{device_for, forward};
//! use moe_kernels::layers::{MoeConfig, MoeLayer};
//!
//! let candle = CandleDevice::Cpu; // or `CandleDevice::new_cuda(0)?` with feature `candle-cuda`
//! let device = device_for(&candle)?; // the emulator here; candle's own stream on a GPU
//! let config = MoeConfig { experts: 8, k: 2, dim: 64, hidden: 128, max_tokens: 16, ..MoeConfig::default() };
//! let mut layer = MoeLayer::<f32>::random(&device, config, 7)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &candle)?;
//! let y = forward(&mut layer, &x)?; // 6 tokens, the shape of x
//! assert_eq!((y.dims(), y.dtype()), (x.dims(), DType::F32));
//! # Ok(())
//! # }
//! ```
//!
//! Where the tensors live decides the path, and the layer must live there too
//! ([`device_for`] builds its [`Device`]):
//! - **candle's CUDA device** (feature `candle-cuda`): zero copy. The input's `CudaSlice` is
//!   handed to the layer as it is, the output is allocated on candle's stream and becomes the
//!   returned tensor's storage, and the layer's device runs on that same stream, so candle's
//!   later work is ordered after the layer's without any sync.
//! - **candle's CPU device**: the emulator. x is copied into an emulator buffer and y copied
//!   back into a new CPU tensor (both are host memory; the copies are the price of the
//!   emulator's own allocator). This is how the integration is tested without a GPU.
//!
//! The forward is inference-style: the returned tensor carries no candle backward op (the
//! layer's own `backward` computes its gradients from the same pass).
use crate::layers::{ChainOfExperts, MoeConfig, MoeLayer, VqMoe};
use crate::ops::FloatElement;
use crate::{Device, DeviceBuffer, DeviceKind, DeviceSlice, DeviceSliceMut, Error, Result};
use candle_core::{Storage, Tensor, WithDType};

/// An element type both sides know: `f32`, `half::f16` and `half::bf16`.
pub trait CandleElement: FloatElement + WithDType + CudaElement {}
impl CandleElement for f32 {}
impl CandleElement for half::f16 {}
impl CandleElement for half::bf16 {}

/// What candle's CUDA storage needs of an element type (nothing without `candle-cuda`).
#[cfg(feature = "candle-cuda")]
#[doc(hidden)]
pub use candle_core::cuda_backend::CudaDType as CudaElement;
#[cfg(not(feature = "candle-cuda"))]
#[doc(hidden)]
pub trait CudaElement {}
#[cfg(not(feature = "candle-cuda"))]
impl<T> CudaElement for T {}

/// The device a layer must be built on to take `candle`'s tensors: the emulator for candle's
/// CPU device, and (feature `candle-cuda`) a CUDA device on candle's own stream.
pub fn device_for(candle: &candle_core::Device) -> Result<Device> {
    match candle {
        candle_core::Device::Cpu => Device::emulator(),
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(cuda) => crate::device::CudaDevice::from_stream(cuda.cuda_stream()).map(Device::Cuda),
        other => Err(Error::InvalidArgument {
            argument: "device",
            value: format!("{:?}", other.location()),
            expected: if cfg!(feature = "candle-cuda") {
                "candle's CPU or CUDA device".into()
            } else {
                "candle's CPU device (its CUDA device needs the feature `candle-cuda`)".into()
            },
        }),
    }
}

/// A layer whose forward maps `[tokens, d]` to `[tokens, d]`: [`MoeLayer`], [`ChainOfExperts`]
/// and [`VqMoe`].
pub trait TokenLayer<T: FloatElement> {
    fn device(&self) -> &Device;
    fn config(&self) -> &MoeConfig;
    fn forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()>;
}

macro_rules! token_layer {
    ($($layer:ident),*) => {$(
        impl<T: FloatElement> TokenLayer<T> for $layer<T> {
            fn device(&self) -> &Device {
                $layer::device(self)
            }
            fn config(&self) -> &MoeConfig {
                $layer::config(self)
            }
            fn forward(&mut self, x: &impl DeviceSlice<T>, tokens: usize, y: &mut impl DeviceSliceMut<T>) -> Result<()> {
                $layer::forward(self, x, tokens, y)
            }
        }
    )*};
}
token_layer!(MoeLayer, ChainOfExperts, VqMoe);

/// `layer`'s forward on `x` (`[..., d]`, contiguous, of dtype `T`; its leading dimensions are
/// the tokens): a new tensor of x's shape on x's device. No host sync on a GPU.
pub fn forward<T: CandleElement, L: TokenLayer<T>>(layer: &mut L, x: &Tensor) -> Result<Tensor> {
    let d = layer.config().dim;
    let shape = || format!("{:?} {:?}", x.dims(), x.dtype());
    if x.dtype() != T::DTYPE || x.dims().last() != Some(&d) {
        return Err(Error::Shape {
            argument: "x",
            expected: format!("[..., d = {d}] {:?}", T::DTYPE),
            got: shape(),
        });
    }
    let (storage, layout) = x.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(Error::Shape {
            argument: "x",
            expected: "a contiguous tensor (call `.contiguous()` first)".into(),
            got: format!("{} with strides {:?}", shape(), layout.stride()),
        });
    };
    let tokens = (end - start) / d;
    match &*storage {
        Storage::Cpu(cpu) => {
            let device = on(layer.device(), DeviceKind::Emulator, "candle's CPU device")?;
            let host: &[T] = cpu.as_slice()?;
            let x_device = device.upload(&host[start..end])?;
            let mut y: DeviceBuffer<T> = device.alloc_zeros(end - start)?;
            layer.forward(&x_device, tokens, &mut y)?;
            Ok(Tensor::from_vec(
                device.download(&y)?,
                x.shape(),
                &candle_core::Device::Cpu,
            )?)
        }
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(cuda) => {
            let Device::Cuda(device) = on(layer.device(), DeviceKind::Cuda, "candle's CUDA device")? else {
                unreachable!("`on` checked the kind")
            };
            let candle = cuda.device().clone();
            if device.stream().cu_stream() != candle.cuda_stream().cu_stream() {
                return Err(Error::WrongDevice {
                    argument: "x",
                    expected: "the layer's stream (build the layer on `device_for(x.device())`)",
                    found: "another CUDA stream",
                });
            }
            let input = cuda.as_cuda_slice::<T>()?.slice(start..end);
            let mut y = device.stream().alloc_zeros::<T>(end - start)?;
            layer.forward(&input, tokens, &mut y)?;
            let storage = Storage::Cuda(candle_core::cuda_backend::CudaStorage::wrap_cuda_slice(y, candle));
            Ok(Tensor::from_storage(
                storage,
                x.shape(),
                candle_core::op::BackpropOp::none(),
                false,
            ))
        }
        #[allow(unreachable_patterns)] // every variant is handled with `candle-cuda` but Metal
        _ => Err(Error::WrongDevice {
            argument: "x",
            expected: if cfg!(feature = "candle-cuda") {
                "candle's CPU or CUDA device"
            } else {
                "candle's CPU device"
            },
            found: "another candle device",
        }),
    }
}

/// A handle on `device` (a cheap clone), if it is of `kind`: the layer must live where candle's
/// tensors do.
fn on(device: &Device, kind: DeviceKind, tensors: &'static str) -> Result<Device> {
    if device.kind() == kind {
        Ok(device.clone())
    } else {
        Err(Error::WrongDevice {
            argument: "layer",
            expected: tensors,
            found: device.kind().name(),
        })
    }
}
