//! The candle integration (`moe_kernels::candle`) on candle's CPU device, which runs on the
//! emulator: every layer's forward on a candle tensor equals, bitwise, the same layer's forward
//! on device buffers; the MoE layer's also matches the reference; shapes, offsets and bad
//! tensors.
mod common;

use candle_core::{DType, Device as CandleDevice, IndexOp, Tensor};
use common::{Rng, Tolerance, assert_close};
use half::bf16;
use moe_kernels::candle::{CandleElement, TokenLayer, device_for, forward};
use moe_kernels::layers::{ChainOfExperts, HostWeights, MoeConfig, MoeLayer, VqMoe};
use moe_kernels::ops::FloatElement;
use moe_kernels::reference::layers as reference;
use moe_kernels::{DeviceKind, Error};

fn config() -> MoeConfig {
    MoeConfig {
        experts: 4,
        k: 2,
        dim: 16,
        hidden: 32,
        max_tokens: 8,
        ..MoeConfig::default()
    }
}

/// `[2, 3, d]` random values of T on candle's CPU device, and the same values as f32.
fn input<T: CandleElement>(seed: u64) -> (Tensor, Vec<f32>) {
    let d = config().dim;
    let x: Vec<T> = Rng::new(seed)
        .normals(6 * d, 1.0)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let as_f32 = x.iter().map(|v| v.to_f32()).collect();
    (Tensor::from_vec(x, (2, 3, d), &CandleDevice::Cpu).unwrap(), as_f32)
}

/// `layer`'s forward on `x` through candle, and on device buffers holding the same values.
fn both<T: CandleElement>(layer: &mut impl TokenLayer<T>, x: &Tensor) -> (Vec<T>, Vec<T>) {
    let y = forward(layer, x).unwrap();
    assert_eq!((y.dims(), y.dtype(), y.device().is_cpu()), (x.dims(), T::DTYPE, true));
    let device = layer.device().clone();
    let host: Vec<T> = x.flatten_all().unwrap().to_vec1().unwrap();
    let x_buffer = device.upload(&host).unwrap();
    let mut y_buffer = device.alloc_zeros::<T>(host.len()).unwrap();
    let tokens = host.len() / layer.config().dim;
    layer.forward(&x_buffer, tokens, &mut y_buffer).unwrap();
    (
        y.flatten_all().unwrap().to_vec1().unwrap(),
        device.download(&y_buffer).unwrap(),
    )
}

fn bits<T: FloatElement>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

#[test]
fn candles_cpu_device_is_the_emulator() {
    assert_eq!(device_for(&CandleDevice::Cpu).unwrap().kind(), DeviceKind::Emulator);
}

#[test]
fn moe_layer_forward_on_a_tensor_is_the_layers_forward_and_the_reference() {
    let device = device_for(&CandleDevice::Cpu).unwrap();
    let config = config();
    let weights = HostWeights::random(&config, 3).rounded::<bf16>(&config);
    let mut layer = MoeLayer::<bf16>::new(&device, config, &weights).unwrap();
    let (x, x_f32) = input::<bf16>(11);
    let (through_candle, direct) = both(&mut layer, &x);
    assert_eq!(bits(&through_candle), bits(&direct));
    let expected = reference::moe_forward(&config, &weights, &x_f32, 6, None, &|v| bf16::from_f64(v).to_f32());
    let got: Vec<f32> = through_candle.iter().map(|v| v.to_f32()).collect();
    assert_close("y", &got, &expected.y, Tolerance::of::<bf16>());
}

#[test]
fn chain_and_vq_forwards_on_a_tensor_are_the_layers_forwards() {
    let device = device_for(&CandleDevice::Cpu).unwrap();
    let (x, _) = input::<f32>(12);
    let mut chain = ChainOfExperts::<f32>::random(&device, config(), 2, 5).unwrap();
    let (through_candle, direct) = both(&mut chain, &x);
    assert_eq!(bits(&through_candle), bits(&direct));
    let mut vq = VqMoe::<f32>::random(&device, config(), 6).unwrap();
    let (through_candle, direct) = both(&mut vq, &x);
    assert_eq!(bits(&through_candle), bits(&direct));
}

#[test]
fn a_contiguous_slice_of_a_tensor_is_read_from_its_offset() {
    let device = device_for(&CandleDevice::Cpu).unwrap();
    let mut layer = MoeLayer::<f32>::random(&device, config(), 8).unwrap();
    let (x, _) = input::<f32>(13);
    let second = x.i(1).unwrap(); // [3, d], starting 3·d elements in
    let alone = second.copy().unwrap();
    let y_slice: Vec<f32> = forward(&mut layer, &second)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let y_alone: Vec<f32> = forward(&mut layer, &alone)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(bits(&y_slice), bits(&y_alone));
}

#[test]
fn bad_tensors_are_errors_naming_x() {
    let device = device_for(&CandleDevice::Cpu).unwrap();
    let mut layer = MoeLayer::<f32>::random(&device, config(), 9).unwrap();
    let d = config().dim;
    let shape_error = |result: moe_kernels::Result<Tensor>, says: &str| match result {
        Err(Error::Shape {
            argument: "x",
            expected,
            got,
        }) => {
            assert!(format!("{expected} {got}").contains(says), "{expected} / {got}")
        }
        other => panic!(
            "expected a shape error naming x, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    };
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &CandleDevice::Cpu).unwrap();
    shape_error(forward(&mut layer, &zeros(&[4, d], DType::BF16)), "BF16");
    shape_error(forward(&mut layer, &zeros(&[4, d + 1], DType::F32)), "d = 16");
    shape_error(
        forward(&mut layer, &zeros(&[d, 4], DType::F32).t().unwrap()),
        "contiguous",
    );
    // Too many tokens for the layer: its own error, naming `tokens`.
    match forward(&mut layer, &zeros(&[config().max_tokens + 1, d], DType::F32)) {
        Err(Error::InvalidArgument { argument: "tokens", .. }) => {}
        other => panic!(
            "expected an error naming tokens, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    }
}
