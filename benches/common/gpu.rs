//! Timing on a GPU: CUDA events around each call, warm-up first, the L2 flushed before every
//! call by reading a buffer twice its size, and the median with p10 and p90 of the samples.
//! Small ops are timed replayed from a graph too (`record_graph`), as a decode loop that
//! captures its step runs them.
use super::blas::Blas;
use super::floors::Floor;
use super::inputs;
use super::stats::{Timing, summarize};
use cudarc::driver::CudaSlice;
use cudarc::driver::sys::{CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, CUevent_flags};
use moe_kernels::benchmarks::{OURS, Record};
use moe_kernels::{Device, DeviceBuffer};
use std::cell::RefCell;

/// Columns of the flush GEMV: it writes `flush / FLUSH_COLS` floats, a sliver of L2.
const FLUSH_COLS: usize = 1024;
/// Calls before timing: module loads, cuBLAS's heuristics and clock ramp stay out.
const WARM_UP: usize = 3;
/// Samples per op: as many as fit in [`SAMPLE_SECONDS`], within these bounds.
const MIN_SAMPLES: usize = 10;
const MAX_SAMPLES: usize = 50;
const SAMPLE_SECONDS: f64 = 0.25;

/// One GPU's timer and cuBLAS handle, made once per bench.
pub struct Gpu {
    pub device: Device,
    pub blas: Blas,
    flush: DeviceBuffer<f32>,
    flush_x: CudaSlice<f32>,
    /// Written by every flush: behind a `RefCell` so that timing takes `&self` and a timed
    /// closure can borrow [`Gpu::blas`].
    flush_y: RefCell<CudaSlice<f32>>,
}

impl Gpu {
    /// `None` on any device but a GPU. Panics when cuBLAS cannot be loaded on a GPU: the
    /// flush, the ceilings and the peers need it, and a run without them would mislead.
    pub fn new(device: &Device) -> Option<Self> {
        let Device::Cuda(cuda) = device else { return None };
        let stream = cuda.stream().clone();
        let l2 = stream
            .context()
            .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .expect("L2 size") as usize;
        let floats = (2 * l2 / 4).max(FLUSH_COLS << 10).next_multiple_of(FLUSH_COLS);
        let blas = Blas::new(stream.clone()).unwrap_or_else(|e| panic!("{e}: the benches need it on a GPU"));
        Some(Self {
            device: device.clone(),
            blas,
            flush: inputs::random(device, floats, 0xf1, 1.0),
            flush_x: stream.clone_htod(&vec![1.0f32; FLUSH_COLS]).expect("flush x"),
            flush_y: RefCell::new(stream.alloc_zeros(floats / FLUSH_COLS).expect("flush y")),
        })
    }

    /// Evicts what the previous call left in L2 by reading twice its size.
    pub fn flush_l2(&self) {
        let flush = cuda(&self.flush);
        let rows = flush.len() / FLUSH_COLS;
        let mut y = self.flush_y.borrow_mut();
        self.blas.gemv_f32((rows, FLUSH_COLS), flush, &self.flush_x, &mut *y);
    }

    /// The median, p10 and p90 GPU time of one call of `run`, each from a cold L2.
    pub fn time(&self, mut run: impl FnMut()) -> Timing {
        let Device::Cuda(cuda) = &self.device else {
            unreachable!("a GPU")
        };
        let stream = cuda.stream().clone();
        let event = || {
            stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .expect("event")
        };
        let mut timed = || {
            self.flush_l2();
            let start = event();
            run();
            (start, event())
        };
        for _ in 0..WARM_UP {
            timed();
        }
        let (start, end) = timed();
        let first = start.elapsed_ms(&end).expect("elapsed") as f64 / 1e3;
        let samples = ((SAMPLE_SECONDS / first.max(1e-6)) as usize).clamp(MIN_SAMPLES, MAX_SAMPLES);
        let events: Vec<_> = (0..samples).map(|_| timed()).collect();
        self.device.synchronize().expect("sync");
        summarize(
            events
                .iter()
                .map(|(start, end)| start.elapsed_ms(end).expect("elapsed") as f64 / 1e3)
                .collect(),
        )
    }

    /// Times `run` as `implementation` of `op` on `shape`, prints a readable line and the
    /// [`Record`] line, and returns the timing.
    pub fn record(&self, op: &str, shape: &str, implementation: &str, floor: Floor, run: impl FnMut()) -> Timing {
        let t = self.time(run);
        let record = Record {
            op: op.into(),
            shape: shape.into(),
            implementation: implementation.into(),
            median_us: t.median * 1e6,
            p10_us: t.p10 * 1e6,
            p90_us: t.p90 * 1e6,
            floor_bytes: floor.bytes,
            floor_flops: floor.flops,
        };
        println!(
            "{op} {shape} [{implementation}] on {}: median {:.2} us (p10 {:.2}, p90 {:.2}); {}",
            self.device.description(),
            record.median_us,
            record.p10_us,
            record.p90_us,
            floor.describe()
        );
        println!("{}", record.to_line());
        t
    }

    /// [`record`](Self::record) of `pass` replayed from a graph (`Device::capture`, after one
    /// eager run that loads its modules): each timed call is one replay, the single submission a
    /// decode loop that captures its step pays instead of a launch latency per kernel.
    pub fn record_graph(
        &self,
        op: &str,
        shape: &str,
        implementation: &str,
        floor: Floor,
        mut pass: impl FnMut(),
    ) -> Timing {
        pass();
        let graph = self
            .device
            .capture(|| {
                pass();
                Ok(())
            })
            .expect("capture");
        // SAFETY: every buffer `pass` touches is borrowed by it, so alive and unmoved while
        // `graph` is replayed here, on the device that captured it.
        self.record(op, shape, implementation, floor, || {
            unsafe { self.device.replay(&graph) }.expect("replay")
        })
    }

    /// [`record`](Self::record) for this crate's own implementation.
    pub fn report(&self, op: &str, shape: &str, floor: Floor, run: impl FnMut()) -> Timing {
        self.record(op, shape, OURS, floor, run)
    }
}

/// The cudarc slice of a buffer on a GPU (for cuBLAS).
pub fn cuda<T: moe_kernels::Element>(buffer: &DeviceBuffer<T>) -> &CudaSlice<T> {
    match buffer {
        DeviceBuffer::Cuda(s) => s,
        DeviceBuffer::Host(_) => panic!("a GPU buffer expected"),
    }
}

pub fn cuda_mut<T: moe_kernels::Element>(buffer: &mut DeviceBuffer<T>) -> &mut CudaSlice<T> {
    match buffer {
        DeviceBuffer::Cuda(s) => s,
        DeviceBuffer::Host(_) => panic!("a GPU buffer expected"),
    }
}
