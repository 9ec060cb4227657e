//! The CUDA device: a cudarc context and stream, modules loaded from the fatbins that
//! `build.rs` embedded, and a function cache.
use super::launch::{KernelArgs, LaunchConfig};
use super::registry;
use super::{Counters, Element};
use crate::{Error, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The default limit on dynamic shared memory; a launch above it must opt in per function.
const DEFAULT_DYNAMIC_SHARED_LIMIT: u32 = 48 * 1024;

/// A GPU and the stream this crate's work is ordered on.
#[derive(Clone)]
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    arch: u32,
    name: String,
    max_dynamic_shared_bytes: u32,
    multiprocessors: u32,
    functions: Arc<Mutex<FunctionCache>>,
    pub(super) counters: Arc<Counters>,
}

#[derive(Default)]
struct FunctionCache {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<String, (CudaFunction, u32)>, // function, dynamic shared memory opted into
}

impl CudaDevice {
    /// GPU `ordinal` with a new stream. Errors (never panics) when this build has no GPU
    /// kernels, when libcuda is missing, when there is no such GPU, or when it is too old.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::check_prerequisites()?;
        let ctx = CudaContext::new(ordinal)?;
        Self::from_stream(ctx.new_stream()?)
    }

    /// Runs this crate's work on a stream the caller already has.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        Self::check_prerequisites()?;
        let ctx = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        let arch = (major * 10 + minor) as u32;
        let needed = registry::TARGET_ARCHS[0];
        if arch < needed {
            return Err(Error::UnsupportedGpu { found: arch, needed });
        }
        let name = ctx.name()?;
        let optin = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let multiprocessors = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(Self {
            stream,
            arch,
            name,
            max_dynamic_shared_bytes: optin as u32,
            multiprocessors: multiprocessors as u32,
            functions: Arc::default(),
            counters: Arc::default(),
        })
    }

    fn check_prerequisites() -> Result<()> {
        if !registry::gpu_kernels_built() {
            return Err(Error::NoGpuKernels(registry::GPU_BUILD_NOTE));
        }
        // cudarc panics on first use when libcuda cannot be loaded: look first. (Linked at build
        // time instead, the library is there or the program would not have started.)
        // SAFETY: only tries to open the library.
        #[cfg(feature = "cuda-dynamic-loading")]
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::CudaUnavailable(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        Ok(())
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Compute capability as a number (90 for sm_90).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// The opt-in ceiling on dynamic shared memory per block.
    pub fn max_dynamic_shared_bytes(&self) -> u32 {
        self.max_dynamic_shared_bytes
    }

    /// Streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    pub fn description(&self) -> String {
        format!("{} (sm_{})", self.name, self.arch)
    }

    /// The loaded function for `name`, opted into `shared_bytes` of dynamic shared memory.
    fn function(&self, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((f, opted)) = cache.functions.get(name)
            && (shared_bytes <= DEFAULT_DYNAMIC_SHARED_LIMIT || shared_bytes <= *opted)
        {
            return Ok(f.clone());
        }
        let module_name = registry::module_of(name).ok_or_else(|| Error::KernelNotFound(name.into()))?;
        let module = match cache.modules.get(module_name) {
            Some(m) => m.clone(),
            None => {
                let fatbin = registry::MODULES
                    .iter()
                    .find(|m| m.name == module_name)
                    .ok_or_else(|| Error::KernelNotFound(name.into()))?
                    .fatbin;
                let m = self
                    .stream
                    .context()
                    .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))?;
                cache.modules.insert(module_name, m.clone());
                m
            }
        };
        let f = module.load_function(name)?;
        if shared_bytes > DEFAULT_DYNAMIC_SHARED_LIMIT {
            f.set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )?;
        }
        cache.functions.insert(name.to_string(), (f.clone(), shared_bytes));
        Ok(f)
    }

    pub(super) fn launch(&self, name: &str, config: LaunchConfig, args: &mut KernelArgs<'_>) -> Result<()> {
        let f = self.function(name, config.shared_bytes)?;
        let mut params = args.param_pointers();
        // SAFETY: the op that built `args` matched them to the kernel's parameter list (and
        // the emulator checks that match on every test); pointers are live device memory of
        // this context, guarded by `args` until the launch is enqueued.
        unsafe {
            result::launch_kernel(
                f.cu_function(),
                config.grid,
                config.block,
                config.shared_bytes,
                self.stream.cu_stream(),
                &mut params,
            )?;
        }
        Ok(())
    }

    pub(super) fn fill_zeros(&self, ptr: u64, bytes: usize) -> Result<()> {
        // SAFETY: `ptr` addresses `bytes` bytes of device memory on this stream's context,
        // borrowed mutably by the caller.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream())? };
        Ok(())
    }

    pub(super) fn upload_into<T: Element>(&self, host: &[T], ptr: u64) -> Result<()> {
        if !host.is_empty() {
            // SAFETY: `ptr` addresses `host.len()` elements of device memory on this stream's
            // context, borrowed mutably by the caller; the driver stages pageable host memory
            // before this returns.
            unsafe { result::memcpy_htod_async(ptr, host, self.stream.cu_stream())? };
        }
        Ok(())
    }

    pub(super) fn download<T: Element>(&self, ptr: u64, len: usize) -> Result<Vec<T>> {
        let mut host = vec![T::zeroed(); len];
        if len > 0 {
            // SAFETY: `ptr` addresses `len` elements of device memory on this stream's context.
            unsafe { result::memcpy_dtoh_async(&mut host, ptr, self.stream.cu_stream())? };
        }
        self.stream.synchronize()?;
        Ok(host)
    }
}
