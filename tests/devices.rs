//! The device layer itself: creation never panics, memory round-trips, counters count.
use half::{bf16, f16};
use moe_kernels::device::{Device, DeviceKind, DeviceStats, available_devices};
use moe_kernels::{DeviceSlice, Element, Error};

fn devices() -> Vec<Device> {
    let list = available_devices().expect("device list");
    for (kind, why) in &list.skipped {
        eprintln!("skipped {}: {why}", kind.name());
    }
    list.devices
}

#[test]
fn cuda_device_is_an_error_not_a_panic_when_unavailable() {
    let result = std::panic::catch_unwind(Device::cuda).expect("Device::cuda must not panic");
    match result {
        Ok(d) => assert_eq!(d.kind(), DeviceKind::Cuda),
        Err(Error::CudaUnavailable(_) | Error::NoGpuKernels(_) | Error::Driver(_) | Error::UnsupportedGpu { .. }) => {}
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

#[test]
fn best_device_exists_and_describes_itself() {
    let d = Device::best().expect("the emulator is always there in default builds");
    assert!(!d.description().is_empty());
}

fn round_trip<T: Element + PartialEq + std::fmt::Debug>(device: &Device, data: &[T]) {
    let buffer = device.upload(data).unwrap();
    assert_eq!(DeviceSlice::len(&buffer), data.len());
    assert_eq!(device.download(&buffer).unwrap(), data);
}

#[test]
fn memory_round_trips_every_element_type() {
    for d in devices() {
        round_trip(&d, &[1.5f32, -0.0, f32::INFINITY]);
        round_trip(&d, &[f16::from_f32(0.1), f16::MAX]);
        round_trip(&d, &[bf16::from_f32(-3.0), bf16::MIN_POSITIVE]);
        round_trip(&d, &[i32::MIN, 0, i32::MAX]);
        round_trip(&d, &[u64::MAX, 7]);
        round_trip(&d, &[0u8, 255]);
        round_trip::<f32>(&d, &[]);
        let zeros = d.alloc_zeros::<f64>(1000).unwrap();
        assert!(d.download(&zeros).unwrap().iter().all(|&v| v == 0.0));
    }
}

#[test]
fn emulator_buffers_are_aligned_like_device_allocations() {
    let d = Device::emulator().unwrap();
    for len in [0, 1, 3, 1000] {
        let b = d.alloc_zeros::<u16>(len).unwrap();
        match &b {
            moe_kernels::DeviceBuffer::Host(h) => assert_eq!(h.as_slice().as_ptr() as usize % 256, 0),
            moe_kernels::DeviceBuffer::Cuda(_) => unreachable!("emulator buffers live on the host"),
        }
    }
}

#[test]
fn counters_count_transfers_syncs_and_memsets() {
    for d in devices() {
        let before = d.stats();
        let mut b = d.upload(&[1u32, 2, 3]).unwrap();
        d.download(&b).unwrap();
        d.synchronize().unwrap();
        d.fill_zeros(&mut b).unwrap();
        let mut empty = d.alloc_zeros::<u32>(0).unwrap();
        d.fill_zeros(&mut empty).unwrap(); // nothing to clear: no memset
        let after = d.stats();
        assert_eq!(
            after,
            DeviceStats {
                launches: before.launches,
                host_to_device: before.host_to_device + 1,
                device_to_host: before.device_to_host + 1,
                host_syncs: before.host_syncs + 2,
                memsets: before.memsets + 1,
            }
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run `cargo test -- --include-ignored` where there is one"]
fn a_buffer_of_one_device_is_refused_by_the_other() {
    let list = devices();
    let (Some(cuda), Some(emu)) = (
        list.iter().find(|d| d.kind() == DeviceKind::Cuda),
        list.iter().find(|d| d.kind() == DeviceKind::Emulator),
    ) else {
        panic!("this test needs both a GPU and the emulator");
    };
    let on_gpu = cuda.upload(&[1.0f32]).unwrap();
    assert!(matches!(
        emu.download(&on_gpu),
        Err(Error::WrongDevice { argument: "data", .. })
    ));
    let on_host = emu.upload(&[1.0f32]).unwrap();
    assert!(matches!(
        cuda.download(&on_host),
        Err(Error::WrongDevice { argument: "data", .. })
    ));
}

#[test]
fn fill_zeros_clears_exactly_the_buffer() {
    for d in devices() {
        let mut buffer = d.upload(&[1u32, 2, 3, 4]).unwrap();
        let syncs = d.stats().host_syncs;
        d.fill_zeros(&mut buffer).unwrap();
        assert_eq!(d.stats().host_syncs, syncs, "fill_zeros must not sync the host");
        assert_eq!(d.download(&buffer).unwrap(), vec![0; 4]);
        let mut empty = d.alloc_zeros::<f32>(0).unwrap();
        d.fill_zeros(&mut empty).unwrap();
    }
}
