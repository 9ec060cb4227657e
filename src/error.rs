//! The crate's one error type. Bad input and missing hardware are `Err`, never a panic.

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable CUDA driver or GPU on this machine (the reason says which).
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    /// The crate was built without nvcc, so it carries no GPU code.
    #[error("this build has no GPU kernels ({0}); set NVCC or install nvidia-cuda-nvcc and rebuild")]
    NoGpuKernels(&'static str),
    /// The GPU is older than the oldest architecture the kernels were compiled for.
    #[error("GPU compute capability sm_{found} is not supported: the kernels need sm_{needed} or newer")]
    UnsupportedGpu { found: u32, needed: u32 },
    /// An error reported by the CUDA driver.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// The emulator was not compiled in (cargo feature `emulator`).
    #[error("the CPU emulator is not part of this build (enable the cargo feature `emulator`)")]
    EmulatorUnavailable,
    /// Memory profiling needs the profiling build of the emulator.
    #[error("memory profiling needs the profiling build: rebuild with MOE_EMU_PROFILE=1 (and clang-19 installed)")]
    ProfilingUnavailable,
    /// Neither device could be had ([`Device::best`](crate::Device::best)): why not, for each.
    #[error("no device: the GPU: {cuda}; the emulator: {emulator}")]
    NoDevice { cuda: Box<Error>, emulator: Box<Error> },
    /// An environment variable that configures the crate has a value it cannot use.
    #[error("environment variable {name}={value}: expected {expected}")]
    Environment {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A kernel name that this build does not contain (an internal inconsistency).
    #[error("kernel `{0}` is not part of this build")]
    KernelNotFound(String),
    /// The argument list given to a kernel does not match its signature.
    #[error("kernel `{kernel}`: {detail}")]
    KernelSignature { kernel: String, detail: String },
    /// A launch configuration outside the device's limits (an op chose it: a crate bug).
    #[error("kernel `{kernel}`: launch configuration refused: {reason}")]
    InvalidLaunch { kernel: String, reason: String },
    /// A launch was rejected or failed while running (emulator: deadlock, `__trap`, ...).
    #[error("kernel launch failed: {0}")]
    LaunchFailed(String),
    /// A buffer handed to an op lives on another device than the one running it.
    #[error("argument `{argument}` lives on {found}, but the op runs on {expected}")]
    WrongDevice {
        argument: &'static str,
        expected: &'static str,
        found: &'static str,
    },
    /// An argument has the wrong shape or length.
    #[error("argument `{argument}`: expected {expected}, got {got}")]
    Shape {
        argument: &'static str,
        expected: String,
        got: String,
    },
    /// A checkpoint that cannot be read or does not fit the layer: `name` is the tensor, file or
    /// `config.json` field concerned.
    #[error("checkpoint: `{name}`: {problem}")]
    Checkpoint { name: String, problem: String },
    /// A report or figure file that could not be written: `path` names it.
    #[error("report: `{path}`: {problem}")]
    Report { path: String, problem: String },
    /// candle refused something ([`candle`](crate::candle), feature `candle`).
    #[cfg(feature = "candle")]
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// An argument's value is outside what the op supports.
    #[error("argument `{argument}` = {value}: expected {expected}")]
    InvalidArgument {
        argument: &'static str,
        value: String,
        expected: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
