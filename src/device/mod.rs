//! The two devices a kernel runs on, behind one launch path.
//!
//! - [`CudaDevice`]: a GPU through cudarc; the kernels come from the fatbins embedded at
//!   build time.
//! - [`EmulatorDevice`]: the CPU; the same kernels compiled as host C++ (`kernels/emu`).
//!
//! An op validates its inputs, builds a [`LaunchConfig`] and a [`KernelArgs`], and calls
//! `Device::launch` with the kernel's name: that call is the only place where the devices
//! differ. Every device counts its launches and host transfers ([`DeviceStats`]) so tests
//! can assert an op's launch budget and that it never syncs the host.
pub mod cuda;
#[cfg(feature = "emulator")]
pub mod emulator;
pub mod graph;
pub mod launch;
pub mod memory;
pub mod profile;
pub mod registry;
pub mod tensor_map;
pub mod view;

pub use cuda::CudaDevice;
#[cfg(feature = "emulator")]
pub use emulator::{EmulatorDevice, Schedule};
pub use graph::Graph;
pub use launch::{KernelArgs, LaunchConfig};
pub use memory::{DeviceBuffer, DeviceSlice, DeviceSliceMut, Element, HostBuffer};
pub use tensor_map::{Swizzle, TensorMap, TensorMapSpec};
pub use view::{BufferView, BufferViewMut};

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Which kind of device something lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cuda,
    Emulator,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cuda => "the CUDA device",
            DeviceKind::Emulator => "the CPU emulator",
        }
    }
}

/// Counts of what a device was asked to do since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Kernel launches.
    pub launches: u64,
    /// Host-to-device copies (uploads).
    pub host_to_device: u64,
    /// Device-to-host copies (downloads); each one waits for the stream.
    pub device_to_host: u64,
    /// Explicit stream synchronizations, downloads included: the host waited for the device.
    pub host_syncs: u64,
    /// Stream-ordered memsets ([`Device::fill_zeros`]): not kernel launches, but queued work.
    pub memsets: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    launches: AtomicU64,
    host_to_device: AtomicU64,
    device_to_host: AtomicU64,
    host_syncs: AtomicU64,
    memsets: AtomicU64,
    /// The configuration of each kernel's latest launch (for occupancy reports).
    configs: Mutex<BTreeMap<String, LaunchConfig>>,
    /// Whether stream work is being captured into a graph ([`Device::capture`]).
    capture: Mutex<graph::CaptureState>,
}

impl Counters {
    fn bump(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed)
    }
    fn snapshot(&self) -> DeviceStats {
        DeviceStats {
            launches: self.launches.load(Ordering::Relaxed),
            host_to_device: self.host_to_device.load(Ordering::Relaxed),
            device_to_host: self.device_to_host.load(Ordering::Relaxed),
            host_syncs: self.host_syncs.load(Ordering::Relaxed),
            memsets: self.memsets.load(Ordering::Relaxed),
        }
    }
}

/// A device that runs this crate's kernels. Cheap to clone (shared handles).
///
/// Memory moves with [`upload`](Self::upload) and [`download`](Self::download); only downloads
/// (and [`synchronize`](Self::synchronize)) wait for the device, and [`stats`](Self::stats)
/// counts them:
///
/// ```
/// use moe_kernels::Device;
///
/// # fn main() -> moe_kernels::Result<()> {
/// let device = Device::emulator()?; // or Device::best(): a GPU when there is one
/// let mut buffer = device.upload(&[1.0f32, 2.0, 3.0, 4.0])?;
/// device.fill_zeros(&mut buffer.slice_mut(1..3)?)?; // stream-ordered, no host sync
/// assert_eq!(device.stats().host_syncs, 0);
/// assert_eq!(device.download(&buffer)?, [1.0, 0.0, 0.0, 4.0]);
/// assert_eq!(device.stats().host_syncs, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub enum Device {
    Cuda(CudaDevice),
    #[cfg(feature = "emulator")]
    Emulator(EmulatorDevice),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description())
    }
}

impl Device {
    /// The first GPU, or an error saying why there is none usable.
    pub fn cuda() -> Result<Self> {
        CudaDevice::new(0).map(Device::Cuda)
    }

    /// The CPU emulator, configured from the environment (see [`EmulatorDevice::from_env`]).
    pub fn emulator() -> Result<Self> {
        #[cfg(feature = "emulator")]
        return EmulatorDevice::from_env().map(Device::Emulator);
        #[cfg(not(feature = "emulator"))]
        Err(Error::EmulatorUnavailable)
    }

    /// The best device here: the first GPU if there is one, else the emulator. When neither
    /// can be had, the error carries both reasons ([`Error::NoDevice`]).
    pub fn best() -> Result<Self> {
        Self::cuda().or_else(|cuda| {
            Self::emulator().map_err(|emulator| Error::NoDevice {
                cuda: Box::new(cuda),
                emulator: Box::new(emulator),
            })
        })
    }

    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Cuda(_) => DeviceKind::Cuda,
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => DeviceKind::Emulator,
        }
    }

    /// A one-line human description ("NVIDIA H100 (sm_90)", "CPU emulator (...)").
    pub fn description(&self) -> String {
        match self {
            Device::Cuda(d) => d.description(),
            #[cfg(feature = "emulator")]
            Device::Emulator(d) => d.description(),
        }
    }

    /// The most dynamic shared memory one block may use on this device.
    pub fn max_dynamic_shared_bytes(&self) -> u32 {
        match self {
            Device::Cuda(d) => d.max_dynamic_shared_bytes(),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => emulator::MAX_DYNAMIC_SHARED_BYTES,
        }
    }

    /// The ceiling for kernel `name`: the device's, except that on the emulator a kernel named
    /// `*_sm90_*` (sm_90a code, launched only on sm_90 GPUs) gets sm_90's 227 KiB rather than
    /// the oldest target's.
    fn max_dynamic_shared_bytes_for(&self, name: &str) -> u32 {
        match self {
            #[cfg(feature = "emulator")]
            Device::Emulator(_) if name.contains("_sm90_") => emulator::SM90_MAX_DYNAMIC_SHARED_BYTES,
            _ => self.max_dynamic_shared_bytes(),
        }
    }

    /// Whether this device runs sm_90a code (wgmma, TMA, setmaxnreg): the emulator, or a GPU of
    /// compute capability 9.x.
    pub fn runs_sm90a(&self) -> bool {
        match self {
            Device::Cuda(d) => d.arch() / 10 == 9,
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => true,
        }
    }

    /// Streaming multiprocessors: how many CTAs a persistent kernel (one per SM) launches. The
    /// emulator reports 3, so that persistent kernels walk several tiles per CTA in tests.
    pub fn multiprocessors(&self) -> u32 {
        match self {
            Device::Cuda(d) => d.multiprocessors(),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => emulator::MULTIPROCESSORS,
        }
    }

    fn counters(&self) -> &Arc<Counters> {
        match self {
            Device::Cuda(d) => &d.counters,
            #[cfg(feature = "emulator")]
            Device::Emulator(d) => &d.counters,
        }
    }

    /// The configuration of every kernel's latest launch on this device, by kernel name.
    pub fn launch_configs(&self) -> BTreeMap<String, LaunchConfig> {
        self.counters()
            .configs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Launches, copies and host syncs so far.
    pub fn stats(&self) -> DeviceStats {
        self.counters().snapshot()
    }

    pub(crate) fn cuda_stream(&self) -> Option<&Arc<cudarc::driver::CudaStream>> {
        match self {
            Device::Cuda(d) => Some(d.stream()),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => None,
        }
    }

    /// A zeroed buffer of `len` elements; `Err` when that many cannot be allocated.
    pub fn alloc_zeros<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        memory::byte_len::<T>(len)?;
        self.refuse_while_capturing("alloc_zeros")?;
        match self {
            Device::Cuda(d) => Ok(DeviceBuffer::Cuda(d.stream().alloc_zeros(len)?)),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(DeviceBuffer::Host(HostBuffer::zeroed(len)?)),
        }
    }

    /// A new buffer holding a copy of `host` (stream-ordered; counted as a host-to-device copy).
    pub fn upload<T: Element>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        self.refuse_while_capturing("upload")?;
        Counters::bump(&self.counters().host_to_device);
        match self {
            Device::Cuda(d) => Ok(DeviceBuffer::Cuda(d.stream().clone_htod(host)?)),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => {
                let mut buffer = HostBuffer::zeroed(host.len())?;
                buffer.as_mut_slice().copy_from_slice(host);
                Ok(DeviceBuffer::Host(buffer))
            }
        }
    }

    /// Copies `host` into the existing buffer `dst` (same length), stream-ordered; counted as a
    /// host-to-device copy. This is how new inputs reach the buffers of a captured graph.
    pub fn upload_into<T: Element>(&self, host: &[T], dst: &mut impl DeviceSliceMut<T>) -> Result<()> {
        self.refuse_while_capturing("upload_into")?;
        if host.len() != dst.len() {
            return Err(Error::Shape {
                argument: "dst",
                expected: format!("{} elements (host.len())", host.len()),
                got: format!("{} elements", dst.len()),
            });
        }
        let (ptr, _guard) = dst.kernel_ptr_mut(self, "dst")?;
        Counters::bump(&self.counters().host_to_device);
        match self {
            Device::Cuda(d) => d.upload_into(host, ptr),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => {
                // SAFETY: on the emulator a kernel pointer is a live, writable host address of
                // `dst.len()` = `host.len()` elements, borrowed mutably for this call.
                unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), ptr as *mut T, host.len()) };
                Ok(())
            }
        }
    }

    /// Sets every element of `buffer` to zero bits, stream-ordered (no host sync). Ops use it
    /// to clear accumulators and counters before the kernels that add into them.
    pub fn fill_zeros<T: Element>(&self, buffer: &mut impl DeviceSliceMut<T>) -> Result<()> {
        let bytes = buffer.len() * size_of::<T>();
        let (ptr, _guard) = buffer.kernel_ptr_mut(self, "buffer")?;
        if bytes == 0 {
            return Ok(());
        }
        match self.record(|| graph::Recorded::Memset { ptr, bytes }) {
            graph::Captured::Recorded => return Ok(()),
            graph::Captured::ByStream => {}
            graph::Captured::No => {
                Counters::bump(&self.counters().memsets);
            }
        }
        match self {
            Device::Cuda(d) => d.fill_zeros(ptr, bytes),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => {
                // SAFETY: on the emulator a kernel pointer is a live, writable host address of
                // `buffer.len()` elements, borrowed mutably for this call.
                unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
                Ok(())
            }
        }
    }

    /// Copies `data` back to the host. This waits for the device: a host sync, counted.
    pub fn download<T: Element>(&self, data: &impl DeviceSlice<T>) -> Result<Vec<T>> {
        self.refuse_while_capturing("download")?;
        let len = data.len();
        let (ptr, _guard) = data.kernel_ptr(self, "data")?;
        Counters::bump(&self.counters().device_to_host);
        Counters::bump(&self.counters().host_syncs);
        match self {
            Device::Cuda(d) => d.download(ptr, len),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => {
                // SAFETY: on the emulator a kernel pointer is a live host address of `len` elements.
                Ok(unsafe { std::slice::from_raw_parts(ptr as *const T, len) }.to_vec())
            }
        }
    }

    /// Waits for all queued work (a host sync, counted). The emulator runs launches to
    /// completion, so there it only counts.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_while_capturing("synchronize")?;
        Counters::bump(&self.counters().host_syncs);
        match self {
            Device::Cuda(d) => Ok(d.stream().synchronize()?),
            #[cfg(feature = "emulator")]
            Device::Emulator(_) => Ok(()),
        }
    }

    /// Launches the kernel `name` (its `extern "C"` symbol) with `args` in its parameter
    /// order. Crate-internal: ops validate their inputs before they get here.
    pub(crate) fn launch(&self, name: &str, config: LaunchConfig, mut args: KernelArgs<'_>) -> Result<()> {
        args.check()?;
        config
            .validate(
                registry::static_shared_bytes(name),
                self.max_dynamic_shared_bytes_for(name),
            )
            .map_err(|reason| Error::InvalidLaunch {
                kernel: name.into(),
                reason,
            })?;
        let record = || graph::Recorded::Launch {
            name: name.to_string(),
            config,
            values: args.values.clone(),
            sizes: args.sizes.clone(),
        };
        let _launch_index = match self.record(record) {
            graph::Captured::Recorded => return Ok(()),
            graph::Captured::ByStream => 0,
            graph::Captured::No => Counters::bump(&self.counters().launches),
        };
        let mut configs = self.counters().configs.lock().unwrap_or_else(|e| e.into_inner());
        match configs.get_mut(name) {
            Some(c) => *c = config,
            None => drop(configs.insert(name.to_string(), config)),
        }
        drop(configs);
        match self {
            Device::Cuda(d) => d.launch(name, config, &mut args),
            #[cfg(feature = "emulator")]
            Device::Emulator(d) => d.launch(name, config, &mut args, _launch_index),
        }
    }
}

/// The devices tests run on, and why any were left out.
pub struct DeviceList {
    pub devices: Vec<Device>,
    /// Devices that are not available, with the reason (for "skipped" messages).
    pub skipped: Vec<(DeviceKind, String)>,
}

/// Every device available here: the emulator (when compiled in) and the first GPU (when
/// there is one and the build has GPU kernels). With `MOE_REQUIRE_GPU=1` a missing GPU is
/// an error instead of a skip.
pub fn available_devices() -> Result<DeviceList> {
    let mut list = DeviceList {
        devices: vec![],
        skipped: vec![],
    };
    match Device::emulator() {
        Ok(d) => list.devices.push(d),
        Err(e) => list.skipped.push((DeviceKind::Emulator, e.to_string())),
    }
    match Device::cuda() {
        Ok(d) => list.devices.push(d),
        Err(e) if std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1") => return Err(e),
        Err(e) => list.skipped.push((DeviceKind::Cuda, e.to_string())),
    }
    Ok(list)
}
